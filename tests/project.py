"""A temporary git repo made from this working tree (code and params, no data or results),
for tests that run DVC commands on the real project."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ("data/", "models/", "logs/", "metrics/", "reports/", "plots/", "exports/")
GIT = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]


def attempt(cmd: list[str], cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run with this interpreter's environment first on PATH (so `dvc` and stage `python` are
    ours); ``env`` entries are added, or removed where None."""
    env = {k: v for k, v in {**os.environ, **(env or {})}.items() if v is not None}
    env["PATH"] = f"{Path(sys.executable).parent}:{os.environ['PATH']}"
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)


def run(cmd: list[str], cwd: Path, env: dict | None = None) -> str:
    """`attempt` that must succeed; returns stdout + stderr."""
    proc = attempt(cmd, cwd, env)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout + proc.stderr


def deep_update(base: dict, update: dict) -> dict:
    for key, value in update.items():
        base[key] = deep_update(base.get(key, {}), value) if isinstance(value, dict) else value
    return base


def make_project(repo: Path, params: dict) -> Path:
    """Copy the tracked and untracked-but-not-ignored files of this working tree, except results
    and dvc.lock, into ``repo``, apply ``params`` to params.yaml and commit it all."""
    files = attempt(["git", "ls-files", "-co", "--exclude-standard"], ROOT).stdout
    for name in files.splitlines():
        src = ROOT / name
        if src.is_file() and not name.startswith(RESULTS) and name != "dvc.lock":
            (repo / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, repo / name)
    settings = yaml.safe_load((repo / "params.yaml").read_text())
    (repo / "params.yaml").write_text(yaml.safe_dump(deep_update(settings, params), sort_keys=False))
    run(["git", "init", "-q"], repo)
    commit(repo, "project")
    return repo


def commit(repo: Path, message: str) -> None:
    run([*GIT, "add", "-A"], repo)
    run([*GIT, "commit", "-qm", message], repo)
