"""Stage `score`: a trained run's candidates over the whole catalogue.

    python stages/score.py --run odmt-s1 [--params params.yaml]
    torchrun --nproc_per_node 2 -- stages/score.py --run odmt-s1   (score.launcher; `--`: --run is not torchrun's)

Reads models/{run}/model.pt, data/ingest/sequences.parquet and `evaluate.exclude_history` (which
history items are never ranked); writes
data/candidates/{run}/{valid,test}.parquet (each user's top-K unseen items, fused and per
branch) and data/candidates/{run}/scoring.json (settings, the search engine, and recall@K for an
approximate index). Under torchrun each rank scores a contiguous share of the users (one GPU per
rank where there are GPUs) and rank 0 merges the shares into the same files one process writes.
"""

from _common import run_option, stage_args

from pathlib import Path

import torch

from pipeline import schema
from pipeline.config import load_section
from pipeline.io import read_checked
from pipeline.evaluation import EvaluateConfig
from pipeline.scoring import ScoreConfig, score_run
from pipeline.training import TrainConfig, load_trained
from pipeline.ddp import cleanup, setup

args = stage_args(__doc__, run_option)
config = load_section(ScoreConfig, "score", args.params)
env = setup()  # one process, or this rank of torchrun's (its GPU, a process group)
device = torch.device("cpu") if config.device == "cpu" else env.device
model, info = load_trained(Path("models") / args.run, load_section(TrainConfig, "train", args.params), device)
exclude_history = load_section(EvaluateConfig, "evaluate", args.params).exclude_history
provenance = {"run": args.run, "variant": info["variant"], "seed": info["seed"], "best_epoch": info["best_epoch"]}
# how training ended (the report shows it); a model.pt older than early stopping has no stop_reason
provenance |= {key: info[key] for key in ("epochs_trained", "stop_reason", "patience") if key in info}
if "sources" in info:
    provenance["sources"] = {"used": info["sources"], "present": info["source_present"]}
sequences = read_checked("data/ingest/sequences.parquet", schema.SEQUENCES, schema.REINGEST)
score_run(model, info["max_len"], sequences, config, Path("data/candidates") / args.run, provenance, exclude_history)
cleanup(env)
