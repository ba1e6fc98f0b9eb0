"""Ranking metrics for leave-one-out evaluation: one target per user, judged by its rank.

Ranks are 1-based. A target that was not retrieved (outside a candidate list) has rank
``inf``, which counts as a miss at every cutoff. Metric values are fractions (0..1), means over
users; reports multiply by 100 for percent.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch

# Which history items are never ranked (the one protocol of model selection and of the reported
# metrics): "all" = every item of the user's history, a repeated target included, so such a
# target cannot be hit (the reference code, odmt.md section 8); "all_but_target" = the history
# except the target, so a repeated item stays rankable (common in repeat-aware papers).
ExcludeHistory = Literal["all", "all_but_target"]


def excluded_items(history: np.ndarray, target: int, how: ExcludeHistory) -> np.ndarray:
    """The items of ``history`` that a user's ranking leaves out, under the protocol ``how``."""
    if how == "all":
        return history
    if how == "all_but_target":
        return history[history != target]
    raise ValueError(f"unknown exclude_history {how!r} (expected all or all_but_target)")


def full_ranks(scores: torch.Tensor, targets: torch.Tensor, excluded: torch.Tensor) -> torch.Tensor:
    """Exact rank of each target among ALL items, from full scores.

    scores: (U, N+1) float, column 0 = padding item; targets: (U,) item indices 1..N;
    excluded: (U, H) item indices never ranked (excluded_items; 0 = padding, ignored). A target
    among them cannot be hit: rank inf, as when it is missing from a candidate list. Otherwise
    rank = number of ranked items scoring at least as high as the target (the target included):
    ties count against the target, so a model that scores everything equal gets the worst rank.
    """
    scores = scores.float().scatter(1, excluded.long(), float("-inf"))
    scores[:, 0] = float("-inf")
    target_scores = scores.gather(1, targets.long()[:, None])
    ranks = (scores >= target_scores).sum(1).float()
    return torch.where(torch.isneginf(target_scores[:, 0]), float("inf"), ranks)


def hit_rate(ranks, k: int) -> float:
    """HR@k: share of users whose target is in the top k (= Recall@k with one target)."""
    ranks = _as_array(ranks)
    return float(np.mean(ranks <= k)) if len(ranks) else 0.0


def ndcg(ranks, k: int) -> float:
    """NDCG@k with one relevant item: 1 / log2(rank + 1) when rank <= k, else 0."""
    ranks = _as_array(ranks)
    gains = np.where(ranks <= k, 1.0 / np.log2(np.minimum(ranks, k) + 1.0), 0.0)
    return float(np.mean(gains)) if len(ranks) else 0.0


def mrr(ranks, k: int) -> float:
    """MRR@k: 1 / rank when rank <= k, else 0."""
    ranks = _as_array(ranks)
    return float(np.mean(np.where(ranks <= k, 1.0 / np.minimum(ranks, k), 0.0))) if len(ranks) else 0.0


def summarize(ranks, ks: tuple[int, ...] = (10,)) -> dict[str, float]:
    """{"hr@k", "ndcg@k", "mrr@k"} for each k."""
    out = {}
    for k in ks:
        out[f"hr@{k}"] = hit_rate(ranks, k)
        out[f"ndcg@{k}"] = ndcg(ranks, k)
        out[f"mrr@{k}"] = mrr(ranks, k)
    return out


def _as_array(ranks) -> np.ndarray:
    if isinstance(ranks, torch.Tensor):
        ranks = ranks.detach().cpu().numpy()
    return np.asarray(ranks, dtype=np.float64)
