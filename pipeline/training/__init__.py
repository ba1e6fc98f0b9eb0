"""Training of ODMT, its ablations and baselines: the `train` params section and the entry
point (`train` in trainer.py), and `load_trained` for the stages that use a trained model."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from ..config import from_dict
from ..models.odmt import ODMT, VARIANTS, ModelConfig
from . import checkpoint
from .data import load_features
from .distillation import DistillConfig


@dataclass(frozen=True)
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    seed: int = 1
    epochs: int = 40
    batch_size: int = 64  # sequences per step and rank; in-batch negatives come from them
    lr: float = 1e-3
    weight_decay: float = 0.1  # AdamW, on all parameters
    clip_norm: float = 5.0  # gradient norm clipping; 0 = off
    amp: bool = True  # float16 mixed precision, used on CUDA only
    logq: bool = True  # subtract log p(item) from in-batch logits
    gather_negatives: bool = False  # DDP: candidates from all ranks instead of this rank's batch
    select_metric: Literal["hr@10", "ndcg@10"] = "hr@10"  # fused validation score picking the best epoch
    patience: int = 0  # stop after this many epochs without improvement; 0 = never
    eval_batch_size: int = 1024  # users per block in validation ranking
    sequences: str = "data/ingest/sequences.parquet"
    popularity: str = "data/ingest/popularity.parquet"
    text_features: str = "data/features/text.parquet"
    image_features: str = "data/features/image.parquet"

    def validate(self) -> None:
        for name in ("epochs", "batch_size", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("lr", "weight_decay", "clip_norm"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.patience < 0:
            raise ValueError(f"patience must be >= 0, got {self.patience}")


def build_model(cfg: TrainConfig, num_items: int) -> ODMT:
    """The model of cfg.model, reading the feature files its variant needs."""
    sources = VARIANTS[cfg.model.variant].sources
    text = load_features(cfg.text_features, num_items) if "text" in sources else None
    image = load_features(cfg.image_features, num_items) if "image" in sources else None
    return ODMT(cfg.model, num_items, text, image)


def load_trained(run_dir: Path, device: str | torch.device = "cpu") -> tuple[ODMT, dict[str, Any]]:
    """The best-validation model of a training run (run_dir/model.pt), in eval mode, and its
    info: variant, backbone, seed, max_len, branches, branch_dim, num_items, best_epoch,
    epochs_trained and the valid/test metrics measured at the end of training."""
    path = Path(run_dir) / "model.pt"
    if not path.exists():
        raise FileNotFoundError(f"{path}: no trained model; run the train stage for this variant and seed")
    saved = checkpoint.load(path)
    cfg = from_dict(TrainConfig, saved["params"], f"{path} params")
    model = build_model(cfg, saved["info"]["num_items"])
    model.load_state_dict(saved["state_dict"])
    return model.to(device).eval(), saved["info"]
