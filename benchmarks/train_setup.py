"""The train stage's set-up (data, feature stores, model, optimiser) timed under one or more checkouts.

    python benchmarks/train_setup.py --work /tmp/odmt-scale/work/new/L [--code . /tmp/base] [--rounds 3]

`trainer.set_up` is what the train stage runs before its first step: the sequences, the kept
feature tokens (train.model.text_tokens, image_tokens), the model with its ID initialisation,
AdamW. Each checkout runs it in a fresh process in the work folder of a benchmarks/scale.py run
(its data; a checkout's own `--work` follows its `--code` in order, for layouts that differ),
with the `train` and `evaluate` sections of the checkout's own params.yaml (its default model,
written to WORK/train-setup-params.yaml), the checkouts taking turns, --rounds times. Prints and writes (--out) the median
seconds and peak RSS of each, and the machine's load average.

Taking turns, a run reads its files after the other checkout's run has read its own (at L,
eb01d8e reads 13 GB), so its page cache is partly cold. With --warm each timed run follows an
untimed run of the same checkout: its files are in the page cache, as after the feature stage
that wrote them or a `dvc pull`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
PARAMS = "train-setup-params.yaml"

SETUP = r"""
import json, resource, sys, time
sys.path.insert(0, sys.argv[1])
from pipeline.config import load_section
from pipeline.evaluation import EvaluateConfig
from pipeline.training import TrainConfig
from pipeline.training.trainer import set_up
cfg = load_section(TrainConfig, "train", sys.argv[2])
exclude_history = load_section(EvaluateConfig, "evaluate", sys.argv[2]).exclude_history
started = time.perf_counter()
set_up(cfg, exclude_history)
print(json.dumps({"setup_s": time.perf_counter() - started, "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}))
"""


def set_up(code: Path, work: Path) -> dict:
    """One run of the set-up of `code` in `work`, in a fresh process: its seconds and peak RSS."""
    defaults = yaml.safe_load((code / "params.yaml").read_text())
    params = work / PARAMS
    params.write_text(yaml.safe_dump({name: defaults[name] for name in ("train", "evaluate")}, sort_keys=False))
    proc = subprocess.run([sys.executable, "-c", SETUP, str(code.resolve()), PARAMS], cwd=work, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{code}: set-up failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--code", nargs="+", type=Path, default=[ROOT], help="checkouts, in turn")
    parser.add_argument("--work", nargs="+", type=Path, required=True, help="a work folder per checkout (or one for all)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warm", action="store_true", help="an untimed run of the same checkout before each timed one")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/train-setup.json")
    args = parser.parse_args()
    works = args.work if len(args.work) == len(args.code) else args.work * len(args.code)
    load = os.getloadavg()
    runs: dict[str, list[dict]] = {str(code): [] for code in args.code}
    for _ in range(args.rounds):
        for code, work in zip(args.code, works):
            if args.warm:
                set_up(code, work)
            runs[str(code)].append(set_up(code, work))
            print(code, runs[str(code)][-1], flush=True)
    report = {"rounds": args.rounds, "warm": args.warm, "load_average_before": load, "load_average_after": os.getloadavg(), "cpus": os.cpu_count(),
              "results": {code: {"work": str(work), "median_setup_s": statistics.median(r["setup_s"] for r in rs),
                                 "median_peak_rss_gb": statistics.median(r["peak_rss_gb"] for r in rs), "runs": rs}
                          for (code, rs), work in zip(runs.items(), works)}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    for code, result in report["results"].items():
        print(f"{code}: set-up {result['median_setup_s']:.1f} s, peak RSS {result['median_peak_rss_gb']:.2f} GB (median of {args.rounds})")
    print(f"load average {load} -> {report['load_average_after']}; wrote {args.out}")


if __name__ == "__main__":
    main()
