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
need to run code to load is refused. A file that is cut short, corrupt, lacks a key or holds
NaN/inf weights is an ArtifactError naming it and what to rerun; for checkpoint.pt that means
training starts afresh (logged).
"""

from __future__ import annotations

import hashlib
import pickle
from pathlib import Path
from typing import Any

import torch

from ..commands import RUN
from ..io import ArtifactError, atomic_path
from ..progress import log

ROOT = Path(__file__).resolve().parents[2]
# The code the `train` stage lists as deps in dvc.yaml (a test keeps the two equal).
TRAIN_CODE = (
    "stages/train.py",
    "pipeline/allocator.py",
    "pipeline/config.py",
    "pipeline/models",
    "pipeline/training",
    "pipeline/metrics.py",
    "pipeline/sequences.py",
    "pipeline/evaluation.py",
    "pipeline/features/store.py",
    "pipeline/ddp.py",
    "pipeline/commands.py",
    "pipeline/io.py",
    "pipeline/progress.py",
    "pipeline/schema.py",
)


# What each file holds (the trainer writes them), and which of its entries are weights.
MODEL_KEYS, MODEL_WEIGHTS = ("state_dict", "params", "info"), ("state_dict",)
CHECKPOINT_KEYS = ("model", "optimizer", "scaler", "params", "epoch", "best_score", "best_epoch", "best_state", "bad_epochs")
CHECKPOINT_WEIGHTS = ("model", "best_state")


class UntrustedArtifactError(RuntimeError):
    """A model or checkpoint file that holds more than plain data (a crafted pickle)."""


def rerun_train(path: Path) -> str:
    """What rewrites models/{variant}-s{seed}/*.pt: its train stage (dvc.yaml names it train@{variant}-{seed})."""
    match = RUN.fullmatch(Path(path).parent.name)
    stage = f"train@{match['variant']}-{match['seed']}" if match else "the train stage of this run"
    return f"delete it and rerun `dvc repro {stage}`"


def load(path: Path, keys: tuple[str, ...] = (), weights: tuple[str, ...] = (), rerun: str | None = None) -> dict[str, Any]:
    """A model.pt or checkpoint.pt as plain data, without running any code it may carry, with
    ``keys`` present and every float tensor of the ``weights`` entries finite."""
    rerun = rerun or rerun_train(path)
    if Path(path).stat().st_size == 0:
        raise ArtifactError(f"{path}: empty file; {rerun}")
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        if not any("global" in line.lower() for line in lines):  # not a crafted object: bytes that are no pickle
            raise ArtifactError(f"{path}: not a file the train stage writes, corrupt or of another format; {rerun}") from None
        raise UntrustedArtifactError(
            f"{path}: refused to load: it holds objects other than tensors and plain data, and "
            f"loading it would run code ({lines[0]}). If it came from the DVC remote, someone pushed a "
            "file this pipeline does not write: delete it and rerun `dvc repro` to rebuild it."
        ) from None
    except (RuntimeError, OSError, EOFError, KeyError, ValueError) as err:
        raise ArtifactError(f"{path}: cut short or corrupt ({type(err).__name__}: {err}); {rerun}") from None
    missing = [key for key in keys if key not in saved] if isinstance(saved, dict) else list(keys)
    if missing:
        raise ArtifactError(f"{path}: {', '.join(missing)} missing, not a file the train stage writes; {rerun}")
    for key in weights:
        for name, tensor in (saved[key] or {}).items():
            if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                bad = int((~torch.isfinite(tensor)).sum())
                raise ArtifactError(f"{path}: {key}.{name} holds {bad} NaN or infinite values; {rerun}")
    return saved


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
    try:
        state = load(path, CHECKPOINT_KEYS, CHECKPOINT_WEIGHTS, rerun="starting afresh")
    except ArtifactError as err:  # a run killed mid-write by the disk, say: its epochs are lost, not the run
        log.warning("%s", err)
        return None
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
