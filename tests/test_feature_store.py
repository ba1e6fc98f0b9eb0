"""The feature store: only the kept tokens read, one column per token, every file checked."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from pipeline.features import store as store_module
from pipeline.features.store import INDEX, StoreError, load_token_features, present_fraction, write_token_features
from pipeline.io import write_table

NUM_TOKENS, DIM = 5, 3


def write_store(folder, n: int = 23, chunk_size: int = 7, dim: int = DIM) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A store of n items in parts of chunk_size; returns the tokens, mask and present written."""
    rng = np.random.default_rng(0)
    tokens = rng.standard_normal((n, NUM_TOKENS, dim)).astype(np.float16)
    mask = rng.random((n, NUM_TOKENS)) < 0.7
    mask[:, 0] = True
    present = rng.random(n) < 0.8
    chunks = [(tokens[i : i + chunk_size], mask[i : i + chunk_size], present[i : i + chunk_size]) for i in range(0, n, chunk_size)]
    write_token_features(folder, chunks, {"modality": "text"})
    return tokens, mask, present


def parts(folder) -> list:
    return sorted(folder.glob("part-*.parquet"))


def test_reading_only_the_kept_tokens_equals_slicing_the_full_load(tmp_path, monkeypatch):
    monkeypatch.setattr(store_module, "READ_ROWS", 4)  # batches that straddle the parts of 7
    tokens, mask, present = write_store(tmp_path / "store")
    assert len(parts(tmp_path / "store")) == 4
    full = load_token_features(tmp_path / "store", 23)
    assert torch.equal(full.tokens[1:], torch.from_numpy(tokens)) and torch.equal(full.mask[1:], torch.from_numpy(mask))
    assert torch.equal(full.present[1:], torch.from_numpy(present))
    assert not full.tokens[0].any() and full.mask[0].tolist() == [True] + [False] * (NUM_TOKENS - 1) and not full.present[0]
    for keep in (1, 2, NUM_TOKENS, NUM_TOKENS + 3):
        kept = load_token_features(tmp_path / "store", 23, max_tokens=keep)
        assert kept.tokens.dtype == torch.float16 and kept.tokens.is_contiguous()
        assert torch.equal(kept.tokens, full.tokens[:, :keep]) and torch.equal(kept.mask, full.mask[:, :keep])
        assert torch.equal(kept.present, full.present)
    assert present_fraction(tmp_path / "store") == pytest.approx(present.mean())


def test_items_sharing_an_input_share_one_entry(tmp_path):
    """Equal inputs have one key: the store holds it once and the index points both items at it."""
    tokens = np.ones((4, NUM_TOKENS, DIM), dtype=np.float16)
    tokens[2] = 2
    mask, present = np.ones((4, NUM_TOKENS), dtype=bool), np.ones(4, dtype=bool)
    write_token_features(tmp_path / "s", [(tokens, mask, present)], {})
    assert pq.read_metadata(parts(tmp_path / "s")[0]).num_rows == 4  # write_token_features keeps duplicates apart ...
    index = pq.read_table(tmp_path / "s" / INDEX)
    assert len(set(index["key"].to_pylist())) == 2  # ... but the keys say which are equal
    assert torch.equal(load_token_features(tmp_path / "s").tokens[1:], torch.from_numpy(tokens))


def test_a_reader_keeping_k_tokens_reads_about_k_over_t_of_the_bytes(tmp_path):
    write_store(tmp_path / "s", n=200, chunk_size=100, dim=128)
    total = kept = 0
    for path in parts(tmp_path / "s"):
        meta = pq.read_metadata(path)
        for g in range(meta.num_row_groups):
            for c in range(meta.num_columns):
                column = meta.row_group(g).column(c)
                total += column.total_compressed_size
                kept += column.total_compressed_size if column.path_in_schema in ("key", "present", "mask", "t000") else 0
    assert kept / total < 1.2 / NUM_TOKENS  # 1 of 5 token columns plus the small key, mask and present columns


def test_token_columns_are_plain_fixed_size_binary_and_uncompressed(tmp_path):
    """No repetition levels, no dictionary, no statistics and (by default) no codec: a write copies bytes."""
    write_store(tmp_path / "s")
    group = pq.read_metadata(parts(tmp_path / "s")[0]).row_group(0)
    columns = {group.column(i).path_in_schema: group.column(i) for i in range(group.num_columns)}
    assert [name for name in columns if name.startswith("t")] == [f"t{j:03d}" for j in range(NUM_TOKENS)]
    for j in range(NUM_TOKENS):
        column = columns[f"t{j:03d}"]
        assert column.compression == "UNCOMPRESSED" and not column.is_stats_set
        assert "RLE_DICTIONARY" not in column.encodings and column.physical_type == "FIXED_LEN_BYTE_ARRAY"
    assert columns["key"].compression == "ZSTD"


def test_equal_stores_are_byte_equal(tmp_path):
    write_store(tmp_path / "a")
    write_store(tmp_path / "b")
    for a, b in zip(parts(tmp_path / "a") + [tmp_path / "a" / INDEX], parts(tmp_path / "b") + [tmp_path / "b" / INDEX]):
        assert a.name == b.name and a.read_bytes() == b.read_bytes()


def test_an_index_without_one_row_per_item_is_refused_by_name(tmp_path):
    write_store(tmp_path / "s", n=9)
    with pytest.raises(StoreError, match=r"index\.parquet: expected one row per item 1\.\.10 in order, got 9 rows"):
        load_token_features(tmp_path / "s", 10, max_tokens=1)


def corrupt_index(folder, **columns) -> None:
    """Rewrite the index with some columns replaced (its metadata kept)."""
    path = folder / INDEX
    table = pq.read_table(path)
    for name, values in columns.items():
        table = table.set_column(table.schema.get_field_index(name), name, pa.array(values, table.schema.field(name).type))
    meta = {k.decode(): v.decode() for k, v in table.schema.metadata.items() if k != b"ARROW:schema"}
    pq.write_table(table.replace_schema_metadata(meta), path)


def test_a_part_name_from_the_index_is_never_a_path(tmp_path):
    """The index comes from a remote like any artifact: a name outside the pattern is refused, not opened."""
    write_store(tmp_path / "s", n=3)
    (tmp_path / "secret.parquet").write_bytes(b"x")
    corrupt_index(tmp_path / "s", part=["../secret.parquet"] * 3)
    with pytest.raises(StoreError, match=r"part name '\.\./secret\.parquet' is not part-<32 hex>\.parquet"):
        load_token_features(tmp_path / "s")


def test_a_missing_part_is_named_with_what_to_do(tmp_path):
    write_store(tmp_path / "s", n=10, chunk_size=5)
    gone = parts(tmp_path / "s")[1]
    gone.unlink()
    with pytest.raises(StoreError, match=rf"{gone.name}: missing \(named by index\.parquet\); pull the store again"):
        load_token_features(tmp_path / "s")


def test_nan_tokens_are_refused_naming_the_part_and_item(tmp_path):
    """A feature file with NaN tokens once scored and evaluated silently (26k candidates instead
    of 47k): the loader checks that the tokens it keeps are finite."""
    write_store(tmp_path / "s", n=6, chunk_size=6)
    path = parts(tmp_path / "s")[0]
    table = pq.read_table(path)
    values = np.frombuffer(table["t001"].combine_chunks().buffers()[1], dtype="<f2").reshape(6, DIM).copy()
    values[4, 2] = np.nan
    column = pa.FixedSizeBinaryArray.from_buffers(pa.binary(2 * DIM), 6, [None, pa.py_buffer(values)])
    write_table(table.set_column(table.schema.get_field_index("t001"), "t001", column), path, table.schema)
    assert load_token_features(tmp_path / "s", max_tokens=1).tokens.isfinite().all()  # token 1 not kept: not read
    with pytest.raises(StoreError, match=rf"{path.name}: item 5 token 1 is NaN or infinite .*rerun the feature stage"):
        load_token_features(tmp_path / "s", max_tokens=2)


def test_keys_that_disagree_with_the_index_are_refused(tmp_path):
    write_store(tmp_path / "s", n=4)
    index = pq.read_table(tmp_path / "s" / INDEX)
    keys = index["key"].to_pylist()
    corrupt_index(tmp_path / "s", key=[keys[1], keys[0], *keys[2:]])
    with pytest.raises(StoreError, match="keys differ from index.parquet's"):
        load_token_features(tmp_path / "s")


def test_a_cut_part_or_a_foreign_index_is_named(tmp_path):
    write_store(tmp_path / "s", n=4)
    part = parts(tmp_path / "s")[0]
    part.write_bytes(part.read_bytes()[: len(part.read_bytes()) // 2])
    with pytest.raises(StoreError, match=rf"{part.name}: not a readable Parquet file"):
        load_token_features(tmp_path / "s")
    pq.write_table(pa.table({"item_idx": [1]}), tmp_path / "s" / INDEX)
    with pytest.raises(StoreError, match=r"index\.parquet: layout None, this code reads 'feature-store/1'"):
        load_token_features(tmp_path / "s")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no feature store index; run the feature stages first"):
        load_token_features(tmp_path / "empty")


def test_a_file_of_the_single_file_layout_converts_to_the_same_features_bit_for_bit(tmp_path):
    """benchmarks/layouts.py reads the layout of checkouts before the store (a fixed-size list of
    T x D float16 per item), converts it, and tells a store with the same bits from one without."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import layouts

    tokens, mask, present = write_store(tmp_path / "store", n=10, chunk_size=4)
    schema = pa.schema([("item_idx", pa.int32()), ("tokens", pa.list_(pa.float16(), NUM_TOKENS * DIM)),
                        ("mask", pa.list_(pa.bool_(), NUM_TOKENS)), ("present", pa.bool_())])
    old = pa.table([pa.array(np.arange(1, 11, dtype=np.int32)),
                    pa.FixedSizeListArray.from_arrays(pa.array(tokens.reshape(-1)), NUM_TOKENS * DIM),
                    pa.FixedSizeListArray.from_arrays(pa.array(mask.reshape(-1)), NUM_TOKENS), pa.array(present)], schema=schema)
    write_table(old, tmp_path / "old.parquet", schema, {"modality": "text", "num_tokens": NUM_TOKENS, "dim": DIM})

    assert layouts.compare(layouts.read_single_file(tmp_path / "old.parquet"), load_token_features(tmp_path / "store"))["bit_identical"]
    layouts.convert(tmp_path / "old.parquet", tmp_path / "converted")
    converted = load_token_features(tmp_path / "converted")
    assert layouts.compare(layouts.read_single_file(tmp_path / "old.parquet"), converted)["bit_identical"]
    changed = load_token_features(tmp_path / "store")
    changed.tokens[4, 1, 2] += 1  # one value
    result = layouts.compare(layouts.read_single_file(tmp_path / "old.parquet"), changed)
    assert not result["bit_identical"] and not result["tokens"] and result["mask"] and result["present"]


def test_an_unreadable_part_is_encoded_again_and_deleted(tmp_path, caplog):
    """A part cut in a transfer: the extraction treats its entries as missing (and compaction deletes it)."""
    from pipeline.features.store import FeatureStore

    write_store(tmp_path / "s", n=8, chunk_size=4)
    cut = parts(tmp_path / "s")[0]
    cut.write_bytes(cut.read_bytes()[:100])
    store = FeatureStore(tmp_path / "s", NUM_TOKENS, DIM)
    assert len(store.index) == 4 and f"{cut.name} is unreadable" in caplog.text
    store.compact(list(store.index), 4, {})
    assert not cut.exists() and len(parts(tmp_path / "s")) == 1


def test_an_index_whose_shape_disagrees_with_its_parts_names_the_part(tmp_path):
    """Wrong `num_tokens` metadata (a hand-edited or foreign index): the parts' schema says otherwise."""
    write_store(tmp_path / "s", n=4)
    path = tmp_path / "s" / INDEX
    table = pq.read_table(path)
    meta = {k.decode(): v.decode() for k, v in table.schema.metadata.items() if k != b"ARROW:schema"}
    meta["num_tokens"] = str(NUM_TOKENS + 2)
    pq.write_table(table.replace_schema_metadata(meta), path)
    with pytest.raises(StoreError, match=rf"{parts(tmp_path / 's')[0].name}: schema differs from feature_part\({NUM_TOKENS + 2}, {DIM}\)"):
        load_token_features(tmp_path / "s")
