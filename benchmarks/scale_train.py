"""The train stage's work for a fixed number of steps, for benchmarks/scale.py --train-steps.

    python benchmarks/scale_train.py --steps 200 [--params params.yaml]    # in a scale work folder

An epoch at 1M users is ~31k steps (hours on 2 CPU cores). This runs what the train stage runs,
on the same params and data: the set-up (data, features, model, optimiser: set_up, where the
memory goes), `--steps` real optimiser steps (train_step, the first epoch's batches and
distillation weight) and one validation on the users an epoch ranks (train.valid_users), and
prints one JSON line: the seconds of each part, the median step and the steps an epoch has.
scale.py extrapolates the stage's time from them and says so in its record. The model after
these steps is written to models/{variant}-s{seed}/model.pt as the stage would (without the
valid/test metrics), so that the score and evaluate stages can follow.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.config import load_section, to_dict  # noqa: E402
from pipeline.evaluation import EvaluateConfig  # noqa: E402
from pipeline.models.odmt import VARIANTS  # noqa: E402
from pipeline.training import TrainConfig, checkpoint  # noqa: E402
from pipeline.training.data import epoch_batches  # noqa: E402
from pipeline.training.distillation import distillation_pairs, ramp_weight  # noqa: E402
from pipeline.training.loss import log_popularity  # noqa: E402
from pipeline.training.trainer import evaluate, set_up, train_step  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args()
    cfg = load_section(TrainConfig, "train", args.params)
    exclude_history = load_section(EvaluateConfig, "evaluate", args.params).exclude_history

    started = time.perf_counter()
    env, data, model, optimizer, scaler, autocast, sources = set_up(cfg, exclude_history)
    setup_s = time.perf_counter() - started

    distill = VARIANTS[cfg.model.variant].distill and cfg.distill.ramp > 0 and bool(distillation_pairs(model.branches, cfg.distill))
    weight = ramp_weight(1, cfg.distill.ramp) if distill else 0.0  # the first epoch's, as the stage
    log_p = log_popularity(data.train_counts).to(env.device) if cfg.logq else None
    batches = epoch_batches(len(data.train), cfg.batch_size, cfg.seed, 1)
    model.train()
    step_s = []
    for rows in batches[: args.steps]:
        started = time.perf_counter()
        train_step(model, model, optimizer, scaler, data.train[rows].to(env.device), cfg, env, weight, log_p, autocast)
        step_s.append(time.perf_counter() - started)

    started = time.perf_counter()
    evaluate(model, data.valid, cfg.eval_batch_size)  # the users that validation ranks (train.valid_users)
    validation_s = time.perf_counter() - started
    info = {"variant": cfg.model.variant, "backbone": cfg.model.backbone, "seed": cfg.seed, "max_len": cfg.model.max_len,
            "branches": list(model.branches), "branch_dim": model.branch_dim,
            "sources": [s for s in sources.used if s in VARIANTS[cfg.model.variant].sources], "source_present": sources.present,
            "exclude_history": exclude_history, "num_items": data.num_items, "best_epoch": 1, "epochs_trained": 0,
            "note": f"benchmarks/scale_train.py: {len(step_s)} steps"}
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    checkpoint.save({"state_dict": state, "params": to_dict(cfg), "info": info}, Path("models") / f"{cfg.model.variant}-s{cfg.seed}/model.pt")
    print(json.dumps({
        "setup_s": round(setup_s, 1),
        "steps_run": len(step_s),
        "steps_per_epoch": len(batches),
        "median_step_s": round(statistics.median(step_s), 4),
        "validation_s": round(validation_s, 1),
        "validation_users": len(data.valid.targets),
    }))


if __name__ == "__main__":
    main()
