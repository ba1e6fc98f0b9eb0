"""Small building blocks shared by the item transformer (IMT) and the SASRec backbone."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class TransformerBlock(nn.Module):
    """Post-LayerNorm transformer block: bias-free Q/K/V/O attention, FFN 4d with ReLU.

    ffn_dropout: a dropout between the FFN's two layers too (ours; the reference has none)."""

    def __init__(self, width: int, heads: int, dropout: float, eps: float = 1e-6, ffn_dropout: bool = False):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by heads {heads}")
        self.heads, self.dropout = heads, dropout
        self.qkv = nn.Linear(width, 3 * width, bias=False)
        self.out = nn.Linear(width, width, bias=False)
        inner = nn.Dropout(dropout) if ffn_dropout else nn.Identity()
        self.ffn = nn.Sequential(nn.Linear(width, 4 * width), nn.ReLU(), inner, nn.Linear(4 * width, width))
        self.norm_attn = nn.LayerNorm(width, eps=eps)
        self.norm_ffn = nn.LayerNorm(width, eps=eps)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        """x: (n, S, d); allowed: (n or 1, S, S) bool, [query, key] True = may attend."""
        n, s, d = x.shape
        q, k, v = self.qkv(x).view(n, s, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed[:, None], dropout_p=self.dropout if self.training else 0.0)
        x = self.norm_attn(x + self.drop(self.out(attended.transpose(1, 2).reshape(n, s, d))))
        return self.norm_ffn(x + self.drop(self.ffn(x)))


def mlp(width_in: int, width: int) -> nn.Sequential:
    """The item output head: Linear -> LeakyReLU -> Linear."""
    return nn.Sequential(nn.Linear(width_in, width), nn.LeakyReLU(), nn.Linear(width, width))


def init_weights(module: nn.Module) -> None:
    """Xavier-normal weights and zero biases (the reference SASRec initialisation)."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.xavier_normal_(module.weight)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)
    if isinstance(module, nn.Embedding) and module.padding_idx is not None:
        with torch.no_grad():
            module.weight[module.padding_idx].zero_()
