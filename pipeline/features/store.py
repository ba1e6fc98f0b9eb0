"""Reading frozen token features back for training: (N+1, T, D) float16, row 0 = padding."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from ..io import read_metadata


@dataclass
class TokenFeatures:
    tokens: torch.Tensor  # (N+1, T, D) float16; row 0 (padding) and absent items are zero
    mask: torch.Tensor  # (N+1, T) bool, True = real token; token 0 is always True
    present: torch.Tensor  # (N+1,) bool, False for padding and items without this modality
    metadata: dict

    @property
    def num_items(self) -> int:
        return self.tokens.shape[0] - 1


def load_token_features(path: str | Path, num_items: int | None = None) -> TokenFeatures:
    """Read a feature file written by the text/image stage (memory-mapped, no float32 copy)."""
    meta = read_metadata(path)
    num_tokens, dim = int(meta["num_tokens"]), int(meta["dim"])
    table = pq.read_table(path, memory_map=True)
    idx = table["item_idx"].to_numpy()
    n = num_items if num_items is not None else int(idx.max(initial=0))
    if len(idx) != n or not np.array_equal(np.sort(idx), np.arange(1, n + 1)):
        raise ValueError(f"{path}: expected one row per item 1..{n}, got {len(idx)} rows; rerun the feature stage")
    flat = table["tokens"].combine_chunks().flatten().to_numpy(zero_copy_only=False)
    tokens = torch.zeros(n + 1, num_tokens, dim, dtype=torch.float16)
    tokens.numpy()[idx] = flat.reshape(len(idx), num_tokens, dim)  # numpy copy: the source may be a read-only map
    mask = torch.zeros(n + 1, num_tokens, dtype=torch.bool)
    mask[:, 0] = True
    mask_np = table["mask"].combine_chunks().flatten().to_numpy(zero_copy_only=False).reshape(len(idx), num_tokens)
    mask[torch.from_numpy(idx.astype(np.int64))] = torch.from_numpy(mask_np)
    present = torch.zeros(n + 1, dtype=torch.bool)
    present[torch.from_numpy(idx.astype(np.int64))] = torch.from_numpy(table["present"].to_numpy(zero_copy_only=False))
    return TokenFeatures(tokens, mask, present, meta)
