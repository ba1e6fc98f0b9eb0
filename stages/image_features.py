"""Stage `image_features`: data/ingest/images.parquet -> data/features/image/
(frozen image-encoder tokens per item; params section `image_features`).

Incremental: images whose entries the store already holds are not encoded again. Sharded when
started by torchrun (`torchrun --nproc_per_node N stages/image_features.py`): each rank encodes
its share of the new images and writes them as parts of the store; rank 0 writes the index."""

from _common import stage_args

from pipeline.config import load_section
from pipeline.features.image import ImageFeaturesConfig, extract_image_features
from pipeline import ddp


def paths(parser):
    parser.add_argument("--images", default="data/ingest/images.parquet")
    parser.add_argument("--out", default="data/features/image", help="the feature store folder")


args = stage_args(__doc__, paths)
config = load_section(ImageFeaturesConfig, "image_features", args.params)
env = ddp.setup()  # torchrun: joins the process group (the extraction asks torch.distributed), sets the GPU
try:
    extract_image_features(config, args.images, args.out)
finally:
    ddp.cleanup(env)
