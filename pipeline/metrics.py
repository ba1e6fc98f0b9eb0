"""Ranking metrics for leave-one-out evaluation: one target per user, judged by its rank.

Ranks are 1-based. A target that was not retrieved (outside a candidate list) has rank
``inf``, which counts as a miss at every cutoff. Metric values are fractions (0..1), means over
users; reports multiply by 100 for percent.
"""

from __future__ import annotations

import numpy as np
import torch


def full_ranks(scores: torch.Tensor, targets: torch.Tensor, history: torch.Tensor) -> torch.Tensor:
    """Exact rank of each target among ALL items, from full scores.

    scores: (U, N+1) float, column 0 = padding item; targets: (U,) item indices 1..N;
    history: (U, H) item indices to exclude (0 = padding, ignored). Padding and history items
    are excluded; the target itself never is. Rank = number of eligible items scoring at least
    as high as the target (the target included): ties count against the target, so a model
    that scores everything equal gets the worst rank, never the best.
    """
    scores = scores.float()
    targets = targets.long()[:, None]
    target_scores = scores.gather(1, targets)
    scores = scores.scatter(1, history.long(), float("-inf"))
    scores[:, 0] = float("-inf")
    scores = scores.scatter(1, targets, target_scores)
    return (scores >= target_scores).sum(1)


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
