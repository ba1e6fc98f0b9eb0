"""Per-branch in-batch softmax cross-entropy with popularity (logQ) correction (odmt.md section 5).

Every row is one supervised position (b, t): the state after slot t of user b predicts slot
t+1. Its candidates are ALL item slots of the batch (B x (L+1)); the target is its own next
slot. logit[r, c] = <h_r, e_c> - log p(item of c). A candidate is blocked (logit -1e4) when it
is padding or its item occurs anywhere in the row's own sequence, except the target slot
itself: the user's other items are not negatives. Rows whose input or target is padding are
not supervised.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

BLOCKED = -1e4


@dataclass
class InBatch:
    rows: torch.Tensor  # (R,) supervised positions, flat indices into (B, L)
    targets: torch.Tensor  # (R,) candidate column of each row's target slot
    blocked: torch.Tensor  # (R, C) bool
    log_q: torch.Tensor  # (C,) log p of each candidate's item (zeros without logQ)


def log_popularity(train_counts: torch.Tensor) -> torch.Tensor:
    """(N+1,) log p(item) with p = training frequency / total (power 1).

    Counts are clamped to at least 1: items never seen in training (and padding) cannot be
    unblocked candidates, since candidates are training slots; the clamp only keeps log p finite.
    """
    counts = train_counts.double().clamp(min=1)
    return (counts / counts.sum()).log().float()


def in_batch(slots: torch.Tensor, candidates: torch.Tensor, offset: int, log_p: torch.Tensor | None) -> InBatch:
    """slots: (B, L+1) this rank's sequences; candidates: (C,) item of every candidate slot, this
    rank's slots flattened at columns offset .. offset + B*(L+1) (others: other ranks' slots)."""
    width = slots.shape[1]
    supervised = (slots[:, :-1] != 0) & (slots[:, 1:] != 0)
    rows = supervised.flatten().nonzero().squeeze(1)
    user, position = rows // (width - 1), rows % (width - 1)
    targets = offset + user * width + position + 1
    in_own_sequence = (slots[:, :, None] == candidates[None, None, :]).any(1)  # (B, C)
    blocked = in_own_sequence[user] | (candidates == 0)[None, :]
    blocked[torch.arange(len(rows), device=slots.device), targets] = False
    log_q = log_p[candidates] if log_p is not None else torch.zeros(len(candidates), device=slots.device)
    return InBatch(rows, targets, blocked, log_q)


def branch_logits(states: torch.Tensor, candidate_vectors: torch.Tensor, batch: InBatch) -> torch.Tensor:
    """states (B, L, d), candidate_vectors (C, d) -> (R, C) corrected, blocked logits (float32)."""
    h = states.reshape(-1, states.shape[-1])[batch.rows].float()
    logits = h @ candidate_vectors.float().T - batch.log_q
    return logits.masked_fill(batch.blocked, BLOCKED)


def cross_entropy(logits: torch.Tensor, batch: InBatch) -> torch.Tensor:
    return F.cross_entropy(logits, batch.targets)
