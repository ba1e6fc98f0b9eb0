"""Stage `image_features`: data/ingest/images.parquet -> data/features/image.parquet
(frozen image-encoder tokens per item; params section `image_features`)."""

from _common import stage_args

from pipeline.config import load_section
from pipeline.features.image import ImageFeaturesConfig, extract_image_features


def paths(parser):
    parser.add_argument("--images", default="data/ingest/images.parquet")
    parser.add_argument("--out", default="data/features/image.parquet")


args = stage_args(__doc__, paths)
config = load_section(ImageFeaturesConfig, "image_features", args.params)
extract_image_features(config, args.images, args.out)
