"""Shared start-up of every stage script: import path, logging, `--params` argument."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline.commands import run_argument  # noqa: E402
from pipeline.progress import setup_logging  # noqa: E402


def run_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", required=True, type=run_argument, help="training run, {variant}-s{seed}, e.g. odmt-s1")


def stage_args(description: str, extra=None) -> argparse.Namespace:
    """Parse the stage's command line (always `--params`, plus stage-specific ones) and set up logging."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    if extra is not None:
        extra(parser)
    setup_logging()
    return parser.parse_args()
