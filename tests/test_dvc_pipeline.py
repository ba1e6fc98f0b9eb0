"""End to end: the real DAG with `dvc repro`, in a temporary git repo made from this working
tree, on a small slice of the embedded dataset pulled from the team DVC remote."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
STORE = ROOT.parent / "shared" / "dvc-store"

# Small but real: 40 users of MovieLens, the real offline encoders, short training.
SLICE = {
    "ingest": {"rules": {"sample_users": 40}},
    "train": {"epochs": 2, "model": {"text_tokens": 8, "image_tokens": 8}},
}


def run(cmd: list[str], cwd: Path) -> str:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout + proc.stderr


def deep_update(base: dict, update: dict) -> dict:
    for key, value in update.items():
        base[key] = deep_update(base.get(key, {}), value) if isinstance(value, dict) else value
    return base


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    if not STORE.is_dir():
        pytest.skip(f"team DVC remote not found at {STORE}")
    repo = tmp_path_factory.mktemp("clone")
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True, check=True)
    for name in files.stdout.splitlines():
        src = ROOT / name
        if src.is_file() and not name.startswith(("data/", "models/", "logs/", "metrics/", "reports/", "plots/")) and name != "dvc.lock":
            (repo / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, repo / name)
    (repo / "data" / "raw").mkdir(parents=True, exist_ok=True)
    shutil.copy2(ROOT / "data" / "raw" / "movielens-100k-mm.dvc", repo / "data" / "raw")
    params = yaml.safe_load((repo / "params.yaml").read_text())
    (repo / "params.yaml").write_text(yaml.safe_dump(deep_update(params, SLICE), sort_keys=False))
    run(["git", "init", "-q"], repo)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "add", "-A"], repo)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "slice"], repo)
    run(["dvc", "remote", "modify", "--local", "team", "url", str(STORE)], repo)
    run(["dvc", "pull", "-q", "data/raw/movielens-100k-mm.dvc"], repo)
    return repo


@pytest.mark.slow
def test_dvc_repro_runs_the_dag_and_then_nothing(project: Path):
    run(["dvc", "repro"], project)
    assert "up to date" in run(["dvc", "status"], project)
    second = run(["dvc", "repro"], project)
    assert "Running stage" not in second

    report = yaml.safe_load((project / "reports" / "ingest.json").read_text())
    assert report["users"] == 40
    for run_name in ("odmt-s1", "sasrec_id-s1"):
        metrics = yaml.safe_load((project / "metrics" / f"{run_name}.json").read_text())
        assert metrics["protocol"]["users"] == {"valid": 40, "test": 40}
    assert "odmt" in (project / "reports" / "report.md").read_text()
    assert "metrics/odmt-s1.json" in run(["dvc", "metrics", "show"], project)


@pytest.mark.slow
def test_a_text_encoder_param_invalidates_only_the_text_branch(project: Path):
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["text_features"]["max_tokens"] = 16
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    status = run(["dvc", "status"], project)
    changed = {line.strip().rstrip(":") for line in status.splitlines() if line and not line.startswith(("\t", " "))}
    assert "text_features" in changed
    assert "ingest" not in changed and "image_features" not in changed
