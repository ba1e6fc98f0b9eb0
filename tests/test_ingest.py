"""The source-independent ingest rules and the movielens-mm adapter, on tiny files."""

from __future__ import annotations

import io
from pathlib import Path

import polars as pl
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline import schema
from pipeline.config import ConfigError, from_dict
from pipeline.ingest import IngestConfig, RawSource, SourceError, SplitRules, ingest, write
from pipeline.ingest.adapters.movielens_mm import MovielensOptions, read_movielens_mm
from pipeline.io import read_json, read_metadata


def raw(interactions: list[tuple], items: list[str] | None = None) -> RawSource:
    inter = pl.DataFrame(interactions, schema=["user_key", "item_key", "timestamp"], orient="row")
    keys = items if items is not None else sorted({r[1] for r in interactions})
    item_frame = pl.DataFrame({"item_key": keys, "title": [f"t{k}" for k in keys], "text": ["x"] * len(keys), "image_path": [None] * len(keys), "image_url": [None] * len(keys)})
    return RawSource(inter, item_frame)


def sequence(result, user_key: str) -> list[str]:
    """A user's full kept sequence as original item keys."""
    row = result.sequences.filter(pl.col("user_key") == user_key).row(0, named=True)
    idx = row["train_items"] + [row["valid_item"], row["test_item"]]
    keys = dict(zip(result.items["item_idx"], result.items["item_key"]))
    return [keys[i] for i in idx]


def test_leave_one_out_split_keeps_last_15_and_drops_short_users():
    rows = [("u1", str(i), 100 + i) for i in range(1, 21)]  # 20 interactions
    rows += [("u2", str(i), 50) for i in (3, 4, 5, 6)]  # 4 interactions: too short
    rows += [("u3", str(i), 10 * i) for i in (7, 8, 9, 10, 11)]  # exactly 5
    result = ingest(raw(rows), SplitRules())
    assert result.sequences["user_key"].to_list() == ["u1", "u3"]
    assert sequence(result, "u1") == [str(i) for i in range(6, 21)]  # last 15 of 20
    row = result.sequences.row(0, named=True)
    assert len(row["train_items"]) == 13
    counts = result.report["counts"]
    assert counts["truncated"] == 5 and counts["short_user"] == 4 and counts["short_user_users"] == 1
    # items 1..5 are only in u1's truncated part or u2: they leave the catalogue
    assert result.report["items"] == 15 and counts["unused_item"] == 5
    assert result.items["item_idx"].to_list() == list(range(1, 16))
    assert result.items["item_key"].to_list() == [str(i) for i in range(6, 21)]  # natural order, not "10" < "6"


def test_timestamp_ties_are_broken_by_item_key_in_natural_order():
    rows = [("u", k, 7) for k in ("10", "9", "2", "100", "33")]
    result = ingest(raw(rows), SplitRules())
    assert sequence(result, "u") == ["2", "9", "10", "33", "100"]
    shuffled = ingest(raw(list(reversed(rows))), SplitRules())
    assert shuffled.sequences.equals(result.sequences)


def test_popularity_counts_training_items_only():
    rows = [("a", k, t) for t, k in enumerate("pqrst")] + [("b", k, t) for t, k in enumerate("pqrsu")]
    result = ingest(raw(rows), SplitRules())
    idx = dict(zip(result.items["item_key"], result.items["item_idx"]))
    pop = dict(zip(result.popularity["item_idx"], result.popularity["train_count"]))
    assert pop[idx["p"]] == 2 and pop[idx["r"]] == 2
    assert pop[idx["s"]] == 0 and pop[idx["t"]] == 0 and pop[idx["u"]] == 0  # valid/test only
    assert sorted(pop) == list(range(1, 7))


def test_duplicates_unknown_items_and_nulls_are_counted_not_fatal():
    rows = [("u", str(i), i) for i in range(1, 7)] + [("u", "1", 1), ("u", "99", 3), ("u", None, 4), (None, "2", 5)]
    result = ingest(raw(rows, items=["1", "2", "3", "4", "5", "6", "2"]), SplitRules())
    counts = result.report["counts"]
    assert counts["duplicate"] == 1 and counts["unknown_item"] == 1 and counts["missing_value"] == 2
    assert counts["duplicate_item"] == 1
    assert sequence(result, "u") == ["1", "2", "3", "4", "5", "6"]


def test_sample_users_keeps_the_first_users():
    rows = [(u, str(i), i) for u in ("3", "20", "100") for i in range(1, 6)]
    result = ingest(raw(rows), SplitRules(sample_users=2))
    assert result.sequences["user_key"].to_list() == ["3", "20"]
    assert result.report["counts"]["not_sampled"] == 5


def jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 12), (200, 30, 30)).save(buf, "JPEG")
    return buf.getvalue()


@pytest.fixture
def movielens(tmp_path: Path) -> Path:
    root = tmp_path / "ml"
    (root / "posters").mkdir(parents=True)
    ratings = ["user_id,movie_id,rating,unix_timestamp"] + [f"{u},{m},4,{1000 + m}" for u in (1, 2) for m in range(1, 8)]
    (root / "ratings.csv").write_text("\n".join(ratings) + "\n")
    items = ["movie_id,title,year,overview"] + [f'{m},Movie {m} (1995),1995,"Plot, of {m}"' for m in range(1, 8)]
    items += ["3,Duplicate three,1995,other", "5,Movie 5 (1995),1995,"]  # duplicated id; first row wins
    (root / "items.csv").write_text("\n".join(items) + "\n")
    for m in (1, 2, 3, 4, 6):
        (root / "posters" / f"{m}.jpg").write_bytes(jpeg())
    (root / "posters" / "6.jpg").write_bytes(b"not an image")  # unreadable; 5 and 7 have no file
    return root


def test_movielens_adapter_end_to_end(movielens: Path, tmp_path: Path):
    result = ingest(read_movielens_mm(movielens, MovielensOptions()), SplitRules())
    write(result, tmp_path / "out", tmp_path / "report.json", {"source": "test"})
    items = pq.read_table(tmp_path / "out" / "items.parquet")
    assert items.schema.equals(schema.ITEMS)
    assert items["title"].to_pylist()[2] == "Movie 3 (1995)" and items["text"].to_pylist()[0] == "Plot, of 1"
    assert items["has_image"].to_pylist() == [True, True, True, True, False, False, False]
    images = pq.read_table(tmp_path / "out" / "images.parquet")
    assert images["image"].to_pylist()[0] == jpeg() and images["image"].to_pylist()[4] is None
    report = read_json(tmp_path / "report.json")
    assert report["users"] == 2 and report["items"] == 7 and report["interactions"] == 14
    assert report["counts"]["duplicate_item"] == 2
    assert report["counts"]["image_missing"] == 2 and report["counts"]["image_unreadable"] == 1
    assert read_metadata(tmp_path / "out" / "sequences.parquet") == {"source": "test"}


def test_images_are_written_in_row_groups_of_bounded_bytes(movielens: Path, tmp_path: Path):
    result = ingest(read_movielens_mm(movielens, MovielensOptions()), SplitRules())
    whole = result.images.table()
    bound = 2 * len(jpeg())  # two images per row group
    write(result, tmp_path / "out", tmp_path / "report.json", {"source": "test"}, image_row_group_bytes=bound)
    file = pq.ParquetFile(tmp_path / "out" / "images.parquet")
    groups = [file.read_row_group(i) for i in range(file.num_row_groups)]
    assert [g.num_rows for g in groups] == [2, 5]  # items 5-7 have no image: no bytes
    assert all(sum(len(b or b"") for b in g["image"].to_pylist()) <= bound for g in groups)
    assert file.read().equals(whole.cast(file.schema_arrow))
    assert file.schema_arrow.equals(schema.IMAGES) and read_metadata(tmp_path / "out" / "images.parquet") == {"source": "test"}


def test_an_image_changed_during_ingest_stops_the_write(movielens: Path, tmp_path: Path):
    result = ingest(read_movielens_mm(movielens, MovielensOptions()), SplitRules())
    (movielens / "posters" / "2.jpg").write_bytes(b"broken now")
    with pytest.raises(SourceError, match="2.jpg changed while ingest ran"):
        write(result, tmp_path / "out", tmp_path / "report.json", {"source": "test"})
    assert not (tmp_path / "out" / "images.parquet").exists()  # atomic: no half-written file


def test_movielens_missing_column_names_file_and_column(movielens: Path):
    (movielens / "ratings.csv").write_text("user_id,item,unix_timestamp\n1,2,3\n")
    with pytest.raises(SourceError, match=r"ratings.csv: missing column\(s\) \['movie_id'\]"):
        read_movielens_mm(movielens, MovielensOptions())


def test_movielens_mostly_bad_timestamps_stop_naming_row(movielens: Path):
    (movielens / "ratings.csv").write_text("user_id,movie_id,rating,unix_timestamp\n1,2,3,100\n1,3,3,yesterday\n")
    raw = read_movielens_mm(movielens, MovielensOptions())  # 1 of 2 values unreadable: more than max_bad_fraction
    with pytest.raises(SourceError, match=r"ratings.csv: column 'unix_timestamp' row 2: expected an integer, got 'yesterday'; 1 of 2"):
        ingest(raw, SplitRules())


def test_missing_file_says_which(movielens: Path):
    (movielens / "items.csv").unlink()
    with pytest.raises(SourceError, match="items.csv: input file not found"):
        read_movielens_mm(movielens, MovielensOptions())


def test_ingest_config_rejects_unknown_keys_and_wrong_types():
    with pytest.raises(ConfigError, match=r"ingest\.rules\.min_user_interaction: unknown key"):
        from_dict(IngestConfig, {"rules": {"min_user_interaction": 3}}, "ingest")
    with pytest.raises(ConfigError, match=r"ingest\.rules\.max_user_interactions: expected int, got str '15'"):
        from_dict(IngestConfig, {"rules": {"max_user_interactions": "15"}}, "ingest")
    with pytest.raises(ConfigError, match=r"ingest\.adapter: expected one of"):
        from_dict(IngestConfig, {"adapter": "movielens"}, "ingest")
    config = from_dict(IngestConfig, {"adapter": "generic", "rules": {"sample_users": None}}, "ingest")
    assert config.adapter == "generic" and config.rules.sample_users is None
