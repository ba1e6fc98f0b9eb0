"""ODMT and every variant and baseline trained beside it, as one model class.

A model = an item encoder (items.py) giving each item one vector per branch, plus one
independent sequence encoder (backbones.py) per branch. Branch score = <user state, item
vector>; the fused score is the mean over branches (odmt.md section 4). The variant names the
item encoder and branches; the backbone names the sequence encoder of every branch. A run may
use fewer sources than the variant names (`sources`: a catalogue without images trains ODMT
with an ID and a text branch); the branches are then those of the sources used.

| variant | item encoder | branches | distillation |
|---|---|---|---|
| odmt | IMT, ID-aware mask | id, text, image | yes |
| odmt_no_distill | IMT, ID-aware mask | id, text, image | no |
| odmt_full_attention | IMT, full attention | id, text, image | yes |
| odmt_no_imt | late fusion (no IMT) | id, text, image | yes |
| sasrec_id | ID embedding, random init | id | - |
| text_only / image_only | that CLS token | text / image | - |
| early_fusion_sum / _concat | sum / concat of ID, text CLS, image CLS | fused | - |
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from .backbones import build_backbone
from .base import SequentialRecommender
from .items import EarlyFusionItems, IdInit, IMTItems, ItemSources, ItemTokens, LateFusionItems, initial_id_table
from .layers import init_weights
from .variants import THREE, VARIANTS, Variant, VariantName

@dataclass(frozen=True)
class ModelConfig:
    variant: VariantName = "odmt"
    backbone: Literal["sasrec", "gru4rec", "nextitnet"] = "sasrec"
    width: int = 64  # d, per branch
    max_len: int = 12  # items a user state sees
    imt_layers: int = 2
    imt_heads: int = 2
    seq_layers: int = 2
    seq_heads: int = 2
    dropout: float = 0.1
    text_tokens: int = 30  # the first tokens of the text features kept (CLS first)
    image_tokens: int = 50  # the first tokens of the image features kept (pooled/CLS first)
    id_init: IdInit = "mean_cls"  # sasrec_id always starts random: it must not see content
    # Deviations from the reference code, each a switch whose default here is the reference's
    # behaviour (docs/paper.md "Deviations from the paper"; params.yaml sets the project's choice).
    id_projection: bool = True  # a Linear(d, d) on the ID vector before the IMT, as for text and image
    id_scale_sqrt_width: bool = False  # the ID vector multiplied by sqrt(d)
    id_init_rescale: bool = False  # a content-initialised ID table rescaled to the random init's spread
    head_init_scale: float = 1.0  # the last Linear of each item head initialised x this
    xavier_init: Literal["encoders", "all"] = "encoders"  # xavier-normal on the sequence encoders only, or every Linear/Embedding
    ffn_dropout: bool = False  # a dropout between the two layers of every transformer FFN
    attention_dropout: bool = False  # a dropout on the attention weights of every transformer block
    dropout_per_slot: bool = True  # training: every slot of an item draws its own dropout mask (false: one per distinct item of a batch)
    # Speed and memory of the IMT (docs/training.md "Training speed and memory"):
    # Each distinct item of a batch projected once, the IMT's last block computed at its output
    # tokens only: the same math and dropout distribution, other masks and float rounding.
    fast_item_encoder: bool = True
    # Training: the IMT in checkpointed chunks of ITEM_CHUNK slots, its activations recomputed in
    # the backward pass (less memory, more time; other dropout draws, see _encode).
    imt_recompute: bool = False

    def validate(self) -> None:
        for name in ("width", "max_len", "imt_layers", "imt_heads", "seq_layers", "seq_heads", "text_tokens", "image_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"model.{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"model.dropout must be in [0, 1), got {self.dropout}")
        if self.head_init_scale <= 0:
            raise ValueError(f"model.head_init_scale must be > 0, got {self.head_init_scale}")


def variant_branches(variant: str, sources: tuple[str, ...] = THREE) -> tuple[str, ...]:
    """The branches a variant trains when only ``sources`` are used (in id, text, image order)."""
    spec = VARIANTS[variant]
    if spec.branches == ("fused",):
        return spec.branches
    branches = tuple(b for b in spec.branches if b in sources)
    if not branches:
        raise ValueError(f"variant {variant!r} needs the {'/'.join(spec.branches)} source, which this run does not use (train.modalities)")
    return branches


# Items per item-encoder call in item_vectors() (and per checkpointed chunk under imt_recompute):
# at 128 the IMT's activations (128 x 81 tokens x 4d for the FFN) stay in cache; the catalogue
# pass measured 1.5x faster than with 1024 on 2 cores, the same vectors.
ITEM_CHUNK = 128


class ODMT(SequentialRecommender):
    def __init__(
        self,
        cfg: ModelConfig,
        num_items: int,
        text: ItemTokens | None = None,
        image: ItemTokens | None = None,
        sources: tuple[str, ...] = THREE,
        content_init: bool = True,
    ):
        """``sources``: the inputs this run uses (train.modalities); the variant reads those of
        them it names. ``content_init``: initialise the ID table from the features (cfg.id_init);
        False when trained weights are loaded over it anyway."""
        super().__init__()
        variant = VARIANTS[cfg.variant]
        self.cfg, self.num_items = cfg, num_items
        self.branches, self.branch_dim = variant_branches(cfg.variant, sources), cfg.width
        reads = variant.sources & set(sources)
        for name, features in (("text", text), ("image", image)):
            if name in reads and features is None:
                raise ValueError(f"variant {cfg.variant!r} needs {name} features")
        item_sources = ItemSources(
            num_items,
            cfg.width,
            use_id="id" in reads,
            text=text if "text" in reads else None,
            image=image if "image" in reads else None,
            text_tokens=cfg.text_tokens,
            image_tokens=cfg.image_tokens,
            id_projection=cfg.id_projection,
            id_scale_sqrt_width=cfg.id_scale_sqrt_width,
        )
        if variant.items == "imt":
            self.items = IMTItems(item_sources, cfg.width, cfg.imt_layers, cfg.imt_heads, cfg.dropout, variant.id_aware, cfg.ffn_dropout, cfg.fast_item_encoder, cfg.attention_dropout)
        elif variant.items == "late":
            self.items = LateFusionItems(item_sources, cfg.width, self.branches)
        else:
            self.items = EarlyFusionItems(item_sources, cfg.width, "sum" if variant.items == "early_sum" else "concat")
        self.encoders = nn.ModuleList(
            build_backbone(cfg.backbone, cfg.width, cfg.max_len, cfg.seq_layers, cfg.seq_heads, cfg.dropout, cfg.ffn_dropout, cfg.attention_dropout)
            for _ in self.branches
        )
        (self if cfg.xavier_init == "all" else self.encoders).apply(init_weights)
        with torch.no_grad():
            for head in self.items.heads.values():
                # Ours (head_init_scale < 1): small item vectors at the start, as a random ID
                # embedding gives, so that the in-batch logits of IMT outputs do not start saturated.
                head[-1].weight.mul_(cfg.head_init_scale)
            if content_init and item_sources.id_table is not None and cfg.variant != "sasrec_id":
                table = initial_id_table(cfg.id_init, cfg.width, text, image, like=item_sources.id_table.weight, rescale=cfg.id_init_rescale)
                if table is not None:
                    item_sources.id_table.weight.copy_(table)

    def forward(self, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Training pass over (B, L+1) left-padded item slots: inputs are slots[:, :-1].

        Returns user states (branches, B, L, d) and the vectors of every slot's item
        (branches, B, L+1, d), the in-batch candidates.
        """
        slots = slots.long()
        vectors = self._vectors_of(slots)
        return encode_sequences(self.encoders, vectors[:, :, :-1], slots[:, :-1] != 0), vectors

    def item_vectors(self, chunk: int = ITEM_CHUNK) -> torch.Tensor:
        device = next(self.parameters()).device
        ids = torch.arange(self.num_items + 1, device=device)
        per_branch = torch.cat([self.items(part) for part in ids.split(chunk)], dim=1)  # (branches, N+1, d)
        return torch.cat(list(per_branch), dim=1)

    def user_vectors(self, sequences: torch.Tensor, item_vectors: torch.Tensor | None = None) -> torch.Tensor:
        sequences = fit_left(sequences.long(), self.cfg.max_len)
        real = sequences != 0
        if item_vectors is None:  # encode only the items these sequences hold, each once
            unique, sequences = torch.unique(sequences, return_inverse=True)
            item_vectors = torch.cat(list(self.items(unique)), dim=1)
        return users_from_item_table(self.encoders, item_vectors, sequences, real)

    def _vectors_of(self, ids: torch.Tensor) -> torch.Tensor:
        if self.training and self.cfg.dropout_per_slot and self.cfg.dropout > 0:
            # As the reference: every slot through the item encoder, each with its own dropout.
            return self._encode(ids.reshape(-1)).unflatten(1, ids.shape)
        # Without dropout the same item gives the same vector in every slot: the item encoder
        # runs once per DISTINCT item of the batch, then is gathered to the slots.
        unique, inverse = torch.unique(ids, return_inverse=True)
        return self._encode(unique)[:, inverse]

    def _encode(self, ids: torch.Tensor) -> torch.Tensor:
        """The item encoder over (n,) ids -> (branches, n, d); under imt_recompute in training, the
        IMT in checkpointed chunks of ITEM_CHUNK slots (IMTItems.forward). Dropout then draws its
        masks per chunk: the same distribution, other masks than without it."""
        if self.cfg.imt_recompute and self.training and torch.is_grad_enabled() and isinstance(self.items, IMTItems):
            return self.items(ids, recompute_chunk=ITEM_CHUNK)
        return self.items(ids)


def encode_sequences(encoders: nn.ModuleList, vectors: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """Each branch's sequence encoder over its item vectors (branches, U, L, d) of LEFT-padded
    sequences (real: (U, L), False at padding) -> states (branches, U, L, d)."""
    vectors = vectors * real[None, :, :, None]
    return torch.stack([encoder(vectors[b], real) for b, encoder in enumerate(encoders)])


def users_from_item_table(encoders: nn.ModuleList, item_table: torch.Tensor, rows: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """User vectors (U, B*d), fused-score scale, of sequences whose items are gathered from a
    table: ``item_table`` (n, B*d) holds item vectors side by side per branch (item_vectors(),
    or the rows of some items), ``rows`` (U, L) the table row of every slot, ``real`` (U, L)
    False at padding.

    An item's vectors depend on that item only, so evaluation encodes the catalogue once and
    gathers, instead of running the item encoder again over the items of every sequence. The
    numbers agree to float32 rounding, not always to the bit: at the tests' tiny widths a matrix
    product's result for a row changes in the last bits with where the row falls in the batch
    (tests/test_training.py, test_users_gathered_...); at the embedded data's shapes (width 64
    or 128) the two were bitwise equal for every batch of users tried."""
    branches = len(encoders)
    vectors = item_table.unflatten(1, (branches, -1)).transpose(0, 1)[:, rows] * real[None, :, :, None]  # (B, U, L, d)
    return torch.cat([encoder.user_state(vectors[b], real) for b, encoder in enumerate(encoders)], dim=1) / branches


class UserEncoder(nn.Module):
    """A trained model's user side over a fixed item table, its item_vectors() encoded once:
    user_vectors(sequences, item_vectors()) of the model, without its item encoder.

    The recommend stage and the exported program (pipeline/export.py) both run this module, so
    the two agree; it holds the table and the branch sequence encoders, not the IMT or the
    frozen features."""

    def __init__(self, model: SequentialRecommender, max_len: int):
        super().__init__()
        if not hasattr(model, "encoders"):
            raise TypeError(f"{type(model).__name__} has no per-branch sequence encoders to gather item vectors into")
        with torch.inference_mode():
            table = model.item_vectors().float()
        self.branches, self.branch_dim, self.max_len = len(model.branches), model.branch_dim, max_len
        self.register_buffer("item_table", table.clone())  # (N+1, B*d); row 0 = padding
        self.encoders = model.encoders

    def forward(self, sequences: torch.Tensor) -> torch.Tensor:
        """(U, L) left-padded item indices -> (U, B*d) user vectors (fused-score scale)."""
        sequences = fit_left(sequences.long(), self.max_len)
        return users_from_item_table(self.encoders, self.item_table, sequences, sequences != 0)


def fit_left(sequences: torch.Tensor, length: int) -> torch.Tensor:
    """Left-pad with 0 or keep the last `length` columns of a LEFT-padded (U, L) sequence."""
    if sequences.shape[1] >= length:
        return sequences[:, -length:]
    return nn.functional.pad(sequences, (length - sequences.shape[1], 0))
