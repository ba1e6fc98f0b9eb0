"""benchmarks/scale.py on a tiny synthetic catalogue: each stage runs as its own process and its
time, peak RSS and output bytes are recorded (the real sizes are run by hand: docs/scale.md "Scale: stages on large synthetic catalogues")."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline.features.store import load_token_features

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import scale  # noqa: E402
import synthetic  # noqa: E402


def test_scale_runs_ingest_as_a_process_and_records_time_memory_and_bytes(tmp_path):
    catalogue = synthetic.write(tmp_path / "catalogue", items=40, users=30)
    inputs = scale.Inputs(catalogue, tmp_path / "encoders", scale.ROOT)
    record = scale.run_stage(scale.STAGES["ingest"], scale.ROOT, tmp_path / "work", inputs)
    assert record["wall_s"] > 0 and 0.05 < record["peak_rss_gb"] < 4 and record["output_bytes"] > 40 * 600  # 40 JPEGs
    items = pq.read_table(tmp_path / "work/data/ingest/items.parquet")
    assert 30 < items.num_rows <= 40 and all(items["has_image"].to_pylist())  # a few only in cut purchases
    assert pq.ParquetFile(tmp_path / "work/data/ingest/images.parquet").metadata.num_rows == items.num_rows
    assert scale.catalogue_counts(catalogue)["items"] == 40


def test_scale_runs_the_dag_after_ingest_with_tiny_encoders_of_the_default_shapes(tmp_path):
    catalogue = synthetic.write(tmp_path / "catalogue", items=40, users=30)
    scale.in_child(scale.write_encoders, tmp_path / "encoders")
    inputs, work = scale.Inputs(catalogue, tmp_path / "encoders", scale.ROOT), tmp_path / "work"
    records = {name: scale.run_stage(scale.STAGES[name], scale.ROOT, work, inputs)
               for name in ("ingest", "text_features", "image_features", "train")}
    assert all(r["output_bytes"] > 0 and r["peak_rss_gb"] > 0 for r in records.values())
    for modality, shape in (("text", (30, 384)), ("image", (50, 1280))):  # the default encoders' shapes
        tokens = load_token_features(work / f"data/features/{modality}").tokens
        assert tuple(tokens.shape[1:]) == shape
    assert (work / f"models/{scale.RUN}/model.pt").exists()

    # score and evaluate on the first 10 users: the outputs hold 10 users, the time is scaled to 30
    scored = scale.prefix_run(scale.STAGES["score"], scale.ROOT, work, inputs, 10, 30)
    evaluated = scale.prefix_run(scale.STAGES["evaluate"], scale.ROOT, work, inputs, 10, 30)
    assert scored["estimated_wall_s"] == pytest.approx(3 * scored["wall_s"], abs=0.11) and "first 10 of 30" in scored["note"]
    prefix = work / "first-10-users"
    assert pq.read_table(prefix / f"data/candidates/{scale.RUN}/test.parquet").num_rows == 10
    assert json.loads((prefix / f"metrics/{scale.RUN}.json").read_text())["test"]["fused"]["hr@10"] >= 0
    assert evaluated["output_bytes"] > 0

    # a fixed number of training steps: the real set-up and steps, an estimate of the epoch
    steps = scale.fixed_steps_train(scale.ROOT, work, inputs, steps=1)
    assert (steps["steps_run"], steps["validation_users"]) == (1, 30) and steps["estimated_wall_s"] >= steps["wall_s"]
    assert "extrapolated" in steps["note"] and (work / f"models/{scale.RUN}/model.pt").exists()


def test_instant_features_write_the_store_a_stage_writes_without_an_encoder(tmp_path):
    """--instant-features: the extraction's own reading, writes and index at the default shapes."""
    catalogue = synthetic.write(tmp_path / "catalogue", items=12, users=10)
    inputs, work = scale.Inputs(catalogue, tmp_path / "encoders", scale.ROOT), tmp_path / "work"
    scale.run_stage(scale.STAGES["ingest"], scale.ROOT, work, inputs)
    record = scale.instant_features(scale.STAGES["image_features"], scale.ROOT, work, inputs)
    features = load_token_features(work / "data/features/image")
    assert tuple(features.tokens.shape[1:]) == (50, 1280) and features.present[1:].all() and features.tokens[1:].any()
    assert record["items_per_s"] > 0 and record["mb_per_s"] > 0 and "instant encoder" in record["note"]
    assert record["output_bytes"] > 0.8 * features.num_items * 50 * 1280 * 2  # random tokens: zstd saves little


def test_merge_replaces_the_same_label_size_and_stage(tmp_path):
    out = tmp_path / "scale.json"
    old = [{"label": "base", "size": "S", "stage": "ingest", "interactions": 1, "wall_s": 9.0},
           {"label": "base", "size": "M", "stage": "ingest", "interactions": 2, "wall_s": 9.0}]
    out.write_text(json.dumps({"runs": old}))
    merged = scale.merge(out, [{"label": "base", "size": "S", "stage": "ingest", "interactions": 1, "wall_s": 1.0}])
    assert [(r["size"], r["wall_s"]) for r in merged] == [("S", 1.0), ("M", 9.0)]
