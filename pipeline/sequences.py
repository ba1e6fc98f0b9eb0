"""Users' item sequences as the evaluation protocol sees them, below training, scoring and
recommend (all three use them; none imports another for them): Ragged (rows of different
lengths as one flat array with offsets), a split's users, histories, targets and excluded items
(split_users, leave-one-out), and left_pad (the model input). Histories stay flat arrays from
the Parquet list column to the model input: no Python object or loop step per user.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

from pipeline.metrics import ExcludeHistory

SPLITS = ("valid", "test")


@dataclass(frozen=True)
class Ragged:
    """Rows of different lengths as one flat array: row i is ``values[offsets[i]:offsets[i + 1]]``.
    Users' histories live in this form from the Parquet list column on, so that 1M users cost
    a few array operations, not a Python object and a loop step each."""

    values: np.ndarray  # (total,) int32
    offsets: np.ndarray  # (rows + 1,) int64, starting at 0

    @classmethod
    def from_lengths(cls, values: np.ndarray, lengths: np.ndarray) -> Ragged:
        offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        return cls(np.asarray(values, dtype=np.int32), offsets)

    @classmethod
    def from_arrow(cls, lists: pa.Array | pa.ChunkedArray) -> Ragged:
        """From a (large_)list<int> column without nulls, chunk by chunk (no combined copy)."""
        chunks = lists.chunks if isinstance(lists, pa.ChunkedArray) else [lists]
        values = [chunk.flatten().to_numpy(zero_copy_only=False) for chunk in chunks]  # flatten() honours slices
        lengths = [np.diff(chunk.offsets.to_numpy()) for chunk in chunks]
        return cls.from_lengths(np.concatenate([np.zeros(0, np.int32), *values]), np.concatenate([np.zeros(0, np.int64), *lengths]))

    @classmethod
    def empty(cls, rows: int) -> Ragged:
        return cls.from_lengths(np.zeros(0, np.int32), np.zeros(rows, np.int64))

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def row(self, i: int) -> np.ndarray:
        return self.values[self.offsets[i] : self.offsets[i + 1]]

    def rows(self, block: slice) -> Ragged:
        """The contiguous rows ``block`` (step 1), sharing this one's values."""
        start, stop, step = block.indices(len(self))
        if step != 1:
            raise ValueError("Ragged.rows takes a contiguous slice")
        offsets = self.offsets[start : max(start, stop) + 1]
        return Ragged(self.values[offsets[0] : offsets[-1]], offsets - offsets[0])

    def row_ids(self) -> np.ndarray:
        """(total,) the row of each value."""
        return np.repeat(np.arange(len(self)), self.lengths())

    def append(self, column: np.ndarray) -> Ragged:
        """Each row followed by ``column[row]``."""
        lengths = self.lengths() + 1
        out = Ragged.from_lengths(np.empty(len(self.values) + len(self), np.int32), lengths)
        out.values[out.offsets[1:] - 1] = column
        out.values[np.arange(len(self.values)) + self.row_ids()] = self.values  # row r shifts by the r items appended before it
        return out

    def where(self, keep: np.ndarray) -> Ragged:
        """The values where ``keep`` (a mask over values), each row keeping its own."""
        return Ragged.from_lengths(self.values[keep], np.bincount(self.row_ids()[keep], minlength=len(self)))


@dataclass(frozen=True)
class SplitUsers:
    """The evaluation protocol of one split: every user's history (the model input), the item to
    predict and the items left out of the user's ranking."""

    split: str
    user_idx: np.ndarray  # (U,) int32
    histories: Ragged  # per user, oldest first
    targets: np.ndarray  # (U,) int32
    excluded: Ragged  # per user: never ranked (the history, under exclude_history)

    def __len__(self) -> int:
        return len(self.user_idx)

    def targets_in_history(self) -> int:
        """Users whose target is also in their history (repeat consumption)."""
        owners = self.histories.row_ids()
        repeated = owners[self.histories.values == self.targets[owners]]
        return len(np.unique(repeated))


def split_users(sequences: pa.Table, split: str, exclude_history: ExcludeHistory = "all") -> SplitUsers:
    """valid: history = train_items, target = valid_item; test: history = train_items +
    valid_item, target = test_item (leave-one-out, see pipeline/schema.py SEQUENCES); the
    excluded items (the history, or under all_but_target the history without the target), for all users at once."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r} (expected one of {SPLITS})")
    train = Ragged.from_arrow(sequences.column("train_items"))
    valid = sequences.column("valid_item").to_numpy().astype(np.int32)
    if split == "valid":
        histories, targets = train, valid
    else:
        histories, targets = train.append(valid), sequences.column("test_item").to_numpy().astype(np.int32)
    if exclude_history == "all":
        excluded = histories
    elif exclude_history == "all_but_target":
        excluded = histories.where(histories.values != targets[histories.row_ids()])
    else:
        raise ValueError(f"unknown exclude_history {exclude_history!r} (expected all or all_but_target)")
    return SplitUsers(split, sequences.column("user_idx").to_numpy().astype(np.int32), histories, targets, excluded)


def left_pad(rows: Ragged, width: int) -> torch.Tensor:
    """(U, width) int64: each row's last `width` items, right-aligned, 0 = padding. One vectorised
    step per column from the right over the rows still long enough, not a Python step per user
    (1M users at scale), nor a scatter through (total,) index arrays (6x slower at L)."""
    kept = np.minimum(rows.lengths(), width)
    out = np.zeros((len(rows), width), dtype=np.int64)
    live = np.arange(len(rows))
    for back in range(1, width + 1):  # column width - back holds each live row's back-th last item
        live = live[kept[live] >= back]
        out[live, width - back] = rows.values[rows.offsets[live + 1] - back]
    return torch.from_numpy(out)
