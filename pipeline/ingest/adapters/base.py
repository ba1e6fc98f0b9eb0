"""The one interface every data source implements.

An adapter reads a source's own files and returns them in a raw but uniform shape; the
source-independent rules (cleaning, k-core, truncation, re-indexing, split) live in
``pipeline.ingest.core`` and are applied identically to every source.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import polars as pl

# Column contract of RawSource.interactions and RawSource.items.
INTERACTION_COLUMNS = {"user_key": pl.String, "item_key": pl.String, "timestamp": pl.Int64}
ITEM_COLUMNS = {
    "item_key": pl.String,
    "title": pl.String,  # may be null or "" (counted, not fatal)
    "text": pl.String,  # description, may be null or ""
    "image_path": pl.String,  # local file, null when none
    "image_url": pl.String,  # remote reference kept for a later fetch, null when none
}


class SourceError(ValueError):
    """Input that cannot be read: names the file, column and (where known) row."""


@dataclass
class RawSource:
    interactions: pl.DataFrame  # INTERACTION_COLUMNS, any order, may hold duplicates
    items: pl.DataFrame  # ITEM_COLUMNS, may hold duplicate keys (first one wins)
    dropped: Counter = field(default_factory=Counter)  # rows the adapter itself skipped, by reason

    def __post_init__(self) -> None:
        for name, frame, columns in (("interactions", self.interactions, INTERACTION_COLUMNS), ("items", self.items, ITEM_COLUMNS)):
            missing = [c for c in columns if c not in frame.columns]
            if missing:
                raise TypeError(f"adapter bug: {name} lacks columns {missing}")
            self.__dict__[name] = frame.select([pl.col(c).cast(t) for c, t in columns.items()])


class Adapter(Protocol):
    """Reads one kind of source rooted at ``path``; ``options`` is its params section."""

    def __call__(self, path: Path, options: object) -> RawSource: ...


def require_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise SourceError(f"{path}: {what} not found (check ingest.path and the file name params)")
    return path


def require_columns(frame: pl.DataFrame, columns: list[str], path: Path) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise SourceError(f"{path}: missing column(s) {missing}; found {frame.columns}")


def read_table(path: Path, **csv_options) -> pl.DataFrame:
    """Read a CSV or Parquet file as strings-or-native columns, naming the file on failure."""
    require_file(path, "input file")
    try:
        if path.suffix == ".parquet":
            return pl.read_parquet(path)
        return pl.read_csv(path, infer_schema_length=0, **csv_options)  # all columns as strings
    except Exception as err:  # polars raises several types; all mean "unreadable"
        raise SourceError(f"{path}: cannot read ({type(err).__name__}: {err})") from err


def to_int64(frame: pl.DataFrame, column: str, path: Path) -> pl.Series:
    """Cast a column to Int64, or stop naming the first bad row (1-based data row)."""
    values = frame[column]
    if values.dtype.is_integer():
        return values.cast(pl.Int64)
    cast = values.cast(pl.Int64, strict=False)
    bad = (cast.is_null() & values.is_not_null()).arg_true()
    if len(bad):
        row = int(bad[0])
        raise SourceError(f"{path}: column '{column}' row {row + 1}: expected an integer, got {values[row]!r}")
    return cast


def joined_text(columns: list[str] | tuple[str, ...]) -> pl.Expr:
    """Non-empty values of ``columns`` joined by newlines ("" when all are empty, or when there
    are no columns: a catalogue with titles only)."""
    if not columns:
        return pl.lit("", pl.String)
    parts = [pl.col(c).cast(pl.String).str.strip_chars().replace("", None) for c in columns]
    return pl.concat_str(parts, separator="\n", ignore_nulls=True)
