"""`amazon2018`: Amazon Review Data 2018 per-category files (reviews + metadata JSON lines).

reviews: one JSON object per line with reviewerID, asin, unixReviewTime. metadata: asin,
title, description (list of strings or a string), brand, category, imageURLHighRes /
imageURL (lists of URLs). Either file may be gzipped (detected from its content). Lines that
are not a JSON object (older dumps hold Python-literal lines) are skipped and counted as
`unparseable_line` (reviews) / `unparseable_item_line` (metadata). Images: `{asin}.jpg` or
`.png` in `images_dir` when there; the first high-res URL (else the first URL) is kept too.
"""

from __future__ import annotations

import gzip
import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from ...progress import Progress
from .base import (
    INTERACTION_COLUMNS,
    ITEM_COLUMNS,
    MAX_EXAMPLES,
    OPTIONAL_ITEM_COLUMNS,
    BadValues,
    RawSource,
    SourceError,
    require_file,
    unreadable,
)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")  # first one found wins


@dataclass(frozen=True)
class Amazon2018Options:
    reviews_file: str = "Arts_Crafts_and_Sewing.json.gz"
    meta_file: str = "meta_Arts_Crafts_and_Sewing.json.gz"
    images_dir: str = "images"  # optional: a missing folder means URL-only images
    text_fields: tuple[str, ...] = ("brand", "description")  # joined into `text` (the title has its own column)


def json_lines(path: Path, what: str) -> Iterator[tuple[int, dict | None]]:
    """(line number, object) per non-blank line; object is None when the line is not a JSON object."""
    require_file(path, what)
    with path.open("rb") as probe:
        gzipped = probe.read(2) == b"\x1f\x8b"
    progress = Progress(f"ingest: reading {path.name}", unit="lines")
    number = 0
    try:
        with gzip.open(path, "rb") if gzipped else path.open("rb") as lines:
            for number, line in enumerate(lines, 1):
                progress.update(1)
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except ValueError:  # also bad UTF-8 in that line
                    record = None
                yield number, record if isinstance(record, dict) else None
    except (OSError, EOFError) as err:  # truncated or corrupt gzip, unreadable file
        raise SourceError(f"{path}: cannot read after line {number} ({type(err).__name__}: {err})") from err
    progress.close()


def as_key(value: object) -> str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    raise ValueError(value)


def as_seconds(value: object) -> int | None:
    if value is None or (isinstance(value, int) and not isinstance(value, bool)):
        return value
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    raise ValueError(value)


# (field, parser, count name when unreadable, what was expected)
REVIEW_FIELDS = (
    ("reviewerID", as_key, "bad_user", "a string id"),
    ("asin", as_key, "bad_item", "a string id"),
    ("unixReviewTime", as_seconds, "bad_timestamp", "integer unix seconds"),
)
META_FIELDS = (("asin", as_key, "bad_item_key", "a string id"),)


def parsed_lines(
    path: Path, what: str, fields: tuple, dropped: Counter, skipped: str, bad_values: list[BadValues]
) -> Iterator[tuple[list, dict]]:
    """(parsed `fields`, record) per JSON-object line. Other lines are counted as `skipped`; a line
    with a value of the wrong type is dropped and recorded in `bad_values` under its first bad field."""
    lines, present, bad_count = 0, Counter(), Counter()
    first_bad: dict[str, list[tuple[int, object]]] = {name: [] for name, *_ in fields}
    for line, record in json_lines(path, what):
        if record is None:
            dropped[skipped] += 1
            continue
        lines += 1
        present.update(name for name, *_ in fields if record.get(name) is not None)
        values, failed = [], None
        for name, parse, *_ in fields:
            try:
                values.append(parse(record.get(name)))
            except ValueError:
                failed = name
                break
        if failed is not None:
            bad_count[failed] += 1
            if len(first_bad[failed]) < MAX_EXAMPLES:
                first_bad[failed].append((line, record.get(failed)))
            continue
        yield values, record
    for name, _, reason, expected in fields:
        if not present[name]:  # absent (or null) on every line: a missing column, not a data-quality issue
            raise SourceError(
                f"{path}: field '{name}' is missing on every line ({lines} JSON lines parsed; is this the right file?)"
            )
        if bad_count[name]:
            bad_values.append(unreadable(path, name, reason, expected, lines, bad_count[name], first_bad[name], "line"))


def as_text(value: object) -> str:
    """A metadata text field: a string, or a list of strings (description, category)."""
    if value is None:
        return ""
    if isinstance(value, list):
        return "\n".join(str(part).strip() for part in value if str(part).strip())
    return str(value).strip()


def first_url(record: dict) -> str | None:
    for field in ("imageURLHighRes", "imageURL"):
        urls = record.get(field)
        urls = [urls] if isinstance(urls, str) else urls
        if isinstance(urls, list) and urls and isinstance(urls[0], str) and urls[0].strip():
            return urls[0].strip()
    return None


def read_reviews(path: Path, dropped: Counter, bad_values: list[BadValues]) -> pl.DataFrame:
    rows = [values for values, _ in parsed_lines(path, "reviews file", REVIEW_FIELDS, dropped, "unparseable_line", bad_values)]
    return pl.DataFrame(rows, schema=INTERACTION_COLUMNS, orient="row")


def read_metadata(
    path: Path, images_dir: Path, text_fields: tuple[str, ...], dropped: Counter, bad_values: list[BadValues]
) -> pl.DataFrame:
    local_images = {p.name for p in images_dir.iterdir()} if images_dir.is_dir() else set()
    rows = []
    for (asin,), record in parsed_lines(path, "metadata file", META_FIELDS, dropped, "unparseable_item_line", bad_values):
        image = next((f"{images_dir}/{asin}{ext}" for ext in IMAGE_EXTENSIONS if f"{asin}{ext}" in local_images), None)
        parts = [as_text(record.get(field)) for field in text_fields]
        rows.append((asin, as_text(record.get("title")), "\n".join(p for p in parts if p), image, first_url(record)))
    return pl.DataFrame(rows, schema={c: t for c, t in ITEM_COLUMNS.items() if c not in OPTIONAL_ITEM_COLUMNS}, orient="row")


def read_amazon2018(path: Path, options: Amazon2018Options) -> RawSource:
    dropped: Counter = Counter()
    bad_values: list[BadValues] = []
    interactions = read_reviews(path / options.reviews_file, dropped, bad_values)
    items = read_metadata(path / options.meta_file, path / options.images_dir, options.text_fields, dropped, bad_values)
    return RawSource(
        interactions=interactions, items=items, dropped=dropped, bad_values=bad_values, image_roots=(path,),
        has_text_columns=bool(options.text_fields),
    )
