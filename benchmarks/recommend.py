"""Recommend throughput: users/s of the recommend stage's work, and the size of an export.

    python benchmarks/recommend.py [--items 1000000] [--users 2000] [--out benchmarks/results/recommend.json]

What is timed is `pipeline.recommend.recommend`, the stage's loop: per block of users, the
user encoder (item vector lookup + the three SASRec branch encoders of the default params) on
the last max_len items, an exact FAISS search over the whole catalogue with the history
excluded, and the Parquet rows written with the source's item keys. Not timed: loading the
model and building the item table (once per run; reported separately for the embedded size).

1. The embedded size: 943 users with 15-item histories, 1,332 items, ODMT with the `train`
   section of params.yaml, random weights and random frozen features of the real shapes
   (text 30 x 384, image 50 x 1280). Also times the item table (the IMT over every item) and
   writes the export, whose file sizes are reported.
2. A synthetic catalogue of --items items (default 1,000,000; d = 3 x 64, 768 MB of float32):
   the same sequence encoders over a random item table, a flat (exact) index.
Random weights and vectors: the cost does not depend on what the model learned.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.config import load_section  # noqa: E402
from pipeline.export import export_run, user_encoder  # noqa: E402
from benchmarks.scoring import write_result  # noqa: E402
from pipeline.progress import log, setup_logging  # noqa: E402
from pipeline.recommend import RecommendConfig, recommend  # noqa: E402
from pipeline.scoring import IndexConfig, available_cpus, build_index  # noqa: E402
from pipeline.sequences import Ragged  # noqa: E402
from pipeline.training import TrainConfig, build_model  # noqa: E402
from tests.toy import make_toy_dataset  # noqa: E402

HISTORY = 15  # the embedded data's kept interactions per user (ingest.rules.max_user_interactions)


def random_histories(rng: np.random.Generator, users: int, items: int) -> Ragged:
    rows = [rng.choice(items, size=HISTORY, replace=False).astype(np.int32) + 1 for _ in range(users)]
    return Ragged.from_lengths(np.concatenate(rows), np.full(users, HISTORY))


def timed_recommend(encoder, index, histories: Ragged, num_items: int, config: RecommendConfig, out: Path) -> dict:
    """users/s (wall clock), and users per CPU second of this process (less sensitive to
    other jobs on a shared machine, but it counts threads that spin while they wait)."""
    keys = ["", *(f"item{i}" for i in range(1, num_items + 1))]
    users = [f"user{u}" for u in range(len(histories))]
    start, cpu = time.perf_counter(), time.process_time()
    recommend(encoder, index, users, histories, keys, config, out, {})
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    return {"users_per_s": round(len(users) / wall, 1), "users_per_cpu_s": round(len(users) / cpu, 1)}


def embedded(cfg: TrainConfig, config: RecommendConfig, tmp: Path, rng: np.random.Generator) -> dict:
    users, items = 943, 1332
    root = make_toy_dataset(tmp / "data", num_users=8, num_items=items, seq_len=4, text_shape=(30, 384), image_shape=(50, 1280))
    cfg = TrainConfig(model=cfg.model, text_features=str(root / "features/text"), image_features=str(root / "features/image"))
    model = build_model(cfg, items).eval()
    start = time.perf_counter()
    encoder = user_encoder(model, cfg.model.max_len)
    table_s = time.perf_counter() - start
    sizes = export_run(encoder, list(model.branches), [f"item{i}" for i in range(1, items + 1)], config.index, tmp / "export", {"run": "benchmark"}, "random weights")
    index = faiss.read_index(str(tmp / "export/index.faiss"))
    seen = random_histories(rng, users, items)
    timed = max((timed_recommend(encoder, index, seen, items, config, tmp / "recs.parquet") for _ in range(3)), key=lambda t: t["users_per_s"])
    log.info("embedded size: %s, item table %.2f s, export %s", timed, table_s, sizes)
    return {"users": users, "items": items, "item_table_s": round(table_s, 2), **timed, "export_bytes": sizes}


def large(cfg: TrainConfig, config: RecommendConfig, items: int, users: int, tmp: Path, rng: np.random.Generator) -> dict:
    small = make_toy_dataset(tmp / "small", num_users=8, num_items=20, seq_len=4)
    cfg = TrainConfig(model=cfg.model, text_features=str(small / "features/text"), image_features=str(small / "features/image"))
    encoder = user_encoder(build_model(cfg, 20).eval(), cfg.model.max_len)
    width = encoder.item_table.shape[1]
    log.info("building %d x %d random item vectors (%.0f MB)", items, width, items * width * 4 / 2**20)
    table = np.empty((items + 1, width), dtype=np.float32)
    for start in range(0, items + 1, 100_000):
        table[start : start + 100_000] = rng.standard_normal((min(100_000, items + 1 - start), width), dtype=np.float32)
    encoder.item_table = torch.from_numpy(table)  # the sequence encoders stay; the catalogue grows
    start = time.perf_counter()
    index = build_index(table[1:], IndexConfig(type="flat"))
    build_s = time.perf_counter() - start
    timed = timed_recommend(encoder, index, random_histories(rng, users, items), items, config, tmp / "recs-large.parquet")
    log.info("%d items, exact: %s", items, timed)
    return {"users": users, "items": items, "dim": width, "index": "flat", "build_s": round(build_s, 2), **timed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=1_000_000, help="synthetic catalogue size")
    parser.add_argument("--users", type=int, default=2000, help="users recommended for on the synthetic catalogue")
    parser.add_argument("--params", default="params.yaml", help="train.model and recommend come from here")
    parser.add_argument("--out", default="benchmarks/results/recommend.json")
    args = parser.parse_args()
    setup_logging()
    torch.manual_seed(0)
    faiss.omp_set_num_threads(available_cpus())
    cfg = load_section(TrainConfig, "train", args.params)
    config = load_section(RecommendConfig, "recommend", args.params)
    rng = np.random.default_rng(0)
    load_at_start = round(os.getloadavg()[0], 2)
    with tempfile.TemporaryDirectory() as tmp:
        result = {
            "machine": {"cpus": available_cpus(), "torch_threads": torch.get_num_threads(), "processor": platform.processor() or platform.machine()},
            "k": config.k,
            "user_block_size": config.user_block_size,
            "embedded": embedded(cfg, config, Path(tmp), rng),
            "large": large(cfg, config, args.items, args.users, Path(tmp), rng),
        }
    write_result(result, load_at_start, args.out)


if __name__ == "__main__":
    main()
