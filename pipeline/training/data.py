"""Training and evaluation inputs from the ingest tables, as LEFT-padded index tensors.

Training: one sequence per user, its last max_len + 1 training items (all positions
supervised). Validation and test: the split and the items left out of each ranking come from
pipeline.sequences.split_users, the same protocol the score and evaluate stages use (validation:
the last max_len training items predict valid_item; test: the last max_len of training items +
valid_item predict test_item; excluded: their history, under evaluate.exclude_history). Only the
users that validation ranks (train.valid_users, `ranked_users`) are padded: at 1M users padding
every user's splits cost ~0.7 s and ~1 GB for the 10,000 that are ranked.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow.parquet as pq
import torch

from .. import schema
from ..io import read_checked
from ..metrics import ExcludeHistory
from ..sequences import Ragged, SplitUsers, left_pad, split_users


@dataclass
class Split:
    inputs: torch.Tensor  # (U, max_len) left-padded
    targets: torch.Tensor  # (U,)
    excluded: torch.Tensor  # (U, H) items left out of the ranking, 0-padded


@dataclass
class SequenceData:
    train: torch.Tensor  # (U, max_len + 1) left-padded training slots
    valid: Split
    test: Split
    train_counts: torch.Tensor  # (N+1,) training frequency per item, 0 for padding
    num_items: int
    num_users: int  # all users; valid and test hold those that validation ranks


def load_sequences(
    sequences_path: str | Path, popularity_path: str | Path, max_len: int, exclude_history: ExcludeHistory = "all",
    valid_users: int | Literal["all"] | None = "all", seed: int = 0,
) -> SequenceData:
    """Every user's training slots, and valid and test for the users `ranked_users(valid_users, seed)`."""
    # not user_key: 1M strings that training never reads
    table = read_checked(sequences_path, schema.SEQUENCES, schema.REINGEST, columns=["user_idx", "train_items", "valid_item", "test_item"])
    if not (np.diff(table["user_idx"].to_numpy()) > 0).all():  # ingest writes them sorted: the sort cost 0.5 s at 1M users
        table = table.sort_by("user_idx")
    train = Ragged.from_arrow(table["train_items"])
    popularity = read_checked(popularity_path, schema.POPULARITY, schema.REINGEST)
    item_idx = popularity["item_idx"].to_numpy()
    num_items = int(item_idx.max(initial=0))
    counts = torch.zeros(num_items + 1, dtype=torch.int64)
    counts[torch.from_numpy(item_idx.astype(np.int64))] = torch.from_numpy(popularity["train_count"].to_numpy().astype(np.int64))
    largest = int(max(train.values.max(initial=0), table["valid_item"].to_numpy().max(initial=0), table["test_item"].to_numpy().max(initial=0)))
    if largest > num_items:
        raise ValueError(f"{sequences_path}: item {largest} is beyond the {num_items} items of {popularity_path}; rerun ingest")
    ranked = ranked_users(len(table), valid_users, seed)
    ranked_table = table if ranked is None else table.take(ranked)
    return SequenceData(
        train=left_pad(train, max_len + 1),
        valid=_ranking_split(split_users(ranked_table, "valid", exclude_history), max_len),
        test=_ranking_split(split_users(ranked_table, "test", exclude_history), max_len),
        train_counts=counts,
        num_items=num_items,
        num_users=len(table),
    )


# train.valid_users null: every user up to this many, else a seeded sample of this many
DEFAULT_VALID_USERS = 10_000


def ranked_users(num_users: int, valid_users: int | Literal["all"] | None, seed: int) -> np.ndarray | None:
    """The users (row indices, ascending) that validation during training ranks: None = all.
    train.valid_users null: all up to DEFAULT_VALID_USERS, else that many; an integer: that many
    (all if fewer); "all": all. A sample is drawn from the seed alone, so every epoch (and a
    resumed run) ranks the same users."""
    wanted = DEFAULT_VALID_USERS if valid_users is None else valid_users
    if wanted == "all" or num_users <= wanted:
        return None
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(num_users, generator=generator)[:wanted].sort().values.numpy()


def _ranking_split(users: SplitUsers, max_len: int) -> Split:
    return Split(
        left_pad(users.histories, max_len),
        torch.from_numpy(users.targets.astype(np.int64)),
        left_pad(users.excluded, int(users.excluded.lengths().max(initial=0))),
    )


def epoch_batches(num_rows: int, batch_size: int, seed: int, epoch: int, rank: int = 0, world_size: int = 1) -> list[torch.Tensor]:
    """This rank's row indices for each step of `epoch`: a permutation fixed by (seed, epoch),
    wrapped to a multiple of world_size and dealt out, so every rank takes the same number of
    equally sized steps (as DistributedSampler does)."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(num_rows, generator=generator)
    padded = -(-num_rows // world_size) * world_size
    order = torch.cat([order, order[: padded - num_rows]])[rank::world_size]
    return list(order.split(batch_size))
