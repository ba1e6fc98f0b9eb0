"""Sequence encoders (backbones), one per branch, behind one interface:

    encoder(x, real) -> states
    x: (B, L, d) item vectors of a LEFT-padded sequence (padded positions are zero),
    real: (B, L) bool, False at padding; states: (B, L, d), position t summarises items <= t
    and predicts the item at t+1.

All three are causal, so the last position's state is the user vector (`user_state`, which
SASRec computes without the other positions' outputs), and none depends on how
much padding precedes a sequence (nor on the values at padded positions): SASRec masks padding
keys and counts positions from the right end, GRU4Rec runs each sequence right-aligned (padding
after it), NextItNet keeps padded positions at exactly zero after every convolution, as its
causal zero padding is.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .layers import Dropout, TransformerBlock


class CausalEncoder(nn.Module):
    def user_state(self, x: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        """(B, d): the last position's state, all that scoring reads."""
        return self(x, real)[:, -1]


class SASRec(CausalEncoder):
    """Learnable absolute positions, LayerNorm + dropout, post-LN blocks, causal + padding mask.

    Positions are counted from the right end (the last slot is always position max_len - 1), as
    the reference's are for its fixed-length left-padded input; a shorter input is the same
    sequence with less padding."""

    def __init__(self, width: int, max_len: int, layers: int, heads: int, dropout: float, ffn_dropout: bool = False, attention_dropout: bool = False):
        super().__init__()
        self.positions = nn.Embedding(max_len, width)
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self.drop = Dropout(dropout)
        self.blocks = nn.ModuleList(TransformerBlock(width, heads, dropout, ffn_dropout=ffn_dropout, attention_dropout=attention_dropout) for _ in range(layers))

    def forward(self, x: torch.Tensor, real: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        """last_only: the last block computes the last position's row alone -> (B, 1, d)."""
        length = x.shape[1]
        x = self.drop(self.norm(x + self.positions.weight[self.positions.num_embeddings - length :]))
        causal = torch.ones(length, length, dtype=torch.bool, device=x.device).tril()
        # A padded query sees only itself, so no row of the softmax is empty (its output is unused).
        allowed = causal & (real[:, None, :] | torch.eye(length, dtype=torch.bool, device=x.device))
        for i, block in enumerate(self.blocks):
            last_block = i == len(self.blocks) - 1
            x = block(x, allowed, torch.tensor([length - 1], device=x.device) if last_only and last_block else None)
        return x

    def user_state(self, x: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        # The last block's keys and values still cover every position; its attention, output
        # projection and FFN run on one row of the L (the same math, other float rounding).
        return self(x, real, last_only=True)[:, -1]


class GRU4Rec(CausalEncoder):
    """Input dropout, a GRU, a linear output layer. Each sequence is run right-aligned (its
    padding moved after it), so the GRU starts from the zero state at its first real item."""

    def __init__(self, width: int, layers: int, dropout: float):
        super().__init__()
        self.drop = Dropout(dropout)
        self.gru = nn.GRU(width, width, num_layers=layers, batch_first=True)
        self.out = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        padding = (~real).sum(1)
        states, _ = self.gru(self.drop(roll_rows(x, padding)))  # causal: trailing padding changes nothing before it
        return self.out(roll_rows(states, -padding)) * real[..., None]


class NextItNet(CausalEncoder):
    """Residual blocks of two dilated causal convolutions (kernel 3, dilations r and 2r, with
    r = 1, 2, 4, ... per block), each followed by LayerNorm and ReLU. Padded positions are set
    to zero after every convolution, like the causal zero padding before the sequence, so no
    bias or normalisation output of a padded slot reaches a real one."""

    def __init__(self, width: int, layers: int, dropout: float, kernel: int = 3):
        super().__init__()
        self.drop = Dropout(dropout)
        self.kernel = kernel
        self.dilations = [d for block in range(layers) for d in (2**block, 2 ** (block + 1))]
        self.convs = nn.ModuleList(nn.Conv1d(width, width, kernel, dilation=d) for d in self.dilations)
        self.norms = nn.ModuleList(nn.LayerNorm(width, eps=1e-6) for _ in self.dilations)

    def forward(self, x: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        keep = real[..., None].to(x.dtype)
        x = self.drop(x) * keep
        for i in range(0, len(self.convs), 2):
            h = x
            for conv, norm, dilation in zip(self.convs[i : i + 2], self.norms[i : i + 2], self.dilations[i : i + 2]):
                h = F.pad(h.transpose(1, 2), ((self.kernel - 1) * dilation, 0))  # left pad: causal
                h = torch.relu(norm(conv(h).transpose(1, 2))) * keep
            x = x + h
        return x


def roll_rows(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """(B, L, d): row b rolled left by shift[b] positions (right for a negative shift)."""
    length = x.shape[1]
    index = (torch.arange(length, device=x.device)[None] + shift[:, None]) % length
    return x.gather(1, index[..., None].expand_as(x))


def build_backbone(
    name: str, width: int, max_len: int, layers: int, heads: int, dropout: float, ffn_dropout: bool = False, attention_dropout: bool = False
) -> CausalEncoder:
    if name == "sasrec":
        return SASRec(width, max_len, layers, heads, dropout, ffn_dropout, attention_dropout)
    if name == "gru4rec":
        return GRU4Rec(width, layers, dropout)
    if name == "nextitnet":
        return NextItNet(width, layers, dropout)
    raise ValueError(f"unknown backbone {name!r} (known: sasrec, gru4rec, nextitnet)")
