"""Small building blocks shared by the item transformer (IMT) and the SASRec backbone."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def drop_mask(shape: tuple[int, ...], p: float) -> torch.Tensor:
    """Dropout's mask on the CPU: a bool tensor of ``shape``, each entry True (dropped) with
    probability p, independently.

    The uniforms come from numpy's PCG64, seeded from torch's generator (so torch.manual_seed and
    activation checkpointing's saved RNG state fix the masks): torch's CPU bernoulli_ draws on one
    thread at ~9 ns an entry (157 ms for one IMT activation of the paper's configuration at width
    128: a fifth of a training step on a 2-core AMD EPYC), numpy at a third of that."""
    seed = int(torch.randint(2**62, (1,)))
    return torch.from_numpy(np.random.default_rng(seed).random(shape, dtype=np.float32) < p)


class Dropout(nn.Module):
    """Inverted dropout as nn.Dropout (entries zeroed with probability p, the others scaled by
    1/(1-p)). On the CPU its masks come from drop_mask and the backward pass keeps the bool mask,
    not torch's float noise tensor (a quarter of the memory); elsewhere torch's fused dropout,
    which keeps a bool mask too."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and self.p > 0):
            return x
        if x.device.type != "cpu":
            return F.dropout(x, self.p, training=True)
        return x.masked_fill(drop_mask(x.shape, self.p), 0.0) * (1 / (1 - self.p))

    def extra_repr(self) -> str:
        return f"p={self.p}"


class TransformerBlock(nn.Module):
    """Post-LayerNorm transformer block: bias-free Q/K/V/O attention, FFN 4d with ReLU.

    ffn_dropout: a dropout between the FFN's two layers too (ours; the reference has none).
    attention_dropout: a dropout on the attention weights too (ours; the reference has none)."""

    def __init__(self, width: int, heads: int, dropout: float, eps: float = 1e-6, ffn_dropout: bool = False, attention_dropout: bool = False):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by heads {heads}")
        self.heads = heads
        self.attention_dropout = dropout if attention_dropout else 0.0
        self.qkv = nn.Linear(width, 3 * width, bias=False)
        self.out = nn.Linear(width, width, bias=False)
        inner = Dropout(dropout) if ffn_dropout else nn.Identity()
        self.ffn = nn.Sequential(nn.Linear(width, 4 * width), nn.ReLU(), inner, nn.Linear(4 * width, width))
        self.norm_attn = nn.LayerNorm(width, eps=eps)
        self.norm_ffn = nn.LayerNorm(width, eps=eps)
        self.drop = Dropout(dropout)
        self.drop_attention = Dropout(self.attention_dropout)

    def forward(self, x: torch.Tensor, allowed: torch.Tensor, queries: torch.Tensor | None = None) -> torch.Tensor:
        """x: (n, S, d); allowed: (n or 1, S, S) bool, [query, key] True = may attend.

        queries: positions (Q,) whose outputs alone are wanted -> (n, Q, d): their rows are all
        that the attention, the output projection and the FFN compute (keys and values still
        cover every position), their dropout masks all that is drawn."""
        n, s, d = x.shape
        if queries is None:
            q, k, v = self.qkv(x).view(n, s, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
            attended = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed[:, None], dropout_p=self.attention_dropout if self.training else 0.0)
            x = self.norm_attn(x + self.drop(self.out(attended.transpose(1, 2).reshape(n, s, d))))
            return self.norm_ffn(x + self.drop(self.ffn(x)))
        head = d // self.heads
        query_weight, key_value_weight = self.qkv.weight.split([d, 2 * d])
        rows = x[:, queries]
        q = F.linear(rows, query_weight).view(n, len(queries), self.heads, head).transpose(1, 2)
        k, v = F.linear(x, key_value_weight).view(n, s, 2, self.heads, head).permute(2, 0, 3, 1, 4)
        attended = self._attention_rows(q, k, v, allowed[:, queries])
        rows = self.norm_attn(rows + self.drop(self.out(attended.transpose(1, 2).reshape(n, len(queries), d))))
        return self.norm_ffn(rows + self.drop(self.ffn(rows)))

    def _attention_rows(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        """Attention of the query rows q (n, h, Q, hd) over all keys; allowed (n or 1, Q, S)."""
        if not (self.training and self.attention_dropout > 0):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed[:, None])
        scores = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
        # nan_to_num: a query that sees no key attends to nothing, as in scaled_dot_product_attention.
        probs = scores.masked_fill(~allowed[:, None], float("-inf")).softmax(-1).nan_to_num(0.0)
        return self.drop_attention(probs) @ v


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
