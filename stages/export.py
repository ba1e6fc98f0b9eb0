"""Stage `export`: what an online service needs from a trained run.

    python stages/export.py --run odmt-s1 [--params params.yaml]

Reads models/{run}/model.pt (with the feature files it was trained on) and
data/ingest/items.parquet; writes exports/{run}/items.parquet (item key, fused and per-branch
vectors, provenance), exports/{run}/index.faiss (FAISS, `recommend.index`) and
exports/{run}/user_encoder.onnx (ONNX: item indices of a history -> user vector), each
fingerprinting model.pt. See pipeline/export.py.
"""

from _common import run_option, stage_args

from pathlib import Path

from pipeline import schema
from pipeline.config import load_section
from pipeline.export import export_run, user_encoder
from pipeline.io import file_sha256, read_checked
from pipeline.progress import log
from pipeline.recommend import RecommendConfig
from pipeline.training import TrainConfig, load_trained

args = stage_args(__doc__, run_option)
config = load_section(RecommendConfig, "recommend", args.params)
model_path = Path("models") / args.run / "model.pt"
model, info = load_trained(model_path.parent, load_section(TrainConfig, "train", args.params))
provenance = {key: info[key] for key in ("variant", "backbone", "seed", "best_epoch")} | {"run": args.run}
items = read_checked("data/ingest/items.parquet", schema.ITEMS, schema.REINGEST, ["item_idx", "item_key"]).sort_by("item_idx")
encoder = user_encoder(model, info["max_len"])
keys = items.column("item_key").to_pylist()
sizes = export_run(encoder, list(info["branches"]), keys, config.index, Path("exports") / args.run, provenance, file_sha256(model_path))
log.info("exports/%s: %s", args.run, ", ".join(f"{name} {size / 2**20:.2f} MiB" for name, size in sizes.items()))
