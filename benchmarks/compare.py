"""Side-by-side runs of two checkouts for the benchmarks' --baseline-worktree.

Each measurement runs in a fresh interpreter started in the tree it measures (its own imports,
its own peak memory): the benchmark script is called again with `--measure TREE` and prints its
result as JSON on its last line. The trees take turns, round after round, so that a change in
the machine's load falls on both; the load average is recorded around the whole run.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import statistics
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

import yaml

Result = TypeVar("Result")


def trees(this: Path, baseline: Path | None) -> dict[str, Path]:
    """{"this": this checkout} plus {"baseline": the other checkout} when one is given."""
    if baseline is None:
        return {"this": this}
    if not (baseline / "pipeline").is_dir():
        raise SystemExit(f"--baseline-worktree {baseline}: not a checkout of this project (no pipeline/)")
    return {"this": this, "baseline": baseline.resolve()}


def in_fresh_process(script: str, code: Path, arguments: Sequence[str]) -> dict:
    """`python script --measure code *arguments`, run in ``code``; its last output line, as JSON."""
    command = [sys.executable, script, "--measure", str(code), *arguments]
    done = subprocess.run(command, cwd=code, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"measuring {code} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def in_turns(checkouts: dict[str, Path], rounds: int, measure: Callable[[str, Path], Result]) -> dict[str, list[Result]]:
    """measure(name, code) once per tree and round, the trees taking turns: {tree name: its rounds' results}."""
    results: dict[str, list[Result]] = {name: [] for name in checkouts}
    for _ in range(rounds):
        for name, code in checkouts.items():
            results[name].append(measure(name, code))
    return results


def taking_turns(script: str, checkouts: dict[str, Path], rounds: int, arguments: Sequence[str]) -> dict[str, list[dict]]:
    """Each tree measured once per round by ``script`` in a fresh process (in_fresh_process)."""
    return in_turns(checkouts, rounds, lambda _, code: in_fresh_process(script, code, arguments))


def parse_settings(pairs: Sequence[str]) -> dict:
    """KEY=VALUE command-line settings (--model, --train) as a dict, each value read as YAML."""
    return {key: yaml.safe_load(value) for key, value in (pair.split("=", 1) for pair in pairs)}


def with_settings(config, settings: dict) -> tuple[object, list[str]]:
    """``config`` (a dataclass) with those of ``settings`` its class knows, and the names of the
    others: a switch that only the newer tree has is left out of the baseline's run."""
    known = {field.name for field in dataclasses.fields(config)}
    return dataclasses.replace(config, **{k: v for k, v in settings.items() if k in known}), sorted(set(settings) - known)


def commit(code: Path) -> str:
    return subprocess.run(["git", "-C", str(code), "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()


def machine(load_at_start: tuple[float, float, float]) -> dict:
    """The machine and its load average (1, 5, 15 min) at the start and now, the end."""
    return {
        "platform": platform.platform(),
        "cpus": len(os.sched_getaffinity(0)),
        "load_average_at_start_and_end": [list(load_at_start), list(os.getloadavg())],
    }


def median_of_runs(rounds: list[dict]) -> dict:
    """One tree's rounds as one result: each `<figure>_runs_s` list joined over the rounds and
    its median as `<figure>_s`; the other fields from the first round, the peak RSS the largest."""
    first = rounds[0]
    runs = {key: [s for r in rounds for s in r[key]] for key in first if key.endswith("_runs_s")}
    return {
        **{key: value for key, value in first.items() if key not in runs and key != "peak_rss_mb"},
        **{key.replace("_runs", ""): round(statistics.median(values), 4) for key, values in runs.items()},
        **runs,
        "peak_rss_mb": max(r["peak_rss_mb"] for r in rounds),
    }


def speed_up(baseline: dict, this: dict, figures: Sequence[str]) -> dict[str, float]:
    """baseline / this of each figure (seconds): above 1, this tree is faster."""
    return {key.removesuffix("_s"): round(baseline[key] / this[key], 2) for key in figures}


def data_paths(kind: str, folder: Path) -> dict[str, str]:
    """Input paths over the params file's: `synthetic`, the embedded dataset's shape (943 users,
    1,332 items, 13 training items per user, text 30 x 384, image 50 x 1280; tests/toy.py) with
    random content written to ``folder``, as absolute paths that every tree reads; `real`, none:
    each tree reads its own data/ as its params file names it (run its ingest and feature stages
    there first), so a baseline from before the feature store reads the single-file features
    its own stages made from the same input."""
    if kind == "real":
        return {}
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.toy import make_toy_dataset

    root = make_toy_dataset(folder, num_users=943, num_items=1332, seq_len=15, text_shape=(30, 384), image_shape=(50, 1280))
    return {
        "sequences": str(root / "ingest/sequences.parquet"),
        "popularity": str(root / "ingest/popularity.parquet"),
        "text_features": str(root / "features/text"),
        "image_features": str(root / "features/image"),
    }
