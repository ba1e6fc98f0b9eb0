"""Peak memory of building the default model on a large catalogue's feature files.

    python benchmarks/build_memory.py [--items 8000] [--repeats 3] [--code PATH ...] [--dir DIR]
                                      [--out benchmarks/results/build_memory.json]

Writes (or reuses, in --dir) synthetic text and image feature files of --items items with the
feature stages' own writer at the default token shapes (text 30 x 384, image 50 x 1280 float16:
151 KB per item; row groups of the stages' default chunk sizes), then builds the model of the
`train` section of params.yaml (`build_model`: feature loading and the ID initialisation) in a
fresh process per build, under the code of each --code checkout (default: this one; name
another checkout, e.g. the main branch's, to compare side by side). Reports the median peak RSS
and wall time of --repeats builds per checkout, interleaved so that the machine's load falls
alike on each, and the load average.
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

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.features import token_rows  # noqa: E402
from pipeline.io import parquet_writer, write_json  # noqa: E402
from pipeline.schema import token_features  # noqa: E402

SHAPES = {"text": (30, 384, 2048), "image": (50, 1280, 1024)}  # tokens, dim, row group (params.yaml chunk_size)

# Run in a fresh interpreter under the checkout given as argv[1]: the build's own peak RSS.
BUILD = """
import dataclasses, json, resource, sys, time
sys.path.insert(0, sys.argv[1])
from pipeline.config import load_section
from pipeline.training import TrainConfig, build_model
cfg = load_section(TrainConfig, "train", sys.argv[2])
cfg = dataclasses.replace(cfg, text_features=sys.argv[3], image_features=sys.argv[4])
started = time.perf_counter()
build_model(cfg, int(sys.argv[5]), ("id", "text", "image"))
print(json.dumps({"seconds": time.perf_counter() - started, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def write_features(folder: Path, items: int) -> dict[str, Path]:
    """Random float16 features of `items` items per modality, written chunk by chunk."""
    paths = {}
    for name, (num_tokens, dim, chunk) in SHAPES.items():
        path = paths[name] = folder / f"{name}-{items}.parquet"
        if path.exists():
            continue
        rng = np.random.default_rng(0)
        meta = {"modality": name, "encoder": "synthetic", "num_tokens": num_tokens, "dim": dim, "pooled_only": False}
        with parquet_writer(path, token_features(num_tokens, dim), meta) as writer:
            for start in range(1, items + 1, chunk):
                n = min(chunk, items + 1 - start)
                tokens = rng.standard_normal((n, num_tokens, dim), dtype=np.float32).astype(np.float16)
                mask = np.ones((n, num_tokens), dtype=bool)
                writer.write_table(token_rows(np.arange(start, start + n, dtype=np.int32), tokens, mask, np.ones(n, dtype=bool)))
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=8000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--code", nargs="+", default=[str(ROOT)], help="checkouts whose pipeline/ builds the model")
    parser.add_argument("--params", default=str(ROOT / "params.yaml"))
    parser.add_argument("--dir", help="folder for the feature files (kept and reused); default: a temporary one")
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/build_memory.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.dir or tmp)
        folder.mkdir(parents=True, exist_ok=True)
        paths = write_features(folder, args.items)
        runs: dict[str, list[dict]] = {code: [] for code in args.code}
        for _ in range(args.repeats):
            for code in args.code:
                command = [sys.executable, "-c", BUILD, code, args.params, str(paths["text"]), str(paths["image"]), str(args.items)]
                runs[code].append(json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout.splitlines()[-1]))
        feature_bytes = {name: path.stat().st_size for name, path in paths.items()}
    results = {
        code: {key: statistics.median(r[key] for r in rs) for key in ("peak_rss_mb", "seconds")} | {"runs": rs} for code, rs in runs.items()
    }
    report = {"items": args.items, "feature_bytes": feature_bytes, "load_average": os.getloadavg(), "results": results}
    write_json(report, args.out)
    for code, r in results.items():
        print(f"{code}: median of {args.repeats} builds of {args.items} items: peak RSS {r['peak_rss_mb']:7.0f} MB, {r['seconds']:6.1f} s")
    print(f"load average {report['load_average']}; wrote {args.out}")


if __name__ == "__main__":
    main()
