"""The feature store's own costs, with an instant encoder so that the encoder is not measured:
write throughput, read time of the tokens a model keeps, and the bytes `dvc push` sends after
+1% items.

    python benchmarks/store.py [--items 2048] [--rounds 3] [--out benchmarks/results/store.json]
    python benchmarks/store.py --baseline-worktree /tmp/base     # side by side with another checkout

Each measurement runs the extraction of a checkout with an instant encoder
(benchmarks/instant_features.py: the loop both feature stages run, keys, parts, index; for
checkouts before the store, its cache parts and the final single file) in a fresh process, on
--items synthetic inputs, at the image stage's default shape (50 tokens x 1280, float16: 128 KB
per item). This checkout runs with `token_compression` none and zstd (the image stage's default).
Reported, median of --rounds, the checkouts taking turns:
- write: items/s and MB/s (token bytes) of one writing process, from the first input read to the
  last file in place;
- read: seconds to load the default model's kept tokens (train.model.image_tokens: 1 of 50) and
  all 50;
- push: after a first `dvc push` of the stage's outputs to a local remote, the extraction is
  rerun on the same items plus 1% new ones, and the bytes the second `dvc push` uploads are
  reported against the outputs' size.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
TOKENS, DIM = 50, 1280  # image_features defaults: pooled + 7 x 7 cells of EfficientNet-Lite0
KEPT = 1  # train.model.image_tokens in params.yaml

# Run under the checkout argv[1]: seconds to load argv[3] kept tokens of the features at argv[2].
READ = r"""
import json, sys, time
sys.path.insert(0, sys.argv[1])
from pipeline.features.store import load_token_features
started = time.perf_counter()
features = load_token_features(sys.argv[2], max_tokens=int(sys.argv[3]))
print(json.dumps({"seconds": time.perf_counter() - started, "shape": list(features.tokens.shape)}))
"""


def run(*command) -> dict:
    proc = subprocess.run([sys.executable, *map(str, command)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def extract(code: Path, out: Path, items: int, compression: str) -> dict:
    """The instant image extraction of `code` (benchmarks/instant_features.py) of `items` inputs into `out`."""
    inputs = out.with_name("images.parquet")
    pq.write_table(pa.table({"item_idx": np.arange(1, items + 1, dtype=np.int32),
                             "image": [f"image {i}".encode() for i in range(items)]}), inputs)
    return run(ROOT / "benchmarks/instant_features.py", "--modality", "image", "--code", code, "--input", inputs, "--out", out,
               "--token-compression", compression)


def outputs(folder: Path) -> list[Path]:
    """What the stage declares as outputs: the store folder, or the old single file and its cache."""
    return [p for p in (folder / "image", folder / "image.cache") if p.exists()]


def tree_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else path.stat().st_size


def write_and_read(code: Path, work: Path, items: int, compression: str) -> dict:
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    written = extract(code, work / "image", items, compression)
    token_mb = items * TOKENS * DIM * 2 / 1e6
    kept, every = (run("-c", READ, code, work / "image", k)["seconds"] for k in (KEPT, TOKENS))
    return {"write_s": written["seconds"], "items_per_s": items / written["seconds"], "mb_per_s": token_mb / written["seconds"],
            "read_kept_s": kept, "read_all_s": every, "bytes": sum(tree_bytes(p) for p in outputs(work)),
            "old_layout": written["old_layout"]}


def push_after_one_percent(code: Path, work: Path, items: int, compression: str) -> dict:
    """Bytes the second `dvc push` uploads after the extraction reruns on +1% items."""
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    dvc = [str(Path(sys.executable).parent / "dvc")]
    git = ["git", "-c", "user.name=b", "-c", "user.email=b@b"]
    for cmd in (git + ["init", "-q"], dvc + ["init", "-q"], dvc + ["remote", "add", "-d", "local", str(work / "remote")]):
        subprocess.run(cmd, cwd=work, check=True, capture_output=True)
    sizes = []
    for n in (items, items + items // 100):
        extract(code, work / "image", n, compression)
        for path in outputs(work):
            subprocess.run(dvc + ["add", "-q", path.name], cwd=work, check=True, capture_output=True)
        before = tree_bytes(work / "remote") if (work / "remote").exists() else 0
        subprocess.run(dvc + ["push", "-q"], cwd=work, check=True, capture_output=True)
        sizes.append((tree_bytes(work / "remote") - before, sum(tree_bytes(p) for p in outputs(work))))
    (_, _), (pushed, total) = sizes
    return {"items": items, "added": items // 100, "pushed_bytes": pushed, "output_bytes": total, "pushed_share": pushed / total}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=2048)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--baseline-worktree", type=Path, help="a checkout before the store, measured in turns with this one")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "odmt-store-bench")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/store.json")
    args = parser.parse_args()
    # this checkout with each token codec of interest (zstd: the image stage's default); a
    # baseline before the store always wrote zstd (the flag is ignored there)
    codes = {f"this-{c}": (ROOT, c) for c in ("none", "zstd")}
    codes |= {"baseline": (args.baseline_worktree.resolve(), "zstd")} if args.baseline_worktree else {}
    load = os.getloadavg()
    rounds: dict[str, list[dict]] = {name: [] for name in codes}
    for r in range(args.rounds):
        for name, (code, compression) in codes.items():
            rounds[name].append(write_and_read(code, args.work / name, args.items, compression))
            print(name, json.dumps(rounds[name][-1]), flush=True)
    results = {}
    for name, (code, compression) in codes.items():
        runs = rounds[name]
        results[name] = {key: statistics.median(run[key] for run in runs) for key in runs[0] if key != "old_layout"}
        results[name] |= {"code": str(code), "token_compression": compression, "old_layout": runs[0]["old_layout"], "runs": runs,
                          "push": push_after_one_percent(code, args.work / f"{name}-push", args.items, compression)}
        print(name, json.dumps({k: v for k, v in results[name].items() if k != "runs"}), flush=True)
    report = {"items": args.items, "tokens": TOKENS, "dim": DIM, "kept": KEPT, "rounds": args.rounds,
              "load_average_before": load, "load_average_after": os.getloadavg(), "cpu": platform.processor() or platform.machine(),
              "cpus": os.cpu_count(), "results": results}
    if "baseline" in results:
        base = results["baseline"]
        report["ratios"] = {name: {"write_items_per_s": this["items_per_s"] / base["items_per_s"],
                                   "read_kept": base["read_kept_s"] / this["read_kept_s"],
                                   "read_all": base["read_all_s"] / this["read_all_s"]}
                            for name, this in results.items() if name != "baseline"}
        print("ratios against the baseline:", json.dumps(report["ratios"]))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
