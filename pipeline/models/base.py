"""The one interface every recommender in this project implements (ODMT, its ablations and
the baselines), so that training, scoring and evaluation never special-case a model.

Scores are inner products. A model with several branches (ODMT: id, text, image) returns
the CONCATENATION of its branch vectors, each user vector already divided by the number of
branches, so that ONE inner product of a user vector with an item vector equals the fused
score (the mean of the branch scores). Branch b occupies columns [b*d, (b+1)*d).
"""

from __future__ import annotations

import torch
from torch import nn


class SequentialRecommender(nn.Module):
    branches: tuple[str, ...]  # e.g. ("id", "text", "image") or ("id",)
    branch_dim: int  # d: width of one branch's vectors

    def item_vectors(self) -> torch.Tensor:
        """(N+1, len(branches) * d) item vectors for the whole catalogue; row 0 = padding."""
        raise NotImplementedError

    def user_vectors(self, sequences: torch.Tensor, item_vectors: torch.Tensor | None = None) -> torch.Tensor:
        """(U, len(branches) * d) user states after the last item of each LEFT-padded (U, L)
        sequence of item indices (0 = padding), scaled so that <user, item> = fused score.

        ``item_vectors``: this model's item_vectors(), when the caller already has them (scoring
        and evaluation do): a model that builds users from its item vectors gathers them from
        this table instead of encoding the sequences' items again (the same numbers to float32
        rounding: see users_from_item_table in odmt.py). A model whose user side does not read
        item vectors ignores it."""
        raise NotImplementedError
