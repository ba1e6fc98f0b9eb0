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
from .base import INTERACTION_COLUMNS, ITEM_COLUMNS, RawSource, SourceError, require_file

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


def as_key(value: object, path: Path, field: str, line: int) -> str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    raise SourceError(f"{path}: line {line}, field '{field}': expected a string id, got {value!r}")


def as_seconds(value: object, path: Path, field: str, line: int) -> int | None:
    if value is None or (isinstance(value, int) and not isinstance(value, bool)):
        return value
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    raise SourceError(f"{path}: line {line}, field '{field}': expected integer unix seconds, got {value!r}")


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


def require_field(values: list, path: Path, field: str) -> None:
    """A field absent (or null) on every line is a missing column, not a data-quality issue."""
    if all(v is None for v in values):
        raise SourceError(f"{path}: field '{field}' is missing on every line ({len(values)} JSON lines parsed; is this the right file?)")


def read_reviews(path: Path, dropped: Counter) -> pl.DataFrame:
    users, items, times = [], [], []
    for line, record in json_lines(path, "reviews file"):
        if record is None:
            dropped["unparseable_line"] += 1
            continue
        users.append(as_key(record.get("reviewerID"), path, "reviewerID", line))
        items.append(as_key(record.get("asin"), path, "asin", line))
        times.append(as_seconds(record.get("unixReviewTime"), path, "unixReviewTime", line))
    for field, values in (("reviewerID", users), ("asin", items), ("unixReviewTime", times)):
        require_field(values, path, field)
    return pl.DataFrame({"user_key": users, "item_key": items, "timestamp": times}, schema=INTERACTION_COLUMNS)


def read_metadata(path: Path, images_dir: Path, text_fields: tuple[str, ...], dropped: Counter) -> pl.DataFrame:
    local_images = {p.name for p in images_dir.iterdir()} if images_dir.is_dir() else set()
    rows = []
    for line, record in json_lines(path, "metadata file"):
        if record is None:
            dropped["unparseable_item_line"] += 1
            continue
        asin = as_key(record.get("asin"), path, "asin", line)
        image = next((f"{images_dir}/{asin}{ext}" for ext in IMAGE_EXTENSIONS if f"{asin}{ext}" in local_images), None)
        parts = [as_text(record.get(field)) for field in text_fields]
        rows.append((asin, as_text(record.get("title")), "\n".join(p for p in parts if p), image, first_url(record)))
    require_field([row[0] for row in rows], path, "asin")
    return pl.DataFrame(rows, schema=ITEM_COLUMNS, orient="row")


def read_amazon2018(path: Path, options: Amazon2018Options) -> RawSource:
    dropped: Counter = Counter()
    interactions = read_reviews(path / options.reviews_file, dropped)
    items = read_metadata(path / options.meta_file, path / options.images_dir, options.text_fields, dropped)
    return RawSource(interactions=interactions, items=items, dropped=dropped)
