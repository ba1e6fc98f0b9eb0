"""`hm`: the H&M Personalized Fashion Recommendations files.

transactions_train.csv (t_dat YYYY-MM-DD, customer_id, article_id, ...; 31M rows, scanned
lazily so only the needed columns and rows, on/after `since`, are loaded), articles.csv
(article_id, prod_name, detail_desc and descriptive name columns) and
images/0XX/0XXXXXXXXX.jpg. Article ids are kept as 10-digit zero-padded strings (the CSVs
may hold them with or without the leading zero); a timestamp is the date at 00:00 UTC.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import polars as pl

from .base import BadValues, RawSource, ReadableRows, SourceError, joined_text, read_table, require_columns, require_file

ARTICLE_ID = r"^\d{1,10}$"


@dataclass(frozen=True)
class HMOptions:
    transactions_file: str = "transactions_train.csv"
    articles_file: str = "articles.csv"
    images_dir: str = "images"
    since: str | None = None  # "YYYY-MM-DD": keep only transactions on or after this date
    text_columns: tuple[str, ...] = ("product_type_name", "colour_group_name", "graphical_appearance_name", "detail_desc")

    def validate(self) -> None:
        if self.since is not None:
            try:
                date.fromisoformat(self.since)
            except ValueError:
                raise ValueError(f"since: expected a date YYYY-MM-DD, got {self.since!r}") from None


def article_keys(frame: pl.DataFrame, column: str, readable: ReadableRows, reason: str) -> pl.Series:
    """10-digit zero-padded article ids; other values are unreadable (their rows are dropped)."""
    ids = frame[column].str.strip_chars()
    valid = pl.when(ids.str.contains(ARTICLE_ID)).then(ids.str.zfill(10))
    return readable.check(column, frame[column], frame.select(valid).to_series(), reason, "an article id of up to 10 digits")


def read_transactions(path: Path, since: str | None) -> tuple[pl.DataFrame, list[BadValues]]:
    require_file(path, "transactions file")
    try:
        scan = pl.scan_csv(path, infer_schema=False, row_index_name="row", row_index_offset=1)
        require_columns(scan.head(0).collect(), ["t_dat", "customer_id", "article_id"], path)
        day = pl.col("t_dat").str.strip_chars().str.to_date("%Y-%m-%d", strict=False)
        query = scan.select("row", "t_dat", "customer_id", "article_id", day.alias("day"))
        if since is not None:  # unparseable dates pass the filter so that they are reported below
            query = query.filter(pl.col("day").is_null() | (pl.col("day") >= date.fromisoformat(since)))
        frame = query.collect()
    except pl.exceptions.PolarsError as err:
        raise SourceError(f"{path}: cannot read ({type(err).__name__}: {err})") from err
    readable = ReadableRows(path, frame.height, rows=frame["row"])
    readable.check("t_dat", frame["t_dat"], frame["day"], "bad_timestamp", "a date YYYY-MM-DD")
    interactions = pl.DataFrame(
        {
            "user_key": frame["customer_id"],
            "item_key": article_keys(frame, "article_id", readable, "bad_item"),
            "timestamp": frame["day"].dt.epoch("s"),
        }
    )
    return interactions.filter(readable.keep), readable.bad_values


def read_hm(path: Path, options: HMOptions) -> RawSource:
    interactions, bad_values = read_transactions(path / options.transactions_file, options.since)

    articles_path = path / options.articles_file
    dropped: Counter = Counter()
    articles = read_table(articles_path, dropped)
    require_columns(articles, ["article_id", "prod_name", *options.text_columns], articles_path)
    readable = ReadableRows(articles_path, articles.height)
    keys = article_keys(articles, "article_id", readable, "bad_item_key")
    articles = articles.with_columns(keys.alias("item_key")).filter(readable.keep)
    key = pl.col("item_key")
    items = articles.select(
        key,
        pl.col("prod_name").alias("title"),
        joined_text(options.text_columns).alias("text"),
        pl.concat_str(pl.lit(f"{path / options.images_dir}/"), key.str.slice(0, 3), pl.lit("/"), key, pl.lit(".jpg")).alias("image_path"),
        pl.lit(None, pl.String).alias("image_url"),
    )
    bad_values += readable.bad_values
    return RawSource(
        interactions=interactions, items=items, dropped=dropped, bad_values=bad_values, image_roots=(path,),
        has_text_columns=bool(options.text_columns),
    )
