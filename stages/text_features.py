"""Stage `text_features`: data/ingest/items.parquet -> data/features/text/
(frozen text-encoder tokens per item; params section `text_features`).

Incremental: texts whose entries the store already holds are not encoded again. Sharded when
started by torchrun (`torchrun --nproc_per_node N stages/text_features.py`): each rank encodes
its share of the new texts and writes them as parts of the store; rank 0 writes the index."""

from _common import stage_args

from pipeline.config import load_section
from pipeline.features.text import TextFeaturesConfig, extract_text_features
from pipeline import ddp


def paths(parser):
    parser.add_argument("--items", default="data/ingest/items.parquet")
    parser.add_argument("--out", default="data/features/text", help="the feature store folder")


args = stage_args(__doc__, paths)
config = load_section(TextFeaturesConfig, "text_features", args.params)
env = ddp.setup()  # torchrun: joins the process group (the extraction asks torch.distributed), sets the GPU
try:
    extract_text_features(config, args.items, args.out)
finally:
    ddp.cleanup(env)
