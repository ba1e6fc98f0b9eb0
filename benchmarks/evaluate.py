"""Evaluation speed: one full-catalogue evaluation of a split, as every epoch's validation runs it.

    python benchmarks/evaluate.py [--data synthetic|real] [--model KEY=VALUE ...] [--train KEY=VALUE ...] [--repeats 5] [--rounds 2]
                                  [--threads N] [--baseline-worktree PATH] [--out benchmarks/results/evaluate.json]

Times `pipeline.training.trainer.evaluate` on the validation split: the item pass (every
catalogue item through the item encoder), the user pass (every user's state) and the fused and
per-branch rankings against the whole catalogue; and, on its own, the item pass
(`model.item_vectors()`). Each figure is the median of --repeats runs after one warm-up run, in
a fresh process, over --rounds such processes; wall time and CPU time (all threads), which a
busy machine disturbs less. `synthetic` data has the embedded dataset's shape (943 users, 1,332 items,
13 training items per user, text 30 x 384, image 50 x 1280; tests/toy.py) with random content;
`real`: each tree its own data/ingest and data/features (compare.data_paths). The model is the `train` section of params.yaml,
with any `--model` settings on top (issue 12's configuration: `--model width=128 text_tokens=30
image_tokens=50`), seeded and untrained: the time does not depend on the weights. `--train
cpu_bf16_validation=true` times the validation as training runs it under that switch.

--baseline-worktree PATH measures the code of another commit in the same run, on the same data,
in its own processes (`git worktree add /tmp/base 3e02192`, then pass /tmp/base), the rounds
of the two trees taking turns, so that a change in the machine's load falls on both: the ratio
baseline / this tree is reported, and whether the two computed the same metrics. The load
average is recorded at the start and the end: on a shared machine other jobs slow every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import compare  # noqa: E402
FIGURES = ("evaluation_s", "evaluation_cpu_s", "item_pass_s", "item_pass_cpu_s")  # medians, compared as baseline / this


# --- the measurement, in a child process that imports the pipeline of --code -----------------


def measure(code: Path, paths: dict[str, str], model_settings: dict, train_settings: dict, repeats: int, threads: int | None) -> dict:
    """Seconds of each timed item pass and whole validation evaluation, with the code at
    ``code`` (imported here, after sys.path points at it: the parent may have another)."""
    sys.path.insert(0, str(code))
    import dataclasses
    import resource
    import time

    import torch

    from pipeline.config import load_params, load_section
    from pipeline.training import TrainConfig, trainer
    from pipeline.training.trainer import evaluate, set_up

    if threads:
        torch.set_num_threads(threads)
    params = code / "params.yaml"  # the tree's own: its TrainConfig may know other fields
    cfg = load_section(TrainConfig, "train", params) if "train" in load_params(params) else TrainConfig()
    model_config, ignored = compare.with_settings(cfg.model, model_settings)
    cfg, ignored_train = compare.with_settings(dataclasses.replace(cfg, **paths, model=model_config), train_settings)
    _, data, model, *_ = set_up(cfg)  # on this process's GPU when there is one
    model.eval()
    model_device = next(model.parameters()).device

    def seconds(run) -> tuple[float, float]:
        """Wall and CPU seconds (all threads) of run(), its GPU work included."""
        wall, cpu = time.perf_counter(), time.process_time()
        run()
        if model_device.type == "cuda":
            torch.cuda.synchronize()
        return round(time.perf_counter() - wall, 4), round(time.process_time() - cpu, 4)

    # each epoch's validation as training runs it: under train.cpu_bf16_validation, the item and
    # user passes in bfloat16 (older trees' evaluate has no autocast argument)
    autocast = getattr(trainer, "validation_autocast", lambda *_: None)(cfg, model_device)
    as_trained = {"autocast": autocast} if autocast else {}

    def validation() -> dict:
        return evaluate(model, data.valid, cfg.eval_batch_size, **as_trained)

    def item_pass() -> None:
        with torch.no_grad(), torch.autocast(model_device.type, dtype=autocast, enabled=autocast is not None):
            model.item_vectors()

    metrics = validation()  # warm-up, and the numbers compared
    item_passes = [seconds(item_pass) for _ in range(repeats)]
    evaluation = [seconds(validation) for _ in range(repeats)]
    return {
        "code": str(code),
        "commit": compare.commit(code),
        "users": len(data.valid.targets),
        "items": data.num_items,
        "variant": cfg.model.variant,
        "model": dataclasses.asdict(cfg.model),
        "model_settings_unknown_here": ignored,
        "train_settings_unknown_here": ignored_train,
        "validation_autocast": str(autocast),
        "threads": torch.get_num_threads(),
        "device": torch.cuda.get_device_name(model_device) if model_device.type == "cuda" else "cpu",
        "item_pass_runs_s": [wall for wall, _ in item_passes],
        "item_pass_cpu_runs_s": [cpu for _, cpu in item_passes],
        "evaluation_runs_s": [wall for wall, _ in evaluation],  # item pass + user pass + rankings
        "evaluation_cpu_runs_s": [cpu for _, cpu in evaluation],
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "metrics": metrics,
    }


# --- the run ----------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", choices=["synthetic", "real"], default="synthetic")
    parser.add_argument("--model", nargs="*", default=[], metavar="KEY=VALUE", help="train.model settings over params.yaml's")
    parser.add_argument("--train", nargs="*", default=[], metavar="KEY=VALUE", help="train settings over params.yaml's (e.g. cpu_bf16_validation=true)")
    parser.add_argument("--train-json", help=argparse.SUPPRESS)
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per figure (the median is reported; at least 3)")
    parser.add_argument("--rounds", type=int, default=2, help="fresh processes per tree, taking turns with the baseline's")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--baseline-worktree", type=Path, help="a git worktree of the commit to compare against")
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/evaluate.json"))
    parser.add_argument("--measure", type=Path, help=argparse.SUPPRESS)  # child mode: the code to measure
    parser.add_argument("--paths", help=argparse.SUPPRESS)
    parser.add_argument("--model-json", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure.resolve(), json.loads(args.paths), json.loads(args.model_json), json.loads(args.train_json), args.repeats, args.threads)))
        return
    model_settings, train_settings = compare.parse_settings(args.model), compare.parse_settings(args.train)
    if args.repeats < 3 or args.rounds < 1:
        parser.error("--repeats must be at least 3 and --rounds at least 1")

    load_at_start = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        paths = compare.data_paths(args.data, Path(tmp))
        arguments = ["--paths", json.dumps(paths), "--model-json", json.dumps(model_settings), "--train-json", json.dumps(train_settings), "--repeats", str(args.repeats)]
        arguments += ["--threads", str(args.threads)] if args.threads else []
        rounds = compare.taking_turns(__file__, compare.trees(ROOT, args.baseline_worktree), args.rounds, arguments)
    for name, measured in rounds.items():
        if any(r["metrics"] != measured[0]["metrics"] for r in measured):
            raise RuntimeError(f"{name}: the metrics differ between rounds")
    runs = {name: compare.median_of_runs(measured) for name, measured in rounds.items()}
    report = {"data": args.data, "model_settings": model_settings, "train_settings": train_settings, "repeats": args.repeats, "machine": compare.machine(load_at_start), "runs": runs}
    if "baseline" in runs:
        report["speed-up"] = compare.speed_up(runs["baseline"], runs["this"], FIGURES)
        report["same_metrics"] = runs["baseline"]["metrics"] == runs["this"]["metrics"]

    sys.path.insert(0, str(ROOT))
    from pipeline.io import write_json

    write_json(report, args.out)
    for name, run in runs.items():
        print(
            f"{name:8s} {run['commit']:>9s}  evaluation {run['evaluation_s']:6.3f} s, CPU {run['evaluation_cpu_s']:6.3f} s "
            f"(item pass {run['item_pass_s']:6.3f} s, CPU {run['item_pass_cpu_s']:6.3f} s)  "
            f"{run['users']} users x {run['items']} items  peak RSS {run['peak_rss_mb']} MB"
        )
    if "speed-up" in report:
        print("speed-up " + ", ".join(f"{key} {ratio}x" for key, ratio in report["speed-up"].items()) + f"; same metrics: {report['same_metrics']}")
    print(f"load average at start {load_at_start}, at end {os.getloadavg()}; wrote {args.out}")


if __name__ == "__main__":
    main()
