"""Stage `text_features`: data/ingest/items.parquet -> data/features/text.parquet
(frozen text-encoder tokens per item; params section `text_features`)."""

from _common import stage_args

from pipeline.config import load_section
from pipeline.features.text import TextFeaturesConfig, extract_text_features


def paths(parser):
    parser.add_argument("--items", default="data/ingest/items.parquet")
    parser.add_argument("--out", default="data/features/text.parquet")


args = stage_args(__doc__, paths)
config = load_section(TextFeaturesConfig, "text_features", args.params)
extract_text_features(config, args.items, args.out)
