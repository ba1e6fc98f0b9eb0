"""Reading frozen token features back for training: (N+1, T, D) float16, row 0 = padding."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from ..io import read_metadata

READ_ROWS = 256  # items decoded at a time (the whole of one item's tokens: 151 KB at 30 x 384 + 50 x 1280)
# Stream the pages through an 8 MB buffer: the default (pre_buffer) holds whole row groups, or
# more; measured on a 960 MB image file, ~1 GB of Arrow memory against ~0.1 GB this way.
STREAM = dict(pre_buffer=False, buffer_size=8 << 20)


@dataclass
class TokenFeatures:
    tokens: torch.Tensor  # (N+1, T, D) float16; row 0 (padding) and absent items are zero
    mask: torch.Tensor  # (N+1, T) bool, True = real token; token 0 is always True
    present: torch.Tensor  # (N+1,) bool, False for padding and items without this modality
    metadata: dict

    @property
    def num_items(self) -> int:
        return self.tokens.shape[0] - 1


def load_token_features(path: str | Path, num_items: int | None = None, max_tokens: int | None = None) -> TokenFeatures:
    """Read a feature file written by the text/image stage: all its tokens, or only the first
    `max_tokens` of each item (CLS/pooled first), which is all a model keeps.

    The kept tokens go straight from the Parquet values, READ_ROWS items at a time, into one
    preallocated float16 array: the peak is that array plus a few batches, never the whole
    file."""
    meta = read_metadata(path)
    num_tokens, dim = int(meta["num_tokens"]), int(meta["dim"])
    keep = num_tokens if max_tokens is None else min(max_tokens, num_tokens)
    file = pq.ParquetFile(path, **STREAM)
    idx = file.read(columns=["item_idx"])["item_idx"].to_numpy()
    n = num_items if num_items is not None else int(idx.max(initial=0))
    if len(idx) != n or not np.array_equal(np.sort(idx), np.arange(1, n + 1)):
        raise ValueError(f"{path}: expected one row per item 1..{n}, got {len(idx)} rows; rerun the feature stage")
    tokens = np.zeros((n + 1, keep, dim), dtype=np.float16)
    mask = np.zeros((n + 1, keep), dtype=bool)
    mask[:, 0] = True
    present = np.zeros(n + 1, dtype=bool)
    for batch in file.iter_batches(batch_size=READ_ROWS, columns=["item_idx", "tokens", "mask", "present"]):
        rows = batch.column("item_idx").to_numpy()
        # flatten() (not .values) honours a slice's offset; the reshape is a view of the batch
        tokens[rows] = batch.column("tokens").flatten().to_numpy().reshape(len(rows), num_tokens, dim)[:, :keep]
        mask[rows] = batch.column("mask").flatten().to_numpy(zero_copy_only=False).reshape(len(rows), num_tokens)[:, :keep]
        present[rows] = batch.column("present").to_numpy(zero_copy_only=False)
    # Arrow's allocator (mimalloc) keeps the pages of the decoded batches for reuse: hand them back,
    # or the training process holds ~1.5x the image features' size more for its whole run.
    pa.default_memory_pool().release_unused()
    return TokenFeatures(torch.from_numpy(tokens), torch.from_numpy(mask), torch.from_numpy(present), meta)
