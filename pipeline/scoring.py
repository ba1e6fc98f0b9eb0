"""Candidate retrieval: a trained model's user and item vectors -> FAISS -> each user's top-K
unseen items, for the validation and test users, written as Parquet.

Why an inner-product index: a model's fused score is ONE inner product of its concatenated
branch vectors (see pipeline/models/base.py), so an exact flat inner-product index ranks
exactly as the model does. Per-branch rankings search the branch's column slice. IVF and HNSW
are there for big catalogues; they may miss items, so scoring with them also measures their
recall@K against exact search, and reported metrics use the exact index.

History exclusion (`evaluate.exclude_history`, pipeline/metrics.py: every history item, or all
but a repeated target): FAISS cannot filter per query, so each query fetches K + (longest
excluded list in its block) results and drops its own excluded items; at least K unseen items survive whenever the
catalogue has them. Padding (item 0) is never added to the index, so it is never returned.
Ties: a list never cuts a group of equal scores at K (search_whole_ties), so the evaluate stage
ranks a target by the one tie rule of pipeline/metrics.py, as validation does.
Users are scored in blocks of ``user_block_size``: memory grows with the block, not with
users x items. Histories stay flat arrays with offsets (Ragged) from the Parquet list column to
the model input: no Python object or loop step per user.

Engines (``score.device``, recorded in scoring.json): FAISS on the CPU; FAISS's GPU index; or,
on a GPU without FAISS's GPU build (its wheels need CUDA 12), an exact blocked torch matmul +
top-k (TorchFlatIndex) behind the same search interface. Under torchrun the users of each split
are shared out among the ranks in whole blocks and rank 0 merges the parts (score_run).
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.distributed as dist

from pipeline.commands import check_launcher
from pipeline.config import to_dict
from pipeline.io import parquet_writer, write_json
from pipeline.metrics import ITEM_BLOCK_SIZE, ExcludeHistory
from pipeline.models.base import SequentialRecommender
from pipeline.progress import Progress, log
from pipeline.schema import candidate_columns, candidates_schema
from pipeline.sequences import SPLITS, Ragged, SplitUsers, left_pad, split_users

GPU_MAX_K = 2048  # FAISS GPU indexes return at most this many neighbours per query


@dataclass(frozen=True)
class IndexConfig:
    type: Literal["flat", "ivf", "hnsw"] = "flat"  # flat = exact; the only one for reported metrics
    nlist: int = 0  # IVF: number of lists; 0 = 4 * sqrt(items), at most the number of items
    nprobe: int = 16  # IVF: lists visited per query (= nlist: exact)
    ivf_train_per_list: int = 64  # IVF: k-means sample, items per list (FAISS's 256 costs 4x the CPU time)
    hnsw_m: int = 32  # HNSW: links per node
    ef_construction: int = 200  # HNSW: candidate list size while building
    ef_search: int = 256  # HNSW: candidate list size while searching (larger: better recall, slower)

    def validate(self) -> None:
        for name in ("nprobe", "ivf_train_per_list", "hnsw_m", "ef_construction", "ef_search"):
            if getattr(self, name) < 1:
                raise ValueError(f"index.{name} must be >= 1, got {getattr(self, name)}")
        if self.nlist < 0:
            raise ValueError(f"index.nlist must be >= 0 (0 = automatic), got {self.nlist}")


@dataclass(frozen=True)
class ScoreConfig:
    k: int = 50  # candidates kept per user and ranking (metrics are computed at cutoffs <= k)
    index: IndexConfig = field(default_factory=IndexConfig)
    user_block_size: int = 2048  # users encoded and searched together
    # auto: a GPU when there is one (FAISS's GPU index, else exact torch search), else the CPU;
    # gpu: as auto, but fail without a GPU; cpu: FAISS on the CPU (see search_engine)
    device: Literal["auto", "cpu", "gpu"] = "auto"
    launcher: str = "python"  # read by dvc.yaml only: the stage's command, e.g. torchrun --nproc_per_node 2

    def validate(self) -> None:
        if self.k < 1 or self.user_block_size < 1:
            raise ValueError(f"k and user_block_size must be >= 1, got {self.k} and {self.user_block_size}")
        check_launcher(self.launcher, "launcher")


# --- search engines: FAISS, or torch on a GPU without FAISS's GPU build ----------------------

# Where the exact search runs: FAISS on the CPU; FAISS's GPU index; or, on a GPU whose CUDA the
# FAISS GPU wheels do not support, a blocked torch matmul + top-k (TorchFlatIndex).
Engine = Literal["faiss-cpu", "faiss-gpu", "torch-cuda"]


def available_cpus() -> int:
    """CPUs this process may run on (respects taskset / cgroup cpusets, unlike os.cpu_count)."""
    return len(os.sched_getaffinity(0))


def search_engine(device: str) -> Engine:
    """score.device -> engine: cpu: FAISS on the CPU; auto and gpu: FAISS's GPU index when the
    FAISS GPU build sees a GPU, else torch on CUDA when there is one; auto falls back to the CPU."""
    if device == "cpu":
        return "faiss-cpu"
    if hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0:
        return "faiss-gpu"
    if torch.cuda.is_available():
        return "torch-cuda"
    if device == "gpu":
        raise RuntimeError("score.device is 'gpu' but there is no CUDA device (for FAISS or torch): set score.device to auto or cpu")
    return "faiss-cpu"


@functools.cache
def _gpu_resources():
    return faiss.StandardGpuResources()  # one per process; must outlive every GPU index


class TorchFlatIndex:
    """Exact inner-product search as a blocked torch matmul and a running top-k, on any torch
    device; answers ``search`` as a FAISS flat index does (scores and rows, best first), so
    search_unseen treats both alike. Memory: one (queries x item_block_size) score block."""

    def __init__(self, vectors: np.ndarray, device: torch.device | str, item_block_size: int = ITEM_BLOCK_SIZE):
        self.vectors = torch.from_numpy(np.ascontiguousarray(vectors, dtype=np.float32)).to(device)
        self.ntotal = len(self.vectors)
        self.item_block_size = item_block_size

    @torch.inference_mode()
    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, rows), each (B, k), for k <= ntotal."""
        q = torch.from_numpy(np.ascontiguousarray(queries, dtype=np.float32)).to(self.vectors.device)
        best_scores = q.new_empty((len(q), 0))
        best_rows = torch.empty((len(q), 0), dtype=torch.int64, device=q.device)
        for start in range(0, self.ntotal, self.item_block_size):
            scores = q @ self.vectors[start : start + self.item_block_size].T
            block = scores.topk(min(k, scores.shape[1]), dim=1)
            scores = torch.cat([best_scores, block.values], dim=1)
            rows = torch.cat([best_rows, block.indices + start], dim=1)
            best = scores.topk(min(k, scores.shape[1]), dim=1)
            best_scores, best_rows = best.values, rows.gather(1, best.indices)
        return best_scores.cpu().numpy(), best_rows.cpu().numpy()


SearchIndex = faiss.Index | TorchFlatIndex


def build_index(vectors: np.ndarray, config: IndexConfig, engine: Engine = "faiss-cpu") -> SearchIndex:
    """Inner-product index over ``vectors`` (n, d): row r is item r + 1 (padding left out).
    Under torch-cuda only the exact (flat) index runs on the GPU; IVF and HNSW stay FAISS on the CPU."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    n, d = vectors.shape
    if config.type == "flat":
        if engine == "torch-cuda":
            return TorchFlatIndex(vectors, torch.device("cuda", torch.cuda.current_device()))
        index = faiss.IndexFlatIP(d)
    elif config.type == "ivf":
        nlist = min(config.nlist or round(4 * math.sqrt(n)), n)
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
        index.cp.seed = 1234  # FAISS's default, pinned: k-means (and so the index) is reproducible
        index.cp.max_points_per_centroid = config.ivf_train_per_list
        index.train(vectors)
        index.nprobe = min(config.nprobe, nlist)
    else:
        index = faiss.IndexHNSWFlat(d, config.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = config.ef_construction
        index.hnsw.efSearch = config.ef_search
    index.add(vectors)
    if engine == "faiss-gpu" and config.type != "hnsw":  # FAISS has no GPU HNSW; it stays on the CPU
        gpu = torch.cuda.current_device() if torch.cuda.is_available() else 0  # this rank's GPU under torchrun
        index = faiss.index_cpu_to_gpu(_gpu_resources(), gpu, index)
    return index


def search_unseen(index: SearchIndex, queries: np.ndarray, excluded: Ragged, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k items per query, best first, skipping the query's row of ``excluded``.

    Returns items (B, k) int32 and scores (B, k) float32; a row has fewer than k real items
    only when the index returned fewer unseen ones (or items scored NaN or +-inf, which are
    never returned: a diverged model's scores are never hits), the rest is item 0 with score -inf.
    """
    fetch = min(k + int(excluded.lengths().max(initial=0)), index.ntotal)
    scores, rows = index.search(np.ascontiguousarray(queries, dtype=np.float32), fetch)
    items = (rows + 1).astype(np.int64)  # row -1 (nothing found) becomes item 0
    # Membership of (query, item) in that query's excluded items, vectorised as one sorted lookup.
    width = index.ntotal + 1
    seen_keys = excluded.row_ids() * width + excluded.values
    found_keys = np.arange(len(items))[:, None] * width + items
    keep = (items > 0) & np.isfinite(scores) & ~np.isin(found_keys, seen_keys)
    order = np.argsort(~keep, axis=1, kind="stable")[:, :k]  # kept results first, order preserved
    kept = np.take_along_axis(keep, order, axis=1)
    top_items = np.where(kept, np.take_along_axis(items, order, axis=1), 0).astype(np.int32)
    top_scores = np.where(kept, np.take_along_axis(scores, order, axis=1), -np.inf).astype(np.float32)
    if top_items.shape[1] < k:  # catalogue smaller than k + history: pad to a fixed width
        pad = k - top_items.shape[1]
        top_items = np.pad(top_items, ((0, 0), (0, pad)))
        top_scores = np.pad(top_scores, ((0, 0), (0, pad)), constant_values=-np.inf)
    return top_items, top_scores


def search_whole_ties(index: SearchIndex, queries: np.ndarray, excluded: Ragged, k: int) -> tuple[np.ndarray, np.ndarray]:
    """search_unseen's top k, less any group of items tied at the cut: when the k-th and the
    (k+1)-th unseen items score the same, every item with that score leaves the row. So a listed
    item's whole tie group is listed, and a target's rank under the tie rule of
    pipeline/metrics.py (ties against it: the listed items scoring at least as high) is exact at
    every cutoff up to k; a target of a dropped group ranks beyond k under that rule anyway."""
    items, scores = search_unseen(index, queries, excluded, k + 1)
    cut = scores[:, k - 1]
    straddles = (items[:, k] > 0) & (scores[:, k] == cut)
    dropped = straddles[:, None] & (scores[:, :k] == cut[:, None])
    return np.where(dropped, 0, items[:, :k]), np.where(dropped, -np.inf, scores[:, :k]).astype(np.float32)


def recall_against(approx: np.ndarray, exact: np.ndarray) -> float:
    """Mean over users of |approximate top-K ∩ exact top-K| / |exact top-K| (item 0 = empty slot)."""
    hits = sizes = 0
    for a, e in zip(approx, exact):
        e = set(e[e > 0].tolist())
        hits += len(e & set(a[a > 0].tolist()))
        sizes += len(e)
    return hits / sizes if sizes else 1.0


# --- a model's rankings ----------------------------------------------------------------------


def ranking_columns(model: SequentialRecommender) -> dict[str, tuple[slice, float]]:
    """ranking name -> (vector columns, user-vector factor). The factor undoes the 1/B scaling
    of user vectors, so a branch ranking's scores are that branch's own scores."""
    branches, d = tuple(model.branches), model.branch_dim
    columns = {"fused": (slice(0, len(branches) * d), 1.0)}
    if len(branches) > 1:
        for b, name in enumerate(branches):
            columns[name] = (slice(b * d, (b + 1) * d), float(len(branches)))
    return columns


@torch.inference_mode()
def catalogue_vectors(model: SequentialRecommender) -> torch.Tensor:
    """(N+1, B*d) item vectors of the whole catalogue (row 0 = padding), encoded once: the
    indexes are built from them and user vectors gather their items from them."""
    vectors = model.item_vectors()
    expected = len(model.branches) * model.branch_dim
    if vectors.ndim != 2 or vectors.shape[1] != expected:
        raise ValueError(f"{type(model).__name__}.item_vectors(): expected shape (N+1, {expected}), got {tuple(vectors.shape)}")
    return vectors.detach()  # a model may hand out its parameter itself


@torch.inference_mode()
def user_matrix(model: SequentialRecommender, histories: Ragged, max_len: int, item_vectors: torch.Tensor) -> np.ndarray:
    """(U, B*d) float32 user vectors, their items gathered from ``item_vectors`` (catalogue_vectors)."""
    inputs = left_pad(histories, max_len).to(item_vectors.device)
    return model.user_vectors(inputs, item_vectors).float().cpu().numpy()


@dataclass(frozen=True)
class Indexes:
    """One index per ranking, plus exact ones to measure an approximate index against."""

    searched: dict[str, SearchIndex]
    exact: dict[str, SearchIndex] | None  # None when `searched` is already exact
    engine: Engine  # where the exact search runs


def build_indexes(model: SequentialRecommender, item_vectors: torch.Tensor, config: ScoreConfig) -> Indexes:
    """The indexes over ``item_vectors`` (catalogue_vectors), padding row dropped: index row r = item r + 1."""
    engine = search_engine(config.device)
    items = item_vectors[1:].float().cpu().numpy()
    columns = ranking_columns(model)
    searched = {name: build_index(items[:, cols], config.index, engine) for name, (cols, _) in columns.items()}
    exact = None
    if config.index.type != "flat":
        exact = {name: build_index(items[:, cols], IndexConfig(type="flat"), engine) for name, (cols, _) in columns.items()}
    where = f"{engine}, {faiss.omp_get_max_threads()} CPU threads" if engine == "faiss-cpu" else engine
    log.info("indexes: %s over %d items x %d dims (%s)", config.index.type, items.shape[0], items.shape[1], where)
    return Indexes(searched, exact, engine)


def rank_share(users: int, block_size: int, rank: int, world_size: int) -> slice:
    """The users that rank ``rank`` of ``world_size`` scores: a contiguous run of whole user
    blocks, so that the ranks' parts, one after the other, hold the single-process file's row
    groups."""
    blocks = -(-users // block_size)
    first, last = blocks * rank // world_size, blocks * (rank + 1) // world_size
    return slice(first * block_size, min(last * block_size, users))


def score_split(
    model: SequentialRecommender,
    users: SplitUsers,
    max_len: int,
    item_vectors: torch.Tensor,
    indexes: Indexes,
    config: ScoreConfig,
    path: Path,
    metadata: dict,
    share: slice = slice(None),
) -> dict[str, list[float]]:
    """Write ``path`` (candidates_schema rows, one row group per user block) for the users of
    ``share`` (a rank's part under torchrun; it starts at a block boundary) and return, for an
    approximate index, each block's recall@K times its users, per ranking (empty when exact).
    ``item_vectors``: the model's catalogue_vectors, which ``indexes`` hold."""
    columns = ranking_columns(model)
    longest_excluded = int(users.excluded.lengths().max(initial=0))
    if indexes.engine == "faiss-gpu" and config.k + longest_excluded > GPU_MAX_K:
        raise ValueError(
            f"score.k ({config.k}) + longest history ({longest_excluded}) exceeds the FAISS GPU limit of {GPU_MAX_K} results "
            "per query: lower score.k or set score.device: cpu"
        )
    recall_hits: dict[str, list[float]] = {name: [] for name in columns} if indexes.exact is not None else {}
    first, last, _ = share.indices(len(users))
    progress = Progress(f"score {users.split}", total=last - first, unit="users")
    with parquet_writer(path, candidates_schema(list(columns)), metadata) as writer:
        for start in range(first, last, config.user_block_size):
            block = slice(start, min(start + config.user_block_size, last))
            excluded = users.excluded.rows(block)
            vectors = user_matrix(model, users.histories.rows(block), max_len, item_vectors)
            rows = {"user_idx": pa.array(users.user_idx[block], pa.int32())}
            for name, (cols, factor) in columns.items():
                queries = vectors[:, cols] * np.float32(factor)
                items, scores = search_whole_ties(indexes.searched[name], queries, excluded, config.k)
                if indexes.exact is not None:
                    exact_items, _ = search_whole_ties(indexes.exact[name], queries, excluded, config.k)
                    recall_hits[name].append(recall_against(items, exact_items) * len(items))
                items_col, scores_col = candidate_columns(name)
                rows[items_col], rows[scores_col] = _ragged(items, scores)
            writer.write_table(pa.table(rows, schema=writer.schema))
            progress.update(len(excluded))
    progress.close()
    return recall_hits


def _ragged(items: np.ndarray, scores: np.ndarray) -> tuple[pa.ListArray, pa.ListArray]:
    """Fixed-width search results as list columns, minus the empty slots (item 0) that a
    too-small catalogue or a tie group dropped at the cut leaves."""
    real = items > 0
    offsets = pa.array(np.concatenate([[0], np.cumsum(real.sum(axis=1))]), pa.int32())
    return (
        pa.ListArray.from_arrays(offsets, pa.array(items[real], pa.int32())),
        pa.ListArray.from_arrays(offsets, pa.array(scores[real], pa.float32())),
    )


def merge_parts(parts: list[Path], path: Path, schema: pa.Schema, metadata: dict) -> None:
    """The ranks' part files, in rank order, into ``path``: row group for row group, through
    the same writer, so the file equals the one a single process writes."""
    with parquet_writer(path, schema, metadata) as writer:
        for part in parts:
            part_file = pq.ParquetFile(part)
            for group in range(part_file.num_row_groups):
                writer.write_table(part_file.read_row_group(group))
            part_file.close()


def score_run(
    model: SequentialRecommender,
    max_len: int,
    sequences: pa.Table,
    config: ScoreConfig,
    out_dir: Path,
    provenance: dict,
    exclude_history: ExcludeHistory = "all",
) -> dict:
    """Candidates of every split into ``out_dir``/{valid,test}.parquet, and
    ``out_dir``/scoring.json: the settings and recall figures the evaluation records.

    Under torchrun (a torch.distributed process group is up), each rank encodes the catalogue,
    builds its indexes and scores its rank_share of each split's users into a part file; rank 0
    merges the parts into the one file and writes scoring.json, both equal to a single
    process's."""
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)
    # Every rank takes the threads one process would, though ranks on one machine then share its
    # CPUs: FAISS's scores change in the last bits with its thread count (the BLAS blocking).
    faiss.omp_set_num_threads(available_cpus())
    model.eval()
    item_vectors = catalogue_vectors(model)  # the catalogue's one pass through the item encoder
    indexes = build_indexes(model, item_vectors, config)
    summary = {
        "run": provenance,
        "k": config.k,
        "items": indexes.searched["fused"].ntotal,
        "index": to_dict(config.index),
        "engine": indexes.engine,
        "rankings": list(ranking_columns(model)),
        "exclude_history": exclude_history,
        "max_len": max_len,
        "splits": {},
    }
    schema = candidates_schema(summary["rankings"])
    for split in SPLITS:
        users = split_users(sequences, split, exclude_history)
        metadata = {**provenance, "split": split, **{key: summary[key] for key in ("k", "index", "max_len", "exclude_history")}}
        path = out_dir / f"{split}.parquet"
        if world_size == 1:
            recall_hits = score_split(model, users, max_len, item_vectors, indexes, config, path, metadata)
        else:
            parts = [out_dir / f".{split}.part{r}.parquet" for r in range(world_size)]
            share = rank_share(len(users), config.user_block_size, rank, world_size)
            gathered: list = [None] * world_size
            # all_gather_object also waits for every rank: each part is complete after it.
            dist.all_gather_object(gathered, score_split(model, users, max_len, item_vectors, indexes, config, parts[rank], metadata, share))
            recall_hits = {name: [hits for part in gathered for hits in part[name]] for name in gathered[0]}
            if rank == 0:
                merge_parts(parts, path, schema, metadata)
        if rank == 0:  # the parts, and any left by a killed torchrun, would end up in DVC's output
            for part in out_dir.glob(f".{split}.part*.parquet"):
                part.unlink()
        measured = {"users": len(users), "longest_history": int(users.histories.lengths().max(initial=0))}
        if recall_hits:  # summed block by block in user order, as one process does
            measured[f"recall@{config.k}"] = {name: sum(hits) / max(len(users), 1) for name, hits in recall_hits.items()}
        summary["splits"][split] = measured
    if rank == 0:
        write_json(summary, out_dir / "scoring.json")
    return summary
