"""Peak memory of building the default model on a large catalogue's feature stores.

    python benchmarks/build_memory.py [--items 8000] [--repeats 3] [--code PATH ...] [--dir DIR]
                                      [--out benchmarks/results/build_memory.json]

Writes (or reuses, in --dir) synthetic text and image feature stores of --items items with the
store's own writer at the default token shapes (text 30 x 384, image 50 x 1280 float16:
151 KB per item; parts of the stages' default chunk sizes), then builds the model of the
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

from pipeline.features.store import write_token_features  # noqa: E402
from pipeline.io import write_json  # noqa: E402

SHAPES = {"text": (30, 384, 2048), "image": (50, 1280, 1024)}  # tokens, dim, part size (params.yaml chunk_size)

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
    """Feature stores of random float16 features of `items` items per modality, written part by part."""
    paths = {}
    for name, (num_tokens, dim, chunk) in SHAPES.items():
        path = paths[name] = folder / f"{name}-{items}"
        if (path / "index.parquet").exists():
            continue
        rng = np.random.default_rng(0)
        meta = {"modality": name, "encoder": "synthetic", "pooled_only": False}
        sizes = [min(chunk, items - start) for start in range(0, items, chunk)]
        write_token_features(path, ((rng.standard_normal((n, num_tokens, dim), dtype=np.float32).astype(np.float16),
                                     np.ones((n, num_tokens), dtype=bool), np.ones(n, dtype=bool)) for n in sizes), meta)
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
        feature_bytes = {name: sum(f.stat().st_size for f in path.iterdir()) for name, path in paths.items()}
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
