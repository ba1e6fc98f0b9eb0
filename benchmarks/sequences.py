"""Sequence data path at scale: `split_users` (both splits) and `load_sequences` on a synthetic
sequences table of --users users (default 1,000,000, the issue-9 L size).

    python benchmarks/sequences.py [--users 1000000] [--items 100000] [--rounds 3]
                                   [--baseline-worktree PATH] [--out benchmarks/results/sequences.json]

The table has the ingest layout (pipeline/schema.py SEQUENCES): 3-13 training items per user
(ingest keeps a user's last 15 interactions, minus valid and test), uniform random items; the
timings do not depend on which items. Each round measures every tree in a fresh process
(its own imports and peak RSS), the trees taking turns, so a change in the machine's load falls
on all of them; figures are medians over the rounds. --baseline-worktree PATH measures another
commit's code (`git archive COMMIT | tar -x -C PATH`) on the same table: the ratio baseline /
this tree is reported, and whether both computed the same arrays (a digest of every output).
The load average is recorded at the start and the end.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIGURES = ("split_users_s", "load_sequences_s")


def measure(code: Path, folder: Path, max_len: int) -> dict:
    """Seconds of split_users (valid + test, on a table already read) and of load_sequences
    (reading included), with the pipeline of ``code``; a digest of what they returned."""
    sys.path.insert(0, str(code))
    import hashlib
    import resource
    import time

    import numpy as np
    import pyarrow.parquet as pq

    from pipeline.sequences import left_pad, split_users
    from pipeline.training.data import load_sequences

    table = pq.read_table(folder / "sequences.parquet")
    start = time.perf_counter()
    splits = [split_users(table, split) for split in ("valid", "test")]
    split_s = time.perf_counter() - start
    start = time.perf_counter()
    data = load_sequences(folder / "sequences.parquet", folder / "popularity.parquet", max_len)
    load_s = time.perf_counter() - start
    digest = hashlib.sha256()
    for users in splits:  # the model inputs and targets, whatever form the histories take
        digest.update(left_pad(users.histories, max_len).numpy().tobytes())
        digest.update(np.ascontiguousarray(users.targets).tobytes())
    for tensor in (data.train, data.valid.inputs, data.valid.excluded, data.test.inputs, data.test.excluded, data.test.targets):
        digest.update(tensor.numpy().tobytes())
    return {
        "split_users_s": round(split_s, 3),
        "load_sequences_s": round(load_s, 3),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "digest": digest.hexdigest(),
    }


def in_fresh_process(code: Path, folder: Path, max_len: int) -> dict:
    command = [sys.executable, __file__, "--measure", str(code), "--folder", str(folder), "--max-len", str(max_len)]
    done = subprocess.run(command, cwd=code, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"measuring {code} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def write_table(folder: Path, users: int, items: int, seed: int) -> None:
    """sequences.parquet and popularity.parquet of the synthetic catalogue, built with numpy."""
    sys.path.insert(0, str(ROOT))
    import numpy as np
    import pyarrow as pa

    from pipeline import schema
    from pipeline.io import write_table as write

    rng = np.random.default_rng(seed)
    lengths = rng.integers(3, 14, size=users)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    values = rng.integers(1, items + 1, size=int(offsets[-1]), dtype=np.int32)
    table = pa.table(
        {
            "user_idx": np.arange(users, dtype=np.int32),
            "user_key": pa.array(np.char.add("u", np.arange(users).astype(str))),
            "train_items": pa.ListArray.from_arrays(pa.array(offsets), pa.array(values)),
            "valid_item": rng.integers(1, items + 1, size=users, dtype=np.int32),
            "test_item": rng.integers(1, items + 1, size=users, dtype=np.int32),
        }
    )
    write(table, folder / "sequences.parquet", schema.SEQUENCES)
    counts = np.bincount(values, minlength=items + 1)[1:].astype(np.int64)
    write(pa.table({"item_idx": np.arange(1, items + 1, dtype=np.int32), "train_count": counts}), folder / "popularity.parquet", schema.POPULARITY)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=1_000_000)
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--max-len", type=int, default=12)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--baseline-worktree", type=Path)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/sequences.json")
    parser.add_argument("--measure", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, args.folder, args.max_len)))
        return

    trees = {"this": ROOT} | ({"baseline": args.baseline_worktree.resolve()} if args.baseline_worktree else {})
    result = {"users": args.users, "items": args.items, "max_len": args.max_len, "rounds": args.rounds, "load_average_start": os.getloadavg()}
    with tempfile.TemporaryDirectory(prefix="sequences-bench-") as tmp:
        write_table(Path(tmp), args.users, args.items, args.seed)
        runs: dict[str, list[dict]] = {name: [] for name in trees}
        for round_ in range(args.rounds):
            for name, code in trees.items():
                runs[name].append(in_fresh_process(code, Path(tmp), args.max_len))
                print(f"round {round_ + 1} {name}: {runs[name][-1]}", file=sys.stderr)
    for name, measured in runs.items():
        result[name] = {figure: statistics.median(r[figure] for r in measured) for figure in FIGURES}
        result[name] |= {"runs": measured, "peak_rss_mb": max(r["peak_rss_mb"] for r in measured)}
    if "baseline" in trees:
        result["baseline_over_this"] = {figure: round(result["baseline"][figure] / result["this"][figure], 1) for figure in FIGURES}
        result["same_outputs"] = {r["digest"] for name in trees for r in runs[name]} == {runs["this"][0]["digest"]}
    result["load_average_end"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({key: value for key, value in result.items() if key not in trees} | {name: {f: result[name][f] for f in FIGURES} for name in trees}, indent=2))


if __name__ == "__main__":
    main()
