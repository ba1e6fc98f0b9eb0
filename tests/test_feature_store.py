"""Reading feature files back: only the kept tokens, row group by row group, with the checks."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from pipeline.features import token_rows
from pipeline.features import store as store_module
from pipeline.features.store import load_token_features
from pipeline.io import parquet_writer, write_table
from pipeline.schema import token_features

NUM_TOKENS, DIM = 5, 3


def write_features(path, item_idx: np.ndarray, row_group: int) -> np.ndarray:
    """A feature file through the stages' own writer, `row_group` items per row group, in the
    order of `item_idx`; returns the tokens (len, T, D) written."""
    rng = np.random.default_rng(0)
    tokens = rng.standard_normal((len(item_idx), NUM_TOKENS, DIM)).astype(np.float16)
    mask = rng.random((len(item_idx), NUM_TOKENS)) < 0.7
    mask[:, 0] = True
    present = rng.random(len(item_idx)) < 0.8
    meta = {"modality": "text", "num_tokens": NUM_TOKENS, "dim": DIM}
    with parquet_writer(path, token_features(NUM_TOKENS, DIM), meta) as writer:
        for start in range(0, len(item_idx), row_group):
            part = slice(start, start + row_group)
            writer.write_table(token_rows(item_idx[part], tokens[part], mask[part], present[part]))
    return tokens


@pytest.mark.parametrize("order", ["in order", "shuffled"])
def test_reading_only_the_kept_tokens_equals_slicing_the_full_load(tmp_path, monkeypatch, order):
    monkeypatch.setattr(store_module, "READ_ROWS", 4)  # reads that straddle the row groups of 7
    item_idx = np.arange(1, 24, dtype=np.int32)
    if order == "shuffled":
        item_idx = np.random.default_rng(1).permutation(item_idx)
    written = write_features(tmp_path / "f.parquet", item_idx, row_group=7)
    full = load_token_features(tmp_path / "f.parquet", 23)
    assert torch.equal(full.tokens[torch.from_numpy(item_idx.astype(np.int64))], torch.from_numpy(written))
    assert not full.tokens[0].any() and full.mask[0].tolist() == [True] + [False] * (NUM_TOKENS - 1) and not full.present[0]
    for keep in (1, 2, NUM_TOKENS, NUM_TOKENS + 3):
        kept = load_token_features(tmp_path / "f.parquet", 23, max_tokens=keep)
        assert kept.tokens.dtype == torch.float16 and kept.tokens.is_contiguous()
        assert torch.equal(kept.tokens, full.tokens[:, :keep]) and torch.equal(kept.mask, full.mask[:, :keep])
        assert torch.equal(kept.present, full.present)


def test_a_file_without_one_row_per_item_is_refused_by_name(tmp_path):
    write_features(tmp_path / "short.parquet", np.arange(1, 10, dtype=np.int32), row_group=4)
    with pytest.raises(ValueError, match=r"short\.parquet: expected one row per item 1\.\.10, got 9 rows"):
        load_token_features(tmp_path / "short.parquet", 10, max_tokens=1)
    write_features(tmp_path / "twice.parquet", np.array([1, 2, 2, 4], dtype=np.int32), row_group=4)
    with pytest.raises(ValueError, match=r"twice\.parquet: expected one row per item 1\.\.4"):
        load_token_features(tmp_path / "twice.parquet", 4)


def test_dictionary_encoding_only_for_repeating_columns(tmp_path):
    """Float tokens and image bytes are written plain (a dictionary slowed reading 2.8x); ids,
    keys and item lists keep it; equal tables still give byte-equal files."""
    schema = pa.schema([
        ("item_idx", pa.int32()), ("tokens", pa.list_(pa.float16(), 2)), ("image", pa.binary()),
        ("key", pa.string()), ("items", pa.list_(pa.int32())),
    ])
    table = pa.table({
        "item_idx": [1, 2], "tokens": pa.array([[1.0, 2.0], [3.0, 4.0]], pa.list_(pa.float16(), 2)),
        "image": [b"a", b"b"], "key": ["x", "y"], "items": [[1], [2, 1]],
    }, schema=schema)
    write_table(table, tmp_path / "a.parquet", schema)
    write_table(table, tmp_path / "b.parquet", schema)
    assert (tmp_path / "a.parquet").read_bytes() == (tmp_path / "b.parquet").read_bytes()
    chunk = pq.ParquetFile(tmp_path / "a.parquet").metadata.row_group(0)
    dictionary = {chunk.column(i).path_in_schema: "RLE_DICTIONARY" in chunk.column(i).encodings for i in range(chunk.num_columns)}
    assert dictionary == {"item_idx": True, "tokens.list.element": False, "image": False, "key": True, "items.list.element": True}


def test_min_max_statistics_only_for_top_level_columns(tmp_path):
    """Statistics of the values inside a list (every token) skip nothing and cost a quarter of
    the write; the item numbers keep theirs."""
    write_features(tmp_path / "f.parquet", np.arange(1, 7), row_group=3)
    group = pq.ParquetFile(tmp_path / "f.parquet").metadata.row_group(0)
    stats = {group.column(i).path_in_schema: group.column(i).is_stats_set for i in range(group.num_columns)}
    assert stats == {"item_idx": True, "tokens.list.element": False, "mask.list.element": False, "present": True}
    assert load_token_features(tmp_path / "f.parquet").tokens.shape == (7, NUM_TOKENS, DIM)
