"""FAISS candidate scoring against a brute-force torch ranking, on a toy model."""

from __future__ import annotations

import dataclasses
import sys

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from torch import nn

from pipeline import schema
from pipeline.config import ConfigError, from_dict
from pipeline.evaluation import EvaluateConfig, evaluate_run
from pipeline.io import read_json, read_metadata
from pipeline.models.base import SequentialRecommender
from pipeline.scoring import (
    IndexConfig,
    ScoreConfig,
    TorchFlatIndex,
    build_index,
    rank_share,
    score_run,
    search_engine,
    search_unseen,
    search_whole_ties,
)
from pipeline.schema import candidate_columns
from pipeline.sequences import left_pad, split_users
from pipeline.training.trainer import train
from tests import project
from tests.test_training import toy_config
from tests.toy import excluded_items, make_toy_dataset, ragged, rows_of

ROOT = project.ROOT

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


@pytest.mark.parametrize("engine", ["faiss", "torch"])
def test_a_tie_group_at_the_cut_leaves_the_list_whole(engine):
    # items 1..6 score 6, 5, 4, 4, 4, 1 for the one query (small integers: exact in float32)
    vectors = np.array([[6, 0], [5, 0], [4, 0], [4, 0], [4, 0], [1, 0]], dtype=np.float32)
    index = build_index(vectors, IndexConfig()) if engine == "faiss" else TorchFlatIndex(vectors, "cpu", item_block_size=2)
    query, nothing_seen = np.array([[1, 0]], dtype=np.float32), ragged([[]])
    items, scores = search_whole_ties(index, query, nothing_seen, 3)  # the 3-way tie straddles places 3 and 4
    assert items[0, :2].tolist() == [1, 2] and items[0, 2] == 0 and np.isneginf(scores[0, 2])
    items, _ = search_whole_ties(index, query, nothing_seen, 5)  # the whole group fits
    assert items[0, :2].tolist() == [1, 2] and sorted(items[0, 2:].tolist()) == [3, 4, 5]
    items, _ = search_whole_ties(index, query, ragged([[4]]), 4)  # item 4 seen: 1, 2, 3, 5 are not cut
    assert items[0].tolist()[:2] == [1, 2] and sorted(items[0, 2:].tolist()) == [3, 5]


@pytest.mark.parametrize("engine", ["faiss", "torch"])
def test_items_scored_nan_are_never_returned(engine):
    vectors = np.array([[1, 0], [2, 0], [np.nan, 0], [3, 0]], dtype=np.float32)
    index = build_index(vectors, IndexConfig()) if engine == "faiss" else TorchFlatIndex(vectors, "cpu")
    items, _ = search_unseen(index, np.array([[1, 0], [np.nan, 0]], dtype=np.float32), ragged([[], []]), 2)
    assert 3 not in items[0] and items[1].tolist() == [0, 0]  # a NaN user vector: nothing, so no hit


def test_metrics_do_not_depend_on_the_user_block_size(tmp_path):
    model, sequences = ToyRecommender(120, seed=3), toy_sequences(50, 120, seed=3)
    results = []
    for block in (1, 7, 50, 4096):
        out = tmp_path / f"block{block}"
        score_run(model, MAX_LEN, sequences, ScoreConfig(k=20, user_block_size=block), out, {"run": "toy"})
        metrics, curve, _ = evaluate_run(out, sequences, EvaluateConfig())
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


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_asking_for_a_gpu_without_one_says_what_to_do():
    with pytest.raises(RuntimeError, match="score.device"):
        search_engine("gpu")
    assert search_engine("auto") == search_engine("cpu") == "faiss-cpu"


@pytest.mark.gpu
@pytest.mark.skipif(faiss.get_num_gpus() == 0, reason="needs the GPU build of FAISS")
def test_gpu_flat_index_ranks_like_the_cpu_one():
    rng = np.random.default_rng(2)
    vectors, queries = rng.standard_normal((500, 24), dtype=np.float32), rng.standard_normal((40, 24), dtype=np.float32)
    histories = ragged([rng.choice(np.arange(1, 501), size=10, replace=False) for _ in range(40)])
    cpu_items, cpu_scores = search_unseen(build_index(vectors, IndexConfig()), queries, histories, 20)
    gpu_items, gpu_scores = search_unseen(build_index(vectors, IndexConfig(), engine="faiss-gpu"), queries, histories, 20)
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


def test_rank_shares_are_whole_blocks_covering_every_user_once():
    for users, block, world_size in [(24, 5, 2), (10, 3, 4), (3, 8, 2), (0, 4, 3), (100, 1, 7)]:
        shares = [rank_share(users, block, rank, world_size) for rank in range(world_size)]
        assert [i for s in shares for i in range(users)[s]] == list(range(users))
        assert all(s.start % block == 0 for s in shares)


# --- the torch engine: exact search without FAISS's GPU build ---------------------------------


def torch_and_faiss_results(device: str):
    rng = np.random.default_rng(4)
    vectors, queries = rng.standard_normal((500, 24), dtype=np.float32), rng.standard_normal((40, 24), dtype=np.float32)
    # histories of 0..30 items, some pointing at the query's best items
    excluded = ragged([rng.choice(np.arange(1, 501), size=n, replace=False) for n in rng.integers(0, 31, size=40)])
    faiss_result = search_unseen(build_index(vectors, IndexConfig()), queries, excluded, 20)
    # blocks of 32 items, fewer than the 20 + up to 30 fetched, the last one partial
    torch_result = search_unseen(TorchFlatIndex(vectors, device, item_block_size=32), queries, excluded, 20)
    return faiss_result, torch_result


def test_torch_flat_search_finds_the_faiss_flat_items():
    (faiss_items, faiss_scores), (torch_items, torch_scores) = torch_and_faiss_results("cpu")
    assert np.array_equal(torch_items, faiss_items)  # Gaussian vectors: no tied scores
    np.testing.assert_allclose(torch_scores, faiss_scores, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
def test_torch_flat_search_on_cuda_finds_the_faiss_flat_items(tmp_path):
    (faiss_items, faiss_scores), (torch_items, torch_scores) = torch_and_faiss_results("cuda")
    assert np.array_equal(torch_items, faiss_items)
    np.testing.assert_allclose(torch_scores, faiss_scores, rtol=1e-4, atol=1e-4)
    model, sequences = ToyRecommender(300, seed=5), toy_sequences(30, 300, seed=5)
    summary = score_run(model, MAX_LEN, sequences, ScoreConfig(k=10, device="gpu"), tmp_path, {"run": "toy"})
    assert summary["engine"] == ("faiss-gpu" if faiss.get_num_gpus() > 0 else "torch-cuda")
    cpu = score_run(model, MAX_LEN, sequences, ScoreConfig(k=10, device="cpu"), tmp_path / "cpu", {"run": "toy"})
    assert cpu["engine"] == "faiss-cpu"
    for split in ("valid", "test"):
        gpu_items, cpu_items = (pq.read_table(d / f"{split}.parquet").column("items").to_pylist() for d in (tmp_path, tmp_path / "cpu"))
        assert np.mean(np.array(gpu_items) == np.array(cpu_items)) > 0.99  # equal up to near-ties


# --- torchrun: users shared out among ranks -----------------------------------------------------


def test_two_cpu_ranks_write_the_files_of_one_process(tmp_path):
    run = "odmt-s1"
    data = make_toy_dataset(tmp_path / "data", num_users=24, num_items=30, seq_len=8, repeated_targets=6)
    torch.manual_seed(0)
    train(toy_config(data, epochs=1), tmp_path / "models" / run, tmp_path / "logs" / run)
    # 5 blocks of 5 users: ranks of 2 and 3 blocks; IVF with one list probed, so recall@K < 1 is merged too
    score = {"k": 5, "user_block_size": 5, "device": "cpu", "index": {"type": "ivf", "nlist": 4, "nprobe": 1}}
    params = {"score": score, "evaluate": {"exclude_history": "all_but_target"}, "train": {}}  # train: the feature files' paths
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    stage = [str(ROOT / "stages/score.py"), "--run", run]
    env = {"OMP_NUM_THREADS": "1", "PYTHONPATH": None, "CUDA_VISIBLE_DEVICES": ""}  # CPU ranks, however many GPUs
    project.run([sys.executable, *stage], tmp_path, env)
    single = tmp_path / "data/candidates" / run
    single.rename(tmp_path / "single")
    single.mkdir()
    (single / ".valid.part2.parquet").write_bytes(b"left by a killed 3-rank run")
    project.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "--", *stage], tmp_path, env)
    assert sorted(p.name for p in single.iterdir()) == ["scoring.json", "test.parquet", "valid.parquet"]  # no part left
    for name in ("valid.parquet", "test.parquet", "scoring.json"):
        assert (single / name).read_bytes() == (tmp_path / "single" / name).read_bytes(), name
    assert pq.ParquetFile(single / "test.parquet").num_row_groups == 5
    assert 0 < read_json(single / "scoring.json")["splits"]["test"]["recall@5"]["fused"] < 1


def test_left_pad_right_aligns_each_rows_last_items():
    histories = [[], [1, 2, 3], [], [4, 5, 6, 7, 8, 9, 10]]
    for width in (0, 1, 3, 8):
        expected = [[0] * (width - min(len(h), width)) + h[len(h) - min(len(h), width):] for h in histories]
        assert left_pad(ragged(histories), width).tolist() == expected
