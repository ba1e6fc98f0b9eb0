"""Training throughput: sequences/s and peak memory of the default and the paper configuration.

    python benchmarks/train.py [--steps 5] [--paper-steps 2] [--data synthetic|real] [--threads N]
                               [--out benchmarks/results/train.json]

Each configuration runs in its own fresh process (so peak memory is its own): the model is
built, two warm-up steps are taken, then --steps optimiser steps of the real training step are
timed (the median step is reported), and one full validation pass (item vectors of the whole
catalogue + exact ranking of every user). `synthetic` data has the embedded dataset's shape
(943 users, 1,332 items, 13 training items per user, text 30 x 384, image 50 x 1280) with
random content, written to a temporary folder; its users walk the catalogue, so a batch holds
more distinct items than real data does (slower: a conservative figure). `real` uses data/ingest and data/features.
Default config: the `train` section of params.yaml (TrainConfig defaults if absent); paper
config: params-paper.yaml. Peak memory is this process's maximum resident set size (and the
CUDA peak on a GPU). The load average is recorded: on a shared machine other jobs slow every figure.
"""

from __future__ import annotations

import argparse
import dataclasses
import multiprocessing as mp
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.config import load_params, load_section  # noqa: E402
from pipeline.io import write_json  # noqa: E402
from pipeline.progress import log, setup_logging  # noqa: E402
from pipeline.training import TrainConfig  # noqa: E402
from pipeline.training.data import epoch_batches  # noqa: E402
from pipeline.training.loss import log_popularity  # noqa: E402
from pipeline.training.trainer import evaluate, set_up, train_step  # noqa: E402
from tests.toy import make_toy_dataset  # noqa: E402

WARMUP_STEPS = 2  # untimed: the first steps load kernels and size the allocator (much slower on CUDA)


def measure(cfg: TrainConfig, steps: int) -> dict:
    env, data, model, optimizer, scaler, use_amp, _ = set_up(cfg)
    log_p = log_popularity(data.train_counts).to(env.device)
    batches = epoch_batches(len(data.train), cfg.batch_size, cfg.seed, 1)
    batches = [batches[i % len(batches)] for i in range(steps + WARMUP_STEPS)]
    model.train()
    step_s = []
    for i, rows in enumerate(batches):
        started = time.perf_counter()
        train_step(model, model, optimizer, scaler, data.train[rows].to(env.device), cfg, env, 1.0, log_p, use_amp)
        if env.device.type == "cuda":
            torch.cuda.synchronize()
        if i >= WARMUP_STEPS:
            step_s.append(time.perf_counter() - started)
    median_step_s = statistics.median(step_s)
    started = time.perf_counter()
    evaluate(model, data.valid, cfg.eval_batch_size)
    validation_s = time.perf_counter() - started
    steps_per_epoch = len(epoch_batches(len(data.train), cfg.batch_size, cfg.seed, 1))
    return {
        "variant": cfg.model.variant,
        "width": cfg.model.width,
        "text_tokens": cfg.model.text_tokens,
        "image_tokens": cfg.model.image_tokens,
        "batch_size": cfg.batch_size,
        "device": str(env.device),
        "threads": torch.get_num_threads(),
        "steps_timed": steps,
        "seconds_per_step": median_step_s,  # median: one slow step (a GC, a late kernel load) does not move it
        "sequences_per_s": cfg.batch_size / median_step_s,
        "validation_s": validation_s,
        "estimated_epoch_s": steps_per_epoch * median_step_s + validation_s,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_cuda_mb": torch.cuda.max_memory_allocated() / 2**20 if env.device.type == "cuda" else None,
    }


def _child(cfg: TrainConfig, steps: int, threads: int | None, queue) -> None:
    setup_logging()
    if threads:
        torch.set_num_threads(threads)
    queue.put(measure(cfg, steps))


def in_fresh_process(cfg: TrainConfig, steps: int, threads: int | None) -> dict:
    context = mp.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_child, args=(cfg, steps, threads, queue))
    process.start()
    result = queue.get()
    process.join()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=5, help="timed steps, default configuration")
    parser.add_argument("--paper-steps", type=int, default=2, help="timed steps, paper configuration")
    parser.add_argument("--data", choices=["synthetic", "real"], default="synthetic")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice); 1 on a busy shared machine")
    parser.add_argument("--params", default=str(ROOT / "params.yaml"))
    parser.add_argument("--paper-params", default=str(ROOT / "params-paper.yaml"))
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/train.json"))
    args = parser.parse_args()
    setup_logging()
    default = load_section(TrainConfig, "train", args.params) if "train" in load_params(args.params) else TrainConfig()
    paper = load_section(TrainConfig, "train", args.paper_params)
    with tempfile.TemporaryDirectory() as tmp:
        if args.data == "synthetic":
            root = make_toy_dataset(Path(tmp), num_users=943, num_items=1332, seq_len=15, text_shape=(30, 384), image_shape=(50, 1280))
            paths = dict(
                sequences=str(root / "ingest/sequences.parquet"),
                popularity=str(root / "ingest/popularity.parquet"),
                text_features=str(root / "features/text.parquet"),
                image_features=str(root / "features/image.parquet"),
            )
            default, paper = (dataclasses.replace(c, **paths) for c in (default, paper))
        results = {}
        for name, cfg, steps in (("default", default, args.steps), ("paper", paper, args.paper_steps)):
            log.info("measuring the %s configuration (%d steps)", name, steps)
            results[name] = in_fresh_process(cfg, steps, args.threads)
            log.info("%s: %s", name, results[name])
    report = {
        "data": args.data,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "load_average": os.getloadavg(), "torch": torch.__version__},
        "results": results,
    }
    write_json(report, args.out)
    for name, r in results.items():
        print(f"{name:8s} {r['sequences_per_s']:8.1f} sequences/s  {r['seconds_per_step']:7.2f} s/step  validation {r['validation_s']:6.2f} s  peak RSS {r['peak_rss_mb']:7.0f} MB")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
