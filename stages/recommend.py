"""Stage `recommend`: the top K unseen items of every user, from the user's whole history.

    python stages/recommend.py --run odmt-s1 [--params params.yaml]
    python stages/recommend.py --run odmt-s1 --histories new.csv [--out recs.parquet]

Reads models/{run}/model.pt, exports/{run}/index.faiss (the export stage's index, checked
against exports/{run}/items.parquet and the model: rows, dimension, fingerprints) and
data/ingest/{sequences,items}.parquet; writes data/recommendations/{run}.parquet: user key,
item keys best first, fused scores (`recommend.k`, `recommend.exclude_history`).

With --histories (CSV or Parquet with columns user, item, timestamp in the source's keys) it
scores those users instead, without retraining, into --out (default: FILE.recommendations.parquet
beside FILE); item keys the model does not know are skipped and counted.
"""

from _common import run_option, stage_args

from pathlib import Path

from pipeline import schema
from pipeline.config import load_section
from pipeline.export import open_index, user_encoder
from pipeline.io import read_checked
from pipeline.progress import log
from pipeline.recommend import RecommendConfig, read_histories, recommend, recommend_metadata, whole_histories
from pipeline.training import TrainConfig, load_trained


def options(parser):
    run_option(parser)
    parser.add_argument("--histories", type=Path, help="score these users' histories (user, item, timestamp) instead")
    parser.add_argument("--out", type=Path, help="with --histories: output file (default FILE.recommendations.parquet)")


args = stage_args(__doc__, options)
config = load_section(RecommendConfig, "recommend", args.params)
model, info = load_trained(Path("models") / args.run, load_section(TrainConfig, "train", args.params))
encoder = user_encoder(model, info["max_len"])
index = open_index(Path("exports") / args.run, Path("models") / args.run / "model.pt", info["num_items"], encoder.item_table.shape[1])
provenance = {"run": args.run, "variant": info["variant"], "seed": info["seed"], "best_epoch": info["best_epoch"]}
items = read_checked("data/ingest/items.parquet", schema.ITEMS, schema.REINGEST, ["item_idx", "item_key"]).sort_by("item_idx")
item_keys = ["", *items.column("item_key").to_pylist()]  # position = item_idx; 0 = padding

if args.histories is None:
    sequences = read_checked("data/ingest/sequences.parquet", schema.SEQUENCES, schema.REINGEST)
    users, histories, source = sequences.column("user_key").to_pylist(), whole_histories(sequences), "train + valid + test items"
    out = Path("data/recommendations") / f"{args.run}.parquet"
else:
    users, histories, counts = read_histories(args.histories, {key: i for i, key in enumerate(item_keys) if i})
    source = f"{args.histories}: " + ", ".join(f"{name} {value}" for name, value in counts.items())
    log.info("%s", source)
    out = args.out or args.histories.with_suffix(".recommendations.parquet")
metadata = recommend_metadata(provenance, config, info["max_len"], source)
recommend(encoder, index, users, histories, item_keys, config, out, metadata)
log.info("wrote %s (%d users)", out, len(users))
