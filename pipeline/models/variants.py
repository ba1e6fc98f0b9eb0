"""The variants a run can train (the table in odmt.py says what each is): plain data, no torch,
so that the params check (pipeline/commands.py) knows the names without the model code."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

VariantName = Literal[
    "odmt",
    "odmt_no_distill",
    "odmt_full_attention",
    "odmt_no_imt",
    "sasrec_id",
    "text_only",
    "image_only",
    "early_fusion_sum",
    "early_fusion_concat",
]


@dataclass(frozen=True)
class Variant:
    items: Literal["imt", "late", "early_sum", "early_concat"]
    branches: tuple[str, ...]
    id_aware: bool = True  # IMT only
    distill: bool = False

    @property
    def sources(self) -> set[str]:
        """Which inputs (id, text, image) the item encoder reads."""
        return set(self.branches) if self.items == "late" else set(THREE)


THREE = ("id", "text", "image")
VARIANTS: dict[str, Variant] = {
    "odmt": Variant("imt", THREE, id_aware=True, distill=True),
    "odmt_no_distill": Variant("imt", THREE, id_aware=True, distill=False),
    "odmt_full_attention": Variant("imt", THREE, id_aware=False, distill=True),
    "odmt_no_imt": Variant("late", THREE, distill=True),
    "sasrec_id": Variant("late", ("id",)),
    "text_only": Variant("late", ("text",)),
    "image_only": Variant("late", ("image",)),
    "early_fusion_sum": Variant("early_sum", ("fused",)),
    "early_fusion_concat": Variant("early_concat", ("fused",)),
}
