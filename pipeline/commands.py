"""The params that dvc.yaml writes into stage command lines, checked before any command runs.

`dvc repro` interpolates `${...}` into each stage's `cmd` and hands the line to a shell, before
any code of ours runs: a launcher `touch X; python` or a variant `x; touch X #` would run as
shell code. So every such param is held to a strict form here:

- `text_features.launcher`, `image_features.launcher`, `score.launcher`: `python`, or `torchrun`
  with only the flags of LAUNCHER_FLAGS, each with a plain value (letters, digits, `_.:-`);
- `runs.variant`: names of pipeline.models.variants.VARIANTS; `runs.seed`: non-negative integers;
- `recommend.runs`, `report.showcase_run`: `{variant}-s{seed}` of such a variant and seed.

Where the check runs, so that it comes first: the `check_params` stage of dvc.yaml (every
stage is downstream of it through `ingest`, so `dvc repro` runs it, and stops at its error,
before any command that carries these params), and the first line of `make repro`. The stage
scripts check their own arguments again (`run_name`).

    python -m pipeline.commands [--params params.yaml] [--out FILE]
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Any

from pipeline.config import ConfigError, load_params
from pipeline.models.variants import VARIANTS

LAUNCHER_FLAGS = ("nproc_per_node", "nproc-per-node", "nnodes", "node_rank", "node-rank", "master_addr", "master-addr",
                  "master_port", "master-port", "rdzv_backend", "rdzv-backend", "rdzv_endpoint", "rdzv-endpoint",
                  "rdzv_id", "rdzv-id", "max_restarts", "max-restarts")  # fmt: skip
_FLAG = rf"--(?:{'|'.join(map(re.escape, LAUNCHER_FLAGS))})[= ][A-Za-z0-9_.:-]+|--standalone"
LAUNCHER = re.compile(rf"python|torchrun(?: (?:{_FLAG}))*")
RUN = re.compile(r"(?P<variant>[a-z0-9_]+)-s(?P<seed>[0-9]+)")
LAUNCHERS = ("text_features.launcher", "image_features.launcher", "score.launcher")
CHECKED_FILE = "data/params_check.txt"


def check_launcher(value: Any, key: str) -> str:
    if not isinstance(value, str) or not LAUNCHER.fullmatch(value):
        raise ConfigError(
            f"{key}: {value!r} is not a launcher: `python`, or `torchrun` with "
            f"--nproc_per_node N and other torchrun flags of plain values (no shell syntax)"
        )
    return value


def check_variant(value: Any, key: str) -> str:
    if value not in VARIANTS:
        raise ConfigError(f"{key}: {value!r} is not a variant (known: {', '.join(sorted(VARIANTS))})")
    return value


def check_seed(value: Any, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"{key}: {value!r} is not a seed (an integer >= 0)")
    return value


def check_run(value: Any, key: str) -> str:
    """A run name, {variant}-s{seed}, as the stages take it in `--run`."""
    match = RUN.fullmatch(value) if isinstance(value, str) else None
    if match is None:
        raise ConfigError(f"{key}: {value!r} is not a run name ({{variant}}-s{{seed}}, e.g. odmt-s1)")
    check_variant(match["variant"], key)
    return value


def run_argument(value: str) -> str:
    """argparse type of `--run` (dvc.yaml puts it into command lines; it names folders)."""
    try:
        return check_run(value, "--run")
    except ConfigError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _lookup(params: dict, key: str, path: Path) -> Any:
    value: Any = params
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            raise ConfigError(f"{path}: {key} is missing (dvc.yaml writes it into a stage's command)")
        value = value[part]
    return value


def _items(value: Any, key: str) -> list:
    if not isinstance(value, list) or not value:
        raise ConfigError(f"{key}: expected a non-empty list, got {value!r}")
    return value


def check_params(path: str | Path = "params.yaml") -> None:
    """Raise ConfigError, naming the key, for the first param of `path` that dvc.yaml would put
    into a command line and that does not have its strict form."""
    path = Path(path)
    params = load_params(path)
    for key in LAUNCHERS:
        check_launcher(_lookup(params, key, path), key)
    for i, variant in enumerate(_items(_lookup(params, "runs.variant", path), "runs.variant")):
        check_variant(variant, f"runs.variant[{i}]")
    for i, seed in enumerate(_items(_lookup(params, "runs.seed", path), "runs.seed")):
        check_seed(seed, f"runs.seed[{i}]")
    for i, run in enumerate(_items(_lookup(params, "recommend.runs", path), "recommend.runs")):
        check_run(run, f"recommend.runs[{i}]")
    check_run(_lookup(params, "report.showcase_run", path), "report.showcase_run")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Check the params that dvc.yaml writes into command lines.")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--out", type=Path, help=f"on success, write this file (the check_params stage: {CHECKED_FILE})")
    args = parser.parse_args(argv)
    try:
        check_params(args.params)
    except ConfigError as err:
        print(f"{err}\nNothing was run: fix params.yaml, then rerun.", file=sys.stderr)
        return 1
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        # Always the same bytes: the stages downstream rerun for their own inputs, not for this check.
        args.out.write_text("The params that dvc.yaml writes into commands passed pipeline/commands.py.\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
