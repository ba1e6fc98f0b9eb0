"""Stage `train`: one training run of a variant and seed.

    python stages/train.py --variant odmt --seed 1 [--params params.yaml]
    torchrun --nproc_per_node 2 stages/train.py --variant odmt --seed 1   # DDP

Reads the `train` section of the params file and `evaluate.exclude_history` (the ranking
protocol that picks the best epoch, the one the evaluate stage reports); writes models/{variant}-s{seed}/model.pt (+
checkpoint.pt, from which a killed run resumes) and dvclive output in logs/{variant}-s{seed}/.
"""

import argparse
import dataclasses
import logging
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.config import load_section  # noqa: E402
from pipeline.evaluation import EvaluateConfig  # noqa: E402
from pipeline.models.odmt import VARIANTS  # noqa: E402
from pipeline.progress import setup_logging  # noqa: E402
from pipeline.training import TrainConfig  # noqa: E402
from pipeline.training.trainer import train  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", choices=sorted(VARIANTS), help="overrides train.model.variant")
    parser.add_argument("--seed", type=int, help="overrides train.seed")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--models", default="models", help="folder of the run folders")
    parser.add_argument("--logs", default="logs", help="folder of the dvclive folders")
    args = parser.parse_args()
    setup_logging(logging.INFO if os.environ.get("RANK", "0") == "0" else logging.WARNING)  # DDP: rank 0 reports
    cfg = load_section(TrainConfig, "train", args.params)
    if args.variant:
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, variant=args.variant))
    if args.seed is not None:
        cfg = dataclasses.replace(cfg, seed=args.seed)
    exclude_history = load_section(EvaluateConfig, "evaluate", args.params).exclude_history
    run = f"{cfg.model.variant}-s{cfg.seed}"
    train(cfg, Path(args.models) / run, Path(args.logs) / run, exclude_history)


if __name__ == "__main__":
    main()
