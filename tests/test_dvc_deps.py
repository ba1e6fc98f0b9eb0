"""Every stage of dvc.yaml lists as deps exactly the project code its script runs: the files of
pipeline/ and stages/ it imports, transitively (imports inside functions too), with the
__init__.py of every package on the way. A module missing from the deps would not rerun the
stage when it changes; a listed one that is not imported reruns it for nothing."""

from __future__ import annotations

import ast
import functools
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CODE = ("pipeline", "stages")


def module_file(name: str, search: Path) -> Path | None:
    """The file of module ``name`` (dotted) under ``search``, or None if it is not one of ours."""
    base = search.joinpath(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def executed_files(name: str, search: Path) -> list[Path]:
    """Importing ``name`` runs its file and the __init__.py of each package above it."""
    parts = name.split(".")
    files = [module_file(".".join(parts[: i + 1]), search) for i in range(len(parts))]
    return [f for f in files if f is not None]


@functools.cache  # each file parsed once, however many scripts import it
def imports_of(path: Path) -> frozenset[Path]:
    """The project files one file's import statements run (not transitively)."""
    relative = path.relative_to(ROOT)
    # a stage script runs with stages/ on sys.path (`from _common import ...`), and the root
    search_paths = [ROOT, path.parent] if relative.parts[0] == "stages" else [ROOT]
    package = list(relative.parent.parts) if relative.parts[0] == "pipeline" else []
    found: set[Path] = set()

    def add(name: str) -> None:
        for search in search_paths:
            found.update(executed_files(name, search))

    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join([*base, *(node.module.split(".") if node.module else [])])
            add(module)
            for alias in node.names:  # `from package import submodule`
                add(f"{module}.{alias.name}")
    return frozenset(found)


@functools.cache
def runs_code(path: Path) -> bool:
    """False for a file of nothing but a docstring (pipeline/__init__.py): importing it does nothing."""
    body = ast.parse(path.read_text()).body
    return not (len(body) <= 1 and all(isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant) for n in body))


def project_code(script: Path) -> set[str]:
    """Every project file running ``script`` executes, relative to the root."""
    seen, todo = set(), [script]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        todo.extend(imports_of(path) - seen)
    return {str(p.relative_to(ROOT)) for p in seen if runs_code(p)}


def stages() -> dict[str, dict]:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def stage_definition(stage: dict) -> dict:
    return stage.get("do", stage)  # foreach stages keep cmd and deps under `do`


@pytest.mark.parametrize("name", sorted(stages()))
def test_a_stage_lists_exactly_the_code_its_script_runs(name):
    stage = stage_definition(stages()[name])
    # a stage script, or a module run with `python -m pipeline.<module>` (check_params)
    scripts = re.findall(r"stages/\w+\.py", stage["cmd"]) + [
        module.replace(".", "/") + ".py" for module in re.findall(r"-m (pipeline(?:\.\w+)+)", stage["cmd"])
    ]
    assert len(scripts) == 1, f"{name}: expected one stages/*.py script or pipeline module in its cmd, found {scripts}"
    runs = project_code(ROOT / scripts[0])
    listed = [d for d in stage["deps"] if isinstance(d, str) and d.startswith(CODE)]

    def covered(file: str) -> bool:
        return any(file == dep or file.startswith(dep.rstrip("/") + "/") for dep in listed)

    missing = sorted(f for f in runs if not covered(f))
    needless = sorted(d for d in listed if not any(f == d or f.startswith(d.rstrip("/") + "/") for f in runs))
    assert not missing, f"dvc.yaml stage {name}: its script runs {missing}: add them to its deps"
    assert not needless, f"dvc.yaml stage {name}: it lists {needless}, which its script does not import: remove them"


def test_the_import_walk_follows_relative_packages_and_stage_helpers():
    train = project_code(ROOT / "stages/train.py")
    assert {"pipeline/training/trainer.py", "pipeline/training/loss.py", "pipeline/models/odmt.py"} <= train
    assert "pipeline/__init__.py" not in train  # a docstring only
    assert "stages/_common.py" in project_code(ROOT / "stages/score.py")


def test_training_and_scoring_do_not_run_each_other():
    """The sequence utilities both use live below both (pipeline/sequences.py): changing how
    candidates are searched must not rerun training, nor a change to training rerun scoring's code."""
    training = {str(p.relative_to(ROOT)) for p in (ROOT / "pipeline/training").glob("*.py")}
    assert "pipeline/training/data.py" in training
    for module in sorted(training):
        assert "pipeline/scoring.py" not in project_code(ROOT / module), f"{module} imports pipeline/scoring.py"
    assert not project_code(ROOT / "pipeline/scoring.py") & training, "pipeline/scoring.py imports pipeline/training"
    assert "pipeline/sequences.py" in project_code(ROOT / "pipeline/scoring.py")
