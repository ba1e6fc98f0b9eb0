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

from ...progress import log

# Column contract of RawSource.interactions and RawSource.items.
INTERACTION_COLUMNS = {"user_key": pl.String, "item_key": pl.String, "timestamp": pl.Int64}
ITEM_COLUMNS = {
    "item_key": pl.String,
    "title": pl.String,  # may be null or "" (counted, not fatal)
    "text": pl.String,  # description, may be null or ""
    "image_path": pl.String,  # local file, null when none; opened only inside RawSource.image_roots
    "image_url": pl.String,  # remote reference kept for a later fetch, null when none
    "image_refused": pl.String,  # optional: why the adapter refused image_path (a count name); never opened
}
OPTIONAL_ITEM_COLUMNS = ("image_refused",)  # null when an adapter does not set them
MAX_EXAMPLES = 5  # bad values named in the report per column


class SourceError(ValueError):
    """Input that cannot be read: names the file, column and (where known) row."""


@dataclass
class BadValues:
    """The unreadable values of one column: their rows were dropped and are counted as `reason`."""

    file: str
    column: str
    reason: str  # the count name: bad_user, bad_item, bad_timestamp, bad_item_key
    expected: str
    count: int
    values_read: int  # values of the column, readable or not (the base of max_bad_fraction)
    rows: list[int]  # the first few: 1-based data rows of a table (header not counted), or JSON lines
    examples: list[str]  # their values (repr), same order
    where: str = "row"  # "row" (CSV / Parquet data row) or "line" (JSON lines file)

    def describe(self) -> str:
        column = "field" if self.where == "line" else "column"
        where = f"{self.file}: {column} '{self.column}' {self.where} {self.rows[0]}"
        return f"{where}: expected {self.expected}, got {self.examples[0]}"


@dataclass
class RawSource:
    interactions: pl.DataFrame  # INTERACTION_COLUMNS, any order, may hold duplicates
    items: pl.DataFrame  # ITEM_COLUMNS, may hold duplicate keys (first one wins)
    dropped: Counter = field(default_factory=Counter)  # rows the adapter itself skipped, by reason
    bad_values: list[BadValues] = field(default_factory=list)  # rows dropped for an unreadable value
    image_roots: tuple[Path, ...] = ()  # image files must resolve (`..`, symlinks) inside one of these
    # False: the source names no text columns (titles only), so an item without text is no
    # finding: the title alone is its text by choice, and `empty_text` is not counted
    has_text_columns: bool = True

    def __post_init__(self) -> None:
        absent = [c for c in OPTIONAL_ITEM_COLUMNS if c not in self.items.columns]
        self.items = self.items.with_columns(pl.lit(None, ITEM_COLUMNS[c]).alias(c) for c in absent)
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


def require_scalar(frame: pl.DataFrame, columns: list[str], path: Path) -> None:
    """Ids and timestamps must be single values (a Parquet list or struct column is the wrong column)."""
    nested = [c for c in columns if frame[c].dtype.is_nested()]
    if nested:
        raise SourceError(f"{path}: column '{nested[0]}' holds {frame[nested[0]].dtype} values; expected one id or time per row")


def read_table(path: Path, dropped: Counter) -> pl.DataFrame:
    """Read a CSV or Parquet file as strings-or-native columns, naming the file on failure.

    A CSV with bytes that are not UTF-8 is read again with them replaced by U+FFFD, and the rows
    that hold one are counted as `invalid_utf8` (kept: a bad byte in one title must not stop ingest)."""
    require_file(path, "input file")
    try:
        if path.suffix == ".parquet":
            return pl.read_parquet(path)
        try:
            return pl.read_csv(path, infer_schema_length=0)  # all columns as strings
        except pl.exceptions.ComputeError as err:
            if "utf-8" not in str(err).lower():
                raise
        frame = pl.read_csv(path, infer_schema_length=0, encoding="utf8-lossy")
    except Exception as err:  # polars raises several types; all mean "unreadable"
        raise SourceError(f"{path}: cannot read ({type(err).__name__}: {err})") from err
    rows = frame.select(pl.any_horizontal(pl.all().str.contains("\ufffd", literal=True).fill_null(False))).to_series().arg_true()
    dropped["invalid_utf8"] += len(rows)
    first = f"row {rows[0] + 1}" if len(rows) else "the header"
    log.warning("ingest: %s: %d rows hold bytes that are not UTF-8 (first: %s), shown as U+FFFD", path, len(rows), first)
    return frame


def to_int64(values: pl.Series) -> pl.Series:
    """A column as Int64; null where a value is not an integer (see `keep_readable`)."""
    if values.dtype.is_integer():
        return values.cast(pl.Int64)
    if values.dtype == pl.String:
        values = values.str.strip_chars()
    return values.cast(pl.Int64, strict=False)


class ReadableRows:
    """The rows of one table whose values can all be read.

    `check` each parsed column: a row whose value is present but did not parse (null) leaves
    `keep` and is recorded in `bad_values`, counted once, under the first column that failed.
    The core drops nothing more for them and stops when a column is mostly unreadable.
    `rows` numbers the rows as the user sees them (default: 1-based data rows, header not counted)."""

    def __init__(self, file: Path, height: int, rows: pl.Series | None = None, where: str = "row"):
        self.file, self.where = file, where
        self.rows = rows if rows is not None else pl.int_range(1, height + 1, eager=True)
        self.keep = pl.repeat(True, height, eager=True)
        self.bad_values: list[BadValues] = []

    def check(self, column: str, raw: pl.Series, parsed: pl.Series, reason: str, expected: str) -> pl.Series:
        """`parsed` (unchanged); its unreadable rows leave `keep`."""
        bad = parsed.is_null() & raw.is_not_null() & self.keep
        count = int(bad.sum())
        if count:
            examples = raw.filter(bad).head(MAX_EXAMPLES).to_list()
            lines = self.rows.filter(bad).head(MAX_EXAMPLES).to_list()
            first = list(zip(lines, examples))
            self.bad_values.append(unreadable(self.file, column, reason, expected, len(raw), count, first, self.where))
            self.keep = self.keep & ~bad
        return parsed


def unreadable(
    file: Path, column: str, reason: str, expected: str, values_read: int, count: int, first: list[tuple[int, object]], where: str
) -> BadValues:
    """BadValues from the first few (row or line number, value) pairs."""
    rows, examples = [n for n, _ in first[:MAX_EXAMPLES]], [repr(v) for _, v in first[:MAX_EXAMPLES]]
    return BadValues(str(file), column, reason, expected, count, values_read, rows, examples, where)


def joined_text(columns: list[str] | tuple[str, ...]) -> pl.Expr:
    """Non-empty values of ``columns`` joined by newlines ("" when all are empty, or when there
    are no columns: a catalogue with titles only)."""
    if not columns:
        return pl.lit("", pl.String)
    parts = [pl.col(c).cast(pl.String).str.strip_chars().replace("", None) for c in columns]
    return pl.concat_str(parts, separator="\n", ignore_nulls=True)
