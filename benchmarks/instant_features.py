"""A feature stage with an instant encoder: the extraction of a checkout, without the encoder's time.

    python benchmarks/instant_features.py --modality image [--code CHECKOUT] [--input data/ingest/images.parquet]
                                          [--out data/features/image] [--chunk-size 1024] [--batch-size 256]

Runs `pipeline.features.extraction.extract` of --code (default: this checkout), the loop both feature stages
run (keys, the store's parts and index; in checkouts before the store, its cache parts and the
final single file), on the stage's real input file, with an encoder that hands back random
float16 tokens of the stage's default shape at once (text 30 x 384, image 50 x 1280), from a pool
of distinct batches so that nothing compresses better than real features would. Prints one JSON
line: the seconds from the first input read to the last file in place, and the items/s and
token MB/s of this one writing process. benchmarks/store.py and
benchmarks/scale.py --instant-features use it to measure what the feature store costs.
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys
import time
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {"text": (30, 384, ["title", "text"]), "image": (50, 1280, ["image"])}  # the stages' default outputs
COMPRESSION = {"text": "none", "image": "zstd"}  # the stages' default token_compression


class InstantEncoder:
    """The encoder protocol of pipeline/features (contents, metadata, encode_window) at no cost."""

    absent, name = "absent", "instant"

    def __init__(self, modality: str, batch_size: int):
        import torch

        self.modality, (self.num_tokens, self.dim, _) = modality, SHAPES[modality]
        self.device, self.timings = torch.device("cpu"), Counter()
        rng = np.random.default_rng(0)
        self.pool = [rng.standard_normal((batch_size, self.num_tokens, self.dim), dtype=np.float32).astype(np.float16)
                     for _ in range(4)]

    def contents(self, chunk) -> list[bytes | None]:
        if self.modality == "image":
            return chunk["image"].to_pylist()
        return [f"{title}\n{text}".encode() for title, text in zip(chunk["title"].to_pylist(), chunk["text"].to_pylist())]

    def metadata(self) -> dict:
        return {"modality": self.modality, "encoder": "instant", "weights": {}, "num_tokens": self.num_tokens, "dim": self.dim,
                "preprocessing": {}, "pooled_only": False, "dtype": "float16", "device": "cpu"}

    def encode_window(self, contents, item_numbers, batch_size: int, batches: range):
        for b in batches:
            index = np.arange(b * batch_size, min((b + 1) * batch_size, len(contents)))
            yield (index, self.pool[b % len(self.pool)][: len(index)], np.ones((len(index), self.num_tokens), dtype=bool),
                   np.ones(len(index), dtype=bool), ["instant"] * len(index))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modality", choices=sorted(SHAPES), required=True)
    parser.add_argument("--code", type=Path, default=ROOT, help="the checkout whose extraction runs")
    parser.add_argument("--input", type=Path, help="default: data/ingest/items.parquet (text) or images.parquet (image)")
    parser.add_argument("--out", type=Path, help="default: the checkout's own output, data/features/<modality>[.parquet]")
    parser.add_argument("--chunk-size", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--token-compression", choices=["none", "lz4", "zstd"], help="default: the stage's default")
    parser.add_argument("--params", help="ignored (scale.py passes every stage its params file)")
    args = parser.parse_args()
    sys.path.insert(0, str(args.code.resolve()))
    try:
        from pipeline.features.extraction import extract
    except ImportError:  # checkouts before the store kept the loop in the package's __init__.py
        from pipeline.features import extract

    # before the store, a feature stage wrote one file and a cache folder of its own (both outputs)
    old_layout = "cache_dir" in inspect.signature(extract).parameters
    out = args.out or Path(f"data/features/{args.modality}" + (".parquet" if old_layout else ""))
    kwargs = {"cache_dir": Path(f"{out}.cache" if args.out else f"data/features/cache/{args.modality}")} if old_layout else {}
    source = args.input or Path("data/ingest/items.parquet" if args.modality == "text" else "data/ingest/images.parquet")
    compression = args.token_compression or COMPRESSION[args.modality]
    config = SimpleNamespace(chunk_size=args.chunk_size, batch_size=args.batch_size, token_compression=compression)
    encoder = InstantEncoder(args.modality, args.batch_size)
    started = time.perf_counter()
    summary = extract(f"instant {args.modality}", encoder, source, SHAPES[args.modality][2], config, out, **kwargs)
    seconds = time.perf_counter() - started
    token_mb = summary["items"] * encoder.num_tokens * encoder.dim * 2 / 1e6
    print(json.dumps({"seconds": seconds, "items_per_s": summary["items"] / seconds, "mb_per_s": token_mb / seconds,
                      "old_layout": old_layout, "token_compression": "zstd (single file and cache)" if old_layout else compression}))


if __name__ == "__main__":
    main()
