"""The DAG's stages on a synthetic catalogue of a given size: wall time, peak RSS and output bytes.

    python benchmarks/scale.py --sizes S M L                 # this checkout's code
    python benchmarks/scale.py --sizes S M --code /tmp/base --label base   # another checkout's, to compare
    python benchmarks/scale.py --sizes L --stages train score evaluate --train-steps 300 --score-users 20000
    python benchmarks/scale.py --sizes L --stages ingest text_features image_features train --instant-features --train-steps 3

For each size, the catalogue of `benchmarks/synthetic.py` (written once into --data/SIZE, not
timed) is run through each stage of --stages in order (ingest, text_features, image_features,
train, score, evaluate), each as its own process (`stages/*.py` of --code, in a work folder
--work/LABEL/SIZE that holds the params.yaml sections it reads and its outputs), and its wall
time, peak resident memory (the process's maximum RSS from `wait4`) and the bytes of its outputs
are recorded in --out (benchmarks/results/scale.json; a rerun replaces the same label, size and
stage), with the machine's load average at the start. A child's maximum RSS includes its
parent's peak (Linux carries it over fork and exec), so this process allocates nothing itself:
the catalogues, encoders and user prefixes are written by helper processes, and each record
gives this process's own peak (`parent_peak_rss_gb`, the floor under `peak_rss_gb`). --plot draws time and memory against the
number of interactions for every label and stage found there (PNG).

What runs, and where it is not the real thing (each record says so in `note`):
- the feature stages use tiny randomly initialised encoders of the default output shapes
  (written once to --data/encoders, not timed): text 30 tokens x 384 from a 1-layer BERT of width
  384 with MiniLM's tokenizer; image 50 tokens x 1280 at 224 px from timm's mobilenetv2_035 (the
  smallest timm model with 1280 features; ~9x cheaper than EfficientNet-Lite0). Their times are
  not the real encoders'; the shapes, the data path and the memory are. Feature stores are
  emptied first: every item is encoded. With --instant-features they run the extraction with an
  instant encoder instead (benchmarks/instant_features.py: random tokens of the default shapes),
  which measures what the store itself costs to write (and, for train, to read back).
- train runs the default `train` section with epochs 1: one whole epoch, its validation, the final
  valid/test evaluation (a checkpoint left from a previous run is removed first). With
  --train-steps N it runs benchmarks/scale_train.py instead: the same set-up and N real steps and
  one validation, and the record adds `estimated_wall_s`, the measured time plus the epoch's
  remaining steps at the median step time plus two more validations (the final valid and test).
- score and evaluate run the default `score` and `evaluate` sections. With --score-users N they
  run on the first N users only (a work folder of their own whose sequences.parquet is that
  prefix), and the record adds `estimated_wall_s`, the time scaled linearly to all users (the
  fixed part, the catalogue's item vectors and index, scaled too: an over-estimate); their peak
  RSS is then that of N users.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import resource
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT))
import synthetic  # noqa: E402  (benchmarks/synthetic.py)


RUN = "odmt-s1"  # the run trained, scored and evaluated: the default variant and seed
TINY_IMAGE_MODEL = "mobilenetv2_035"  # timm's smallest with 1280 features (7 x 7 cells at 224 px)


@dataclass(frozen=True)
class Inputs:
    """What the stages' params point at."""

    catalogue: Path  # the synthetic catalogue (generic layout)
    encoders: Path  # the tiny encoders (write_encoders)
    code: Path  # the checkout whose params.yaml gives the default train, score and evaluate sections


@dataclass(frozen=True)
class Stage:
    name: str
    script: str  # relative to the code checkout
    params: Callable[[Inputs], dict]  # the params sections the stage reads
    outputs: tuple[str, ...]  # relative to the work folder
    args: tuple[str, ...] = ()
    fresh: tuple[str, ...] = ()  # removed first, so that the stage does all its work (caches, checkpoint)


def ingest_params(inputs: Inputs) -> dict:
    generic = {"text_columns": ["description"], "image_column": "image", "image_dir": "images"}
    return {"ingest": {"adapter": "generic", "path": str(inputs.catalogue), "generic": generic}}


def text_params(inputs: Inputs) -> dict:
    return {"text_features": {"model": str(inputs.encoders / "text")}}  # default max_tokens: 30


def image_params(inputs: Inputs) -> dict:
    # default size 224: 1 pooled + 7 x 7 tokens; 2 decoding workers, as many as the machine's cores
    return {"image_features": {"model": TINY_IMAGE_MODEL, "weights": str(inputs.encoders / f"{TINY_IMAGE_MODEL}.pth")}}


def default_sections(code: Path, *names: str) -> dict:
    params = yaml.safe_load((code / "params.yaml").read_text())
    return {name: params[name] for name in names}


def train_params(inputs: Inputs) -> dict:
    sections = default_sections(inputs.code, "train", "evaluate")
    sections["train"]["epochs"] = 1
    return sections


def score_params(inputs: Inputs) -> dict:
    return default_sections(inputs.code, "score", "evaluate", "train")  # train: the feature files' paths


def evaluate_params(inputs: Inputs) -> dict:
    return default_sections(inputs.code, "evaluate")


STAGES = {
    "ingest": Stage(
        "ingest",
        "stages/ingest.py",
        ingest_params,
        tuple(f"data/ingest/{name}.parquet" for name in ("items", "images", "interactions", "sequences", "popularity")),
    ),
    # the stores (and, in checkouts before them, the single file and its cache)
    "text_features": Stage("text_features", "stages/text_features.py", text_params,
                           ("data/features/text", "data/features/text.parquet", "data/features/cache/text"),
                           fresh=("data/features/text", "data/features/text.parquet", "data/features/cache/text")),
    "image_features": Stage("image_features", "stages/image_features.py", image_params,
                            ("data/features/image", "data/features/image.parquet", "data/features/cache/image"),
                            fresh=("data/features/image", "data/features/image.parquet", "data/features/cache/image")),
    "train": Stage("train", "stages/train.py", train_params, (f"models/{RUN}/model.pt",), ("--variant", "odmt", "--seed", "1"),
                   fresh=(f"models/{RUN}", f"logs/{RUN}")),
    "score": Stage("score", "stages/score.py", score_params, (f"data/candidates/{RUN}",), ("--run", RUN),
                   fresh=(f"data/candidates/{RUN}",)),
    "evaluate": Stage("evaluate", "stages/evaluate.py", evaluate_params, (f"metrics/{RUN}.json",), ("--run", RUN)),
}
NOTES = {
    "text_features": "tiny random encoder of the default shape (30 tokens x 384): 1-layer BERT of width 384, MiniLM's tokenizer",
    "image_features": f"tiny random encoder of the default shape (50 tokens x 1280 at 224 px): timm {TINY_IMAGE_MODEL}",
    "train": "the default train section, epochs 1 (one whole epoch)",
}


def write_encoders(folder: Path) -> None:
    """The tiny random encoders of the default output shapes (once; seeded, so the same each time).
    Run through in_child: torch and transformers stay out of this process."""
    import timm
    import torch
    import transformers

    from pipeline.features.text import TextFeaturesConfig, resolve_model

    if (folder / f"{TINY_IMAGE_MODEL}.pth").exists():
        return
    source, _ = resolve_model(TextFeaturesConfig().model)
    transformers.AutoTokenizer.from_pretrained(source, local_files_only=True).save_pretrained(folder / "text")
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=transformers.AutoConfig.from_pretrained(source).vocab_size, hidden_size=384,
                                     num_hidden_layers=1, num_attention_heads=6, intermediate_size=384)
    transformers.BertModel(config).save_pretrained(folder / "text")
    torch.save(timm.create_model(TINY_IMAGE_MODEL).state_dict(), folder / f"{TINY_IMAGE_MODEL}.pth")


def catalogue_counts(catalogue: Path) -> dict:
    """Users, items and interactions of a synthetic catalogue (from its files)."""
    with (catalogue / "interactions.csv").open("rb") as f:
        interactions = sum(1 for _ in f) - 1
    with (catalogue / "items.csv").open("rb") as f:
        items = sum(1 for _ in f) - 1
    return {"items": items, "interactions": interactions}


def run_stage(stage: Stage, code: Path, work: Path, inputs: Inputs, command: list[str] | None = None) -> dict:
    """Run one stage as a child process in `work`; its wall time, peak RSS (wait4) and output
    bytes (and its last stdout line, when it prints one: scale_train.py's JSON). `command`
    replaces the stage's script (python ... --params params.yaml is kept)."""
    work.mkdir(parents=True, exist_ok=True)
    for path in map(work.joinpath, stage.fresh):
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
    (work / "params.yaml").write_text(yaml.safe_dump(stage.params(inputs), sort_keys=False))
    log_path = work / f"{stage.name}.log"
    command = command or [str(code / stage.script), *stage.args]
    start = time.perf_counter()
    with log_path.open("w") as log, (work / f"{stage.name}.out").open("w") as out:
        proc = subprocess.Popen([sys.executable, *command, "--params", "params.yaml"], cwd=work, stdout=out, stderr=log)
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{stage.name} failed in {work} (see {log_path}):\n" + log_path.read_text()[-3000:])
    printed = (work / f"{stage.name}.out").read_text().strip().splitlines()
    return {
        "wall_s": round(wall, 1),
        "peak_rss_gb": round(usage.ru_maxrss / 2**20, 2),  # ru_maxrss is in KiB on Linux
        "output_bytes": sum(output_bytes(work / out) for out in stage.outputs),
        **(json.loads(printed[-1]) if printed and printed[-1].startswith("{") else {}),
    }


def output_bytes(path: Path) -> int:
    if not path.exists():
        return 0
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else path.stat().st_size


def fixed_steps_train(code: Path, work: Path, inputs: Inputs, steps: int) -> dict:
    """The train stage's set-up, `steps` steps and one validation (scale_train.py), and the
    stage's time estimated from them."""
    script = code / "benchmarks/scale_train.py"
    result = run_stage(STAGES["train"], code, work, inputs, [str(script), "--steps", str(steps)])
    remaining = result["steps_per_epoch"] - result["steps_run"]
    result["estimated_wall_s"] = round(result["wall_s"] + remaining * result["median_step_s"] + 2 * result["validation_s"], 1)
    result["note"] = (f"extrapolated: the default train section's set-up, {result['steps_run']} of the epoch's "
                      f"{result['steps_per_epoch']} steps and one validation were run (benchmarks/scale_train.py); "
                      "estimated_wall_s adds the remaining steps at the median step time and the final valid and test "
                      "validations (checkpoint and model.pt writes not included)")
    return result


def user_prefix(work: Path, users: int) -> Path:
    """A work folder for score and evaluate on the first `users` users of `work`'s data: its
    sequences.parquet is that prefix; models and features are links to `work`'s."""
    prefix = work / f"first-{users}-users"
    (prefix / "data/ingest").mkdir(parents=True, exist_ok=True)
    in_child(write_prefix, work / "data/ingest/sequences.parquet", prefix / "data/ingest/sequences.parquet", users)
    for link, target in (("models", work / "models"), ("data/features", work / "data/features")):
        if not (prefix / link).exists():
            (prefix / link).symlink_to(target.resolve(), target_is_directory=True)
    return prefix


def write_prefix(source: Path, out: Path, users: int) -> None:
    table = pq.read_table(source).sort_by("user_idx")
    pq.write_table(table.slice(0, users), out)


def in_child(function: Callable, *args) -> None:
    """function(*args) in a fresh process. Linux carries a process's peak RSS over fork and exec
    into its children's ru_maxrss, so what this process allocated (torch for the encoders, a
    catalogue's arrays) would become every later stage's floor: it allocates nothing itself."""
    process = multiprocessing.get_context("spawn").Process(target=function, args=args)
    process.start()
    process.join()
    if process.exitcode != 0:
        raise SystemExit(f"{function.__name__}{args} failed (exit code {process.exitcode})")


def prefix_run(stage: Stage, code: Path, work: Path, inputs: Inputs, users: int, total_users: int) -> dict:
    """A score or evaluate stage on the first `users` users, its time scaled to all users."""
    result = run_stage(stage, code, user_prefix(work, users), inputs)
    result["estimated_wall_s"] = round(result["wall_s"] * total_users / users, 1)
    result["note"] = (f"extrapolated: run on the first {users} of {total_users} users; estimated_wall_s scales the time "
                      "linearly in users (the fixed part too: an over-estimate); peak_rss_gb and output_bytes are the "
                      f"{users} users'")
    return result


def parent_peak_rss_gb() -> float:
    """This process's peak RSS: the floor of every stage's peak_rss_gb (see in_child)."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)


def git_commit(code: Path) -> str:
    result = subprocess.run(["git", "-C", str(code), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return result.stdout.strip() or "unknown"


def instant_features(stage: Stage, code: Path, work: Path, inputs: Inputs) -> dict:
    """A feature stage's extraction under `code` with an instant encoder (instant_features.py):
    what the store costs at this size, without an encoder's time."""
    modality = stage.name.removesuffix("_features")
    script = ROOT / "benchmarks/instant_features.py"
    result = run_stage(stage, code, work, inputs, [str(script), "--modality", modality, "--code", str(code)])
    result["note"] = (f"instant encoder (benchmarks/instant_features.py): random float16 tokens of the default shape, "
                      f"no encoding; the extraction's own reading, keys, writes and index of {code.name}")
    return result


def measure(sizes: list[str], stages: list[str], code: Path, label: str, data: Path, work: Path,
            train_steps: int | None = None, score_users: int | None = None, instant: bool = False) -> list[dict]:
    records = []
    encoders = data / "encoders"
    if {"text_features", "image_features"} & set(stages) and not instant:
        in_child(write_encoders, encoders)
    for size in sizes:
        catalogue = data / size
        if not (catalogue / "items.csv").exists():
            items, users = synthetic.SIZES[size]
            print(f"writing the {size} catalogue ({items} items, {users} users) to {catalogue} ...", flush=True)
            in_child(synthetic.write, catalogue, items, users)
        counts = {"users": synthetic.SIZES[size][1], **catalogue_counts(catalogue)}
        inputs = Inputs(catalogue, encoders, code)
        folder = work / label / size
        for name in stages:
            load = os.getloadavg()[0]
            if name == "train" and train_steps:
                result = fixed_steps_train(code, folder, inputs, train_steps)
            elif name.endswith("_features") and instant:
                result = instant_features(STAGES[name], code, folder, inputs)
            elif name in ("score", "evaluate") and score_users and score_users < counts["users"]:
                result = prefix_run(STAGES[name], code, folder, inputs, score_users, counts["users"])
            else:
                result = run_stage(STAGES[name], code, folder, inputs)
                if name in NOTES:
                    result["note"] = NOTES[name]
            record = {"label": label, "commit": git_commit(code), "size": size, **counts, "stage": name, **result,
                      "parent_peak_rss_gb": parent_peak_rss_gb(), "load_avg_1m": round(load, 2), "cpus": os.cpu_count()}
            print(json.dumps(record), flush=True)
            records.append(record)
    return records


def merge(out: Path, records: list[dict]) -> list[dict]:
    """The records of `out` with the new ones replacing those of the same label, size and stage."""
    key = lambda r: (r["label"], r["size"], r["stage"])  # noqa: E731
    old = json.loads(out.read_text())["runs"] if out.exists() else []
    new_keys = {key(r) for r in records}
    merged = [r for r in old if key(r) not in new_keys] + records
    return sorted(merged, key=lambda r: (r["stage"], r["label"], r["interactions"]))


def plot(records: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (time_ax, rss_ax) = plt.subplots(1, 2, figsize=(10, 4))
    for label, stage in sorted({(r["label"], r["stage"]) for r in records}):
        runs = [r for r in records if r["label"] == label and r["stage"] == stage]
        x = [r["interactions"] / 1e6 for r in runs]
        # an extrapolated stage (a prefix of the users, a fixed number of steps) at its estimate
        time_ax.plot(x, [r.get("estimated_wall_s", r["wall_s"]) for r in runs], "o-", label=f"{stage} ({label})")
        rss_ax.plot(x, [r["peak_rss_gb"] for r in runs], "o-", label=f"{stage} ({label})")
        for r, xi in zip(runs, x):
            rss_ax.annotate(r["size"], (xi, r["peak_rss_gb"]), textcoords="offset points", xytext=(4, 4), fontsize=8)
    for ax, ylabel in ((time_ax, "wall time (s)"), (rss_ax, "peak RSS (GB)")):
        ax.set_xlabel("interactions (millions)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("benchmarks/scale.py: stages on synthetic catalogues (S, M, L)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", choices=sorted(synthetic.SIZES), default=["S"])
    parser.add_argument("--stages", nargs="+", choices=list(STAGES), default=list(STAGES))
    parser.add_argument("--code", type=Path, default=ROOT, help="the checkout whose stages run (default: this one)")
    parser.add_argument("--label", default="current", help="the name of this code in the results (e.g. base, after)")
    parser.add_argument("--data", type=Path, default=Path("/tmp/odmt-scale/catalogues"), help="synthetic catalogues (reused)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/odmt-scale/work"), help="the stages' params and outputs")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/scale.json")
    parser.add_argument("--plot", type=Path, default=ROOT / "benchmarks/results/scale.png")
    parser.add_argument("--train-steps", type=int, help="train: this many steps and an estimate, instead of a whole epoch")
    parser.add_argument("--score-users", type=int, help="score, evaluate: the first this many users and an estimate")
    parser.add_argument("--instant-features", action="store_true",
                        help="feature stages: an instant encoder (instant_features.py), so the store, not an encoder, is measured")
    args = parser.parse_args()
    measured = measure(args.sizes, args.stages, args.code.resolve(), args.label, args.data, args.work, args.train_steps,
                       args.score_users, args.instant_features)
    records = merge(args.out, measured)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    note = ("Each stage run as its own process on a synthetic catalogue (benchmarks/synthetic.py); peak_rss_gb is the "
            "process's maximum RSS (wait4). The feature stages ran tiny randomly initialised encoders of the default "
            "output shapes (their times are not the real encoders'); a record's own note says what else was not the "
            "real stage (a fixed number of training steps, a prefix of the users), and estimated_wall_s is then an "
            "extrapolation.")
    args.out.write_text(json.dumps({"note": note, "runs": records}, indent=2) + "\n")
    plot(records, args.plot)
    print(f"{len(records)} runs in {args.out}; figure {args.plot}")


if __name__ == "__main__":
    main()
