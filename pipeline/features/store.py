"""The feature store: frozen encoder tokens per item, as a folder that DVC versions part by part.

A store folder (e.g. data/features/image/, a DVC directory output) holds:

- `part-<32 hex>.parquet`: immutable parts of encoder outputs, one row per distinct input
  (schema `feature_part`): its key, sha256(encoder identity digest + the exact input the encoder
  saw: the templated text, the image bytes), and its tokens, one fixed-size binary column per
  token position (t000, t001, ...: `dim` float16 each). A reader that keeps k of the T tokens
  reads k columns, about k/T of the bytes; a writer copies bytes, with no repetition level per
  float. A part is named after its keys and written atomically, by whichever rank encoded it.
- `index.parquet`: one row per item 1..N (schema `FEATURE_INDEX`): its key and where that key is
  (part, row), present and outcome; its metadata is the provenance (encoder, weights,
  preprocessing, num_tokens, dim, counts of outcomes, devices, world size).

The parts are also the cache of the extraction: an item whose input and encoder are unchanged
keeps its entry, so adding 1% of items writes parts for those only, and `dvc push` uploads them
and the index. Parts whose entries no item uses any more are deleted; parts mostly unused are
rewritten (`compact`). Everything read here may come from a remote: the index and every part are
checked (schema, names, rows, keys, finite values) and a failure names the file.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import re
from collections import Counter, OrderedDict
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from ..io import read_metadata, write_table
from ..progress import log
from ..schema import FEATURE_INDEX, feature_part, token_columns

INDEX = "index.parquet"
PART_PATTERN = re.compile(r"part-[0-9a-f]{32}\.parquet")  # nothing else is ever opened (no path from a file)
LAYOUT = "feature-store/1"  # in the index metadata: the layout this module reads and writes
COMPRESSIONS = ("none", "lz4", "zstd")  # of the token columns (params: token_compression)
READ_ROWS = 1024  # rows of a part decoded at a time while loading
NON_FINITE = 0x7C00  # the exponent bits of a float16: all set in an infinity or a NaN
MIN_PARTS = 16  # `compact` merges parts when there are over twice as many as full ones would need, plus this
CACHED_PARTS = 4  # decoded parts kept while gathering for a rewrite (reads are mostly in order)


class StoreError(ValueError):
    """A store folder that cannot be read as it is: the message names the file and what to rerun."""


@dataclass
class TokenFeatures:
    tokens: torch.Tensor  # (N+1, T, D) float16; row 0 (padding) and absent items are zero
    mask: torch.Tensor  # (N+1, T) bool, True = real token; token 0 is always True
    present: torch.Tensor  # (N+1,) bool, False for padding and items without this modality
    metadata: dict

    @property
    def num_items(self) -> int:
        return self.tokens.shape[0] - 1


def part_rows(
    keys: list[bytes], outcomes: list[str], devices: list[str], tokens: np.ndarray, mask: np.ndarray, present: np.ndarray
) -> pa.Table:
    """Rows of a part: tokens (n, T, D) float16, mask (n, T) bool, present (n,) bool."""
    n, num_tokens, dim = tokens.shape
    # One copy, position-major, into memory from Arrow's pool (reused from part to part: fresh
    # pages for every part cost more than the copy): each token column is then a slice of it.
    by_position = pa.allocate_buffer(tokens.size * 2)
    np.copyto(np.frombuffer(by_position, dtype="<f2").reshape(num_tokens, n, dim), tokens.transpose(1, 0, 2))
    width = 2 * dim
    columns = [
        pa.array(keys, pa.binary(32)),
        pa.array(outcomes, pa.string()),
        pa.array(devices, pa.string()),
        pa.array(present, pa.bool_()),
        fixed_binary(pa.py_buffer(np.ascontiguousarray(mask, dtype=np.uint8)), n, num_tokens),
        *(fixed_binary(by_position.slice(j * n * width, n * width), n, width) for j in range(num_tokens)),
    ]
    return pa.Table.from_arrays(columns, schema=feature_part(num_tokens, dim))


def fixed_binary(values: pa.Buffer, n: int, width: int) -> pa.FixedSizeBinaryArray:
    """n fixed-size binary values of `width` bytes each, laid end to end in `values` (no copy)."""
    return pa.FixedSizeBinaryArray.from_buffers(pa.binary(width), n, [None, values])


def binary_values(column: pa.ChunkedArray | pa.Array, dtype: str, per_row: int) -> np.ndarray:
    """The bytes of a fixed-size binary column as an (n, per_row) array of `dtype` (a view where
    the column is one chunk)."""
    chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
    width = np.dtype(dtype).itemsize * per_row
    arrays = []
    for chunk in chunks:
        data = np.frombuffer(chunk.buffers()[1], dtype=np.uint8)[chunk.offset * width : (chunk.offset + len(chunk)) * width]
        arrays.append(data.view(dtype).reshape(len(chunk), per_row))
    return arrays[0] if len(arrays) == 1 else np.concatenate(arrays)


def identity_digest(identity: dict) -> bytes:
    """What a key hashes besides the input: the encoder, its weights, preprocessing and shape."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).digest()


def content_keys(digest: bytes, contents) -> list[bytes | None]:
    """The store key of each input; None (no input) stays None."""
    return [None if c is None else hashlib.sha256(digest + c).digest() for c in contents]


class FeatureStore:
    """The parts in `folder` holding entries of one encoder shape (num_tokens, dim), and its index."""

    def __init__(self, folder: str | Path, num_tokens: int, dim: int, compression: str = "none"):
        if compression not in COMPRESSIONS:
            raise ValueError(f"token_compression: {compression!r} is not one of {', '.join(COMPRESSIONS)}")
        self.folder, self.shape = Path(folder), (num_tokens, dim)
        self.compression = {name: compression for name in token_columns(num_tokens)}
        self.folder.mkdir(parents=True, exist_ok=True)
        self.parts: list[Path] = []
        self.index: dict[bytes, tuple[int, int]] = {}  # key -> (part, row)
        self.about: dict[int, pa.Table] = {}  # part -> its outcome, device and present columns
        self._tables: OrderedDict[int, pa.Table] = OrderedDict()
        self.refresh()

    def refresh(self) -> None:
        """(Re)read the small columns of every part (parts written by other ranks since appear now)."""
        self.parts = sorted(p for p in self.folder.iterdir() if PART_PATTERN.fullmatch(p.name))
        self.index.clear()
        self.about.clear()
        self._tables.clear()
        schema = feature_part(*self.shape)
        for p, path in enumerate(self.parts):
            try:
                part = pq.ParquetFile(path)
                if not part.schema_arrow.remove_metadata().equals(schema):
                    continue  # another token shape: another encoder, never a hit (compact deletes it)
                small = part.read(columns=["key", "outcome", "device", "present"])
            except (pa.ArrowException, OSError) as err:  # e.g. cut in a transfer: its inputs are encoded again
                log.warning("feature store: %s is unreadable (%s): ignored, and deleted once the run is done", path, err)
                continue
            self.about[p] = small.select(["outcome", "device", "present"])
            for row, key in enumerate(small["key"].to_pylist()):
                self.index.setdefault(key, (p, row))

    def __contains__(self, key: bytes) -> bool:
        return key in self.index

    def write_part(self, table: pa.Table, metadata: dict) -> Path:
        """Write `table` (schema feature_part) as one new part named after its keys, atomically."""
        name = f"part-{hashlib.sha256(b''.join(table['key'].to_pylist())).hexdigest()[:32]}.parquet"
        path = self.folder / name
        write_table(table, path, feature_part(*self.shape), metadata, self.compression)
        return path

    def entries(self, keys: list[bytes], columns: list[str]) -> pa.Table:
        """The rows of `keys` (all in the store), in that order, with `columns`."""
        located = np.array([self.index[key] for key in keys], dtype=np.int64).reshape(-1, 2)
        pieces, order = [], []
        for p in np.unique(located[:, 0]):
            at = np.flatnonzero(located[:, 0] == p)
            pieces.append(self._table(int(p)).select(columns).take(pa.array(located[at, 1])))
            order.append(at)
        if not pieces:
            return feature_part(*self.shape).empty_table().select(columns)
        table = pa.concat_tables(pieces)
        return table.take(pa.array(np.argsort(np.concatenate(order), kind="stable")))

    def _table(self, p: int) -> pa.Table:
        if p in self._tables:
            self._tables.move_to_end(p)
            return self._tables[p]
        table = pq.read_table(self.parts[p])
        self._tables[p] = table
        if len(self._tables) > CACHED_PARTS:
            self._tables.popitem(last=False)
        return table

    def compact(self, live: list[bytes], chunk_size: int, metadata: dict) -> None:
        """Delete the parts that hold no entry of `live` (the current catalogue's keys, in its
        order); then, when over half the entries are still unused or there are too many small
        parts, rewrite the used entries as parts of `chunk_size` in catalogue order."""
        live = list(dict.fromkeys(k for k in live if k in self.index))
        used_parts = {self.index[k][0] for k in live}
        unused_parts = [path for p, path in enumerate(self.parts) if p not in used_parts]
        for path in unused_parts:
            path.unlink()
        if unused_parts:
            log.info("feature store %s: deleted %d parts no item uses any more", self.folder, len(unused_parts))
            self.refresh()
        unused = len(self.index) - len(live)
        if unused <= len(live) and len(self.parts) <= 2 * (len(live) // chunk_size + 1) + MIN_PARTS:
            return
        log.info("feature store %s: %d entries used, %d unused, %d parts: rewriting",
                 self.folder, len(live), unused, len(self.parts))
        kept = [self.write_part(self.entries(live[start : start + chunk_size], feature_part(*self.shape).names), metadata)
                for start in range(0, len(live), chunk_size)]
        for path in set(self.parts) - set(kept):
            path.unlink()
        self.refresh()

    def write_index(self, keys: list[bytes | None], absent: str, metadata: dict) -> dict:
        """The index of items 1..N (`keys` in item order; None = no input, outcome `absent`), with
        the outcome counts and the devices that computed the features in its metadata; returns
        the counts."""
        about = {p: {c: table[c].to_pylist() for c in table.column_names} for p, table in self.about.items()}
        located = [None if k is None else self.index[k] for k in keys]
        table = pa.table({
            "item_idx": np.arange(1, len(keys) + 1, dtype=np.int32),
            "key": keys,
            "part": [None if at is None else self.parts[at[0]].name for at in located],
            "row": [None if at is None else at[1] for at in located],
            "present": [False if at is None else about[at[0]]["present"][at[1]] for at in located],
            "outcome": [absent if at is None else about[at[0]]["outcome"][at[1]] for at in located],
        })
        counts = dict(sorted(Counter(table["outcome"].to_pylist()).items()))
        devices = "+".join(sorted({about[p]["device"][row] for p, row in filter(None, located)})) or metadata.get("device", "")
        write_table(table, self.folder / INDEX, FEATURE_INDEX, {**metadata, "layout": LAYOUT, "counts": counts, "device": devices})
        return counts


def write_token_features(folder: str | Path, chunks: Iterable[tuple[np.ndarray, np.ndarray, np.ndarray]], metadata: dict) -> None:
    """A store of items 1, 2, ... from chunks of (tokens (n, T, D) float16, mask (n, T) bool,
    present (n,) bool), one part each: for tests, benchmarks and features made elsewhere. Each
    item is keyed by its values."""
    store, keys = None, []
    for tokens, mask, present in chunks:
        store = store or FeatureStore(folder, *tokens.shape[1:])
        chunk = [hashlib.sha256(t.tobytes() + m.tobytes()).digest() for t, m in zip(tokens, mask)]
        outcomes = ["present" if p else "absent" for p in present]
        store.write_part(part_rows(chunk, outcomes, ["cpu"] * len(chunk), tokens, mask, present), metadata)
        keys += chunk
    store.refresh()
    store.write_index(keys, "absent", {**metadata, "num_tokens": store.shape[0], "dim": store.shape[1]})


def read_index(folder: str | Path) -> tuple[pa.Table, dict]:
    """The checked index of a store folder and its metadata."""
    path = Path(folder) / INDEX
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no feature store index; run the feature stages first (dvc repro)")
    try:
        meta = read_metadata(path)
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as err:
        raise StoreError(f"{path}: not a readable Parquet file ({err}); rerun the feature stage (dvc repro -f)") from None
    if meta.get("layout") != LAYOUT:
        raise StoreError(f"{path}: layout {meta.get('layout')!r}, this code reads {LAYOUT!r}; rerun the feature stage")
    if not table.schema.remove_metadata().equals(FEATURE_INDEX):
        raise StoreError(f"{path}: schema differs from FEATURE_INDEX (pipeline/schema.py); rerun the feature stage")
    for key in ("num_tokens", "dim"):
        if not isinstance(meta.get(key), int) or meta[key] < 1:
            raise StoreError(f"{path}: metadata {key} is {meta.get(key)!r}, not a positive integer; rerun the feature stage")
    return table, meta


def present_fraction(folder: str | Path) -> float:
    """Share of items with this source (the index's `present`); 0 without a store."""
    if not (Path(folder) / INDEX).is_file():
        return 0.0
    present = read_index(folder)[0]["present"].to_numpy(zero_copy_only=False)
    return float(present.mean()) if len(present) else 0.0


def available_cores() -> int:
    """The cores this process may run on, unless OMP_NUM_THREADS says fewer (on a machine shared
    with other jobs, fewer threads are faster; torchrun sets 1)."""
    return int(os.environ.get("OMP_NUM_THREADS") or len(os.sched_getaffinity(0)))


def load_token_features(folder: str | Path, num_items: int | None = None, max_tokens: int | None = None) -> TokenFeatures:
    """All the tokens of a store, or only the first `max_tokens` of each item (CLS/pooled first),
    which is all a model keeps: only those columns are read, part by part, READ_ROWS rows at a
    time, into one preallocated float16 array (the peak is that array plus one batch per thread)."""
    folder = Path(folder)
    index, meta = read_index(folder)
    num_tokens, dim = meta["num_tokens"], meta["dim"]
    keep = num_tokens if max_tokens is None else min(max_tokens, num_tokens)
    idx = index["item_idx"].to_numpy()
    n = num_items if num_items is not None else len(idx)
    if not np.array_equal(idx, np.arange(1, n + 1)):
        raise StoreError(f"{folder / INDEX}: expected one row per item 1..{n} in order, got {len(idx)} rows; rerun the feature stage")
    tokens = _prefaulted_zeros((n + 1, keep, dim), np.float16)
    mask = np.zeros((n + 1, keep), dtype=bool)
    mask[:, 0] = True
    present = np.zeros(n + 1, dtype=bool)
    rows = index["row"].fill_null(-1).to_numpy()
    keys = index["key"].to_pylist()
    columns = ["key", "present", "mask", *token_columns(num_tokens)[:keep]]
    # the items of each part, grouped by one sort of the part codes (not one pass over all items
    # per part: at 10^6 items and 10^3 parts that was 10^9 string comparisons)
    names, codes = np.unique(np.array(index["part"].fill_null("").to_pylist(), dtype=object), return_inverse=True)
    by_part = np.argsort(codes, kind="stable")
    bounds = np.searchsorted(codes[by_part], np.arange(len(names) + 1))

    def read_part(p: int) -> None:
        name, items = names[p], by_part[bounds[p] : bounds[p + 1]]  # 0-based: item items[i] + 1
        if not name and all(keys[i] is None for i in items):
            return  # items without input: zero tokens, present false
        part = _open_part(folder, name, num_tokens, dim)
        wanted = rows[items]
        if wanted.min() < 0 or wanted.max() >= part.metadata.num_rows:
            raise StoreError(f"{folder / INDEX}: rows of {name} out of range (it has {part.metadata.num_rows}); rerun the feature stage")
        order = np.argsort(wanted, kind="stable")
        items, wanted = items[order], wanted[order]
        try:
            start = 0
            for batch in part.iter_batches(batch_size=READ_ROWS, columns=columns, use_threads=False):
                end = start + batch.num_rows
                hit = slice(np.searchsorted(wanted, start), np.searchsorted(wanted, end))
                start = end
                if hit.start < hit.stop:
                    _scatter(batch, items[hit] + 1, wanted[hit] - (end - batch.num_rows), keys, (num_tokens, keep, dim),
                             tokens, mask, present)
        except (pa.ArrowException, OSError) as err:
            raise StoreError(f"{folder / name}: unreadable ({err}); rerun the feature stage (dvc repro -f)") from None
        except StoreError as err:
            raise StoreError(f"{folder / name}: {err}; rerun the feature stage (dvc repro -f text_features / image_features)") from None

    # Parts fill disjoint rows: one thread per available core reads them (Arrow's decoding and
    # numpy's copies release the GIL), so the read scales with the machine. map raises the first error.
    with ThreadPoolExecutor(max_workers=max(1, min(len(names), available_cores()))) as pool:
        for _ in pool.map(read_part, range(len(names))):
            pass
    # Arrow's allocator (mimalloc) keeps the pages of the decoded batches for reuse: hand them back,
    # or the training process holds them for its whole run.
    pa.default_memory_pool().release_unused()
    return TokenFeatures(torch.from_numpy(tokens), torch.from_numpy(mask), torch.from_numpy(present), meta)


def _prefaulted_zeros(shape: tuple[int, ...], dtype: type) -> np.ndarray:
    """A zero array whose pages the kernel maps in one call (MAP_POPULATE, Linux): every page of the
    token array is written anyway, and one fault per 4 KB page was the largest cost of the L set-up
    (1.2 GB of text tokens: 3.1 s of faults in a VM, 0.55 s populated)."""
    size = int(np.prod(shape)) * np.dtype(dtype).itemsize
    if not hasattr(mmap, "MAP_POPULATE") or size == 0:
        return np.zeros(shape, dtype)
    memory = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | mmap.MAP_POPULATE)
    return np.frombuffer(memory, dtype).reshape(shape)  # the array keeps the mapping alive


def _scatter(batch: pa.RecordBatch, items: np.ndarray, rows: np.ndarray, keys: list, shape: tuple[int, int, int],
             tokens: np.ndarray, mask: np.ndarray, present: np.ndarray) -> None:
    """Copy `rows` of a part's batch into the arrays at `items` (1-based), checking
    keys and values; shape: (tokens in the part, tokens kept, dim)."""
    num_tokens, keep, dim = shape
    if batch.column("key").take(pa.array(rows)).to_pylist() != [keys[i - 1] for i in items]:
        raise StoreError(f"keys differ from {INDEX}'s (the store is inconsistent)")
    # runs of consecutive items and rows (the usual case) are slices: the batch's bytes are read in
    # place and copied once, not gathered into a copy first
    at, picked = (slice(int(ids[0]), int(ids[-1]) + 1) if (np.diff(ids) == 1).all() else ids for ids in (items, rows))
    for j in range(keep):
        values = binary_values(batch.column(f"t{j:03d}"), "<f2", dim)[picked]
        # float16 infinities and NaNs have every exponent bit set (10x faster than np.isfinite on float16)
        if ((values.view(np.uint16) & NON_FINITE) == NON_FINITE).any():
            bad = np.flatnonzero(((values.view(np.uint16) & NON_FINITE) == NON_FINITE).any(axis=1))[0]
            raise StoreError(f"item {int(items[bad])} token {j} is NaN or infinite (corrupt features)")
        tokens[at, j] = values
    mask[at] = binary_values(batch.column("mask"), "u1", num_tokens)[picked, :keep] != 0
    present[at] = batch.column("present").to_numpy(zero_copy_only=False)[picked]


def _open_part(folder: Path, name: str, num_tokens: int, dim: int) -> pq.ParquetFile:
    path = folder / name
    if not PART_PATTERN.fullmatch(name):
        raise StoreError(f"{folder / INDEX}: part name {name!r} is not part-<32 hex>.parquet; the index is corrupt: rerun the feature stage")
    if not path.is_file():
        raise StoreError(f"{path}: missing (named by {INDEX}); pull the store again (dvc pull) or rerun the feature stage")
    try:
        part = pq.ParquetFile(path, pre_buffer=False, memory_map=True)
    except (pa.ArrowException, OSError) as err:
        raise StoreError(f"{path}: not a readable Parquet file ({err}); rerun the feature stage (dvc repro -f)") from None
    if not part.schema_arrow.remove_metadata().equals(feature_part(num_tokens, dim)):
        raise StoreError(f"{path}: schema differs from feature_part({num_tokens}, {dim}) (pipeline/schema.py); rerun the feature stage")
    return part
