"""The canonical tables every stage exchanges, as explicit Arrow schemas.

Item indices run 1..N; 0 is reserved for padding and never appears in a table.
User indices run 0..U-1.
"""

import pyarrow as pa

# What rewrites the ingest stage's tables, for errors about them (pipeline.io.read_checked).
REINGEST = "rerun `dvc repro ingest`"

ITEMS = pa.schema(
    [
        pa.field("item_idx", pa.int32(), nullable=False),
        pa.field("item_key", pa.string(), nullable=False),  # the source's own id
        pa.field("title", pa.string(), nullable=False),  # "" when unknown
        pa.field("text", pa.string(), nullable=False),  # description / overview, "" when unknown
        pa.field("image_ref", pa.string()),  # original path or URL, null when none
        pa.field("has_image", pa.bool_(), nullable=False),  # encoded bytes present in IMAGES
    ]
)

# Encoded image files (JPEG/PNG/...) packed in Parquet, not thousands of loose files.
IMAGES = pa.schema(
    [
        pa.field("item_idx", pa.int32(), nullable=False),
        pa.field("image", pa.binary()),  # null when the item has no usable image
    ]
)

INTERACTIONS = pa.schema(
    [
        pa.field("user_idx", pa.int32(), nullable=False),
        pa.field("item_idx", pa.int32(), nullable=False),
        pa.field("timestamp", pa.int64(), nullable=False),  # unix seconds
        pa.field("position", pa.int32(), nullable=False),  # 0-based order in the user's kept sequence
    ]
)

# Leave-one-out split, one row per user: train on train_items (all positions supervised),
# validate on valid_item after train_items, test on test_item after train_items + valid_item.
SEQUENCES = pa.schema(
    [
        pa.field("user_idx", pa.int32(), nullable=False),
        pa.field("user_key", pa.string(), nullable=False),
        pa.field("train_items", pa.list_(pa.int32()), nullable=False),
        pa.field("valid_item", pa.int32(), nullable=False),
        pa.field("test_item", pa.int32(), nullable=False),
    ]
)

# Item frequency in the TRAINING split only (the logQ correction must not see valid/test).
POPULARITY = pa.schema(
    [
        pa.field("item_idx", pa.int32(), nullable=False),
        pa.field("train_count", pa.int64(), nullable=False),
    ]
)


def token_features(num_tokens: int, dim: int) -> pa.Schema:
    """Frozen encoder output per item: (num_tokens, dim) float16, first token = CLS / pooled."""
    return pa.schema(
        [
            pa.field("item_idx", pa.int32(), nullable=False),
            pa.field("tokens", pa.list_(pa.float16(), num_tokens * dim), nullable=False),  # row-major
            pa.field("mask", pa.list_(pa.bool_(), num_tokens), nullable=False),  # True = real token
            pa.field("present", pa.bool_(), nullable=False),  # False: no/bad input, tokens are zero
        ]
    )
