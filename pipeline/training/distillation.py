"""Online distillation between the branches (odmt.md section 5).

KD(student <- teacher) = tau^2 * mean over rows of the soft cross-entropy
-sum_c softmax(teacher / tau)_c * log softmax(student / tau)_c, on the branches' in-batch
logits. Pairs: text <- id, image <- id, id <- ensemble (mean of the three branch logits). With
fewer sources (a catalogue without images, say) only the pairs among the present branches are
formed, and the ensemble is the mean of the present branches.
The teacher is not detached by default (as in the reference code). A live teacher is also
pulled by the soft cross-entropy onto the student's top item; on the embedded data this cost
about a point of HR@10, so params.yaml detaches it (docs/paper.md "Online distillation on the embedded
data: what we measured").
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class DistillConfig:
    tau: float = 0.3  # temperature
    ramp: float = 20.0  # a: w(e) reaches 1 at epoch a (a >= 1); 0 < a < 1: constant a; 0: off
    detach_teacher: bool = False
    text_from_id: bool = True
    image_from_id: bool = True
    id_from_ens: bool = True

    def validate(self) -> None:
        if self.tau <= 0:
            raise ValueError(f"distill.tau must be > 0, got {self.tau}")
        if self.ramp < 0:
            raise ValueError(f"distill.ramp must be >= 0, got {self.ramp}")


def ramp_weight(epoch: int, a: float) -> float:
    """w(e) for epochs e = 1, 2, ...: exp(-5 (1 - min(e, a) / a)^2) for a >= 1, a for a < 1."""
    if a < 1:
        return float(a)
    return math.exp(-5.0 * (1.0 - min(epoch, a) / a) ** 2)


def soft_cross_entropy(student: torch.Tensor, teacher: torch.Tensor, tau: float) -> torch.Tensor:
    soft_targets = F.softmax(teacher / tau, dim=1)
    return tau**2 * -(soft_targets * F.log_softmax(student / tau, dim=1)).sum(1).mean()


def distillation_pairs(branches: tuple[str, ...] | list[str], cfg: DistillConfig) -> list[tuple[str, str, str]]:
    """(term name, student, teacher) of each enabled pair among ``branches``; teacher "ensemble"
    = the mean of all branch logits."""
    candidates = [("text_from_id", "text", "id"), ("image_from_id", "image", "id")]
    if len(branches) > 1:
        candidates.append(("id_from_ens", "id", "ensemble"))
    return [(name, s, t) for name, s, t in candidates if getattr(cfg, name) and s in branches and t in (*branches, "ensemble")]


def distillation_terms(logits: dict[str, torch.Tensor], cfg: DistillConfig) -> dict[str, torch.Tensor]:
    """Unweighted KD term of each enabled pair, from the branch logits (R, C)."""
    teachers = dict(logits, ensemble=sum(logits.values()) / len(logits))
    terms = {}
    for name, student, teacher in distillation_pairs(tuple(logits), cfg):
        target = teachers[teacher].detach() if cfg.detach_teacher else teachers[teacher]
        terms[name] = soft_cross_entropy(logits[student], target, cfg.tau)
    return terms
