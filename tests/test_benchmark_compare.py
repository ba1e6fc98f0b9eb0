"""benchmarks/compare.py: the shared `--baseline-worktree` helpers of the benchmarks."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import compare  # noqa: E402


def test_the_trees_take_turns_round_by_round(tmp_path):
    (tmp_path / "pipeline").mkdir()
    trees = compare.code_trees(tmp_path)
    assert trees == {"this": compare.ROOT, "baseline": tmp_path}
    calls = []
    results = compare.in_turns(trees, 3, lambda name, code: calls.append((name, code)) or len(calls))
    assert [name for name, _ in calls] == ["this", "baseline"] * 3
    assert results == {"this": [1, 3, 5], "baseline": [2, 4, 6]}


def test_a_baseline_that_is_not_a_checkout_is_refused(tmp_path):
    with pytest.raises(SystemExit, match="not a checkout"):
        compare.code_trees(tmp_path)
    assert compare.code_trees(None) == {"this": compare.ROOT}


def test_speed_up_compares_medians_whichever_way_is_faster():
    assert compare.speed_up([10.0, 12.0, 50.0], [24.0, 30.0, 1.0], higher_is_faster=True) == 2.0  # items/s
    assert compare.speed_up([4.0, 4.0, 4.0], [2.0, 1.0, 2.0], higher_is_faster=False) == 2.0  # seconds
