"""Measuring two checkouts' code in one run: the benchmarks' `--baseline-worktree PATH`.

A figure from another day is not comparable on a shared machine: other jobs change the speed
by several times. So the benchmarks run this checkout's code and another commit's (a git
worktree: `git worktree add --detach /tmp/base main`) in the same run, in fresh processes, the
two taking turns, so that a change in the machine's load falls on both, and report the ratio of
the medians.
"""

from __future__ import annotations

import statistics
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

ROOT = Path(__file__).resolve().parents[1]
Result = TypeVar("Result")


def code_trees(baseline: Path | None) -> dict[str, Path]:
    """The code to measure: {"this": this checkout} and, if given, {"baseline": the other}."""
    if baseline is None:
        return {"this": ROOT}
    baseline = baseline.resolve()
    if not (baseline / "pipeline").is_dir():
        raise SystemExit(f"--baseline-worktree {baseline}: not a checkout of this project (no pipeline/)")
    return {"this": ROOT, "baseline": baseline}


def in_turns(trees: dict[str, Path], rounds: int, measure: Callable[[str, Path], Result]) -> dict[str, list[Result]]:
    """measure(name, code) `rounds` times for each tree, the trees taking turns."""
    results: dict[str, list[Result]] = {name: [] for name in trees}
    for _ in range(rounds):
        for name, code in trees.items():
            results[name].append(measure(name, code))
    return results


def commit_of(code: Path) -> str:
    return subprocess.run(["git", "-C", str(code), "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()


def speed_up(baseline: list[float], this: list[float], higher_is_faster: bool) -> float:
    """This tree's speed over the baseline's, from the medians of their runs."""
    ratio = statistics.median(this) / statistics.median(baseline)
    return round(ratio if higher_is_faster else 1 / ratio, 2)
