"""Recommendations for use, not for a table: every user's next items from the WHOLE history.

The evaluation (scoring.py) hides the validation and test items from the model; a shop wants
the opposite: each user's state after everything they did (train + valid + test items, the
last max_len as the model's input), and the top K items they have not had yet (history
exclusion is a param), keyed by the source's own user and item keys.

Users are encoded and searched in bounded blocks (`user_block_size`) by the UserEncoder that
export.py exports, against the run's exported FAISS index, so the stage, a service holding the export,
and `--histories` (new users, no retraining) compute the same thing.

One user, in the terminal and optionally as a page of item thumbnails:

    python -m pipeline.recommend --run odmt-s1 --user 42 [--html user42.html]
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import faiss
import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from pipeline import schema
from pipeline.commands import check_run, run_argument
from pipeline.config import load_section, to_dict
from pipeline.ingest.adapters.base import read_table, require_columns
from pipeline.ingest.adapters.generic import unix_seconds
from pipeline.ingest.core import natural_order
from pipeline.io import parquet_writer, read_checked
from pipeline.models.odmt import UserEncoder
from pipeline.progress import Progress, log, setup_logging
from pipeline.scoring import IndexConfig, _ragged, available_cpus, search_unseen
from pipeline.sequences import Ragged, left_pad

RECOMMENDATIONS = pa.schema(
    [
        pa.field("user_key", pa.string(), nullable=False),  # the source's user id
        pa.field("items", pa.list_(pa.string()), nullable=False),  # the source's item ids, best first
        pa.field("scores", pa.list_(pa.float32()), nullable=False),  # the model's fused scores for them
    ]
)
HISTORY_COLUMNS = ("user", "item", "timestamp")  # of a --histories file, in the source's keys


@dataclass(frozen=True)
class RecommendConfig:
    runs: list[str] = field(default_factory=lambda: ["odmt-s1"])  # one recommend and export stage each
    k: int = 10  # items recommended per user
    exclude_history: bool = True  # never recommend an item the user already has
    user_block_size: int = 2048  # users encoded and searched at once (bounds memory)
    index: IndexConfig = field(default_factory=IndexConfig)  # the exported index; flat = exact

    def validate(self) -> None:
        if self.k < 1 or self.user_block_size < 1:
            raise ValueError(f"k and user_block_size must be >= 1, got {self.k} and {self.user_block_size}")
        self.index.validate()
        for i, run in enumerate(self.runs):
            check_run(run, f"runs[{i}]")


def whole_histories(sequences: pa.Table) -> Ragged:
    """Each user's whole kept history, oldest first: train items, then valid and test item."""
    train = Ragged.from_arrow(sequences.column("train_items"))
    return train.append(sequences.column("valid_item").to_numpy()).append(sequences.column("test_item").to_numpy())


def recommend(
    encoder: UserEncoder,
    index: faiss.Index,
    user_keys: list[str],
    histories: Ragged,
    item_keys: list[str],
    config: RecommendConfig,
    path: Path,
    metadata: dict,
) -> float:
    """Write ``path`` (RECOMMENDATIONS rows, block by block, in the order of ``user_keys``) and
    return the users/s. ``item_keys[i]`` is the key of item_idx i (row 0: padding)."""
    faiss.omp_set_num_threads(available_cpus())
    progress = Progress("recommend", total=len(user_keys), unit="users")
    key_of = pa.array(item_keys, pa.string())
    with parquet_writer(path, RECOMMENDATIONS, metadata) as writer:
        for start in range(0, len(user_keys), config.user_block_size):
            block = histories.rows(slice(start, start + config.user_block_size))
            with torch.inference_mode():
                queries = encoder(left_pad(block, encoder.max_len)).numpy()
            excluded = block if config.exclude_history else Ragged.empty(len(block))
            items, scores = _ragged(*search_unseen(index, queries, excluded, config.k))
            keys = pa.ListArray.from_arrays(items.offsets, key_of.take(items.values))
            users = pa.array(user_keys[start : start + len(block)], pa.string())
            writer.write_table(pa.table([users, keys, scores], schema=writer.schema))
            progress.update(len(block))
    return progress.close()


def recommend_metadata(provenance: dict, config: RecommendConfig, max_len: int, source: str) -> dict:
    return {
        **provenance,
        "k": config.k,
        "history_excluded": config.exclude_history,
        "index": to_dict(config.index),
        "model_input": f"last {max_len} history items",
        "histories": source,
    }


# --- new histories, in the source's keys -----------------------------------------------------


def read_histories(path: Path, item_index: dict[str, int]) -> tuple[list[str], Ragged, Counter]:
    """Users and their histories (item indices, oldest first) from a CSV or Parquet file of
    user, item, timestamp. Ordered as ingest orders them: by (timestamp, item key in natural
    order). Rows with a missing value, exact repeats of a row and items outside the trained
    catalogue are skipped, users left without a known item too; all are counted."""
    counts: Counter = Counter()
    raw = read_table(path, counts)  # counts invalid_utf8
    require_columns(raw, list(HISTORY_COLUMNS), path)
    seconds, _ = unix_seconds(raw["timestamp"])
    frame = pl.DataFrame({"user": raw["user"].cast(pl.String), "item": raw["item"].cast(pl.String), "timestamp": seconds})
    counts.update(rows=frame.height, users=frame["user"].drop_nulls().n_unique())
    counts["skipped_bad_timestamp"] = int((seconds.is_null() & raw["timestamp"].is_not_null()).sum())
    known = frame.drop_nulls()
    counts["skipped_missing_value"] = frame.height - known.height - counts["skipped_bad_timestamp"]
    unique = known.unique(maintain_order=True)  # as ingest: an exact repeat of an event is dropped
    counts["skipped_duplicate"] = known.height - unique.height
    known = unique.with_columns(pl.col("item").replace_strict(item_index, default=None, return_dtype=pl.Int32).alias("item_idx"))
    counts["skipped_unknown_item"] = int(known["item_idx"].null_count())
    known = known.drop_nulls()
    known = known.with_columns(natural_order(known["item"]).alias("key_rank"))
    grouped = known.sort(["user", "timestamp", "key_rank"]).group_by("user", maintain_order=True).agg(pl.col("item_idx"))
    grouped = grouped.sort(natural_order(grouped["user"]))
    counts["users_scored"] = grouped.height
    counts["skipped_users_without_known_item"] = counts["users"] - grouped.height
    return grouped["user"].to_list(), Ragged.from_arrow(grouped["item_idx"].to_arrow()), counts


# --- one user --------------------------------------------------------------------------------


def one_user(run: str, user: str, top: int = 10, html_path: Path | None = None, params: str = "params.yaml") -> str:
    """One user's recent history and top ``top`` with titles, as text; with ``html_path`` also
    the page of that user's item thumbnails (the report's page code)."""
    from pipeline.report import ReportConfig, escape, poster_page, printable

    path = Path("data/recommendations") / f"{run}.parquet"
    if not path.exists():
        raise FileNotFoundError(f"{path}: no recommendations; run `dvc repro recommend@{run}` first")
    found = pq.read_table(path, filters=[("user_key", "=", user)])
    if found.num_rows == 0:
        raise KeyError(f"user {user!r} is not in {path}")
    ingest = Path("data/ingest")
    sequences = read_checked(ingest / "sequences.parquet", schema.SEQUENCES, schema.REINGEST, filters=[("user_key", "=", user)])
    if sequences.num_rows == 0:  # recommendations older than the ingest tables
        raise KeyError(f"user {user!r} is in {path} but not in {ingest / 'sequences.parquet'}: rerun `dvc repro recommend@{run}`")
    items = read_checked(ingest / "items.parquet", schema.ITEMS, schema.REINGEST, ["item_idx", "item_key", "title"])
    index_of = dict(zip(items.column("item_key").to_pylist(), items.column("item_idx").to_pylist()))
    index_key = {i: key for key, i in index_of.items()}
    titles = dict(zip(items.column("item_idx").to_pylist(), items.column("title").to_pylist()))
    report = load_section(ReportConfig, "report", params)
    history = whole_histories(sequences).row(0)[-report.history_shown :].tolist()
    recommended = [index_of[key] for key in found.column("items")[0].as_py()[:top]]
    scores = found.column("scores")[0].as_py()[:top]

    name = {i: printable(titles[i] or index_key[i]) for i in (*history, *recommended)}
    lines = [f"User {printable(user)}, run {run}: last {len(history)} items of the history, oldest first"]
    lines += [f"  {name[i]}" for i in history]
    lines += [f"Top {len(recommended)}:"]
    lines += [f"  {rank:2d}. {name[i]}  ({score:.3f})" for rank, (i, score) in enumerate(zip(recommended, scores), 1)]
    if html_path is not None:
        page = poster_page(
            [(user, history, recommended, None)],
            items.select(["item_idx", "title"]),
            ingest / "images.parquet",
            report,
            escape(f"Recommendations of {run} for user {user}"),
            "The user's recent history (the model's input; history items are never recommended) and the top "
            f"{len(recommended)} over the whole catalogue, from the user's whole history.",
        )
        Path(html_path).write_text(page)
        lines.append(f"wrote {html_path}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="One user's recent history and top recommendations.")
    parser.add_argument("--run", required=True, type=run_argument, help="a run of recommend.runs, e.g. odmt-s1")
    parser.add_argument("--user", required=True, help="the user's key in the source data")
    parser.add_argument("--top", type=positive, default=10, help="recommendations shown (at most recommend.k)")
    parser.add_argument("--html", type=Path, help="also write the user's page of item thumbnails here")
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args(argv)
    setup_logging()
    if args.html is not None and not args.html.parent.is_dir():
        log.error("--html %s: the folder %s does not exist", args.html, args.html.parent)
        return 1
    try:
        print(one_user(args.run, args.user, args.top, args.html, args.params))
    except (FileNotFoundError, KeyError) as err:
        log.error("%s", err.args[0] if isinstance(err, KeyError) else err)  # str(KeyError) adds quotes
        return 1
    return 0


def positive(value: str) -> int:
    """--top: an integer >= 1."""
    if not value.lstrip("+").isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value!r}")
    return int(value)


if __name__ == "__main__":
    sys.exit(main())
