"""The resumable training checkpoint and the final model file.

checkpoint.pt (written after every epoch): model, optimiser and scaler states, the completed
epoch, the best validation score, its epoch and weights, the epochs without improvement, and
the params and the MD5 of every input file. No RNG state is needed: every epoch reseeds from
(seed, epoch, rank). A run resumes from it only when its params equal the current ones apart
from `epochs` (so a finished run can also be extended) and its input files are unchanged (DVC
keeps the checkpoint across reruns, and a rerun after new data must not resume); otherwise it
starts afresh.
model.pt: the best-validation weights, the params and an info dict (see load_trained).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch

from ..io import atomic_path
from ..progress import log


def save(obj: dict[str, Any], path: Path) -> None:
    # Through a file object: given a path, torch.save names the archive's records after it (the
    # random temp name), so the same weights would hash differently and DVC would rerun scoring.
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(obj, f)


def input_digests(paths: list[str | Path]) -> dict[str, str]:
    """MD5 of each existing input file (the same digest DVC records in dvc.lock)."""
    digests = {}
    for path in map(Path, paths):
        if path.exists():
            md5 = hashlib.md5()
            with path.open("rb") as f:
                while chunk := f.read(1 << 20):
                    md5.update(chunk)
            digests[str(path)] = md5.hexdigest()
    return digests


def load_compatible(path: Path, params: dict[str, Any], inputs: dict[str, str]) -> dict[str, Any] | None:
    """The checkpoint at `path` if it was written with the same params (ignoring epochs) from
    the same input files."""
    if not path.exists():
        return None
    state = torch.load(path, map_location="cpu", weights_only=False)
    for what, saved, current in (
        ("params", {k: v for k, v in state["params"].items() if k != "epochs"}, {k: v for k, v in params.items() if k != "epochs"}),
        ("input files", state.get("inputs", {}), inputs),
    ):
        changed = sorted(k for k in saved.keys() | current.keys() if saved.get(k) != current.get(k))
        if changed:
            log.info("%s: %s changed (%s); starting afresh", path, what, ", ".join(changed))
            return None
    return state
