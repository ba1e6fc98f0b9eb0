"""Ranking metrics for leave-one-out evaluation: one target per user, judged by its rank.

Ranks are 1-based. A target that was not retrieved (outside a candidate list) has rank
``inf``, which counts as a miss at every cutoff. Metric values are fractions (0..1), means over
users; reports multiply by 100 for percent.

The one tie rule, in validation (blocked_ranks) and in the score and evaluate stages alike
(pipeline/scoring.py, pipeline/evaluation.py): ties count against the target. Its rank is the
number of ranked items scoring at least as high as it, itself included, so an item sharing the
target's score (a duplicate item vector, say) is ranked before it, and a model that scores
everything equal gets the worst rank. A target whose score is not finite (NaN, +-inf: a
diverged model) is never a hit: rank inf.
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


# Items scored at once by blocked_ranks: its memory is (users of a block) x this many float32
# scores, whatever the catalogue size (1024 x 65,536 = 256 MB), and a catalogue up to this size
# is scored in one product.
ITEM_BLOCK_SIZE = 65_536


def blocked_ranks(users: torch.Tensor, items: torch.Tensor, targets: torch.Tensor, excluded: torch.Tensor, item_block_size: int = ITEM_BLOCK_SIZE) -> torch.Tensor:
    """Exact rank of each target among ALL items, by the scores users @ items.T, without the
    (U, N+1) score matrix.

    users: (U, d); items: (N+1, d), row 0 = padding, never ranked; targets: (U,) item indices
    1..N; excluded: (U, H) item indices never ranked (the user's history under exclude_history;
    0 = padding, ignored). A target among them cannot be hit: rank inf, as when it is missing
    from a candidate list; so is a target whose score is not finite. Otherwise rank = number of
    ranked items scoring at least as high as the target (the target included): the module's tie
    rule. A NaN item score never counts against a target (NaN >= s is false).

    The items are scored in blocks of
    item_block_size rows: a first pass takes each target's score from its block, a second counts
    the ranked items of every block scoring at least as high. Both passes compute the same block
    products, so a target is compared with exactly the scores it is counted against; with more
    than one block, these are the full product's scores up to the last bit of the matrix kernel
    (the same numbers, not always the same bits). One block (N+1 <= item_block_size) is computed
    once: the ranks of the full score matrix bit for bit.
    """
    if item_block_size < 1:
        raise ValueError(f"item_block_size must be >= 1, got {item_block_size}")
    starts = range(0, len(items), item_block_size)
    targets = targets.long()
    target_scores = torch.full((len(users),), float("-inf"), device=users.device)
    block = None
    for start in starts:
        block = _ranked_block(users @ items[start : start + item_block_size].T, start, excluded)
        local = targets - start
        inside = (local >= 0) & (local < block.shape[1])
        found = block.gather(1, local.clamp(0, block.shape[1] - 1)[:, None])[:, 0]
        target_scores = torch.where(inside, found, target_scores)
    counts = torch.zeros(len(users), dtype=torch.int64, device=users.device)
    for start in starts:
        if len(starts) > 1:  # one block: still the one just computed
            block = _ranked_block(users @ items[start : start + item_block_size].T, start, excluded)
        counts += (block >= target_scores[:, None]).sum(1)
    # -inf: excluded or padding; NaN or +inf: a diverged model, whose "rank" would be 0 or 1
    return torch.where(torch.isfinite(target_scores), counts.float(), float("inf"))


def _ranked_block(scores: torch.Tensor, start: int, excluded: torch.Tensor) -> torch.Tensor:
    """The scores of items start.. (one block of columns) with each user's excluded items and the
    padding item at -inf, never ranked."""
    users, width = scores.shape
    local = excluded.long() - start
    # excluded items of other blocks go to a spare column, cut off below
    local = local.masked_fill((local < 0) | (local >= width), width)
    hidden = torch.zeros(users, width + 1, dtype=torch.bool, device=scores.device).scatter_(1, local, True)
    if start == 0:
        hidden[:, 0] = True
    return scores.float().masked_fill(hidden[:, :width], float("-inf"))


def hit_rate(ranks, k: int) -> float:
    """HR@k: share of users whose target is in the top k (= Recall@k with one target)."""
    return summarize(ranks, (k,))[f"hr@{k}"]


def ndcg(ranks, k: int) -> float:
    """NDCG@k with one relevant item: 1 / log2(rank + 1) when rank <= k, else 0."""
    return summarize(ranks, (k,))[f"ndcg@{k}"]


def mrr(ranks, k: int) -> float:
    """MRR@k: 1 / rank when rank <= k, else 0."""
    return summarize(ranks, (k,))[f"mrr@{k}"]


def summarize(ranks, ks: tuple[int, ...] = (10,)) -> dict[str, float]:
    """{"hr@k", "ndcg@k", "mrr@k"} for each k: the means over users of per_user (0 without users)."""
    return {name: float(np.mean(values)) if len(values) else 0.0 for name, values in per_user(ranks, ks).items()}


def per_user(ranks, ks: tuple[int, ...] = (10,)) -> dict[str, np.ndarray]:
    """Each user's value of "hr@k", "ndcg@k" and "mrr@k" for each k (what paired statistics
    compare): hit 1 when rank <= k, gain 1 / log2(rank + 1) and reciprocal rank 1 / rank when
    rank <= k, else 0."""
    ranks = _as_array(ranks)
    out = {}
    for k in ks:
        hit = ranks <= k
        capped = np.minimum(ranks, k)  # finite and >= 1 where it is read
        out[f"hr@{k}"] = hit.astype(np.float64)
        out[f"ndcg@{k}"] = np.where(hit, 1.0 / np.log2(capped + 1.0), 0.0)
        out[f"mrr@{k}"] = np.where(hit, 1.0 / capped, 0.0)
    return out


def _as_array(ranks) -> np.ndarray:
    if isinstance(ranks, torch.Tensor):
        ranks = ranks.detach().cpu().numpy()
    return np.asarray(ranks, dtype=np.float64)
