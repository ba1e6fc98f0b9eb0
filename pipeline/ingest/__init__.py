"""Stage 1: a raw source -> canonical Parquet tables and the leave-one-out split."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from .adapters.amazon2018 import Amazon2018Options, read_amazon2018
from .adapters.base import Adapter, RawSource, SourceError
from .adapters.generic import GenericOptions, read_generic
from .adapters.hm import HMOptions, read_hm
from .adapters.movielens_mm import MovielensOptions, read_movielens_mm
from .core import SplitRules, ingest, write

ADAPTERS: dict[str, Adapter] = {
    "movielens-mm": read_movielens_mm,
    "generic": read_generic,
    "amazon2018": read_amazon2018,
    "hm": read_hm,
}


@dataclass(frozen=True)
class IngestConfig:
    """params.yaml `ingest`: which adapter reads `path`, its options, and the split rules."""

    adapter: Literal["movielens-mm", "generic", "amazon2018", "hm"] = "movielens-mm"
    path: str = "data/raw/movielens-100k-mm"
    rules: SplitRules = field(default_factory=SplitRules)
    movielens_mm: MovielensOptions = field(default_factory=MovielensOptions)
    generic: GenericOptions = field(default_factory=GenericOptions)
    amazon2018: Amazon2018Options = field(default_factory=Amazon2018Options)
    hm: HMOptions = field(default_factory=HMOptions)

    def adapter_options(self) -> object:
        return getattr(self, self.adapter.replace("-", "_"))


__all__ = ["ADAPTERS", "IngestConfig", "RawSource", "SourceError", "SplitRules", "ingest", "write"]
