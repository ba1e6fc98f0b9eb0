"""benchmarks/scale.py on a tiny synthetic catalogue: each stage runs as its own process and its
time, peak RSS and output bytes are recorded (the real sizes are run by hand: README "Scale")."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import scale  # noqa: E402
import synthetic  # noqa: E402


def test_scale_runs_ingest_as_a_process_and_records_time_memory_and_bytes(tmp_path):
    catalogue = synthetic.write(tmp_path / "catalogue", items=40, users=30)
    record = scale.run_stage(scale.STAGES["ingest"], scale.ROOT, tmp_path / "work", catalogue)
    assert record["wall_s"] > 0 and 0.05 < record["peak_rss_gb"] < 4 and record["output_bytes"] > 40 * 600  # 40 JPEGs
    items = pq.read_table(tmp_path / "work/data/ingest/items.parquet")
    assert 30 < items.num_rows <= 40 and all(items["has_image"].to_pylist())  # a few only in cut purchases
    assert pq.ParquetFile(tmp_path / "work/data/ingest/images.parquet").metadata.num_rows == items.num_rows
    assert scale.catalogue_counts(catalogue)["items"] == 40


def test_merge_replaces_the_same_label_size_and_stage(tmp_path):
    out = tmp_path / "scale.json"
    old = [{"label": "base", "size": "S", "stage": "ingest", "interactions": 1, "wall_s": 9.0},
           {"label": "base", "size": "M", "stage": "ingest", "interactions": 2, "wall_s": 9.0}]
    out.write_text(json.dumps({"runs": old}))
    merged = scale.merge(out, [{"label": "base", "size": "S", "stage": "ingest", "interactions": 1, "wall_s": 1.0}])
    assert [(r["size"], r["wall_s"]) for r in merged] == [("S", 1.0), ("M", 9.0)]
