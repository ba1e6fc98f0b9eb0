"""benchmarks/compare.py: the side-by-side helpers of the train and evaluate benchmarks."""

from __future__ import annotations

import sys
from pathlib import Path

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
