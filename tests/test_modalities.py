"""A catalogue without images, given with titles only, as a new user brings one: the generic
adapter, the real feature stages (tiny local encoders), training, scoring, evaluation and the
report. ODMT must train an ID and a text branch and say so everywhere."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import polars as pl
import pyarrow.parquet as pq
import pytest

from pipeline.evaluation import EvaluateConfig, evaluate_run
from pipeline.features.image import ImageFeaturesConfig, extract_image_features
from pipeline.features.text import extract_text_features
from pipeline.ingest import SplitRules, ingest, write
from pipeline.ingest.adapters.generic import GenericOptions, read_generic
from pipeline.io import write_json
from pipeline.models.odmt import ModelConfig
from pipeline.report import ReportConfig, load_runs, markdown_report
from pipeline.scoring import ScoreConfig, score_run
from pipeline.training import TrainConfig
from pipeline.training.distillation import DistillConfig
from pipeline.training.trainer import train
from tests.test_features import text_config, tiny_bert, tiny_cnn  # noqa: F401 (fixtures)

NUM_USERS, NUM_ITEMS = 12, 15


def write_titles_only_catalogue(root: Path) -> None:
    """interactions.csv (user_id, item_id, timestamp) and items.csv with item_id and title only."""
    rows = [(f"u{u}", f"m{(u + t) % NUM_ITEMS}", 1_000_000 + 60 * t) for u in range(NUM_USERS) for t in range(7)]
    pl.DataFrame(rows, schema=["user_id", "item_id", "timestamp"], orient="row").write_csv(root / "interactions.csv")
    words = ["toy story", "dark night", "space ranger", "hello world", "cowboy doll"]
    titles = [f"{words[i % 5]} {i}" for i in range(NUM_ITEMS)]
    pl.DataFrame({"item_id": [f"m{i}" for i in range(NUM_ITEMS)], "title": titles}).write_csv(root / "items.csv")


@pytest.fixture(scope="module")
def titles_only(tmp_path_factory, tiny_bert, tiny_cnn) -> Path:  # noqa: F811
    root = tmp_path_factory.mktemp("titles_only")
    (root / "raw").mkdir()
    write_titles_only_catalogue(root / "raw")
    raw = read_generic(root / "raw", GenericOptions(text_columns=(), image_column=None))
    write(ingest(raw, SplitRules()), root / "ingest", root / "ingest.json", {})
    extract_text_features(text_config(tiny_bert), root / "ingest/items.parquet", root / "features/text")
    image_config = ImageFeaturesConfig(model="test_efficientnet", weights=str(tiny_cnn), size=32, num_workers=0)
    extract_image_features(image_config, root / "ingest/images.parquet", root / "features/image")
    return root


def test_titles_are_the_text_when_no_text_column_is_given(titles_only):
    items = pq.read_table(titles_only / "ingest/items.parquet").to_pylist()
    assert len(items) == NUM_ITEMS and all(row["text"] == "" and row["title"] for row in items)
    assert not any(row["has_image"] for row in items)


def test_odmt_on_a_text_only_catalogue_trains_two_branches_and_says_so(titles_only, tmp_path, caplog):
    cfg = TrainConfig(
        model=ModelConfig(variant="odmt", width=8, max_len=4, imt_layers=1, seq_layers=1, text_tokens=4),
        distill=DistillConfig(tau=1.0, ramp=2.0, detach_teacher=True),
        epochs=2,
        batch_size=4,
        sequences=str(titles_only / "ingest/sequences.parquet"),
        popularity=str(titles_only / "ingest/popularity.parquet"),
        text_features=str(titles_only / "features/text"),
        image_features=str(titles_only / "features/image"),
    )
    with caplog.at_level(logging.INFO, logger="pipeline"):
        model, info = train(cfg, tmp_path / "models/odmt-s1", tmp_path / "logs/odmt-s1")
    assert model.branches == ("id", "text") and info["sources"] == ["id", "text"]
    assert info["source_present"] == {"id": 1.0, "text": 1.0, "image": 0.0}
    assert "sources: id (100.0% of items, used), text (100.0% of items, used), image (0.0% of items: below" in caplog.text
    assert "odmt trains branches id, text" in caplog.text
    assert "distillation pairs: text <- id, id <- ensemble" in caplog.text
    assert model.items.sources.image_proj is None  # no branch trained on zero features

    sequences = pq.read_table(titles_only / "ingest/sequences.parquet")
    provenance = {"run": "odmt-s1", "variant": "odmt", "seed": 1, "sources": {"used": info["sources"], "present": info["source_present"]}}
    score_run(model, info["max_len"], sequences, ScoreConfig(k=10), tmp_path / "candidates", provenance)
    metrics, _, _ = evaluate_run(tmp_path / "candidates", sequences, EvaluateConfig(ks=[5, 10]))
    assert metrics["protocol"]["sources"] == {"used": ["id", "text"], "present": {"id": 1.0, "text": 1.0, "image": 0.0}}
    assert metrics["run"]["rankings"] == ["fused", "id", "text"] and set(metrics["test"]) == {"fused", "id", "text"}

    write_json(metrics, tmp_path / "metrics/odmt-s1.json")
    report = markdown_report(load_runs(tmp_path / "metrics"), ReportConfig(metrics=["hr@10"]))
    assert "Item sources used: odmt: id, text (share of catalogue items having each: id 100.0%, text 100.0%, image 0.0%)." in report
    assert "| odmt | image |" not in report


def test_explicit_modalities_and_the_threshold(titles_only, tmp_path):
    from pipeline.training import find_sources

    base = TrainConfig(text_features=str(titles_only / "features/text"), image_features=str(titles_only / "features/image"))
    assert find_sources(base).used == ("id", "text")
    assert find_sources(replace(base, modalities=["id"])).used == ("id",)
    assert find_sources(replace(base, modality_min_present=0.0)).used == ("id", "text", "image")  # zeros, asked for
