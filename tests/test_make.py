"""What `make` relies on: picking a Python for .venv, and a pull that does not cry wolf."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

from pipeline.pull import MissingOnRemote, summary
from tests.project import attempt, run

ROOT = Path(__file__).resolve().parent.parent


def fake_python(folder: Path, name: str, version: str | None) -> None:
    """``name`` on a PATH: the real interpreter (version None) or one that claims ``version``
    and fails the range check."""
    body = f'exec {sys.executable} "$@"' if version is None else f'case "$2" in *print*) echo {version};; *) exit 1;; esac'
    path = folder / name
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(0o755)


def pick(folder: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["/bin/sh", str(ROOT / "scripts/pick-python.sh")], env={"PATH": str(folder)}, capture_output=True, text=True)


def test_the_first_supported_python_is_picked_and_otherwise_one_clear_line(tmp_path):
    fake_python(tmp_path, "python3", "3.10")
    none = pick(tmp_path)
    assert none.returncode == 1 and none.stdout == ""
    assert none.stderr.count("\n") == 1 and "found: python3 3.10 on the PATH" in none.stderr and "3.11 to 3.14" in none.stderr
    fake_python(tmp_path, "python3.13", None)  # this interpreter, under a later candidate's name
    assert pick(tmp_path).stdout == "python3.13\n"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "found: none on the PATH" in pick(empty).stderr


def test_missing_cache_warning_becomes_one_line(tmp_path):
    """A real DVC project whose output is neither cached nor on the remote."""
    remote = tmp_path / "remote"
    remote.mkdir()
    run(["git", "init", "-q"], tmp_path)
    run(["dvc", "init", "-q"], tmp_path)
    run(["dvc", "remote", "add", "-d", "team", str(remote)], tmp_path)
    (tmp_path / "features.txt").write_text("computed later\n")
    run(["dvc", "add", "-q", "features.txt"], tmp_path)
    for cached in (tmp_path / ".dvc/cache").rglob("*"):
        if cached.is_file():
            cached.unlink()
    (tmp_path / "features.txt").unlink()
    # and a stage that dvc.lock does not know yet
    (tmp_path / "dvc.yaml").write_text("stages:\n  later:\n    cmd: echo x > later.txt\n    outs: [later.txt]\n")
    proc = attempt([sys.executable, "-m", "pipeline.pull"], tmp_path, {"PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr
    assert "neither locally nor on remote" not in proc.stdout + proc.stderr and "hash info" not in proc.stdout + proc.stderr
    assert "Not on the remote yet, so `dvc repro` computes them: 2 file(s) (later.txt)." in proc.stdout


def test_summary_names_a_few_outputs():
    missing = MissingOnRemote()
    assert missing.filter(logging.makeLogRecord({"msg": "Other warning", "args": ()}))
    record = logging.makeLogRecord({"msg": "Some of the cache files do not exist neither locally nor on remote. Missing cache files:\n%s", "args": ("name: a, md5: 1\nname: b, md5: 2\nname: c, md5: 3\nname: d, md5: 4",)})
    assert not missing.filter(record)
    assert summary(missing.files) == "Not on the remote yet, so `dvc repro` computes them: 4 file(s) (a, b, c and 1 more)."
    assert summary(["md5: 1", "md5: 2"]) == "Not on the remote yet, so `dvc repro` computes them: 2 file(s)."
