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


# The feature store (pipeline/features/store.py): a folder of immutable parts, one row per distinct
# encoder input, and an index of one row per item.


def token_columns(num_tokens: int) -> list[str]:
    """The part columns of the tokens, one per position: t000, t001, ..."""
    return [f"t{j:03d}" for j in range(num_tokens)]


def feature_part(num_tokens: int, dim: int) -> pa.Schema:
    """Frozen encoder outputs, one row per distinct input. Each token position is a column of
    fixed-size binary values (dim float16, little-endian), so a reader that keeps k of the T
    tokens reads k columns, and a writer copies bytes (no repetition levels per float)."""
    return pa.schema(
        [
            pa.field("key", pa.binary(32), nullable=False),  # sha256(encoder identity + the exact input)
            pa.field("outcome", pa.string(), nullable=False),  # how the input was encoded (fits, truncated, ...)
            pa.field("device", pa.string(), nullable=False),  # cpu | cuda: what computed it
            pa.field("present", pa.bool_(), nullable=False),  # False: bad input, tokens are zero
            pa.field("mask", pa.binary(num_tokens), nullable=False),  # one byte per token, 1 = real token
            *(pa.field(name, pa.binary(2 * dim), nullable=False) for name in token_columns(num_tokens)),
        ]
    )


FEATURE_INDEX = pa.schema(
    [
        pa.field("item_idx", pa.int32(), nullable=False),  # 1..N in order
        pa.field("key", pa.binary(32)),  # null: the item has no input (zero tokens, present false)
        pa.field("part", pa.string()),  # the part file holding the key (null with the key)
        pa.field("row", pa.int32()),  # its row there
        pa.field("present", pa.bool_(), nullable=False),
        pa.field("outcome", pa.string(), nullable=False),
    ]
)


# The score stage's candidates (data/candidates/<run>/<split>.parquet), read by evaluate and report.
def candidate_columns(ranking: str) -> tuple[str, str]:
    """Names of a ranking's (items, scores) columns: the fused ranking is plain items/scores."""
    return ("items", "scores") if ranking == "fused" else (f"items_{ranking}", f"scores_{ranking}")


def candidates_schema(rankings: list[str]) -> pa.Schema:
    """One row per user, in split order. Per ranking ("fused", then one per branch of a
    multi-branch model): items = item indices best first (never history, never padding; fewer
    than K where the catalogue has fewer or a tie group straddled the K-th place),
    scores = the model's scores for them (fused: mean of branch scores; a branch: its own)."""
    fields = [pa.field("user_idx", pa.int32(), nullable=False)]
    for ranking in rankings:
        items, scores = candidate_columns(ranking)
        fields.append(pa.field(items, pa.list_(pa.int32()), nullable=False))
        fields.append(pa.field(scores, pa.list_(pa.float32()), nullable=False))
    return pa.schema(fields)
