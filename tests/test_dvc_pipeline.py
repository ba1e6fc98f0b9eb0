"""End to end: the real DAG with `dvc repro`, in a temporary git repo made from this working
tree, on a small slice of the embedded dataset pulled from the team DVC remote."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from tests.project import ROOT, make_project, run

STORE = ROOT.parent / "shared" / "dvc-store"

# Small but real: 40 users of MovieLens, the real offline encoders, short training.
SLICE = {
    "ingest": {"rules": {"sample_users": 40}},
    "train": {"epochs": 2, "model": {"text_tokens": 8, "image_tokens": 8}},
}


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    if not STORE.is_dir():
        pytest.skip(f"team DVC remote not found at {STORE}")
    repo = tmp_path_factory.mktemp("clone")
    (repo / "data" / "raw").mkdir(parents=True)
    shutil.copy2(ROOT / "data" / "raw" / "movielens-100k-mm.dvc", repo / "data" / "raw")
    make_project(repo, SLICE)
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
