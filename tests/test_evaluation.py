"""Metrics from hand-made candidate lists, checked against values computed by hand."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from pipeline import schema
from pipeline.evaluation import EvaluateConfig, evaluate_run, target_ranks
from pipeline.io import write_json, write_table
from pipeline.schema import candidates_schema

K = 20
# Four users; their test targets are 100..103 and land at rank 1, 10, 11 and nowhere.
TARGET_RANKS = {100: 1, 101: 10, 102: 11, 103: None}


def ranked_list(target: int, rank: int | None) -> list[int]:
    """K filler items (1..) with ``target`` placed at ``rank`` (or absent)."""
    items = list(range(1 + target * 30, 1 + target * 30 + K))
    if rank is not None:
        items[rank - 1] = target
    return items


def sequences(train_items=([1, 2], [3], [4, 5, 6], [7]), valid_items=None) -> pa.Table:
    targets = list(TARGET_RANKS)
    return pa.table(
        {
            "user_idx": [0, 1, 2, 3],
            "user_key": ["a", "b", "c", "d"],
            "train_items": list(train_items),
            "valid_item": valid_items or [t + 50 for t in targets],
            "test_item": targets,
        }
    ).cast(schema.SEQUENCES)


def write_candidates(root, rankings=("fused", "id"), exclude_history="all") -> None:
    """Valid: every target missed. Test: the ranks above in every ranking, except branch 'id'
    which puts every target first. Rows deliberately not in user order."""
    order = [2, 0, 3, 1]
    targets = list(TARGET_RANKS)
    for split in ("valid", "test"):
        rows = {"user_idx": order}
        for ranking in rankings:
            items_col, scores_col = ("items", "scores") if ranking == "fused" else (f"items_{ranking}", f"scores_{ranking}")
            if split == "valid":
                lists = [ranked_list(targets[u], None) for u in order]
            elif ranking == "id":
                lists = [ranked_list(targets[u], 1) for u in order]
            else:
                lists = [ranked_list(targets[u], TARGET_RANKS[targets[u]]) for u in order]
            rows[items_col] = lists
            rows[scores_col] = [list(np.linspace(1, 0, K)) for _ in order]
        write_table(pa.table(rows), root / f"{split}.parquet", candidates_schema(list(rankings)))
    write_json(
        {
            "run": {"run": "odmt-s1", "variant": "odmt", "seed": 1},
            "k": K,
            "items": 5000,
            "index": {"type": "flat"},
            "rankings": list(rankings),
            "exclude_history": exclude_history,
            "max_len": 13,
            "splits": {"valid": {"users": 4}, "test": {"users": 4}},
        },
        root / "scoring.json",
    )


def test_target_ranks_rank_1_10_11_and_missing():
    lists = pa.array([ranked_list(t, r) for t, r in TARGET_RANKS.items()], pa.list_(pa.int32()))
    scores = pa.array([np.linspace(1, 0, K)] * len(TARGET_RANKS), pa.list_(pa.float32()))
    assert target_ranks(lists, scores, np.array(list(TARGET_RANKS))).tolist() == [1, 10, 11, math.inf]


def test_ties_count_against_the_target_and_a_nan_score_is_never_a_hit():
    # the list order puts each target first among its ties (as FAISS's order may); the rule does not
    lists = pa.array([[7, 8, 9], [5, 6, 4], [3, 2, 1], [1, 2, 3], []], pa.list_(pa.int32()))
    scores = pa.array(
        [[0.9, 0.5, 0.5], [2.0, 2.0, 2.0], [float("nan"), 0.4, 0.1], [0.3, 0.2, 0.1], []], pa.list_(pa.float32())
    )
    targets = np.array([8, 5, 3, 4, 1])
    # user 0: 8 ties with 9 -> rank 3; user 1: three-way tie -> 3; user 2: NaN target score;
    # user 3: target absent; user 4: an empty list (a NaN user vector: search_unseen returns nothing)
    assert target_ranks(lists, scores, targets).tolist() == [3, 3, math.inf, math.inf, math.inf]


def test_metrics_match_hand_computed_values(tmp_path):
    write_candidates(tmp_path)
    metrics, curve, users = evaluate_run(tmp_path, sequences(), EvaluateConfig(ks=[5, 10, 20]))
    test = metrics["test"]["fused"]
    # ranks 1, 10, 11, missing over 4 users
    assert test["hr@5"] == pytest.approx(1 / 4)
    assert test["hr@10"] == pytest.approx(2 / 4)
    assert test["hr@20"] == pytest.approx(3 / 4)
    assert test["ndcg@5"] == pytest.approx(1 / 4)
    assert test["ndcg@10"] == pytest.approx((1 + 1 / math.log2(11)) / 4)
    assert test["ndcg@20"] == pytest.approx((1 + 1 / math.log2(11) + 1 / math.log2(12)) / 4)
    assert test["mrr@10"] == pytest.approx((1 + 1 / 10) / 4)
    assert test["mrr@20"] == pytest.approx((1 + 1 / 10 + 1 / 11) / 4)
    assert metrics["test"]["id"] == {f"{m}@{k}": 1.0 for k in (5, 10, 20) for m in ("hr", "ndcg", "mrr")}
    assert metrics["valid"]["fused"]["hr@20"] == 0.0
    # The curve has every cutoff 1..K, agreeing with the table at the listed ones.
    assert [row["k"] for row in curve] == list(range(1, K + 1))
    assert curve[9]["test_hr"] == test["hr@10"] and curve[10]["test_hr"] == pytest.approx(3 / 4)
    assert curve[9]["test_ndcg"] == test["ndcg@10"] and curve[0]["valid_mrr"] == 0.0
    # Each user's own values, in user order, one row per split, ranking and user; their means
    # are the table's.
    assert users.num_rows == 2 * 2 * 4
    fused = users.filter((pc.field("split") == "test") & (pc.field("ranking") == "fused")).to_pydict()
    assert fused["user_idx"] == [0, 1, 2, 3] and fused["rank"] == [TARGET_RANKS[t] or math.inf for t in TARGET_RANKS]
    assert fused["hr@10"] == [1.0, 1.0, 0.0, 0.0] and fused["mrr@10"] == [1.0, 0.1, 0.0, 0.0]
    assert fused["ndcg@20"] == pytest.approx([1.0, 1 / math.log2(11), 1 / math.log2(12), 0.0])
    for split in ("valid", "test"):
        for ranking in ("fused", "id"):
            rows = users.filter((pc.field("split") == split) & (pc.field("ranking") == ranking))
            assert {name: pc.mean(rows[name]).as_py() for name in metrics[split][ranking]} == pytest.approx(metrics[split][ranking])


@pytest.mark.parametrize("exclude", ["all", "all_but_target"])
def test_metrics_file_records_the_protocol_and_the_run(tmp_path, exclude):
    # repeat consumption: user 1's test target 101 and user 2's validation target 5 are in their histories
    train_items = ([1, 2], [3, 101], [4, 5, 6], [7])
    valid_items = [150, 151, 5, 153]
    table = sequences(train_items, valid_items)
    write_candidates(tmp_path, exclude_history=exclude)
    metrics, _, _ = evaluate_run(tmp_path, table, EvaluateConfig(ks=[10], exclude_history=exclude))
    protocol = metrics["protocol"]
    test_histories = [h + [v] for h, v in zip(train_items, valid_items)]
    expected_in_history = {
        "valid": sum(v in h for v, h in zip(valid_items, train_items)),
        "test": sum(t in h for t, h in zip(TARGET_RANKS, test_histories)),
    }
    assert expected_in_history == {"valid": 1, "test": 1}
    assert protocol["targets_in_history"] == expected_in_history
    assert protocol["full_ranking"] is True and protocol["exclude_history"] == exclude
    assert protocol["items"] == 5000 and protocol["candidates_k"] == K and protocol["ks"] == [10]
    assert protocol["users"] == {"valid": table.num_rows, "test": table.num_rows}
    assert protocol["index"] == "flat" and "leave-one-out" in protocol["split"]
    assert metrics["run"] == {"run": "odmt-s1", "variant": "odmt", "seed": 1, "rankings": ["fused", "id"]}
    assert set(metrics["test"]["fused"]) == {"hr@10", "ndcg@10", "mrr@10"}


def test_cutoff_beyond_the_candidates_missing_users_and_another_exclusion_are_refused(tmp_path):
    write_candidates(tmp_path)
    with pytest.raises(ValueError, match="scored with exclude_history 'all'"):
        evaluate_run(tmp_path, sequences(), EvaluateConfig(exclude_history="all_but_target"))
    with pytest.raises(ValueError, match="score.k"):
        evaluate_run(tmp_path, sequences(), EvaluateConfig(ks=[10, 50]))
    fewer_users = sequences().slice(0, 3)
    with pytest.raises(ValueError, match="re-run the score stage"):
        evaluate_run(tmp_path, fewer_users, EvaluateConfig())
