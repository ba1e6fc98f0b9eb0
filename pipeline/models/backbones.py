"""Sequence encoders (backbones), one per branch, behind one interface:

    encoder(x, real) -> states
    x: (B, L, d) item vectors of a LEFT-padded sequence (padded positions are zero),
    real: (B, L) bool, False at padding; states: (B, L, d), position t summarises items <= t
    and predicts the item at t+1.

All three are causal, so the last position's state is the user vector.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .layers import TransformerBlock


class SASRec(nn.Module):
    """Learnable absolute positions, LayerNorm + dropout, post-LN blocks, causal + padding mask."""

    def __init__(self, width: int, max_len: int, layers: int, heads: int, dropout: float):
        super().__init__()
        self.positions = nn.Embedding(max_len, width)
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(TransformerBlock(width, heads, dropout) for _ in range(layers))

    def forward(self, x: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        length = x.shape[1]
        x = self.drop(self.norm(x + self.positions.weight[:length]))
        causal = torch.ones(length, length, dtype=torch.bool, device=x.device).tril()
        # A padded query sees only itself, so no row of the softmax is empty (its output is unused).
        allowed = causal & (real[:, None, :] | torch.eye(length, dtype=torch.bool, device=x.device))
        for block in self.blocks:
            x = block(x, allowed)
        return x


class GRU4Rec(nn.Module):
    """Input dropout, a GRU, a linear output layer. Left padding enters as zero vectors."""

    def __init__(self, width: int, layers: int, dropout: float):
        super().__init__()
        self.drop = nn.Dropout(dropout)
        self.gru = nn.GRU(width, width, num_layers=layers, batch_first=True)
        self.out = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        states, _ = self.gru(self.drop(x))
        return self.out(states)


class NextItNet(nn.Module):
    """Residual blocks of two dilated causal convolutions (kernel 3, dilations r and 2r, with
    r = 1, 2, 4, ... per block), each followed by LayerNorm and ReLU."""

    def __init__(self, width: int, layers: int, dropout: float, kernel: int = 3):
        super().__init__()
        self.drop = nn.Dropout(dropout)
        self.kernel = kernel
        self.dilations = [d for block in range(layers) for d in (2**block, 2 ** (block + 1))]
        self.convs = nn.ModuleList(nn.Conv1d(width, width, kernel, dilation=d) for d in self.dilations)
        self.norms = nn.ModuleList(nn.LayerNorm(width, eps=1e-6) for _ in self.dilations)

    def forward(self, x: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        x = self.drop(x)
        for i in range(0, len(self.convs), 2):
            h = x
            for conv, norm, dilation in zip(self.convs[i : i + 2], self.norms[i : i + 2], self.dilations[i : i + 2]):
                h = F.pad(h.transpose(1, 2), ((self.kernel - 1) * dilation, 0))  # left pad: causal
                h = torch.relu(norm(conv(h).transpose(1, 2)))
            x = x + h
        return x


def build_backbone(name: str, width: int, max_len: int, layers: int, heads: int, dropout: float) -> nn.Module:
    if name == "sasrec":
        return SASRec(width, max_len, layers, heads, dropout)
    if name == "gru4rec":
        return GRU4Rec(width, layers, dropout)
    if name == "nextitnet":
        return NextItNet(width, layers, dropout)
    raise ValueError(f"unknown backbone {name!r} (known: sasrec, gru4rec, nextitnet)")
