"""The DAG's stages on a synthetic catalogue of a given size: wall time, peak RSS and output bytes.

    python benchmarks/scale.py --sizes S M L                 # this checkout's code
    python benchmarks/scale.py --sizes S M --code /tmp/base --label base   # another checkout's, to compare

For each size, the catalogue of `benchmarks/synthetic.py` (written once into --data/SIZE, not
timed) is run through each stage of --stages in order, each as its own process (`stages/*.py` of
--code, in a work folder --work/LABEL/SIZE that holds its params.yaml and outputs), and its wall
time, peak resident memory (the process's maximum RSS from `wait4`) and the bytes of its outputs
are recorded in --out (benchmarks/results/scale.json; a rerun replaces the same label, size and
stage), with the machine's load average at the start. --plot draws time and memory against the
number of interactions for every label and stage found there (PNG).

Stages so far: ingest. A stage is an entry of STAGES (its script, the params sections it reads,
its outputs), so the feature, train, score and evaluate stages are added the same way.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import synthetic  # noqa: E402  (benchmarks/synthetic.py)

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Stage:
    name: str
    script: str  # relative to the code checkout
    params: Callable[[Path], dict]  # the params sections the stage reads, given the catalogue folder
    outputs: tuple[str, ...]  # relative to the work folder


def ingest_params(catalogue: Path) -> dict:
    generic = {"text_columns": ["description"], "image_column": "image", "image_dir": "images"}
    return {"ingest": {"adapter": "generic", "path": str(catalogue), "generic": generic}}


STAGES = {
    "ingest": Stage(
        "ingest",
        "stages/ingest.py",
        ingest_params,
        tuple(f"data/ingest/{name}.parquet" for name in ("items", "images", "interactions", "sequences", "popularity")),
    ),
}


def catalogue_counts(catalogue: Path) -> dict:
    """Users, items and interactions of a synthetic catalogue (from its files)."""
    with (catalogue / "interactions.csv").open("rb") as f:
        interactions = sum(1 for _ in f) - 1
    with (catalogue / "items.csv").open("rb") as f:
        items = sum(1 for _ in f) - 1
    return {"items": items, "interactions": interactions}


def run_stage(stage: Stage, code: Path, work: Path, catalogue: Path) -> dict:
    """Run one stage as a child process; its wall time, peak RSS (wait4) and output bytes."""
    work.mkdir(parents=True, exist_ok=True)
    (work / "params.yaml").write_text(yaml.safe_dump(stage.params(catalogue), sort_keys=False))
    log_path = work / f"{stage.name}.log"
    start = time.perf_counter()
    with log_path.open("w") as log:
        proc = subprocess.Popen([sys.executable, str(code / stage.script), "--params", "params.yaml"], cwd=work, stdout=log, stderr=log)
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{stage.name} failed on {catalogue} (see {log_path}):\n" + log_path.read_text()[-3000:])
    return {
        "wall_s": round(wall, 1),
        "peak_rss_gb": round(usage.ru_maxrss / 2**20, 2),  # ru_maxrss is in KiB on Linux
        "output_bytes": sum((work / out).stat().st_size for out in stage.outputs),
    }


def git_commit(code: Path) -> str:
    result = subprocess.run(["git", "-C", str(code), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return result.stdout.strip() or "unknown"


def measure(sizes: list[str], stages: list[str], code: Path, label: str, data: Path, work: Path) -> list[dict]:
    records = []
    for size in sizes:
        catalogue = data / size
        if not (catalogue / "items.csv").exists():
            items, users = synthetic.SIZES[size]
            print(f"writing the {size} catalogue ({items} items, {users} users) to {catalogue} ...", flush=True)
            synthetic.write(catalogue, items, users)
        counts = {"users": synthetic.SIZES[size][1], **catalogue_counts(catalogue)}
        for name in stages:
            load = os.getloadavg()[0]
            result = run_stage(STAGES[name], code, work / label / size, catalogue)
            record = {"label": label, "commit": git_commit(code), "size": size, **counts, "stage": name,
                      **result, "load_avg_1m": round(load, 2), "cpus": os.cpu_count()}
            print(json.dumps(record), flush=True)
            records.append(record)
    return records


def merge(out: Path, records: list[dict]) -> list[dict]:
    """The records of `out` with the new ones replacing those of the same label, size and stage."""
    key = lambda r: (r["label"], r["size"], r["stage"])  # noqa: E731
    old = json.loads(out.read_text())["runs"] if out.exists() else []
    new_keys = {key(r) for r in records}
    merged = [r for r in old if key(r) not in new_keys] + records
    return sorted(merged, key=lambda r: (r["stage"], r["label"], r["interactions"]))


def plot(records: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (time_ax, rss_ax) = plt.subplots(1, 2, figsize=(10, 4))
    for label, stage in sorted({(r["label"], r["stage"]) for r in records}):
        runs = [r for r in records if r["label"] == label and r["stage"] == stage]
        x = [r["interactions"] / 1e6 for r in runs]
        time_ax.plot(x, [r["wall_s"] for r in runs], "o-", label=f"{stage} ({label})")
        rss_ax.plot(x, [r["peak_rss_gb"] for r in runs], "o-", label=f"{stage} ({label})")
        for r, xi in zip(runs, x):
            rss_ax.annotate(r["size"], (xi, r["peak_rss_gb"]), textcoords="offset points", xytext=(4, 4), fontsize=8)
    for ax, ylabel in ((time_ax, "wall time (s)"), (rss_ax, "peak RSS (GB)")):
        ax.set_xlabel("interactions (millions)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("benchmarks/scale.py: stages on synthetic catalogues (S, M, L)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", choices=sorted(synthetic.SIZES), default=["S"])
    parser.add_argument("--stages", nargs="+", choices=list(STAGES), default=list(STAGES))
    parser.add_argument("--code", type=Path, default=ROOT, help="the checkout whose stages run (default: this one)")
    parser.add_argument("--label", default="current", help="the name of this code in the results (e.g. base, after)")
    parser.add_argument("--data", type=Path, default=Path("/tmp/odmt-scale/catalogues"), help="synthetic catalogues (reused)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/odmt-scale/work"), help="the stages' params and outputs")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/scale.json")
    parser.add_argument("--plot", type=Path, default=ROOT / "benchmarks/results/scale.png")
    args = parser.parse_args()
    records = merge(args.out, measure(args.sizes, args.stages, args.code.resolve(), args.label, args.data, args.work))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    note = ("Each stage run as its own process on a synthetic catalogue (benchmarks/synthetic.py); peak_rss_gb is the "
            "process's maximum RSS (wait4). Only the ingest stage is measured so far (no feature encoder ran).")
    args.out.write_text(json.dumps({"note": note, "runs": records}, indent=2) + "\n")
    plot(records, args.plot)
    print(f"{len(records)} runs in {args.out}; figure {args.plot}")


if __name__ == "__main__":
    main()
