"""A persistent, content-addressed cache of encoder outputs, so that a rerun encodes only new input.

Each entry is keyed by sha256(encoder identity digest + the exact input the encoder sees: the
item text after templating, or the image bytes). The identity holds the model, a hash of its
weights, the preprocessing params and the token count, so changing any of them misses every
entry. Entries live in immutable Parquet parts (`part-<hash of their keys>.parquet`, schema
`feature_cache` below, plain data, never pickle), written atomically, one per window
of encoded items: an interrupted run keeps its finished windows. A folder of immutable parts
suits DVC (a `persist: true` directory output whose unchanged files are stored once) and
several ranks writing at once. Parts whose entries are mostly unused (items removed, encoder changed) are
rewritten by `compact`.
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..io import write_table
from ..progress import log

PART_GLOB = "part-*.parquet"
MIN_PARTS = 16  # `compact` merges parts when there are over twice as many as full ones would need, plus this
CACHED_ROW_GROUPS = 4  # decoded row groups kept while gathering (reads are mostly in order)


def feature_cache(num_tokens: int, dim: int) -> pa.Schema:
    """One cached encoder output per distinct input: the key is sha256(encoder identity digest +
    the exact input), the rest is what the feature file holds for an item with that input."""
    return pa.schema(
        [
            pa.field("key", pa.binary(32), nullable=False),
            pa.field("outcome", pa.string(), nullable=False),  # counted in the feature file's metadata
            pa.field("device", pa.string(), nullable=False),  # cpu | cuda: what computed it
            pa.field("tokens", pa.list_(pa.float16(), num_tokens * dim), nullable=False),
            pa.field("mask", pa.list_(pa.bool_(), num_tokens), nullable=False),
            pa.field("present", pa.bool_(), nullable=False),
        ]
    )


def identity_digest(identity: dict) -> bytes:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).digest()


def content_keys(digest: bytes, contents: Iterable[bytes | None]) -> list[bytes | None]:
    """The cache key of each input; None (no input) stays None."""
    return [None if c is None else hashlib.sha256(digest + c).digest() for c in contents]


def cache_rows(
    keys: list[bytes], outcomes: list[str], devices: list[str], tokens: np.ndarray, mask: np.ndarray, present: np.ndarray
) -> pa.Table:
    _, num_tokens, dim = tokens.shape
    columns = [
        pa.array(keys, pa.binary(32)),
        pa.array(outcomes, pa.string()),
        pa.array(devices, pa.string()),
        pa.FixedSizeListArray.from_arrays(pa.array(tokens.reshape(-1), pa.float16()), num_tokens * dim),
        pa.FixedSizeListArray.from_arrays(pa.array(mask.reshape(-1), pa.bool_()), num_tokens),
        pa.array(present, pa.bool_()),
    ]
    return pa.Table.from_arrays(columns, schema=feature_cache(num_tokens, dim))


class FeatureCache:
    """The parts in `folder` holding entries of one encoder shape (num_tokens, dim)."""

    def __init__(self, folder: str | Path, num_tokens: int, dim: int):
        self.folder, self.shape = Path(folder), (num_tokens, dim)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.parts: list[Path] = []
        self.index: dict[bytes, tuple[int, int, int]] = {}  # key -> (part, row group, row)
        self._row_groups: OrderedDict[tuple[int, int], pa.Table] = OrderedDict()
        self.refresh()

    def refresh(self) -> None:
        """(Re)read the keys of every part (parts written by other ranks since appear now)."""
        self.parts = sorted(self.folder.glob(PART_GLOB))
        self.index.clear()
        self._row_groups.clear()
        schema = feature_cache(*self.shape)
        for p, path in enumerate(self.parts):
            part = pq.ParquetFile(path)
            if not part.schema_arrow.remove_metadata().equals(schema):
                continue  # another token shape: another encoder, never a hit (compact deletes it)
            for g in range(part.num_row_groups):
                keys = part.read_row_group(g, columns=["key"])["key"].to_pylist()
                for row, key in enumerate(keys):
                    self.index.setdefault(key, (p, g, row))

    def __contains__(self, key: bytes) -> bool:
        return key in self.index

    def write_part(self, table: pa.Table, metadata: dict) -> Path:
        """Write `table` (schema feature_cache) as one new part named after its keys, atomically."""
        path = self.folder / f"part-{hashlib.sha256(b''.join(table['key'].to_pylist())).hexdigest()[:32]}.parquet"
        write_table(table, path, feature_cache(*self.shape), metadata)  # one row group (windows are < 1M rows)
        return path

    def gather(self, keys: list[bytes]) -> tuple[list[str], list[str], np.ndarray, np.ndarray, np.ndarray]:
        """outcomes, devices, tokens (n, T, D), mask (n, T), present (n,) of keys all in the cache."""
        num_tokens, dim = self.shape
        tokens = np.zeros((len(keys), num_tokens, dim), dtype=np.float16)
        mask = np.zeros((len(keys), num_tokens), dtype=bool)
        present = np.zeros(len(keys), dtype=bool)
        outcomes, devices = [""] * len(keys), [""] * len(keys)
        by_group: dict[tuple[int, int], list[tuple[int, int]]] = {}
        for i, key in enumerate(keys):
            p, g, row = self.index[key]
            by_group.setdefault((p, g), []).append((i, row))
        for group, pairs in sorted(by_group.items()):
            table = self._row_group(*group)
            out, rows = (np.array(v) for v in zip(*pairs))
            taken = table.take(pa.array(rows))
            tokens[out] = flat(taken["tokens"]).reshape(len(rows), num_tokens, dim)
            mask[out] = flat(taken["mask"]).reshape(len(rows), num_tokens)
            present[out] = taken["present"].to_numpy(zero_copy_only=False)
            for i, outcome, device in zip(out, taken["outcome"].to_pylist(), taken["device"].to_pylist()):
                outcomes[i], devices[i] = outcome, device
        return outcomes, devices, tokens, mask, present

    def _row_group(self, p: int, g: int) -> pa.Table:
        if (p, g) in self._row_groups:
            self._row_groups.move_to_end((p, g))
            return self._row_groups[(p, g)]
        table = pq.ParquetFile(self.parts[p]).read_row_group(g)
        self._row_groups[(p, g)] = table
        if len(self._row_groups) > CACHED_ROW_GROUPS:
            self._row_groups.popitem(last=False)
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
            log.info("feature cache %s: deleted %d parts no item uses any more", self.folder, len(unused_parts))
            self.refresh()
        unused = len(self.index) - len(live)
        if unused <= len(live) and len(self.parts) <= 2 * (len(live) // chunk_size + 1) + MIN_PARTS:
            return
        log.info("feature cache %s: %d entries used, %d unused, %d parts: rewriting",
                 self.folder, len(live), unused, len(self.parts))
        kept = []
        for start in range(0, len(live), chunk_size):
            keys = live[start : start + chunk_size]
            kept.append(self.write_part(cache_rows(keys, *self.gather(keys)), metadata))
        for path in set(self.parts) - set(kept):
            path.unlink()
        self.refresh()


def flat(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """The values of a fixed-size list column as one flat numpy array."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    return column.flatten().to_numpy(zero_copy_only=False)
