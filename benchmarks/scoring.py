"""Scoring throughput: users/s of the score stage's search (FAISS + history exclusion) on CPU.

    python benchmarks/scoring.py [--items 1000000] [--users 1000] [--out benchmarks/results/scoring.json]

1. The embedded size (943 users x 1,330 items, d = 3 x 64): exact search, the default.
2. A synthetic catalogue of --items items (default 1,000,000, d = 3 x 64; 768 MB of float32):
   exact search, then IVF and HNSW at a few settings, each with its build time, users/s and
   recall@K against exact. Items and users are drawn around shared cluster centres, as learned
   embeddings are; on structureless Gaussian noise every ANN index does poorly.
Random data: ranking quality does not depend on the model, only on the vectors' geometry.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import sys
import time
from pathlib import Path

import faiss
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.io import write_json  # noqa: E402
from pipeline.progress import log, setup_logging  # noqa: E402
from pipeline.scoring import IndexConfig, available_cpus, build_index, recall_against, search_unseen  # noqa: E402
from pipeline.sequences import Ragged  # noqa: E402

DIM = 3 * 64
K = 50
HISTORY = 13  # the embedded data's longest test history (15 kept interactions minus the target, minus one)


def clustered(rng: np.random.Generator, centres: np.ndarray, count: int, noise: float, chunk: int = 100_000) -> np.ndarray:
    """``count`` vectors, each a random centre plus Gaussian noise, built in chunks (float32 only)."""
    out = np.empty((count, centres.shape[1]), dtype=np.float32)
    for start in range(0, count, chunk):
        n = min(chunk, count - start)
        out[start : start + n] = centres[rng.integers(0, len(centres), n)]
        out[start : start + n] += noise * rng.standard_normal((n, centres.shape[1]), dtype=np.float32)
    return out


def histories(rng: np.random.Generator, users: int, items: int) -> Ragged:
    rows = [rng.choice(items, size=int(rng.integers(4, HISTORY + 1)), replace=False).astype(np.int32) + 1 for _ in range(users)]
    return Ragged.from_lengths(np.concatenate(rows), np.array([len(r) for r in rows]))


def timed_search(index: faiss.Index, queries: np.ndarray, seen: Ragged, block: int, repeats: int) -> tuple[np.ndarray, float]:
    """Top-K unseen items of every query, searched in blocks as the score stage does; best
    users/s over ``repeats`` runs (the first run also warms caches)."""
    best = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        parts = [search_unseen(index, queries[s : s + block], seen.rows(slice(s, s + block)), K)[0] for s in range(0, len(queries), block)]
        best = max(best, len(queries) / (time.perf_counter() - start))
    return np.concatenate(parts), best


def timed_build(vectors: np.ndarray, config: IndexConfig) -> tuple[faiss.Index, float]:
    start = time.perf_counter()
    index = build_index(vectors, config)
    return index, time.perf_counter() - start


def embedded(rng: np.random.Generator, block: int) -> dict:
    users, items = 943, 1330
    centres = rng.standard_normal((64, DIM), dtype=np.float32)
    item_vectors, user_vectors = clustered(rng, centres, items, 0.5), clustered(rng, centres, users, 0.5)
    index, build_s = timed_build(item_vectors, IndexConfig())
    _, users_per_s = timed_search(index, user_vectors, histories(rng, users, items), block, repeats=5)
    log.info("embedded size, exact: %.0f users/s", users_per_s)
    return {"users": users, "items": items, "dim": DIM, "k": K, "index": "flat", "build_s": round(build_s, 4), "users_per_s": round(users_per_s, 1)}


def large(rng: np.random.Generator, items: int, users: int, block: int, nlist: int, nprobes: list[int], efs: list[int], hnsw_m: int, ef_construction: int) -> dict:
    log.info("building %d x %d synthetic item vectors (%.0f MB)", items, DIM, items * DIM * 4 / 2**20)
    centres = rng.standard_normal((4096, DIM), dtype=np.float32)
    item_vectors, user_vectors = clustered(rng, centres, items, 0.7), clustered(rng, centres, users, 0.7)
    seen = histories(rng, users, items)
    out: dict = {"users": users, "items": items, "dim": DIM, "k": K}

    index, build_s = timed_build(item_vectors, IndexConfig())
    exact, users_per_s = timed_search(index, user_vectors, seen, block, repeats=2)
    del index
    out["flat"] = {"build_s": round(build_s, 2), "users_per_s": round(users_per_s, 1)}
    log.info("%d items, exact: %.0f users/s", items, users_per_s)

    index, build_s = timed_build(item_vectors, IndexConfig(type="ivf", nlist=nlist))
    out["ivf"] = {"nlist": nlist, "build_s": round(build_s, 2), "runs": []}
    for nprobe in nprobes:
        index.nprobe = nprobe
        found, users_per_s = timed_search(index, user_vectors, seen, block, repeats=2)
        out["ivf"]["runs"].append({"nprobe": nprobe, "users_per_s": round(users_per_s, 1), f"recall@{K}": round(recall_against(found, exact), 4)})
        log.info("IVF nlist %d nprobe %d: %.0f users/s, recall@%d %.4f", nlist, nprobe, users_per_s, K, out["ivf"]["runs"][-1][f"recall@{K}"])
    del index

    if efs:
        index, build_s = timed_build(item_vectors, IndexConfig(type="hnsw", hnsw_m=hnsw_m, ef_construction=ef_construction))
        out["hnsw"] = {"hnsw_m": hnsw_m, "ef_construction": ef_construction, "build_s": round(build_s, 2), "runs": []}
        for ef in efs:
            index.hnsw.efSearch = ef
            found, users_per_s = timed_search(index, user_vectors, seen, block, repeats=2)
            out["hnsw"]["runs"].append({"ef_search": ef, "users_per_s": round(users_per_s, 1), f"recall@{K}": round(recall_against(found, exact), 4)})
            log.info("HNSW M %d ef %d: %.0f users/s, recall@%d %.4f", hnsw_m, ef, users_per_s, K, out["hnsw"]["runs"][-1][f"recall@{K}"])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=1_000_000, help="synthetic catalogue size")
    parser.add_argument("--users", type=int, default=1000, help="users searched on the synthetic catalogue")
    parser.add_argument("--block", type=int, default=2048, help="users per search block (score.user_block_size)")
    parser.add_argument("--nlist", type=int, default=1024, help="IVF lists (score's automatic 4 * sqrt(items) trains too long on 2 CPUs)")
    parser.add_argument("--nprobe", type=int, nargs="+", default=[8, 32, 128], help="IVF settings to measure")
    parser.add_argument("--ef-search", type=int, nargs="*", default=[64, 256], help="HNSW settings to measure (none: skip HNSW)")
    parser.add_argument("--hnsw-m", type=int, default=16)
    parser.add_argument("--ef-construction", type=int, default=40)
    parser.add_argument("--out", default="benchmarks/results/scoring.json")
    args = parser.parse_args()
    setup_logging()
    faiss.omp_set_num_threads(available_cpus())
    rng = np.random.default_rng(0)
    load_at_start = round(os.getloadavg()[0], 2)
    result = {
        "machine": {"cpus": available_cpus(), "processor": platform.processor() or platform.machine(), "faiss": faiss.__version__},
        "embedded": embedded(rng, args.block),
        "large": large(rng, args.items, args.users, args.block, args.nlist, args.nprobe, args.ef_search, args.hnsw_m, args.ef_construction),
    }
    write_result(result, load_at_start, args.out)


def write_result(result: dict, load_at_start: float, out: str) -> None:
    """Add this process's peak memory and the load average (start, end) to result["machine"], write it."""
    result["machine"]["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    result["machine"]["load_average_at_start_and_end"] = [load_at_start, round(os.getloadavg()[0], 2)]  # > cpus: shared, slower
    write_json(result, out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
