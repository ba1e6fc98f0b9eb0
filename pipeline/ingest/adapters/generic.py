"""`generic`: any dataset given as an interactions file and an items file (CSV or Parquet).

interactions: one row per (user, item, timestamp); the timestamp is integer unix seconds or an
ISO 8601 date/datetime string (naive values are taken as UTC). items: an item key, a title,
one or more text columns (joined into `text`) and optionally an image column holding a path
(relative to `image_dir`, else to the dataset root; or absolute) or an http(s) URL.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import polars as pl

from .base import RawSource, SourceError, joined_text, read_table, require_columns, to_int64


@dataclass(frozen=True)
class GenericOptions:
    interactions_file: str = "interactions.csv"
    user_column: str = "user_id"
    item_column: str = "item_id"
    timestamp_column: str = "timestamp"
    items_file: str = "items.csv"
    item_key_column: str = "item_id"
    title_column: str = "title"
    text_columns: tuple[str, ...] = ("description",)
    image_column: str | None = None  # path or http(s) URL per item; None: no images
    image_dir: str | None = None  # relative image paths are under this folder of the root


def unix_seconds(frame: pl.DataFrame, column: str, path: Path) -> pl.Series:
    """Integer seconds, Parquet dates/datetimes, or ISO strings -> Int64 unix seconds."""
    values = frame[column]
    if values.dtype == pl.Date or isinstance(values.dtype, pl.Datetime):
        return values.dt.epoch("s")
    if values.dtype == pl.String:
        values = values.str.strip_chars()
    if values.dtype != pl.String or values.str.contains(r"^-?\d+$").all():
        return to_int64(pl.DataFrame({column: values}), column, path)
    seconds = {}
    for text in values.drop_nulls().unique(maintain_order=True):  # first-seen order: first bad row
        try:
            moment = datetime.fromisoformat(text)
        except ValueError:
            row = int((values == text).arg_true()[0]) + 1
            raise SourceError(
                f"{path}: column '{column}' row {row}: expected unix seconds or an ISO date/datetime "
                f"(one kind per column), got {text!r}"
            ) from None
        seconds[text] = int((moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp())
    return values.replace_strict(seconds, default=None, return_dtype=pl.Int64)


def image_references(options: GenericOptions, path: Path) -> list[pl.Expr]:
    """(image_path, image_url) expressions: URLs are kept for a later fetch, paths resolved."""
    if options.image_column is None:
        return [pl.lit(None, pl.String).alias("image_path"), pl.lit(None, pl.String).alias("image_url")]
    root = path / options.image_dir if options.image_dir else path
    if not root.is_dir():
        raise SourceError(f"{root}: image folder not found (check ingest.generic.image_dir)")
    ref = pl.col(options.image_column).cast(pl.String).str.strip_chars().replace("", None)
    is_url = ref.str.contains(r"^(?i)https?://")
    local = pl.when(ref.str.starts_with("/")).then(ref).otherwise(pl.lit(f"{root}/") + ref)
    return [
        pl.when(is_url).then(None).otherwise(local).alias("image_path"),
        pl.when(is_url).then(ref).otherwise(None).alias("image_url"),
    ]


def read_generic(path: Path, options: GenericOptions) -> RawSource:
    inter_path = path / options.interactions_file
    inter = read_table(inter_path)
    require_columns(inter, [options.user_column, options.item_column, options.timestamp_column], inter_path)
    interactions = pl.DataFrame(
        {
            "user_key": inter[options.user_column],
            "item_key": inter[options.item_column],
            "timestamp": unix_seconds(inter, options.timestamp_column, inter_path),
        }
    )

    items_path = path / options.items_file
    table = read_table(items_path)
    image_columns = [options.image_column] if options.image_column else []
    require_columns(table, [options.item_key_column, options.title_column, *options.text_columns, *image_columns], items_path)
    items = table.select(
        pl.col(options.item_key_column).alias("item_key"),
        pl.col(options.title_column).alias("title"),
        joined_text(options.text_columns).alias("text"),
        *image_references(options, path),
    )
    return RawSource(interactions=interactions, items=items)
