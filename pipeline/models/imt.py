"""The ID-aware multi-modal transformer (IMT): one small transformer over each item's tokens.

Input per item: [text tokens ; image tokens ; one ID token], already projected to width d,
with no positional or modality-type embeddings; a source the run does not use (a catalogue
without images, say) is simply absent from the sequence. The ID-aware mask keeps the content tokens
free of the ID: no query except the ID token's may attend to the ID key, while the ID token
attends to everything. Text padding keys are masked; image and ID keys are always visible.
Outputs: the text CLS position, the image CLS position and the ID position.
"""

from __future__ import annotations

import torch
from torch import nn

from .layers import Dropout, TransformerBlock


def imt_attention_mask(text_mask: torch.Tensor, num_image_tokens: int, id_aware: bool, has_id: bool = True) -> torch.Tensor:
    """(n, S, S) bool, [query, key] True = may attend, for S = text + image (+ 1 ID) tokens;
    text_mask is (n, 0) when there is no text."""
    n = text_mask.shape[0]
    always = torch.ones(n, num_image_tokens + int(has_id), dtype=torch.bool, device=text_mask.device)
    keys = torch.cat([text_mask.bool(), always], dim=1)  # (n, S)
    s = keys.shape[1]
    allowed = keys[:, None, :].expand(n, s, s).clone()
    if id_aware and has_id:
        allowed[:, :-1, -1] = False  # only the last query (the ID token) sees the ID key
    return allowed


class IDAwareMultimodalTransformer(nn.Module):
    def __init__(
        self,
        width: int,
        layers: int,
        heads: int,
        dropout: float,
        id_aware: bool = True,
        ffn_dropout: bool = False,
        outputs_only: bool = False,
        attention_dropout: bool = False,
    ):
        """outputs_only: the last block computes only the rows of the output tokens (the same
        math and random stream, other float rounding)."""
        super().__init__()
        self.id_aware, self.outputs_only = id_aware, outputs_only
        self.drop = Dropout(dropout)
        self.blocks = nn.ModuleList(TransformerBlock(width, heads, dropout, 1e-6, ffn_dropout, attention_dropout) for _ in range(layers))

    def forward(
        self, text: torch.Tensor | None, text_mask: torch.Tensor | None, image: torch.Tensor | None, ident: torch.Tensor | None
    ) -> dict[str, torch.Tensor]:
        """text (n, Tt, d) with text_mask (n, Tt), image (n, Ti, d), ident (n, d), each None when
        absent -> {"text": output at the text CLS, "image": at the image CLS, "id": at the ID
        token}, (n, d) each, for the sources given."""
        parts, outputs, start = [], {}, 0
        for name, tokens in (("text", text), ("image", image), ("id", None if ident is None else ident[:, None])):
            if tokens is not None:
                parts.append(tokens)
                outputs[name] = start
                start += tokens.shape[1]
        if not parts:
            raise ValueError("the IMT needs at least one source")
        x = torch.cat(parts, dim=1)
        if text_mask is None:
            text_mask = torch.zeros(x.shape[0], 0, dtype=torch.bool, device=x.device)
        allowed = imt_attention_mask(text_mask, 0 if image is None else image.shape[1], self.id_aware, has_id=ident is not None)
        x = self.drop(x)
        positions = torch.tensor(list(outputs.values()), device=x.device)
        for i, block in enumerate(self.blocks):
            # The last block is read at the output tokens only: their rows can be all it computes.
            queries = positions if self.outputs_only and i == len(self.blocks) - 1 else None
            x = block(x, allowed, queries)
        if not self.outputs_only:
            x = x[:, positions]
        return {name: x[:, i] for i, name in enumerate(outputs)}
