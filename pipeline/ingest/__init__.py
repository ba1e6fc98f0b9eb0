"""Stage 1: a raw source -> canonical Parquet tables and the leave-one-out split."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import polars as pl

from ..config import to_dict
from ..progress import log

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
    # true: a `path` outside the project is recorded as written in the ingest files' metadata
    # (false: only its folder name and a hash, so a push does not share the local folder layout)
    publish_path: bool = False
    rules: SplitRules = field(default_factory=SplitRules)
    movielens_mm: MovielensOptions = field(default_factory=MovielensOptions)
    generic: GenericOptions = field(default_factory=GenericOptions)
    amazon2018: Amazon2018Options = field(default_factory=Amazon2018Options)
    hm: HMOptions = field(default_factory=HMOptions)

    def adapter_options(self) -> object:
        return getattr(self, self.adapter.replace("-", "_"))

    def provenance(self, project: Path) -> dict:
        """What the ingest files' metadata records: the adapter, `path` as `recorded_path` gives
        it, and the rules. Warns when `path` is absolute: params.yaml and dvc.lock hold it as written."""
        if Path(self.path).is_absolute():
            log.warning(
                "ingest.path %s is absolute: params.yaml and dvc.lock (the ingest stage's dependency and params) "
                "record it, so a commit or a push shares your folder layout. Give it relative to the project; a link "
                "does it: `ln -s %s data/raw/%s`, then ingest.path: data/raw/%s",
                self.path, self.path, Path(self.path).name, Path(self.path).name,
            )
        path = recorded_path(self.path, project, self.publish_path)
        return {"source": {"adapter": self.adapter, "path": path}, "rules": to_dict(self.rules)}

    def recorded_items(self, items: pl.DataFrame, project: Path) -> pl.DataFrame:
        """`items` with each image file under `path` (`image_ref`) recorded under `path` as the
        metadata records it: no local folder layout in items.parquet either."""
        written, recorded = f"{Path(self.path)}/", f"{recorded_path(self.path, project, self.publish_path)}/"
        ref = pl.col("image_ref")
        under = pl.when(ref.str.starts_with(written)).then(pl.lit(recorded) + ref.str.slice(len(written)))
        return items.with_columns(under.otherwise(ref).alias("image_ref"))


def recorded_path(path: str, project: Path, publish: bool = False) -> str:
    """`path` relative to the `project` folder when it lies inside (`..` removed, links not
    followed: a link data/raw/x to elsewhere stays data/raw/x); else as written when `publish`,
    else only its folder name and a hash of its absolute form (no local folder layout)."""
    project = Path(os.path.normpath(Path(project).absolute()))
    full = Path(os.path.normpath(project / path))
    if full.is_relative_to(project):
        return full.relative_to(project).as_posix()
    if publish:
        return path
    return f"{full.name} (outside the project; sha256 of its path {hashlib.sha256(str(full).encode()).hexdigest()[:16]})"


__all__ = ["ADAPTERS", "IngestConfig", "RawSource", "SourceError", "SplitRules", "ingest", "recorded_path", "write"]
