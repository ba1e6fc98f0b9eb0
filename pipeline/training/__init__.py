"""Training of ODMT, its ablations and baselines: the `train` params section and the entry
point (`train` in trainer.py), and `load_trained` for the stages that use a trained model."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch

from ..config import from_dict
from ..features.store import load_token_features, present_fraction
from ..io import ArtifactError
from ..models.odmt import ODMT, THREE, VARIANTS, ModelConfig
from ..progress import log
from . import checkpoint
from .distillation import DistillConfig

Source = Literal["id", "text", "image"]


@dataclass(frozen=True)
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    # The sources the model uses: "auto" = id, plus text and image where the feature file says
    # at least modality_min_present of the items have them; or an explicit list.
    modalities: Literal["auto"] | list[Source] = "auto"
    modality_min_present: float = 0.5
    seed: int = 1
    epochs: int = 40  # the most epochs a run trains (early stopping: patience)
    batch_size: int = 64  # sequences per step and rank; in-batch negatives come from them
    lr: float = 1e-3
    weight_decay: float = 0.1  # AdamW, on all parameters
    clip_norm: float = 5.0  # gradient norm clipping; 0 = off
    amp: bool = True  # float16 mixed precision, used on CUDA only
    cpu_bf16: bool = False  # on the CPU: the training forward pass under bfloat16 autocast (opt-in, docs/training.md)
    # on the CPU: each epoch's validation computes item and user vectors under bfloat16 autocast
    # (ranking in float32); the best epoch may differ, model.pt's metrics stay float32 (opt-in, docs/training.md)
    cpu_bf16_validation: bool = False
    logq: bool = True  # subtract log p(item) from in-batch logits
    gather_negatives: bool = False  # DDP: candidates from all ranks instead of this rank's batch
    # A training step whose loss is NaN or inf (divergence): "stop" training there with a message
    # (the last complete epoch's checkpoint is kept) | "skip" the step, count it (log, dvclive
    # train/skipped_steps) and go on. Weights that are no longer finite always stop training.
    non_finite_loss: Literal["stop", "skip"] = "stop"
    select_metric: Literal["hr@10", "ndcg@10"] = "hr@10"  # fused validation score picking the best epoch
    patience: int = 0  # stop after this many epochs in a row without a better select_metric; 0 = never
    eval_batch_size: int = 1024  # users per block in validation ranking
    # Users ranked by validation every epoch, and behind model.pt's valid/test metrics: None = all
    # up to 10,000, else a sample of 10,000 seeded from `seed`; an integer = that many (all if
    # fewer); "all" = every user (the paper). The same users every epoch. The evaluate stage
    # always reports all users.
    valid_users: int | Literal["all"] | None = None
    sequences: str = "data/ingest/sequences.parquet"
    popularity: str = "data/ingest/popularity.parquet"
    text_features: str = "data/features/text"  # feature store folders
    image_features: str = "data/features/image"

    def validate(self) -> None:
        for name in ("epochs", "batch_size", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("lr", "weight_decay", "clip_norm"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.valid_users not in (None, "all") and self.valid_users < 1:
            raise ValueError(f"valid_users must be null or >= 1, got {self.valid_users}")
        if self.patience < 0:
            raise ValueError(f"patience must be >= 0, got {self.patience}")
        if self.modalities != "auto" and not self.modalities:
            raise ValueError("modalities must be 'auto' or a non-empty list of id, text, image")
        if not 0 <= self.modality_min_present <= 1:
            raise ValueError(f"modality_min_present must be in [0, 1], got {self.modality_min_present}")


@dataclass(frozen=True)
class Sources:
    """Which item sources a run uses, and why: the share of items that have each one."""

    used: tuple[str, ...]  # in branch order: id, text, image
    present: dict[str, float]  # source -> fraction of catalogue items that have it

    def describe(self, cfg: TrainConfig) -> str:
        """One log line: each source found, its coverage, used or dropped and why (a source the
        run has but its variant does not read, as sasrec_id's text, is not used)."""
        parts = []
        reads = VARIANTS[cfg.model.variant].sources
        for name in THREE:
            share = f"{100 * self.present[name]:.1f}% of items"
            if name in self.used and name in reads:
                parts.append(f"{name} ({share}, used)")
            elif name in self.used:
                parts.append(f"{name} ({share}: not read by {cfg.model.variant})")
            elif cfg.modalities == "auto":
                parts.append(f"{name} ({share}: below train.modality_min_present {cfg.modality_min_present}, dropped)")
            else:
                parts.append(f"{name} ({share}: not in train.modalities)")
        return "sources: " + ", ".join(parts)


def find_sources(cfg: TrainConfig) -> Sources:
    """The sources of this run, from train.modalities and the feature files' `present` column."""
    present = {"id": 1.0, "text": present_fraction(cfg.text_features), "image": present_fraction(cfg.image_features)}
    if cfg.modalities == "auto":
        used = tuple(s for s in THREE if present[s] >= cfg.modality_min_present)
    else:
        used = tuple(s for s in THREE if s in cfg.modalities)
        for name in used:
            if present[name] < cfg.modality_min_present:
                log.warning("train.modalities names %s, which only %.1f%% of items have", name, 100 * present[name])
    return Sources(used, present)


def build_model(cfg: TrainConfig, num_items: int, sources: tuple[str, ...] | None = None, content_init: bool = True) -> ODMT:
    """The model of cfg.model on ``sources`` (default: find_sources), reading the feature files
    it needs: only the tokens the model keeps (model.text_tokens / image_tokens). Without
    ``content_init`` the ID table is left random (for loading a trained state over it)."""
    if sources is None:
        sources = find_sources(cfg).used
    reads = VARIANTS[cfg.model.variant].sources & set(sources)
    text = load_token_features(cfg.text_features, num_items, cfg.model.text_tokens) if "text" in reads else None
    image = load_token_features(cfg.image_features, num_items, cfg.model.image_tokens) if "image" in reads else None
    return ODMT(cfg.model, num_items, text, image, tuple(sources), content_init)


def load_trained(run_dir: Path, current: TrainConfig, device: str | torch.device = "cpu") -> tuple[ODMT, dict[str, Any]]:
    """The best-validation model of a training run (run_dir/model.pt), in eval mode, and its
    info: variant, backbone, seed, max_len, branches, branch_dim, num_items, best_epoch,
    epochs_trained, stop_reason (patience | max_epochs) and the valid/test metrics measured at
    the end of training.

    The feature files are those of ``current`` (the `train` params of now, whose files are the
    stage's DVC deps), never the paths saved in model.pt: a pulled artifact chooses no file."""
    path = Path(run_dir) / "model.pt"
    if not path.exists():
        raise FileNotFoundError(f"{path}: no trained model; run the train stage for this variant and seed")
    saved = checkpoint.load(path, checkpoint.MODEL_KEYS, checkpoint.MODEL_WEIGHTS)
    cfg = from_dict(TrainConfig, saved["params"], f"{path} params")
    cfg = replace(cfg, text_features=current.text_features, image_features=current.image_features)
    # The saved state replaces the ID table: no content initialisation (an SVD) to compute first.
    model = build_model(cfg, saved["info"]["num_items"], saved["info"].get("sources"), content_init=False)
    try:
        model.load_state_dict(saved["state_dict"])
    except RuntimeError as err:  # missing, unexpected or mis-shaped weights
        raise ArtifactError(f"{path}: its weights do not fit its params ({err}); {checkpoint.rerun_train(path)}") from None
    return model.to(device).eval(), saved["info"]
