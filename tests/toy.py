"""A tiny synthetic dataset in the canonical formats, shared by the tests of later stages.

`make_toy_dataset(root)` writes what the ingest and feature stages would write:
root/ingest/{items,sequences,popularity}.parquet and root/features/{text,image}.parquet,
with a learnable signal (each user walks through the catalogue in steps of one or two).
`repeated_targets` users get validation and test targets taken from their own training history
(repeat consumption). The first `duplicate_texts` even items get the text features of the item
before them (duplicate titles: equal text vectors, exact score ties in a text ranking).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from pipeline import schema
from pipeline.features.store import write_token_features
from pipeline.io import write_table
from pipeline.sequences import Ragged


def make_toy_dataset(
    root: Path,
    num_users: int = 24,
    num_items: int = 30,
    seq_len: int = 8,
    text_shape: tuple[int, int] = (4, 6),
    image_shape: tuple[int, int] = (3, 5),
    seed: int = 0,
    repeated_targets: int = 0,
    duplicate_texts: int = 0,
) -> Path:
    rng = np.random.default_rng(seed)
    ingest, features = root / "ingest", root / "features"
    items = pa.table(
        {
            "item_idx": np.arange(1, num_items + 1, dtype=np.int32),
            "item_key": [f"i{k}" for k in range(1, num_items + 1)],
            "title": [f"item {k}" for k in range(1, num_items + 1)],
            "text": [f"text of item {k}" for k in range(1, num_items + 1)],
            "image_ref": [None] * num_items,
            "has_image": [False] * num_items,
        }
    )
    write_table(items, ingest / "items.parquet", schema.ITEMS)

    rows = []
    for user in range(num_users):
        start, step = rng.integers(1, num_items + 1), 1 + user % 2
        walk = [int((start - 1 + step * t) % num_items) + 1 for t in range(seq_len)]
        if user < repeated_targets:  # the user comes back to items seen before
            walk[-2], walk[-1] = walk[-3], walk[0]
        rows.append((user, f"u{user}", walk[:-2], walk[-2], walk[-1]))
    users, keys, train, valid, test = zip(*rows)
    seqs = pa.table({"user_idx": np.array(users, np.int32), "user_key": list(keys), "train_items": list(train), "valid_item": np.array(valid, np.int32), "test_item": np.array(test, np.int32)})
    write_table(seqs, ingest / "sequences.parquet", schema.SEQUENCES)
    counts = np.bincount(np.concatenate(train), minlength=num_items + 1)[1:]
    write_table(pa.table({"item_idx": np.arange(1, num_items + 1, dtype=np.int32), "train_count": counts.astype(np.int64)}), ingest / "popularity.parquet", schema.POPULARITY)

    for name, (num_tokens, dim) in (("text", text_shape), ("image", image_shape)):
        tokens = rng.standard_normal((num_items, num_tokens * dim)).astype(np.float16)
        if name == "text":
            tokens[1 : 2 * duplicate_texts : 2] = tokens[0 : 2 * duplicate_texts : 2]
        mask = np.ones((num_items, num_tokens), dtype=bool)
        mask[::3, -1] = False  # some padded text tokens
        present = np.ones(num_items, dtype=bool)
        present[-1] = False  # one item without this modality
        tokens[-1] = 0
        meta = {"modality": name, "encoder": "toy-random", "weights": "none", "pooled_only": False, "preprocessing": {}}
        write_token_features(features / name, [(tokens.reshape(num_items, num_tokens, dim), mask, present)], meta)
    return root


def ragged(rows) -> Ragged:
    """Ragged from a list of per-row sequences (the tests' plain form)."""
    rows = [np.asarray(r, dtype=np.int32) for r in rows]
    return Ragged.from_lengths(np.concatenate([np.zeros(0, np.int32), *rows]), np.array([len(r) for r in rows], dtype=np.int64))


def rows_of(values: Ragged) -> list[np.ndarray]:
    """The rows of a Ragged as a list of arrays."""
    return [values.row(i) for i in range(len(values))]


# --- per-user and full-matrix definitions the vectorised pipeline code is tested against ---


def excluded_items(history: np.ndarray, target: int, how: str) -> np.ndarray:
    """The items of one user's ``history`` that the ranking leaves out, under evaluate.exclude_history."""
    if how == "all":
        return history
    if how == "all_but_target":
        return history[history != target]
    raise ValueError(f"unknown exclude_history {how!r} (expected all or all_but_target)")


def full_ranks(scores: torch.Tensor, targets: torch.Tensor, excluded: torch.Tensor) -> torch.Tensor:
    """pipeline.metrics.blocked_ranks' ranks from the whole (U, N+1) score matrix (column 0 = padding)."""
    scores = scores.float().scatter(1, excluded.long(), float("-inf"))
    scores[:, 0] = float("-inf")
    target_scores = scores.gather(1, targets.long()[:, None])
    ranks = (scores >= target_scores).sum(1).float()
    return torch.where(torch.isfinite(target_scores[:, 0]), ranks, float("inf"))
