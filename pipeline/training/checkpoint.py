"""The resumable training checkpoint and the final model file.

checkpoint.pt (written after every epoch): model, optimiser and scaler states, the completed
epoch, the best validation score, its epoch and weights, the epochs without improvement, and
the params, the MD5 of every input file and a digest of the training code. No RNG state is
needed: every epoch reseeds from (seed, epoch, rank). DVC keeps the checkpoint across reruns,
so a rerun must not resume from one that no longer fits: a run resumes only when its params
equal the current ones apart from `epochs` (a finished run can be extended, never cut short),
its input files and its code are unchanged; otherwise it starts afresh and says why.
model.pt: the best-validation weights, the params and an info dict (see load_trained).

Both files travel through the team's DVC remote, so they are loaded as data only
(`torch.load(weights_only=True)`: tensors, numbers, strings, lists and dicts); a file that would
need to run code to load is refused.
"""

from __future__ import annotations

import hashlib
import pickle
from pathlib import Path
from typing import Any

import torch

from ..io import atomic_path
from ..progress import log

ROOT = Path(__file__).resolve().parents[2]
# The code the `train` stage lists as deps in dvc.yaml (a test keeps the two equal).
TRAIN_CODE = (
    "stages/train.py",
    "pipeline/config.py",
    "pipeline/models",
    "pipeline/training",
    "pipeline/metrics.py",
    "pipeline/scoring.py",
    "pipeline/evaluation.py",
    "pipeline/features/store.py",
    "pipeline/ddp.py",
    "pipeline/io.py",
    "pipeline/progress.py",
    "pipeline/schema.py",
)


class UntrustedArtifactError(RuntimeError):
    """A model or checkpoint file that holds more than plain data (a crafted pickle)."""


def load(path: Path) -> dict[str, Any]:
    """A model.pt or checkpoint.pt as plain data, without running any code it may carry."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UntrustedArtifactError(
            f"{path}: refused to load: it holds objects other than tensors and plain data, and "
            f"loading it would run code ({reason}). If it came from the DVC remote, someone pushed a "
            "file this pipeline does not write: delete it and rerun `dvc repro` to rebuild it."
        ) from None


def save(obj: dict[str, Any], path: Path) -> None:
    # Through a file object: given a path, torch.save names the archive's records after it (the
    # random temp name), so the same weights would hash differently and DVC would rerun scoring.
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(obj, f)


def input_digests(paths: list[str | Path]) -> dict[str, str]:
    """MD5 of each existing input file (the same digest DVC records in dvc.lock); of a feature
    store folder, its index's (which names every part and key)."""
    digests = {}
    for path in map(Path, paths):
        file = path / "index.parquet" if path.is_dir() else path
        if file.is_file():
            md5 = hashlib.md5()
            with file.open("rb") as f:
                while chunk := f.read(1 << 20):
                    md5.update(chunk)
            digests[str(path)] = md5.hexdigest()
    return digests


def code_digest(paths: tuple[str, ...] = TRAIN_CODE, root: Path = ROOT) -> dict[str, str]:
    """SHA-256 of every Python source under `paths` (files or folders relative to `root`)."""
    files = []
    for name in paths:
        path = root / name
        files.extend(sorted(path.rglob("*.py")) if path.is_dir() else [path])
    return {str(f.relative_to(root)): hashlib.sha256(f.read_bytes()).hexdigest() for f in files}


def load_compatible(path: Path, params: dict[str, Any], inputs: dict[str, str], code: dict[str, str]) -> dict[str, Any] | None:
    """The checkpoint at `path` if it was written by the same code from the same input files with
    the same params, apart from more `epochs` than it has done. Those are checked first: a
    checkpoint of other data or params is refused for that, whatever its epochs."""
    if not path.exists():
        return None
    state = load(path)
    for what, saved, current in (
        ("params", {k: v for k, v in state["params"].items() if k != "epochs"}, {k: v for k, v in params.items() if k != "epochs"}),
        ("input files", state.get("inputs", {}), inputs),
        ("code", state.get("code", {}), code),
    ):
        changed = sorted(k for k in saved.keys() | current.keys() if saved.get(k) != current.get(k))
        if changed:
            log.info("%s: %s changed (%s); starting afresh", path, what, ", ".join(changed))
            return None
    if state["epoch"] > params["epochs"]:
        log.info("%s: trained %d epochs, more than epochs: %d; starting afresh", path, state["epoch"], params["epochs"])
        return None
    return state
