"""Metrics from candidates: HR, NDCG and MRR at each cutoff, for the fused ranking and each
branch, on validation and test, with the protocol written beside the numbers.

A target's rank follows the one tie rule of pipeline/metrics.py, as validation in training does:
the number of items in the user's candidate list (history already excluded by scoring, over the
whole catalogue) scoring at least as high as the target, itself included, so an item tied with it
ranks before it; the lists never cut a tie group at K (scoring.search_whole_ties), so this is the
rank among all items. A target outside the top K, or with a score that is not finite, counts as a
miss at every cutoff, so cutoffs must not exceed K. Metric values are fractions (0..1), means over users;
each user's own values are kept too (user_values), for paired comparisons between runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.io import read_json
from pipeline.metrics import ExcludeHistory, per_user, summarize
from pipeline.schema import candidate_columns
from pipeline.sequences import SPLITS, SplitUsers, split_users


@dataclass(frozen=True)
class EvaluateConfig:
    ks: list[int] = field(default_factory=lambda: [5, 10, 20])  # cutoffs in the metrics file
    # History items never ranked, for model selection (train), candidates (score) and metrics
    # alike: all (the reference) | all_but_target (a repeated target stays rankable).
    exclude_history: ExcludeHistory = "all"

    def validate(self) -> None:
        if not self.ks or min(self.ks) < 1:
            raise ValueError(f"ks must be a non-empty list of cutoffs >= 1, got {self.ks}")


def target_ranks(items: pa.ListArray | pa.ChunkedArray, scores: pa.ListArray | pa.ChunkedArray, targets: np.ndarray) -> np.ndarray:
    """(U,) float: rank of ``targets[u]`` in candidate list ``items[u]`` with scores
    ``scores[u]``: the entries scoring at least as high as it (ties against the target); inf if
    absent or its score is not finite."""
    items, scores = _one_chunk(items), _one_chunk(scores)
    offsets = items.offsets.to_numpy()
    flat_items, flat_scores = items.flatten().to_numpy(), scores.flatten().to_numpy()
    row = np.repeat(np.arange(len(items)), np.diff(offsets))
    match = np.flatnonzero(flat_items == targets[row])  # each item appears at most once per list
    target_scores = np.full(len(items), np.nan, dtype=flat_scores.dtype)
    target_scores[row[match]] = flat_scores[match]
    at_least = np.bincount(row, weights=flat_scores >= target_scores[row], minlength=len(items))  # NaN: none
    return np.where(np.isfinite(target_scores), at_least, np.inf)


def _one_chunk(lists: pa.ListArray | pa.ChunkedArray) -> pa.ListArray:
    if isinstance(lists, pa.ChunkedArray):
        return pa.concat_arrays(lists.chunks) if lists.num_chunks else pa.array([], lists.type)
    return lists


def split_ranks(candidates: pa.Table, users: SplitUsers, ranking: str, source: str) -> np.ndarray:
    """Ranks of the split's targets in one ranking of a candidates table (its row order)."""
    scored = candidates.column("user_idx").to_numpy()
    if len(scored) != len(users) or not np.array_equal(np.sort(scored), np.sort(users.user_idx)):
        raise ValueError(
            f"{source}: candidates for {len(scored)} users but the {users.split} split has {len(users)} "
            "(or other ones): re-run the score stage for this run"
        )
    sorter = np.argsort(users.user_idx)
    targets = users.targets[sorter[np.searchsorted(users.user_idx, scored, sorter=sorter)]]
    items, scores = candidate_columns(ranking)
    return target_ranks(candidates.column(items), candidates.column(scores), targets)


def evaluate_run(candidates_dir: Path, sequences: pa.Table, config: EvaluateConfig) -> tuple[dict, list[dict], pa.Table]:
    """The metrics file of one run (metrics per split and ranking, protocol, run), its
    metrics-against-K rows (fused ranking, every cutoff 1..K) for dvc plots, and its per-user
    table (user_values: what `python -m pipeline.compare` pairs between runs)."""
    scoring = read_json(candidates_dir / "scoring.json")
    k = scoring["k"]
    if scoring.get("exclude_history") != config.exclude_history:
        raise ValueError(
            f"{candidates_dir} was scored with exclude_history {scoring.get('exclude_history')!r}, evaluate.exclude_history "
            f"is {config.exclude_history!r}: re-run the score stage for this run"
        )
    if max(config.ks) > k:
        raise ValueError(
            f"evaluate.ks goes up to {max(config.ks)} but {candidates_dir} holds only the top {k} (score.k): "
            "raise score.k or lower evaluate.ks"
        )
    result: dict = {}
    curve = [{"k": cutoff} for cutoff in range(1, k + 1)]
    users_per_split, in_history, per_user_parts = {}, {}, []
    for split in SPLITS:
        path = candidates_dir / f"{split}.parquet"
        users = split_users(sequences, split, config.exclude_history)
        result[split] = {}
        for ranking in scoring["rankings"]:
            # one ranking's lists at a time: at 1M users the whole candidates table (4 rankings)
            # is ~4x what one ranking needs
            candidates = pq.read_table(path, columns=["user_idx", *candidate_columns(ranking)])
            ranks = split_ranks(candidates, users, ranking, str(path))
            result[split][ranking] = summarize(ranks, tuple(config.ks))
            per_user_parts.append(user_values(candidates.column("user_idx").to_numpy(), split, ranking, ranks, tuple(config.ks)))
            if ranking == "fused":
                for row in curve:
                    for name, value in summarize(ranks, (row["k"],)).items():
                        row[f"{split}_{name.split('@')[0]}"] = value
        users_per_split[split] = len(users)
        # Repeat consumption: under exclude_history "all" these targets can never be hit.
        in_history[split] = users.targets_in_history()
    result["protocol"] = {
        "split": "leave-one-out (valid: history = train items, target = valid item; "
        "test: history = train + valid items, target = test item)",
        "full_ranking": True,
        "items": scoring["items"],
        "exclude_history": config.exclude_history,
        "model_input": f"last {scoring['max_len']} history items",
        "candidates_k": k,
        "ks": list(config.ks),
        "users": users_per_split,
        "targets_in_history": in_history,
        "index": scoring["index"]["type"],
        "metric_scale": "fraction of users (0..1)",
    }
    recall = {split: s[f"recall@{k}"] for split, s in scoring["splits"].items() if f"recall@{k}" in s}
    if recall:
        result["protocol"][f"index_recall@{k}"] = recall
    run = dict(scoring["run"])
    if "sources" in run:  # the item sources the model used, and the share of catalogue items having each
        result["protocol"]["sources"] = run.pop("sources")
    result["run"] = run | {"rankings": scoring["rankings"]}
    return result, curve, pa.concat_tables(per_user_parts)


def user_values(user_idx: np.ndarray, split: str, ranking: str, ranks: np.ndarray, ks: tuple[int, ...]) -> pa.Table:
    """One row per user, in user_idx order: split, ranking, the target's rank (inf: not in the
    candidates) and each metric of the metrics file for this user alone (their mean over users
    is the metrics file's value, up to the float rounding of another summation order)."""
    order = np.argsort(user_idx, kind="stable")
    columns = {
        "user_idx": pa.array(user_idx[order].astype(np.int64)),
        "split": pa.array([split] * len(order), pa.string()),
        "ranking": pa.array([ranking] * len(order), pa.string()),
        "rank": pa.array(ranks[order]),
    }
    columns |= {name: pa.array(values[order]) for name, values in per_user(ranks, ks).items()}
    return pa.table(columns)

