"""Training throughput: seconds per step, sequences/s and peak memory of a training configuration.

    python benchmarks/train.py [--configs default paper] [--model KEY=VALUE ...] [--train KEY=VALUE ...] [--steps 5] [--rounds 1]
                               [--data synthetic|real] [--threads N] [--baseline-worktree PATH]
                               [--profile benchmarks/results/train-profile.txt] [--out benchmarks/results/train.json]

Each measurement runs in its own fresh process (so peak memory is its own): the model is built,
two warm-up steps are taken, then --steps optimiser steps of the real training step
(`pipeline.training.trainer.train_step`, distillation weight 1) are timed, and one full
validation pass (item vectors of the whole catalogue + exact ranking of every user). The median
step is reported. `synthetic` data has the embedded dataset's shape (943 users, 1,332 items, 13
training items per user, text 30 x 384, image 50 x 1280) with random content, written to a
temporary folder; its users walk the catalogue, so a batch holds more distinct items than real
data does (slower: a conservative figure). `real`: each tree reads its own data/ingest and
data/features (compare.data_paths).
Configurations: `default` is the `train` section of params.yaml, `paper` that of
params-paper.yaml, each with the --model (train.model) and --train (train) settings on top (issue 12's configuration: `--configs
paper --model width=128 --threads 2`, the paper's with width 128; on a CPU it runs in float32).
Peak memory is the process's maximum resident set size (and the CUDA peak on a GPU).

--baseline-worktree PATH measures the code of another commit in the same run, on the same data,
each tree in its own processes and the trees taking turns over --rounds rounds (benchmarks/
compare.py): the ratio baseline / this tree is reported. --profile FILE profiles one more step
of this tree (torch.profiler, CPU) and writes its operators by self CPU time to FILE. The load
average is recorded: on a shared machine other jobs slow every figure.
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

WARMUP_STEPS = 2  # untimed: the first steps load kernels and size the allocator (much slower on CUDA)
FIGURES = ("step_s", "validation_s")  # medians, compared as baseline / this
PARAMS_FILES = {"default": "params.yaml", "paper": "params-paper.yaml"}
PROFILE_ROWS = 40


# --- the measurement, in a child process that imports the pipeline of --measure ---------------


def measure(
    code: Path, config: str, paths: dict[str, str], model_settings: dict, train_settings: dict, steps: int, threads: int | None, profile: str | None
) -> dict:
    """Seconds of each timed training step and of one validation pass, with the code at
    ``code`` (imported here, after sys.path points at it: the parent may have another)."""
    sys.path.insert(0, str(code))
    import dataclasses
    import resource
    import time

    import torch

    from pipeline.config import load_params, load_section
    from pipeline.training import TrainConfig
    from pipeline.training.data import epoch_batches
    from pipeline.training.loss import log_popularity
    from pipeline.training.trainer import evaluate, set_up, train_step

    if threads:
        torch.set_num_threads(threads)
    params = code / PARAMS_FILES[config]  # the tree's own: its TrainConfig may know other fields
    cfg = load_section(TrainConfig, "train", params) if "train" in load_params(params) else TrainConfig()
    model_config, ignored = compare.with_settings(cfg.model, model_settings)
    cfg, ignored_train = compare.with_settings(cfg, train_settings)
    cfg = dataclasses.replace(cfg, **paths, model=model_config)
    env, data, model, optimizer, scaler, autocast, _ = set_up(cfg)
    log_p = log_popularity(data.train_counts).to(env.device)
    epoch = epoch_batches(len(data.train), cfg.batch_size, cfg.seed, 1)
    model.train()

    def step(i: int) -> float:
        started = time.perf_counter()
        train_step(model, model, optimizer, scaler, data.train[epoch[i % len(epoch)]].to(env.device), cfg, env, 1.0, log_p, autocast)
        if env.device.type == "cuda":
            torch.cuda.synchronize()
        return round(time.perf_counter() - started, 4)

    step_s = [step(i) for i in range(WARMUP_STEPS + steps)][WARMUP_STEPS:]
    if profile:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as profiler

        with profiler(activities=[ProfilerActivity.CPU]) as prof:
            step(WARMUP_STEPS + steps)
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=PROFILE_ROWS, max_name_column_width=50)
        Path(profile).write_text(f"one training step of {config} {model_settings}, {torch.get_num_threads()} threads, code {code}\n{table}\n")
    started = time.perf_counter()
    evaluate(model, data.valid, cfg.eval_batch_size)
    validation_s = round(time.perf_counter() - started, 4)
    return {
        "code": str(code),
        "commit": compare.commit(code),
        "variant": cfg.model.variant,
        "model": dataclasses.asdict(cfg.model),
        "model_settings_unknown_here": ignored,
        "train_settings_unknown_here": ignored_train,
        "batch_size": cfg.batch_size,
        "steps_per_epoch": len(epoch),
        "device": str(env.device),
        "threads": torch.get_num_threads(),
        "step_runs_s": step_s,
        "validation_runs_s": [validation_s],
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "peak_cuda_mb": round(torch.cuda.max_memory_allocated() / 2**20) if env.device.type == "cuda" else None,
    }


# --- the run ----------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", choices=list(PARAMS_FILES), default=list(PARAMS_FILES))
    parser.add_argument("--model", nargs="*", default=[], metavar="KEY=VALUE", help="train.model settings over the params file's")
    parser.add_argument("--train", nargs="*", default=[], metavar="KEY=VALUE", help="train settings over the params file's (e.g. cpu_bf16=true)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per process (the median over all is reported)")
    parser.add_argument("--rounds", type=int, default=1, help="fresh processes per tree and configuration, taking turns with the baseline's")
    parser.add_argument("--data", choices=["synthetic", "real"], default="synthetic")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--baseline-worktree", type=Path, help="a git worktree of the commit to compare against")
    parser.add_argument("--profile", help="write the operators of one profiled step of this tree here (the first configuration)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/train.json"))
    parser.add_argument("--measure", type=Path, help=argparse.SUPPRESS)  # child mode: the code to measure
    parser.add_argument("--config", help=argparse.SUPPRESS)
    parser.add_argument("--paths", help=argparse.SUPPRESS)
    parser.add_argument("--model-json", help=argparse.SUPPRESS)
    parser.add_argument("--train-json", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        result = measure(args.measure.resolve(), args.config, json.loads(args.paths), json.loads(args.model_json), json.loads(args.train_json), args.steps, args.threads, args.profile)
        print(json.dumps(result))
        return
    if args.steps < 1 or args.rounds < 1:
        parser.error("--steps and --rounds must be at least 1")
    model_settings, train_settings = compare.parse_settings(args.model), compare.parse_settings(args.train)

    load_at_start = os.getloadavg()
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        paths = compare.data_paths(args.data, Path(tmp))
        common = ["--paths", json.dumps(paths), "--model-json", json.dumps(model_settings), "--train-json", json.dumps(train_settings), "--steps", str(args.steps)]
        common += ["--threads", str(args.threads)] if args.threads else []
        for config in args.configs:
            rounds = compare.taking_turns(__file__, compare.trees(ROOT, args.baseline_worktree), args.rounds, [*common, "--config", config])
            runs[config] = {name: compare.median_of_runs(measured) for name, measured in rounds.items()}
        if args.profile:
            compare.in_fresh_process(__file__, ROOT, [*common, "--config", args.configs[0], "--profile", str(Path(args.profile).resolve())])
    report = {"data": args.data, "model_settings": model_settings, "train_settings": train_settings, "steps": args.steps, "machine": compare.machine(load_at_start), "runs": runs}
    if args.baseline_worktree:
        report["speed-up"] = {config: compare.speed_up(trees["baseline"], trees["this"], FIGURES) for config, trees in runs.items()}

    sys.path.insert(0, str(ROOT))
    from pipeline.io import write_json

    write_json(report, args.out)
    for config, trees in runs.items():
        for name, run in trees.items():
            print(
                f"{config:8s} {name:8s} {run['commit']:>9s}  {run['step_s']:7.2f} s/step ({run['batch_size'] / run['step_s']:7.1f} sequences/s)  "
                f"validation {run['validation_s']:6.2f} s  peak RSS {run['peak_rss_mb']} MB"
            )
        if "speed-up" in report:
            print(f"{config:8s} speed-up " + ", ".join(f"{key} {ratio}x" for key, ratio in report["speed-up"][config].items()))
    print(f"load average at start {load_at_start}, at end {os.getloadavg()}; wrote {args.out}")


if __name__ == "__main__":
    main()
