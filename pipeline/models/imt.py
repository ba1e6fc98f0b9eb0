"""The ID-aware multi-modal transformer (IMT): one small transformer over each item's tokens.

Input per item: [text tokens ; image tokens ; one ID token], already projected to width d,
with no positional or modality-type embeddings. The ID-aware mask keeps the content tokens
free of the ID: no query except the ID token's may attend to the ID key, while the ID token
attends to everything. Text padding keys are masked; image and ID keys are always visible.
Outputs: the text CLS position, the image CLS position and the ID position.
"""

from __future__ import annotations

import torch
from torch import nn

from .layers import TransformerBlock


def imt_attention_mask(text_mask: torch.Tensor, num_image_tokens: int, id_aware: bool) -> torch.Tensor:
    """(n, S, S) bool, [query, key] True = may attend, for S = text + image + 1 tokens."""
    n = text_mask.shape[0]
    always = torch.ones(n, num_image_tokens + 1, dtype=torch.bool, device=text_mask.device)
    keys = torch.cat([text_mask.bool(), always], dim=1)  # (n, S)
    s = keys.shape[1]
    allowed = keys[:, None, :].expand(n, s, s).clone()
    if id_aware:
        allowed[:, :-1, -1] = False  # only the last query (the ID token) sees the ID key
    return allowed


class IDAwareMultimodalTransformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, dropout: float, id_aware: bool = True):
        super().__init__()
        self.id_aware = id_aware
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(TransformerBlock(width, heads, dropout, eps=1e-6) for _ in range(layers))

    def forward(
        self, text: torch.Tensor, text_mask: torch.Tensor, image: torch.Tensor, ident: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """text (n, Tt, d), text_mask (n, Tt), image (n, Ti, d), ident (n, d) -> three (n, d) outputs."""
        allowed = imt_attention_mask(text_mask, image.shape[1], self.id_aware)
        x = self.drop(torch.cat([text, image, ident[:, None]], dim=1))
        for block in self.blocks:
            x = block(x, allowed)
        return x[:, 0], x[:, text.shape[1]], x[:, -1]
