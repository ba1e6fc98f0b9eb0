"""The report renders from toy metrics files and toy candidates."""

from __future__ import annotations

import base64
import io
import re

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from pipeline import schema
from pipeline.io import write_json, write_table
from pipeline.report import ReportConfig, load_runs, load_user_values, markdown_report, recommendations_html, showcase_users, training_lines
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


def user_file(root, run: str, hits: np.ndarray) -> None:
    """A per-user file of the evaluate stage: each user's test and valid fused hr@10 (and ndcg@10,
    here half of it)."""
    users = len(hits)
    write_table(
        pa.table(
            {
                "user_idx": np.tile(np.arange(users), 2),
                "split": ["valid"] * users + ["test"] * users,
                "ranking": ["fused"] * (2 * users),
                "hr@10": np.tile(hits, 2).astype(float),
                "ndcg@10": np.tile(hits, 2) / 2.0,
            }
        ),
        root / f"{run}.users.parquet",
        pa.schema([("user_idx", pa.int64()), ("split", pa.string()), ("ranking", pa.string()), ("hr@10", pa.float64()), ("ndcg@10", pa.float64())]),
    )


def planted_runs(root, gain: float) -> None:
    """odmt and sasrec_id on 943 users whose hit probabilities vary; odmt's are `gain` higher."""
    rng = np.random.default_rng(7)
    chance = rng.beta(1, 7, 943)
    for variant, extra in (("sasrec_id", 0.0), ("odmt", gain)):
        hits = rng.random(943) < np.minimum(chance + extra, 1)
        metrics_file(root, variant, 1, hits.mean(), hits.mean() / 2)
        user_file(root, f"{variant}-s1", hits)


def test_table_aggregates_seeds_and_shows_relative_improvement(tmp_path):
    metrics_file(tmp_path, "odmt", 1, 0.12, 0.06, branches=("id", "text", "image"))
    metrics_file(tmp_path, "odmt", 2, 0.14, 0.07, branches=("id", "text", "image"))
    metrics_file(tmp_path, "sasrec_id", 1, 0.10, 0.05)
    metrics_file(tmp_path, "text_only", 1, 0.0, 0.02)
    # per-user values with the same means (100 users)
    user_file(tmp_path, "odmt-s1", np.arange(100) < 12)
    user_file(tmp_path, "odmt-s2", np.arange(100) < 14)
    user_file(tmp_path, "sasrec_id-s1", np.arange(100) < 10)
    user_file(tmp_path, "text_only-s1", np.zeros(100, bool))
    runs = load_runs(tmp_path)
    text = markdown_report(runs, ReportConfig(metrics=["hr@10", "ndcg@10"]), load_user_values(tmp_path, runs))
    lines = text.splitlines()
    # mean 13.00, sample std of (12, 14) = 1.41; single seed: no spread
    assert "| **odmt** | 1, 2 | 13.00 ± 1.41 | 6.50 ± 0.71 | 13.00 ± 1.41 | 6.50 ± 0.71 |" in lines
    assert "| sasrec_id | 1 | 10.00 | 5.00 | 10.00 | 5.00 |" in lines
    # the seeds averaged per user: 12 users hit in both seeds, 2 in one: mean 13.00, with an interval
    odmt_interval = next(line for line in lines if line.startswith("| odmt | 2 | 13.00 ["))
    low, high = map(float, re.search(r"13\.00 \[([\d.]+), ([\d.]+)\]", odmt_interval).groups())
    assert low < 13.0 < high
    # (0.13 - 0.10) / 0.10 = +30%: the relative change is shown, but on 100 users it is noise
    sasrec_row = next(line for line in lines if line.startswith("| sasrec_id | +3.00 ["))
    assert "+30.0%" in sasrec_row and "within noise" in sasrec_row and "better" not in sasrec_row
    # a zero baseline has no ratio; 13 against 0 hits in 100 users is not noise
    text_only_row = next(line for line in lines if line.startswith("| text_only | +13.00 ["))
    assert "n/a" in text_only_row and ": better" in text_only_row
    assert "- odmt against text_only: significantly better on HR@10 (+13.00 points), NDCG@10 (+6.50 points)." in lines
    assert "- odmt against sasrec_id: within noise on HR@10, NDCG@10." in lines
    branch_rows = [line for line in lines if line.startswith("| odmt | ")]
    assert branch_rows[0] == "| odmt | 2 | 13.00 [" + odmt_interval.split(" [", 1)[1]
    assert branch_rows[1].startswith("| odmt | fused | 13.00 ± 1.41") and branch_rows[4] == "| odmt | image | 6.50 ± 0.71 | 3.25 ± 0.35 |"
    assert lines.index("| **odmt** | 1, 2 | 13.00 ± 1.41 | 6.50 ± 0.71 | 13.00 ± 1.41 | 6.50 ± 0.71 |") < lines.index("| sasrec_id | 1 | 10.00 | 5.00 | 10.00 | 5.00 |")
    assert "full ranking over all 1330 items" in text and "Warning" not in text


@pytest.mark.parametrize("gain, verdict", [(0.05, "better"), (0.0, "within noise")])
def test_a_planted_improvement_is_significant_and_two_runs_of_one_model_are_noise(tmp_path, gain, verdict):
    planted_runs(tmp_path, gain)
    runs = load_runs(tmp_path)
    text = markdown_report(runs, ReportConfig(metrics=["hr@10"]), load_user_values(tmp_path, runs))
    row = next(line for line in text.splitlines() if line.startswith("| sasrec_id | +") or line.startswith("| sasrec_id | -"))
    assert row.endswith(f": {verdict} |")
    assert ("significantly better on HR@10" in text) == (verdict == "better")
    assert "A variant with one seed: its interval and tests cover which users were sampled" in text


def test_runs_without_per_user_values_get_no_test_and_the_report_says_so(tmp_path):
    metrics_file(tmp_path, "odmt", 1, 0.12, 0.06)
    metrics_file(tmp_path, "sasrec_id", 1, 0.10, 0.05)
    text = markdown_report(load_runs(tmp_path), ReportConfig(metrics=["hr@10"]))
    assert "No per-user values (metrics/{run}.users.parquet) for odmt, sasrec_id" in text
    assert "No per-user values for odmt: no significance test." in text and "+20.0%" not in text


def test_training_lines_say_how_each_run_stopped_and_warn_when_it_did_not_converge(tmp_path):
    runs = [
        {"run": {"run": "odmt-s1", "epochs_trained": 57, "best_epoch": 47, "stop_reason": "patience", "patience": 10}},
        {"run": {"run": "sasrec_id-s1", "epochs_trained": 100, "best_epoch": 95, "stop_reason": "max_epochs", "patience": 10}},
    ]
    lines = training_lines(runs)
    assert lines[0] == (
        "Training (early stopping with patience 10 on validation; the best-validation epoch's weights are kept): "
        "odmt-s1 57 epochs (best 47, early-stopped); sasrec_id-s1 100 epochs (best 95, the maximum)."
    )
    assert lines[1].startswith("**Warning**: sasrec_id-s1 reached the maximum of 100 epochs (train.epochs) and its best epoch (95) was fewer") and len(lines) == 2
    runs[1]["run"]["best_epoch"] = 90  # best 10 epochs before the maximum: converged by the same rule
    assert len(training_lines(runs)) == 1


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
