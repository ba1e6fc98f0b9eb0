"""`generic`: any dataset given as an interactions file and an items file (CSV or Parquet).

interactions: one row per (user, item, timestamp); the timestamp is integer unix seconds or an
ISO 8601 date/datetime string (naive values are taken as UTC). items: an item key, a title,
one or more text columns (joined into `text`) and optionally an image column holding a path
(relative to `image_dir`, else to the dataset root; or absolute, only when
`allow_absolute_image_paths`) or an http(s) URL. A timestamp that does not parse drops its
row (counted as `bad_timestamp` by the core).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import polars as pl

from .base import RawSource, ReadableRows, SourceError, joined_text, read_table, require_columns, require_scalar, to_int64


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
    # false: an absolute path in image_column is refused (image_absolute_path) and image_dir must
    # lie inside the dataset folder; true: both allowed, but files must still resolve inside the
    # dataset folder or image_dir
    allow_absolute_image_paths: bool = False


def unix_seconds(values: pl.Series) -> tuple[pl.Series, str]:
    """Integer seconds, Parquet dates/datetimes, or ISO strings -> Int64 unix seconds, null where
    a value does not parse; and what was expected. One kind per column: the kind most values have."""
    if values.dtype == pl.Date or isinstance(values.dtype, pl.Datetime):
        return values.dt.epoch("s"), "a date/datetime"
    if values.dtype != pl.String:
        return to_int64(values), "integer unix seconds"
    values = values.str.strip_chars()
    if 2 * values.str.contains(r"^-?\d+$").sum() >= values.is_not_null().sum():
        return to_int64(values), "integer unix seconds (like most of the column)"
    seconds = {}
    for text in values.drop_nulls().unique():
        try:
            moment = datetime.fromisoformat(text)
        except ValueError:
            continue
        seconds[text] = int((moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp())
    parsed = values.replace_strict(seconds, default=None, return_dtype=pl.Int64)
    return parsed, "an ISO 8601 date/datetime (like most of the column)"


def image_references(options: GenericOptions, path: Path) -> tuple[list[pl.Expr], tuple[Path, ...]]:
    """(image_path, image_url, image_refused) expressions and the folders image files may be in.

    URLs are kept for a later fetch; relative paths are joined to the image folder; absolute
    ones are kept only when allowed. Whether a file really lies inside an allowed folder (after
    `..` and symlinks) is checked by the core before anything is opened."""
    if options.image_column is None:
        return [pl.lit(None, pl.String).alias("image_path"), pl.lit(None, pl.String).alias("image_url")], ()
    root = path / options.image_dir if options.image_dir else path
    if not root.is_dir():
        raise SourceError(f"{root}: image folder not found (check ingest.generic.image_dir)")
    inside = root.resolve().is_relative_to(path.resolve())
    if not inside and not options.allow_absolute_image_paths:
        raise SourceError(
            f"{root}: ingest.generic.image_dir lies outside the dataset folder {path}; "
            "set ingest.generic.allow_absolute_image_paths: true to read images from there"
        )
    ref = pl.col(options.image_column).cast(pl.String).str.strip_chars().replace("", None)
    is_url = ref.str.contains(r"^(?i)https?://")
    absolute = ref.str.starts_with("/")
    local = pl.when(absolute).then(ref).otherwise(pl.lit(f"{root}/") + ref)
    refused = absolute & ~is_url & pl.lit(not options.allow_absolute_image_paths)
    return [
        pl.when(is_url).then(None).otherwise(local).alias("image_path"),
        pl.when(is_url).then(ref).otherwise(None).alias("image_url"),
        pl.when(refused).then(pl.lit("image_absolute_path")).otherwise(None).alias("image_refused"),
    ], (path,) if inside else (path, root)


def read_generic(path: Path, options: GenericOptions) -> RawSource:
    inter_path = path / options.interactions_file
    dropped: Counter = Counter()
    inter = read_table(inter_path, dropped)
    require_columns(inter, [options.user_column, options.item_column, options.timestamp_column], inter_path)
    require_scalar(inter, [options.user_column, options.item_column, options.timestamp_column], inter_path)
    readable = ReadableRows(inter_path, inter.height)
    raw_times = inter[options.timestamp_column]
    times, expected = unix_seconds(raw_times)
    readable.check(options.timestamp_column, raw_times, times, "bad_timestamp", expected)
    interactions = pl.DataFrame(
        {"user_key": inter[options.user_column], "item_key": inter[options.item_column], "timestamp": times}
    ).filter(readable.keep)

    items_path = path / options.items_file
    table = read_table(items_path, dropped)
    image_columns = [options.image_column] if options.image_column else []
    require_columns(table, [options.item_key_column, options.title_column, *options.text_columns, *image_columns], items_path)
    require_scalar(table, [options.item_key_column], items_path)
    images, roots = image_references(options, path)
    items = table.select(
        pl.col(options.item_key_column).alias("item_key"),
        pl.col(options.title_column).alias("title"),
        joined_text(options.text_columns).alias("text"),
        *images,
    )
    return RawSource(
        interactions=interactions, items=items, dropped=dropped, bad_values=readable.bad_values, image_roots=roots,
        has_text_columns=bool(options.text_columns),
    )
