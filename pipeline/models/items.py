"""Item encoders: from an item index to one vector per branch, (branches, n, d).

`ItemSources` holds the three inputs of every item (frozen text tokens, frozen image tokens,
a trainable ID embedding) and projects them to width d (the ID through a Linear(d, d) as in the
reference when `id_projection`, else as it is). The encoders combine them:
- `IMTItems`: ODMT. The IMT over [text ; image ; ID], then one output MLP per branch.
- `LateFusionItems`: no IMT. Each branch is its own source (text/image CLS token, ID) + MLP.
- `EarlyFusionItems`: one "fused" branch, the sum or concatenation of the projected text CLS,
  image CLS and ID, + MLP.
Frozen features live in non-persistent float16 buffers: they are not saved with the weights
(a trained model is rebuilt from the feature files) and are cast to float per gathered batch.
"""

from __future__ import annotations

import math
from typing import Literal, Protocol

import numpy as np
import scipy.linalg
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .imt import IDAwareMultimodalTransformer
from .layers import mlp

IdInit = Literal["mean_cls", "text_cls", "image_cls", "random"]


class ItemTokens(Protocol):
    """Frozen token features of items 0..N, row 0 the padding: what the models read (the feature
    store's `load_token_features` gives one; so may anything else with these tensors)."""

    tokens: torch.Tensor  # (N+1, T, D) float16, CLS/pooled first; absent items zero
    mask: torch.Tensor  # (N+1, T) bool, True = real token; token 0 always True
    present: torch.Tensor  # (N+1,) bool, False for padding and items without this source


class ItemSources(nn.Module):
    def __init__(
        self,
        num_items: int,
        width: int,
        use_id: bool,
        text: ItemTokens | None,
        image: ItemTokens | None,
        text_tokens: int,
        image_tokens: int,
        id_projection: bool = True,
        id_scale_sqrt_width: bool = False,
    ):
        super().__init__()
        self.num_items = num_items
        self.id_table = nn.Embedding(num_items + 1, width, padding_idx=0) if use_id else None
        self.id_proj = nn.Linear(width, width) if use_id and id_projection else None
        # Ours, off in the reference: as Transformers scale token embeddings, so that the ID token
        # enters at about the scale of a projected content token while the table keeps a small init.
        self.id_scale = math.sqrt(width) if id_scale_sqrt_width else 1.0
        self.text_proj = self._add_features("text", text, text_tokens, width)
        self.image_proj = self._add_features("image", image, image_tokens, width)

    def _add_features(self, name: str, features: ItemTokens | None, max_tokens: int, width: int) -> nn.Linear | None:
        if features is None:
            return None
        if len(features.tokens) - 1 != self.num_items:
            raise ValueError(f"{name} features cover {len(features.tokens) - 1} items, the sequences {self.num_items}; rerun the feature stage")
        keep = min(max_tokens, features.tokens.shape[1])  # the first tokens: CLS/pooled first
        # No copy when the features hold only the kept tokens (build_model reads no more)
        self.register_buffer(f"{name}_tokens", features.tokens[:, :keep].contiguous(), persistent=False)
        if name == "text":  # image keys are always visible in the IMT: only text has padding
            self.register_buffer("text_mask", features.mask[:, :keep].contiguous(), persistent=False)
        return nn.Linear(features.tokens.shape[2], width)

    def present(self) -> tuple[str, ...]:
        """The sources this item encoder reads, in branch order (id, text, image)."""
        built = {"id": self.id_table, "text": self.text_proj, "image": self.image_proj}
        return tuple(name for name, module in built.items() if module is not None)

    def text(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.text_proj(self.text_tokens[ids].float()), self.text_mask[ids]

    def image(self, ids: torch.Tensor) -> torch.Tensor:
        return self.image_proj(self.image_tokens[ids].float())

    def ident(self, ids: torch.Tensor) -> torch.Tensor:
        vectors = self.id_table(ids) * self.id_scale
        return self.id_proj(vectors) if self.id_proj is not None else vectors

    def single(self, branch: str, ids: torch.Tensor) -> torch.Tensor:
        """A branch's one projected input vector without the IMT: the ID, or the CLS token."""
        if branch == "id":
            return self.ident(ids)
        proj, tokens = (self.text_proj, self.text_tokens) if branch == "text" else (self.image_proj, self.image_tokens)
        return proj(tokens[ids, 0].float())


def initial_id_table(
    how: IdInit, width: int, text: ItemTokens | None, image: ItemTokens | None, like: torch.Tensor, rescale: bool = False
) -> torch.Tensor | None:
    """ID embedding initialisation from the items' CLS (first-token) features, or None for
    "random" (keep `like`, the model's random initialisation).

    Each chosen modality's CLS features are used as they are when their dim equals `width`
    (the reference), else centred and projected onto their top-`width` principal directions
    (found on a sample of PCA_SAMPLE items in larger catalogues).
    Items lacking a modality average only what they have; the padding row is zero. With
    `rescale` (ours; the reference keeps the features' own scale) the table is rescaled to the
    standard deviation of `like`: the features then set the directions of the ID vectors, not
    their scale (a large-scale table would learn slowly under Adam).
    """
    if how == "random":
        return None
    # mean_cls: the mean over the content sources the run uses (text alone without images)
    sources = {"mean_cls": tuple(f for f in (text, image) if f is not None), "text_cls": (text,), "image_cls": (image,)}[how]
    if not sources or any(f is None for f in sources):
        raise ValueError(f"id_init {how!r} needs the features it names; use id_init 'random' for this variant")
    # The (N+1, width) sums are float64 as before (narrow: 51 MB at 100k items); the wide CLS
    # features are only ever converted in bounded pieces (_to_width).
    total = torch.zeros(like.shape, dtype=torch.float64)
    count = torch.zeros(like.shape[0], 1, dtype=torch.float64)
    for features in sources:
        present = features.present.clone()
        present[0] = False
        rows = present.nonzero().squeeze(1)
        total.index_add_(0, rows, _to_width(features.tokens[:, 0], rows, width))  # in place: no gathered copy
        count[rows] += 1
    table = total.div_(count.clamp(min=1))
    if rescale:
        table = table * like[1:].double().std() / table[1:].std().clamp(min=1e-12)
    return table.to(like.dtype)


PCA_SAMPLE = 20_000  # items whose CLS features fix the principal directions (float32: 100 MB at D = 1280)
PCA_SEED = 0
PROJECT_ROWS = 8192  # items centred and projected at a time above PCA_SAMPLE


def _to_width(cls: torch.Tensor, rows: torch.Tensor, width: int, sample: int = PCA_SAMPLE) -> torch.Tensor:
    """The CLS features (N+1, D) of `rows` at `width` dims, float64 (len(rows), width): as they are
    when D == width, else centred and projected onto their top-`width` principal directions.

    Up to `sample` rows: one exact SVD of all of them. Above: the mean over all rows, the
    directions from the scatter matrix of a seeded sample of `sample` rows, and the projection
    in blocks, so that memory stays bounded by the sample, not the catalogue."""
    if cls.shape[1] == width:
        return cls[rows].double()
    if len(rows) <= sample:
        centred = cls[rows].double()
        centred -= centred.mean(0)
        _, _, vh = torch.linalg.svd(centred, full_matrices=False)
        out = centred @ vh[:width].T
    else:
        # The wide arithmetic in float32 (the features are float16): the mean, the sample's (D, D)
        # scatter matrix and the projection, block by block through one reused buffer (fresh
        # memory is first-touch page faults, most of this step's time); float64 only for the
        # scatter's eigenvectors and the narrow output.
        blocks = rows.split(PROJECT_ROWS)
        buffer = torch.empty(len(blocks[0]), cls.shape[1])
        mean = (sum(buffer[: len(block)].copy_(cls[block]).sum(0).double() for block in blocks) / len(rows)).float()
        chosen = torch.randperm(len(rows), generator=torch.Generator().manual_seed(PCA_SEED))[:sample].sort().values
        scatter = torch.zeros(cls.shape[1], cls.shape[1])
        for block in rows[chosen].split(PROJECT_ROWS):
            centred = buffer[: len(block)].copy_(cls[block]).sub_(mean)
            scatter.addmm_(centred.T, centred)
        directions = _top_eigenvectors(scatter, width).float()
        out = torch.empty(len(rows), directions.shape[1], dtype=torch.float64)
        for block, projected in zip(blocks, out.split(PROJECT_ROWS)):
            projected.copy_(buffer[: len(block)].copy_(cls[block]).sub_(mean) @ directions)
    return out if out.shape[1] == width else nn.functional.pad(out, (0, width - out.shape[1]))  # fewer dims than width: zero-fill


def _top_eigenvectors(scatter: torch.Tensor, k: int) -> torch.Tensor:
    """The eigenvectors of the `k` largest eigenvalues of a symmetric (D, D) matrix, largest
    first, (D, min(k, D)) float64: LAPACK's dsyevx computes only those (half of a full eigh)."""
    dim = scatter.shape[0]
    _, vectors = scipy.linalg.eigh(scatter.double().numpy(), subset_by_index=[dim - min(k, dim), dim - 1], driver="evx")
    return torch.from_numpy(np.ascontiguousarray(vectors[:, ::-1]))  # eigh sorts ascending


class IMTItems(nn.Module):
    """The IMT over the present sources' tokens, then one output MLP per present source."""

    def __init__(
        self,
        sources: ItemSources,
        width: int,
        layers: int,
        heads: int,
        dropout: float,
        id_aware: bool,
        ffn_dropout: bool = False,
        fast: bool = False,
        attention_dropout: bool = False,
    ):
        """fast: each distinct item of a call projected once, the IMT's last block computed at its
        output tokens only (the same math, other float rounding)."""
        super().__init__()
        self.sources, self.branches, self.fast = sources, sources.present(), fast
        self.imt = IDAwareMultimodalTransformer(width, layers, heads, dropout, id_aware, ffn_dropout, fast, attention_dropout)
        self.heads = nn.ModuleDict({b: mlp(width, width) for b in self.branches})

    def forward(self, ids: torch.Tensor, recompute_chunk: int | None = None) -> torch.Tensor:
        """(n,) ids -> (branches, n, d). recompute_chunk: the IMT in checkpointed chunks of that
        many slots, whose activations the backward pass recomputes (with the chunk's dropout
        masks), so that the peak holds one chunk's instead of the call's."""
        if self.fast:
            # The projected tokens depend on the item alone (dropout comes later, in the IMT):
            # each distinct item is projected once, outside any recomputation, and gathered to its slots.
            unique, slots = torch.unique(ids, return_inverse=True)
            projected = self._project(unique)

            def encode(part: torch.Tensor) -> torch.Tensor:
                return self._transform(*(None if tokens is None else tokens[part] for tokens in projected))
        else:
            slots = ids

            def encode(part: torch.Tensor) -> torch.Tensor:
                return self._transform(*self._project(part))
        if recompute_chunk is None:
            return encode(slots)
        return torch.cat([checkpoint(encode, part, use_reentrant=False) for part in slots.split(recompute_chunk)], dim=1)

    def _project(self, ids: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        """(text tokens, text mask, image tokens, ID vector) of ids at width d; None where absent."""
        text, text_mask = self.sources.text(ids) if "text" in self.branches else (None, None)
        image = self.sources.image(ids) if "image" in self.branches else None
        ident = self.sources.ident(ids) if "id" in self.branches else None
        return text, text_mask, image, ident

    def _transform(self, text, text_mask, image, ident) -> torch.Tensor:
        outputs = self.imt(text, text_mask, image, ident)
        return torch.stack([self.heads[b](outputs[b]) for b in self.branches])


class LateFusionItems(nn.Module):
    def __init__(self, sources: ItemSources, width: int, branches: tuple[str, ...]):
        super().__init__()
        self.sources, self.branches = sources, branches
        self.heads = nn.ModuleDict({b: mlp(width, width) for b in branches})

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.stack([self.heads[b](self.sources.single(b, ids)) for b in self.branches])


class EarlyFusionItems(nn.Module):
    """One "fused" branch: the sum or concatenation of the present sources' single vectors."""

    branches = ("fused",)

    def __init__(self, sources: ItemSources, width: int, how: Literal["sum", "concat"]):
        super().__init__()
        self.sources, self.how, self.parts = sources, how, sources.present()
        self.heads = nn.ModuleDict({"fused": mlp(len(self.parts) * width if how == "concat" else width, width)})

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        parts = [self.sources.single(b, ids) for b in self.parts]
        fused = torch.cat(parts, dim=-1) if self.how == "concat" else torch.stack(parts).sum(0)
        return self.heads["fused"](fused)[None]
