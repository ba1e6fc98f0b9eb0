"""Source-independent ingest rules (ODMT section 7), applied the same way to every adapter.

Rules, in order (each dropped row is counted by reason in the report):
0. Optionally only the first `sample_users` users are kept (`not_sampled`), for quick trials.
1. Interactions with a null user, item or timestamp are dropped (`missing_value`); exact
   duplicates of (user, item, timestamp) are dropped (`duplicate`).
2. Items: a duplicated item key keeps its first row (`duplicate_item`). Interactions with an
   item that has no metadata row are dropped (`unknown_item`): ODMT needs its content.
3. Each user's history is ordered by (timestamp, item key in natural order), so ties repeat.
   Users with fewer than `min_user_interactions` are dropped (`short_user`); of the rest only
   the last `max_user_interactions` are kept (`truncated`).
4. Items no longer used are dropped; the rest are re-indexed 1..N in natural key order (0 is
   padding). Users are indexed 0..U-1 in natural key order.
5. Leave-one-out: test = last item, valid = second to last, train = the rest. Popularity is
   counted over train items only.
Items keep a missing text or image: their features are zero and flagged (`present` false);
the counts appear in the report. Image files are packed into Parquet as encoded bytes, streamed:
`ingest` checks every file (bytes read, header checked, bytes let go) and `write` reads the kept
ones again into row groups of at most IMAGE_ROW_GROUP_BYTES, so no more than one row group of
image bytes is ever held (the second read costs I/O, not memory; small files come from the page
cache).

Bad input never stops ingest row by row. Rows with an unreadable value (a timestamp that is no
time, an id of the wrong type) were dropped by the adapter; they are counted (`bad_timestamp`,
`bad_user`, `bad_item`, `bad_item_key`) and their first row numbers are in the report under
`bad_values`. Ingest stops only when more than `max_bad_fraction` of a column is unreadable (the
wrong column or format), naming file, column and the first bad row, or when no user is left.
An image is opened only when its path, with `..` and symlinks resolved, lies inside the dataset
folder (`image_outside_root` otherwise), and only through the guarded `pipeline.images`.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import polars as pl
import pyarrow as pa
from PIL import Image

from .. import schema
from ..images import MAX_PIXELS, ImageRefused, open_image
from ..io import parquet_writer, write_json, write_table
from ..progress import Progress, log
from .adapters.base import BadValues, RawSource, SourceError

# What can be wrong with an item's image, as counted in the report (the first few are logged)
IMAGE_PROBLEMS = (
    "image_absolute_path",
    "image_bad_path",
    "image_outside_root",
    "image_missing",
    "image_too_large",
    "image_unreadable",
    "image_bomb",
)
MAX_LOGGED_PROBLEMS = 20
IMAGE_COLUMNS = ("item_key", "image_path", "image_url", "image_refused")
# Image bytes per row group of images.parquet: ingest holds one row group at a time, and the
# image feature stage reads one at a time (real product photos: ~400 per group at 150 KB each).
IMAGE_ROW_GROUP_BYTES = 64 * 2**20


@dataclass(frozen=True)
class SplitRules:
    min_user_interactions: int = 5
    max_user_interactions: int = 15
    max_image_bytes: int = 20_000_000  # a larger file is refused as a likely bomb / wrong file
    max_image_pixels: int = MAX_PIXELS  # a larger image (from its header) is refused: image_bomb
    min_image_side: int = 32  # a smaller width or height is counted: image_too_small
    drop_small_images: bool = False  # true: such an image is dropped too (the item keeps no image)
    max_bad_fraction: float = 0.1  # stop when more of a column's values are unreadable
    sample_users: int | None = None  # keep only the first N users (natural key order): quick trials

    def validate(self) -> None:
        if not 0 < self.max_image_pixels <= Image.MAX_IMAGE_PIXELS:
            limit = Image.MAX_IMAGE_PIXELS
            raise ValueError(f"max_image_pixels must be in 1..{limit} (PIL's own bomb limit), got {self.max_image_pixels}")
        if not 0 <= self.max_bad_fraction <= 1:
            raise ValueError(f"max_bad_fraction must be in 0..1, got {self.max_bad_fraction}")


@dataclass(frozen=True)
class ImageSource:
    """Where each kept item's image file is (items: item_idx, IMAGE_COLUMNS, has_image): read
    file by file when images.parquet is written (`image_row_groups`), never all at once."""

    items: pl.DataFrame
    rules: SplitRules
    roots: tuple[Path, ...]

    def table(self) -> pa.Table:
        """Every image at once: for small catalogues and tests (the stage streams them)."""
        return pa.concat_tables(image_row_groups(self))


@dataclass
class Ingested:
    items: pl.DataFrame
    images: ImageSource
    interactions: pl.DataFrame
    sequences: pl.DataFrame
    popularity: pl.DataFrame
    report: dict


def natural_order(keys: pl.Series) -> pl.Series:
    """Sort rank of keys: numerically when every key is an integer, else lexicographically."""
    numeric = keys.cast(pl.Int64, strict=False)
    by = numeric if numeric.null_count() == 0 else keys
    return by.rank(method="dense").cast(pl.Int64)


def key_codes(keys: pl.Series) -> pl.Series:
    """An integer per distinct key (a categorical's codes: hashed once, no sort of the strings)."""
    return keys.cast(pl.Categorical).to_physical()


def clean(raw: RawSource, rules: SplitRules) -> tuple[pl.DataFrame, pl.DataFrame, Counter]:
    """Steps 1-4: returns (items with item_idx, interactions with user/item idx), drop counts.

    From the first step on the interactions carry integer codes, not their string keys (those are
    kept once per user and per item), and no step keeps the input order: a sort by (user,
    timestamp, item) sets it. So the cleaning's memory stays near the size of the integer table,
    not of the raw strings (64-hex user ids: 80 bytes a row)."""
    dropped = Counter(raw.dropped)
    inter = raw.interactions
    n = inter.height
    inter = inter.drop_nulls()
    dropped["missing_value"] += n - inter.height
    keys = inter
    inter = pl.DataFrame({"user": key_codes(keys["user_key"]), "item": key_codes(keys["item_key"]), "timestamp": keys["timestamp"]})
    users = pl.DataFrame({"user": inter["user"], "user_key": keys["user_key"]}).unique("user")
    item_codes = pl.DataFrame({"item": inter["item"], "item_key": keys["item_key"]}).unique("item")  # unknown keys too
    del keys
    n = inter.height
    inter = inter.sort(["user", "timestamp", "item"])  # duplicates side by side: a hashed unique() holds far more
    inter = inter.filter(pl.any_horizontal(pl.all().ne_missing(pl.all().shift(1))))
    dropped["duplicate"] += n - inter.height

    if rules.sample_users is not None:
        sampled = users.filter(natural_order(users["user_key"]) <= rules.sample_users)
        n = inter.height
        inter = inter.join(sampled, on="user", how="semi")
        dropped["not_sampled"] += n - inter.height

    items = raw.items.filter(pl.col("item_key").is_not_null())
    n = items.height
    items = items.unique("item_key", keep="first", maintain_order=True)
    dropped["duplicate_item"] += n - items.height

    rank = items.select("item_key", natural_order(items["item_key"]).alias("key_rank"))
    n = inter.height
    inter = inter.join(item_codes.join(rank, on="item_key").drop("item_key"), on="item").drop("item")
    dropped["unknown_item"] += n - inter.height

    inter = inter.sort(["user", "timestamp", "key_rank"])
    counts = inter.group_by("user").len()
    short = counts.filter(pl.col("len") < rules.min_user_interactions)
    dropped["short_user"] += int(short["len"].sum() or 0)
    dropped["short_user_users"] += short.height
    inter = inter.join(short, on="user", how="anti")
    n = inter.height
    from_end = pl.len().over("user").cast(pl.Int64) - pl.int_range(pl.len()).over("user")  # 1 = last
    inter = inter.filter(from_end <= rules.max_user_interactions)
    dropped["truncated"] += n - inter.height

    used = items.join(rank, on="item_key").join(inter.select("key_rank").unique(), on="key_rank", how="semi")
    dropped["unused_item"] += items.height - used.height
    items = used.sort("key_rank").with_row_index("item_idx", offset=1)
    users = users.join(inter.select("user").unique(), on="user", how="semi")
    users = users.with_columns(natural_order(users["user_key"]).alias("order")).sort("order")  # of the kept keys
    users = users.with_row_index("user_idx").drop("order")
    inter = (
        inter.join(items.select("key_rank", "item_idx"), on="key_rank")
        .join(users, on="user")
        .sort(["user_idx", "timestamp", "item_idx"])  # item_idx runs in key order
        .select("user_idx", "user_key", "item_idx", "timestamp", pl.int_range(pl.len()).over("user_idx").alias("position"))
    )
    return items.drop("key_rank"), inter, dropped


def split(inter: pl.DataFrame) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Step 5: leave-one-out sequences and train-only popularity."""
    seqs = (
        inter.group_by("user_idx", maintain_order=True)
        .agg(pl.col("user_key").first(), pl.col("item_idx"))
        .select(
            "user_idx",
            "user_key",
            pl.col("item_idx").list.slice(0, pl.col("item_idx").list.len() - 2).alias("train_items"),
            pl.col("item_idx").list.get(-2).alias("valid_item"),
            pl.col("item_idx").list.get(-1).alias("test_item"),
        )
    )
    counts = seqs.select(pl.col("train_items").explode().alias("item_idx")).group_by("item_idx").len("train_count")
    all_items = inter.select("item_idx").unique()
    popularity = all_items.join(counts, on="item_idx", how="left").fill_null(0).sort("item_idx")
    return seqs, popularity


def check_images(items: pl.DataFrame, rules: SplitRules, roots: tuple[Path, ...], dropped: Counter) -> list[bool]:
    """Whether each item's local image file is kept; refused, missing or unreadable ones are counted.
    The bytes are read to check them and let go: `image_row_groups` reads them again to write them."""
    kept = []
    progress = file_progress("ingest: checking images", items)
    for key, path, url, refused in items.select(*IMAGE_COLUMNS).iter_rows():
        image, problem = _read_image(path, url, refused, rules, roots)
        if problem:
            dropped[problem] += 1
            if problem in IMAGE_PROBLEMS and sum(dropped[p] for p in IMAGE_PROBLEMS) <= MAX_LOGGED_PROBLEMS:
                log.warning("ingest: item %s: %s (%r)", key, problem, path)
        kept.append(image is not None)
        progress.update(1)
    progress.close()
    return kept


def file_progress(what: str, items: pl.DataFrame) -> Progress:
    """Progress over the items' image files, silent when no item names a local file (a
    catalogue without an image column): then nothing is read and there is nothing to report."""
    return Progress(what, total=items.height, quiet=items["image_path"].is_null().all())


def image_row_groups(images: ImageSource, max_bytes: int = IMAGE_ROW_GROUP_BYTES) -> Iterator[pa.Table]:
    """The IMAGES table in row groups of at most `max_bytes` of image data (or one image, when
    larger), read file by file as it goes. An image whose check comes out differently than in
    `check_images` (the file changed during ingest) stops ingest: the items' `has_image` would lie."""
    progress = file_progress("ingest: packing images", images.items)
    idx: list[int] = []
    data: list[bytes | None] = []
    size = 0
    rows = images.items.select("item_idx", *IMAGE_COLUMNS, "has_image").iter_rows()
    for item_idx, key, path, url, refused, has_image in rows:
        image, _ = _read_image(path, url, refused, images.rules, images.roots)
        if (image is not None) != has_image:
            raise SourceError(f"ingest: item {key}: image {path} changed while ingest ran (rerun ingest)")
        if data and size + len(image or b"") > max_bytes:
            yield _image_table(idx, data)
            idx, data, size = [], [], 0
        idx.append(item_idx)
        data.append(image)
        size += len(image or b"")
        progress.update(1)
    if data:
        yield _image_table(idx, data)
    progress.close()


def _image_table(idx: list[int], data: list[bytes | None]) -> pa.Table:
    return pa.table({"item_idx": pa.array(idx, pa.int32()), "image": pa.array(data, pa.binary())}, schema=schema.IMAGES)


def _read_image(
    path: str | None, url: str | None, refused: str | None, rules: SplitRules, roots: tuple[Path, ...]
) -> tuple[bytes | None, str | None]:
    """(the file's bytes or None, the count name of what is wrong with it or None)."""
    if refused:  # the adapter refused the reference itself
        return None, refused
    if path is None:
        return None, "image_url_only" if url else "image_none"
    if "\x00" in path:  # no file system takes it (os calls raise ValueError)
        return None, "image_bad_path"
    file = resolved_inside(Path(path), roots)  # read by its resolved path: a link swapped later is not followed
    if file is None:
        return None, "image_outside_root"
    if not file.is_file():
        return None, "image_missing"
    if file.stat().st_size > rules.max_image_bytes:
        return None, "image_too_large"
    try:
        data = file.read_bytes()
        width, height = open_image(data, rules.max_image_pixels, lambda image: image.size)  # the header only
    except OSError:
        return None, "image_unreadable"
    except ImageRefused as refusal:
        return None, f"image_{refusal.reason}"
    if min(width, height) < rules.min_image_side:
        return None if rules.drop_small_images else data, "image_too_small"
    return data, None


def resolved_inside(path: Path, roots: tuple[Path, ...]) -> Path | None:
    """`path` with its symlinks resolved when it lies in one of the (absolute) `roots` both as
    written (`..` removed: a path that climbs out is refused without a system call) and resolved;
    else None. Only the links on the way are read (lstat, readlink), never the file itself."""
    lexical = Path(os.path.normpath(path.absolute()))
    if not any(lexical.is_relative_to(os.path.normpath(root)) for root in roots):
        return None
    real = Path(os.path.realpath(path))
    return real if any(real.is_relative_to(os.path.realpath(root)) for root in roots) else None


def check_bad_values(bad_values: list[BadValues], max_fraction: float) -> None:
    """Log the rows adapters dropped for an unreadable value; stop when a column is mostly unreadable."""
    for bad in bad_values:
        log.warning("ingest: %d rows dropped (%s), the first: %s", bad.count, bad.reason, bad.describe())
        if bad.count > max_fraction * bad.values_read:
            raise SourceError(
                f"{bad.describe()}; {bad.count} of {bad.values_read} values are unreadable, more than "
                f"ingest.rules.max_bad_fraction {max_fraction} (is it the right column, or the right format?)"
            )


def nothing_left(rows_read: int, dropped: Counter, rules: SplitRules) -> str:
    """Why no user is left: every rule that removed interactions, with its count."""
    removed = ", ".join(f"{reason} {n}" for reason, n in dropped.items() if n and reason not in ("duplicate_item", "unused_item"))
    if not removed:
        return "ingest: no interactions read: the interactions file holds no data rows"
    return (
        f"ingest: no users left after the rules ({rows_read} interactions read; removed: {removed}). "
        f"short_user: interactions of users with fewer than min_user_interactions ({rules.min_user_interactions}); "
        "unknown_item: interactions whose item has no row in the items file; bad_*: unreadable values"
    )


def ingest(raw: RawSource, rules: SplitRules) -> Ingested:
    check_bad_values(raw.bad_values, rules.max_bad_fraction)
    rows_read = raw.interactions.height  # lines an adapter could not parse, or with bad values, are in counts
    items_read = raw.items.height
    items, inter, dropped = clean(raw, rules)
    for bad in raw.bad_values:
        dropped[bad.reason] += bad.count
    if inter.is_empty():
        raise SourceError(nothing_left(rows_read, dropped, rules))
    seqs, popularity = split(inter)
    roots = tuple(root.absolute() for root in raw.image_roots)
    has_image = pl.Series("has_image", check_images(items, rules, roots, dropped), pl.Boolean)
    images = ImageSource(items.select("item_idx", *IMAGE_COLUMNS).with_columns(has_image), rules, roots)
    items = items.drop("image_refused")
    items = items.with_columns(
        pl.col("title").fill_null(""),
        pl.col("text").fill_null(""),
        pl.coalesce("image_path", "image_url").alias("image_ref"),
        has_image,
    )
    has_title, has_text = pl.col("title").str.strip_chars() != "", pl.col("text").str.strip_chars() != ""
    if raw.has_text_columns:  # else every item is its title alone, by the user's choice
        dropped["empty_text"] += items.filter(has_title & ~has_text).height
    dropped["empty_title_and_text"] += items.filter(~has_title & ~has_text).height
    report = {
        "interactions_read": rows_read,
        "items_read": items_read,
        "users": seqs.height,
        "items": items.height,
        "interactions": inter.height,
        "train_interactions": int(seqs["train_items"].list.len().sum()),
        "items_with_image": int(has_image.sum()),
        "counts": dict(sorted(dropped.items())),
    }
    if raw.bad_values:
        report["bad_values"] = [asdict(bad) for bad in raw.bad_values]
    log.info("ingest: %d users, %d items, %d interactions", report["users"], report["items"], report["interactions"])
    return Ingested(items, images, inter, seqs, popularity, report)


def write(
    result: Ingested, out_dir: Path, report_path: Path, provenance: dict, image_row_group_bytes: int = IMAGE_ROW_GROUP_BYTES
) -> None:
    """The tables and the report; images.parquet is written one row group at a time as the files
    are read (at most `image_row_group_bytes` of images each)."""
    _write_frame(result.items, out_dir / "items.parquet", schema.ITEMS, provenance)
    with parquet_writer(out_dir / "images.parquet", schema.IMAGES, provenance) as writer:
        for group in image_row_groups(result.images, image_row_group_bytes):
            writer.write_table(group)
    _write_frame(result.interactions, out_dir / "interactions.parquet", schema.INTERACTIONS, provenance)
    _write_frame(result.sequences, out_dir / "sequences.parquet", schema.SEQUENCES, provenance)
    _write_frame(result.popularity, out_dir / "popularity.parquet", schema.POPULARITY, provenance)
    write_json(result.report, report_path)


def _write_frame(frame: pl.DataFrame, path: Path, table_schema: pa.Schema, provenance: dict) -> None:
    """Only the schema's columns go to Arrow (the interactions' user keys would be copied, 1 GB at L)."""
    write_table(frame.select(table_schema.names).to_arrow(), path, table_schema, provenance)
