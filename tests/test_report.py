"""The report renders from toy metrics files and toy candidates."""

from __future__ import annotations

import base64
import io

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from pipeline import schema
from pipeline.io import write_json, write_table
from pipeline.report import ReportConfig, load_runs, markdown_report, recommendations_html, showcase_users
from pipeline.schema import candidates_schema

PROTOCOL = {
    "split": "leave-one-out",
    "full_ranking": True,
    "items": 1330,
    "exclude_history": "all",
    "model_input": "last 13 history items",
    "candidates_k": 50,
    "ks": [10],
    "users": {"valid": 943, "test": 943},
    "targets_in_history": {"valid": 0, "test": 0},
    "index": "flat",
    "metric_scale": "fraction of users (0..1)",
}


def metrics_file(root, variant: str, seed: int, hr: float, ndcg: float, branches=(), protocol=PROTOCOL) -> None:
    split = {"fused": {"hr@10": hr, "ndcg@10": ndcg}} | {b: {"hr@10": hr / 2, "ndcg@10": ndcg / 2} for b in branches}
    write_json({"valid": split, "test": split, "protocol": protocol, "run": {"run": f"{variant}-s{seed}", "variant": variant, "seed": seed, "rankings": ["fused", *branches]}}, root / f"{variant}-s{seed}.json")


def test_table_aggregates_seeds_and_shows_relative_improvement(tmp_path):
    metrics_file(tmp_path, "odmt", 1, 0.12, 0.06, branches=("id", "text", "image"))
    metrics_file(tmp_path, "odmt", 2, 0.14, 0.07, branches=("id", "text", "image"))
    metrics_file(tmp_path, "sasrec_id", 1, 0.10, 0.05)
    metrics_file(tmp_path, "text_only", 1, 0.0, 0.02)
    text = markdown_report(load_runs(tmp_path), ReportConfig(metrics=["hr@10", "ndcg@10"]))
    lines = text.splitlines()
    # mean 13.00, sample std of (12, 14) = 1.41; single seed: no spread
    assert "| **odmt** | 1, 2 | 13.00 ± 1.41 | 6.50 ± 0.71 | 13.00 ± 1.41 | 6.50 ± 0.71 |" in lines
    assert "| sasrec_id | 1 | 10.00 | 5.00 | 10.00 | 5.00 |" in lines
    # (0.13 - 0.10) / 0.10 = +30%, (0.065 - 0.05) / 0.05 = +30%; a zero baseline has no ratio
    assert "| sasrec_id | +30.0% | +30.0% |" in lines
    assert "| text_only | n/a | +225.0% |" in lines
    branch_rows = [line for line in lines if line.startswith("| odmt | ")]
    assert branch_rows[0].startswith("| odmt | fused | 13.00 ± 1.41") and branch_rows[3] == "| odmt | image | 6.50 ± 0.71 | 3.25 ± 0.35 |"
    assert lines.index("| **odmt** | 1, 2 | 13.00 ± 1.41 | 6.50 ± 0.71 | 13.00 ± 1.41 | 6.50 ± 0.71 |") < lines.index("| sasrec_id | 1 | 10.00 | 5.00 | 10.00 | 5.00 |")
    assert "full ranking over all 1330 items" in text and "Warning" not in text


def test_variant_order_missing_variants_and_protocol_mismatch_are_reported(tmp_path):
    metrics_file(tmp_path, "odmt", 1, 0.12, 0.06)
    metrics_file(tmp_path, "sasrec_id", 1, 0.10, 0.05, protocol=PROTOCOL | {"exclude_history": "all_but_target"})
    text = markdown_report(load_runs(tmp_path), ReportConfig(variants=["sasrec_id", "odmt"], metrics=["hr@10"]))
    assert text.index("| sasrec_id | 1 |") < text.index("| **odmt** | 1 |")
    assert "**Warning**: run sasrec_id-s1 differs in protocol (exclude_history)" in text
    with pytest.raises(ValueError, match="gru4rec"):
        markdown_report(load_runs(tmp_path), ReportConfig(variants=["odmt", "gru4rec"]))
    with pytest.raises(FileNotFoundError, match="evaluate stage"):
        load_runs(tmp_path / "empty")


def poster(color: str) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (60, 90), color).save(out, format="PNG")
    return out.getvalue()


def test_recommendations_page_inlines_posters_titles_and_marks_hits(tmp_path):
    num_items = 12
    items = pa.table(
        {
            "item_idx": np.arange(1, num_items + 1, dtype=np.int32),
            "item_key": [f"m{i}" for i in range(1, num_items + 1)],
            "title": [f"Movie <{i}>" for i in range(1, num_items + 1)],
            "text": [""] * num_items,
            "image_ref": [None] * num_items,
            "has_image": [i != 5 for i in range(1, num_items + 1)],
        }
    ).cast(schema.ITEMS)
    images = pa.table({"item_idx": np.arange(1, num_items + 1, dtype=np.int32), "image": [None if i == 5 else poster("red") for i in range(1, num_items + 1)]})
    write_table(images, tmp_path / "images.parquet", schema.IMAGES)
    sequences = pa.table({"user_idx": [0, 1], "user_key": ["alice", "bob"], "train_items": [[1, 2], [3]], "valid_item": [4, 5], "test_item": [6, 12]}).cast(schema.SEQUENCES)
    candidates = pa.table({"user_idx": [1, 0], "items": [[6, 7, 8], [9, 6, 10]], "scores": [[3.0, 2.0, 1.0], [3.0, 2.0, 1.0]]}).cast(candidates_schema(["fused"]))

    page = recommendations_html(candidates, sequences, items, tmp_path / "images.parquet", ReportConfig(top_n=3, showcase_users=2, thumb_height=30))
    assert page.startswith("<!DOCTYPE html>") and "http" not in page  # self-contained
    assert "User alice <small>(held-out item at rank 2)" in page
    assert "User bob <small>(held-out item not in the top 3)" in page
    assert "Movie &lt;6&gt;" in page and "Movie <6>" not in page  # titles escaped
    assert page.count('class="hit"') == 2  # alice's hit, in the list and as the held-out card
    assert '<div class="none">Movie &lt;5&gt;</div>' in page  # no poster: titled placeholder
    uri = page.split('src="data:image/jpeg;base64,')[1].split('"')[0]
    assert Image.open(io.BytesIO(base64.b64decode(uri))).size == (20, 30)


def test_showcase_users_are_evenly_spread():
    assert showcase_users(943, 4).tolist() == [0, 314, 628, 942]
    assert showcase_users(2, 6).tolist() == [0, 1]
