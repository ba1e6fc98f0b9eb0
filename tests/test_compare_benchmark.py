"""benchmarks/compare.py: the side-by-side helpers of the train and evaluate benchmarks."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from pipeline.models.odmt import ModelConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import compare  # noqa: E402


def test_a_setting_the_tree_does_not_know_is_left_out_and_named():
    config, unknown = compare.with_settings(ModelConfig(), {"width": 128, "switch_of_a_newer_tree": True})
    assert config.width == 128 and unknown == ["switch_of_a_newer_tree"]


def test_rounds_are_joined_into_medians_and_ratios():
    rounds = [
        {"commit": "abc", "step_runs_s": [3.0, 1.0], "peak_rss_mb": 100},
        {"commit": "abc", "step_runs_s": [2.0], "peak_rss_mb": 300},
    ]
    merged = compare.median_of_runs(rounds)
    assert merged == {"commit": "abc", "step_s": 2.0, "step_runs_s": [3.0, 1.0, 2.0], "peak_rss_mb": 300}
    assert compare.speed_up({"step_s": 3.0}, merged, ["step_s"]) == {"step": 1.5}


def test_the_trees_take_turns_round_by_round(tmp_path):
    (tmp_path / "pipeline").mkdir()
    trees = compare.trees(Path("/this"), tmp_path)
    assert trees == {"this": Path("/this"), "baseline": tmp_path}
    calls = []
    results = compare.in_turns(trees, 3, lambda name, code: calls.append((name, code)) or len(calls))
    assert [name for name, _ in calls] == ["this", "baseline"] * 3
    assert results == {"this": [1, 3, 5], "baseline": [2, 4, 6]}


def test_a_baseline_that_is_not_a_checkout_is_refused(tmp_path):
    with pytest.raises(SystemExit, match="not a checkout"):
        compare.trees(Path("/this"), tmp_path)
    assert compare.trees(Path("/this"), None) == {"this": Path("/this")}
