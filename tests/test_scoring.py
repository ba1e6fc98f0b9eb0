"""FAISS candidate scoring against a brute-force torch ranking, on a toy model."""

from __future__ import annotations

import dataclasses

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from torch import nn

from pipeline import schema
from pipeline.config import ConfigError, from_dict
from pipeline.evaluation import EvaluateConfig, evaluate_run
from pipeline.io import read_json, read_metadata
from pipeline.models.base import SequentialRecommender
from pipeline.metrics import excluded_items
from pipeline.scoring import IndexConfig, candidate_columns, ScoreConfig, build_index, left_pad, score_run, search_unseen, split_users, use_gpu
from tests.toy import ragged, rows_of

MAX_LEN = 6


class ToyRecommender(SequentialRecommender):
    """Random item vectors; user = a fixed random map of the mean of its items' vectors,
    divided by the number of branches as the interface requires."""

    def __init__(self, num_items: int, branches=("id", "text", "image"), dim: int = 8, seed: int = 0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.branches, self.branch_dim = tuple(branches), dim
        width = len(self.branches) * dim
        self.items = nn.Parameter(torch.randn(num_items + 1, width, generator=gen))
        self.mix = nn.Parameter(torch.randn(width, width, generator=gen) / width**0.5)

    def item_vectors(self) -> torch.Tensor:
        return self.items

    def user_vectors(self, sequences: torch.Tensor, item_vectors: torch.Tensor | None = None) -> torch.Tensor:
        real = (sequences > 0).float()[..., None]
        mean = (self.items[sequences] * real).sum(1) / real.sum(1).clamp(min=1)
        return torch.tanh(mean @ self.mix) / len(self.branches)


def toy_sequences(num_users: int, num_items: int, seed: int = 0, max_history: int = 12) -> pa.Table:
    """Users with distinct random items: a train history of 1..max_history, then valid, test."""
    rng = np.random.default_rng(seed)
    rows = []
    for user in range(num_users):
        walk = rng.choice(np.arange(1, num_items + 1), size=int(rng.integers(3, max_history + 3)), replace=False)
        rows.append((user, f"u{user}", walk[:-2].tolist(), int(walk[-2]), int(walk[-1])))
    users, keys, train, valid, test = zip(*rows)
    table = pa.table({"user_idx": users, "user_key": keys, "train_items": train, "valid_item": valid, "test_item": test})
    return table.cast(schema.SEQUENCES)


def brute_force(model: ToyRecommender, histories, cols: slice, factor: float, k: int):
    """The model's own scores over all items, padding and history masked, sorted."""
    with torch.no_grad():
        users = model.user_vectors(left_pad(ragged(histories), MAX_LEN))[:, cols] * factor
        scores = users @ model.item_vectors()[:, cols].T
    scores[:, 0] = -torch.inf
    for row, history in enumerate(histories):
        scores[row, torch.as_tensor(history, dtype=torch.long)] = -torch.inf
    top = torch.topk(scores, k, dim=1)
    return top.indices.numpy(), top.values.numpy()


def read_candidates(path, ranking: str):
    table = pq.read_table(path)
    items, scores = candidate_columns(ranking)
    return table.column("user_idx").to_numpy(), np.array(table.column(items).to_pylist()), np.array(table.column(scores).to_pylist())


def test_exact_candidates_equal_brute_force_ranking_for_fused_and_each_branch(tmp_path):
    num_items, k = 200, 15
    model, sequences = ToyRecommender(num_items), toy_sequences(40, num_items)
    summary = score_run(model, MAX_LEN, sequences, ScoreConfig(k=k, user_block_size=16), tmp_path, {"run": "toy"})
    assert summary["rankings"] == ["fused", "id", "text", "image"]
    assert summary["items"] == num_items
    columns = {"fused": (slice(0, 24), 1.0), "id": (slice(0, 8), 3.0), "text": (slice(8, 16), 3.0), "image": (slice(16, 24), 3.0)}
    for split in ("valid", "test"):
        users = split_users(sequences, split)
        assert read_metadata(tmp_path / f"{split}.parquet")["split"] == split
        for ranking, (cols, factor) in columns.items():
            user_idx, items, scores = read_candidates(tmp_path / f"{split}.parquet", ranking)
            assert np.array_equal(user_idx, users.user_idx)
            want_items, want_scores = brute_force(model, rows_of(users.histories), cols, factor, k)
            np.testing.assert_allclose(scores, want_scores, rtol=1e-4, atol=1e-4)
            # Same order, except where two neighbouring scores tie within float rounding.
            gaps = np.abs(np.diff(want_scores, axis=1))
            near_tie = np.zeros_like(want_scores, dtype=bool)
            near_tie[:, 1:] |= gaps < 1e-4
            near_tie[:, :-1] |= gaps < 1e-4
            assert np.all((items == want_items) | near_tie), f"{split}/{ranking}: order differs from brute force"


def test_history_is_never_returned_and_k_items_come_back_when_the_catalogue_has_them():
    rng = np.random.default_rng(1)
    num_items, k = 30, 5
    vectors = rng.standard_normal((num_items, 4)).astype(np.float32)
    index = build_index(vectors, IndexConfig())
    histories = [rng.choice(np.arange(1, num_items + 1), size=n, replace=False) for n in (0, 3, 20, 25, 28, 30)]
    # Queries pointing at their own history: unfiltered, the history would fill the top ranks.
    queries = np.stack([vectors[h - 1].sum(0) if len(h) else vectors[0] for h in histories])
    items, scores = search_unseen(index, queries, ragged(histories), k)
    assert items.shape == (len(histories), k)
    for row, history in enumerate(histories):
        available = min(k, num_items - len(history))
        real = items[row][items[row] > 0]
        assert len(real) == available, f"history of {len(history)}: {len(real)} items, expected {available}"
        assert np.all(items[row, :available] > 0) and np.all(items[row, available:] == 0)
        assert not set(real.tolist()) & set(history.tolist())
        assert len(set(real.tolist())) == len(real)
        assert np.all(np.diff(scores[row, :available]) <= 0) and np.all(np.isneginf(scores[row, available:]))


def test_metrics_do_not_depend_on_the_user_block_size(tmp_path):
    model, sequences = ToyRecommender(120, seed=3), toy_sequences(50, 120, seed=3)
    results = []
    for block in (1, 7, 50, 4096):
        out = tmp_path / f"block{block}"
        score_run(model, MAX_LEN, sequences, ScoreConfig(k=20, user_block_size=block), out, {"run": "toy"})
        metrics, curve = evaluate_run(out, sequences, EvaluateConfig())
        items = pq.read_table(out / "test.parquet").column("items").to_pylist()
        results.append((metrics, curve, items))
    assert results[0][0]["test"]["fused"]["hr@20"] > 0  # something was hit, so equality means something
    for other in results[1:]:
        assert other == results[0]


@pytest.mark.parametrize(
    "index",
    [IndexConfig(type="ivf", nlist=8, nprobe=8), IndexConfig(type="hnsw", hnsw_m=8, ef_construction=400, ef_search=400)],
    ids=["ivf-all-lists", "hnsw-large-ef"],
)
def test_ann_recall_is_one_when_the_search_is_exhaustive(tmp_path, index):
    model, sequences = ToyRecommender(300, seed=5), toy_sequences(30, 300, seed=5)
    summary = score_run(model, MAX_LEN, sequences, ScoreConfig(k=10, index=index), tmp_path, {"run": "toy"})
    for split in ("valid", "test"):
        assert summary["splits"][split]["recall@10"] == {"fused": 1.0, "id": 1.0, "text": 1.0, "image": 1.0}
    assert read_json(tmp_path / "scoring.json")["splits"]["test"]["recall@10"]["fused"] == 1.0


def test_ann_recall_is_measured_below_one_for_a_narrow_ivf_probe(tmp_path):
    model, sequences = ToyRecommender(300, branches=("id",), seed=5), toy_sequences(30, 300, seed=5)
    summary = score_run(model, MAX_LEN, sequences, ScoreConfig(k=10, index=IndexConfig(type="ivf", nlist=16, nprobe=1)), tmp_path, {"run": "toy"})
    assert summary["rankings"] == ["fused"]  # one branch: no separate branch rankings
    recall = summary["splits"]["test"]["recall@10"]["fused"]
    assert 0.0 < recall < 1.0


def test_exact_index_reports_no_recall_and_one_branch_model_has_only_the_fused_ranking(tmp_path):
    model, sequences = ToyRecommender(40, branches=("id",)), toy_sequences(10, 40)
    summary = score_run(model, MAX_LEN, sequences, ScoreConfig(k=5), tmp_path, {"run": "toy"})
    assert "recall@5" not in summary["splits"]["valid"]
    assert pq.read_schema(tmp_path / "valid.parquet").names == ["user_idx", "items", "scores"]


def test_split_protocol_and_left_padding():
    table = pa.table({"user_idx": [0, 1], "user_key": ["a", "b"], "train_items": [[5, 6, 7], [9]], "valid_item": [8, 3], "test_item": [2, 4]}).cast(schema.SEQUENCES)
    valid, test = split_users(table, "valid"), split_users(table, "test")
    assert [h.tolist() for h in rows_of(valid.histories)] == [[5, 6, 7], [9]] and valid.targets.tolist() == [8, 3]
    assert [h.tolist() for h in rows_of(test.histories)] == [[5, 6, 7, 8], [9, 3]] and test.targets.tolist() == [2, 4]
    assert left_pad(test.histories, 3).tolist() == [[6, 7, 8], [0, 9, 3]]


def test_config_loads_nested_index_settings_and_rejects_unknown_keys():
    config = from_dict(ScoreConfig, {"k": 20, "index": {"type": "hnsw", "ef_search": 64}}, "score")
    assert config.index == dataclasses.replace(IndexConfig(), type="hnsw", ef_search=64)
    with pytest.raises(ConfigError, match="score.index.nprobes"):
        from_dict(ScoreConfig, {"index": {"nprobes": 4}}, "score")
    with pytest.raises(ConfigError, match="score.index.type"):
        from_dict(ScoreConfig, {"index": {"type": "pq"}}, "score")


@pytest.mark.skipif(faiss.get_num_gpus() > 0, reason="checks the no-GPU message")
def test_asking_for_a_gpu_without_one_says_what_to_do():
    with pytest.raises(RuntimeError, match="score.device"):
        use_gpu("gpu")
    assert use_gpu("auto") is False


@pytest.mark.gpu
@pytest.mark.skipif(faiss.get_num_gpus() == 0, reason="needs the GPU build of FAISS")
def test_gpu_flat_index_ranks_like_the_cpu_one():
    rng = np.random.default_rng(2)
    vectors, queries = rng.standard_normal((500, 24), dtype=np.float32), rng.standard_normal((40, 24), dtype=np.float32)
    histories = ragged([rng.choice(np.arange(1, 501), size=10, replace=False) for _ in range(40)])
    cpu_items, cpu_scores = search_unseen(build_index(vectors, IndexConfig()), queries, histories, 20)
    gpu_items, gpu_scores = search_unseen(build_index(vectors, IndexConfig(), gpu=True), queries, histories, 20)
    np.testing.assert_allclose(gpu_scores, cpu_scores, rtol=1e-4, atol=1e-4)
    assert (gpu_items == cpu_items).mean() > 0.99  # equal up to near-ties


# --- flat arrays instead of per-user Python ---------------------------------------------------


def random_sequences(num_users: int, num_items: int, seed: int) -> pa.Table:
    """Histories of 0..9 items (repeats allowed), a quarter of the targets taken from the user's
    own history; split into three record batches, the middle one a slice, as Parquet reads come."""
    rng = np.random.default_rng(seed)
    train = [rng.integers(1, num_items + 1, size=rng.integers(0, 10)).tolist() for _ in range(num_users)]
    valid = rng.integers(1, num_items + 1, size=num_users)
    test = rng.integers(1, num_items + 1, size=num_users)
    for user in range(0, num_users, 4):
        if train[user]:
            valid[user], test[user] = train[user][-1], train[user][0]
    table = pa.table({"user_idx": np.arange(num_users), "user_key": [f"u{u}" for u in range(num_users)], "train_items": train, "valid_item": valid, "test_item": test}).cast(schema.SEQUENCES)
    third = num_users // 3
    return pa.concat_tables([table.slice(0, third), table.slice(third, third), table.slice(2 * third)])


@pytest.mark.parametrize("exclude", ["all", "all_but_target"])
def test_split_users_equals_the_per_user_definition(exclude):
    table = random_sequences(60, 12, seed=7)
    assert table.column("train_items").num_chunks == 3 and any(len(h) == 0 for h in table.column("train_items").to_pylist())
    train = [np.array(h, dtype=np.int32) for h in table.column("train_items").to_pylist()]
    valid, test = table.column("valid_item").to_pylist(), table.column("test_item").to_pylist()
    expected = {"valid": (train, valid), "test": ([np.append(h, v).astype(np.int32) for h, v in zip(train, valid)], test)}
    for split, (histories, targets) in expected.items():
        users = split_users(table, split, exclude)
        assert [h.tolist() for h in rows_of(users.histories)] == [h.tolist() for h in histories]
        assert users.targets.tolist() == targets
        assert [e.tolist() for e in rows_of(users.excluded)] == [excluded_items(h, t, exclude).tolist() for h, t in zip(histories, targets)]
        assert users.targets_in_history() == sum(t in h for h, t in zip(histories, targets)) > 0
        width = 4
        padded = [[0] * (width - len(h[-width:])) + h[-width:].tolist() for h in histories]
        assert left_pad(users.histories, width).tolist() == padded
        assert left_pad(users.histories.rows(slice(10, 25)), width).tolist() == padded[10:25]
