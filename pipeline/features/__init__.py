"""Frozen features: per-item token features from pretrained text and image encoders.

- `store.py`: the feature store, what the stages write and every reader loads (training,
  scoring, export, recommend): immutable Parquet parts of tokens per distinct input, one column
  per token position, and an index of items 1..N. Importing it pulls in no encoder.
- `extraction.py`: the incremental, sharded loop both feature stages run (device set-up,
  reading input in chunks, keys, parts written by every rank, the index).
- `text.py`, `image.py` (+ `efficientnet_lite.py`): the encoders and the two stages' entry points.
"""
