"""What a new user meets on their own text-only catalogue (issue 25): the generic adapter, titles
only (`text_columns: []`), no image column, duplicate titles, titles longer than max_tokens, a few
users coming back to an item they had before. Each test checks one thing the stages say about
such data: warnings, counts, log lines, the report's words, the paths they record."""

from __future__ import annotations

import io
import logging
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import polars as pl
import pyarrow.parquet as pq
import pytest
import yaml

from pipeline.evaluation import EvaluateConfig, evaluate_run
from pipeline.features.image import ImageFeaturesConfig, extract_image_features
from pipeline.features.text import extract_text_features
from pipeline.ingest import SplitRules, ingest, write
from pipeline.ingest.adapters.generic import GenericOptions, read_generic
from pipeline.io import read_json, read_metadata, write_json
from pipeline.models.odmt import ModelConfig
from pipeline.progress import LevelFormatter, log
from pipeline.report import ReportConfig, load_runs, markdown_report, recommendations_html
from pipeline.scoring import ScoreConfig, score_run
from pipeline.training import TrainConfig, find_sources
from pipeline.training.distillation import DistillConfig
from pipeline.training.trainer import train
from tests.test_adapters import make_image
from tests.test_features import text_config, tiny_bert, tiny_cnn  # noqa: F401 (fixtures)

ROOT = Path(__file__).resolve().parent.parent
NUM_USERS, NUM_ITEMS, REPEATERS = 12, 15, 3
TITLES_ONLY = GenericOptions(text_columns=(), image_column=None)
# Where the feature stages write, under a root (from the feature store on: features/text, features/image)
TEXT, IMAGE = "features/text", "features/image"


def titles() -> list[str]:
    """Every third item is "toy story" (duplicate titles); the rest are longer than the tests'
    max_tokens (8), half of them alike in their first tokens."""
    kinds = ("toy story", "the movie the movie the movie {}", "dark night {} " + "hello world " * 6)
    return [kinds[i % 3].format(i) for i in range(NUM_ITEMS)]


def write_catalogue(folder: Path, num_users: int = NUM_USERS) -> Path:
    """interactions.csv (user_id, item_id, timestamp) and items.csv (item_id, title); the first
    REPEATERS users end on the item they started with (a test target in their history)."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for u in range(num_users):
        walk = [(u + t) % NUM_ITEMS for t in range(7)]
        if u < REPEATERS:
            walk[-1] = walk[0]
        rows += [(f"u{u}", f"m{item}", 1_000_000 + 60 * t) for t, item in enumerate(walk)]
    pl.DataFrame(rows, schema=["user_id", "item_id", "timestamp"], orient="row").write_csv(folder / "interactions.csv")
    pl.DataFrame({"item_id": [f"m{i}" for i in range(NUM_ITEMS)], "title": titles()}).write_csv(folder / "items.csv")
    return folder


def ingest_titles_only(raw: Path, root: Path) -> None:
    """The ingest stage on the catalogue at `raw`: root/ingest/*.parquet and root/ingest.json."""
    write(ingest(read_generic(raw, TITLES_ONLY), SplitRules()), root / "ingest", root / "ingest.json", {})


@pytest.fixture(scope="module")
def catalogue(tmp_path_factory, tiny_bert, tiny_cnn) -> Path:  # noqa: F811
    """The catalogue through ingest and both feature stages, as the DAG runs them."""
    root = tmp_path_factory.mktemp("text_only")
    ingest_titles_only(write_catalogue(root / "raw"), root)
    extract_text_features(text_config(tiny_bert), root / "ingest/items.parquet", root / TEXT)
    image_config = ImageFeaturesConfig(model="test_efficientnet", weights=str(tiny_cnn), size=32, num_workers=0)
    extract_image_features(image_config, root / "ingest/images.parquet", root / IMAGE)
    return root


def train_config(root: Path, variant: str = "odmt", features: Path | None = None, **changes) -> TrainConfig:
    """A tiny run on root/ingest's data and the features under `features` (default: root)."""
    features = features or root
    cfg = TrainConfig(
        model=ModelConfig(variant=variant, width=8, max_len=4, imt_layers=1, seq_layers=1, text_tokens=4),
        distill=DistillConfig(tau=1.0, ramp=20.0, detach_teacher=True),
        epochs=2,
        batch_size=4,
        sequences=str(root / "ingest/sequences.parquet"),
        popularity=str(root / "ingest/popularity.parquet"),
        text_features=str(features / TEXT),
        image_features=str(features / IMAGE),
    )
    return replace(cfg, **changes)


@pytest.fixture
def formatted_log():
    """The `pipeline` log as the stages write it (setup_logging's format), captured."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(LevelFormatter())
    log.addHandler(handler)
    level = log.level
    log.setLevel(logging.INFO)
    yield stream
    log.removeHandler(handler)
    log.setLevel(level)


# --- item 2: texts cut at max_tokens ----------------------------------------------------------


def test_most_texts_cut_at_max_tokens_warns_with_a_max_tokens_that_fits(catalogue, tiny_bert, tmp_path, caplog):  # noqa: F811
    with caplog.at_level(logging.INFO, logger="pipeline"):
        summary = extract_text_features(text_config(tiny_bert), catalogue / "ingest/items.parquet", tmp_path / TEXT)
    cut = summary["counts"]["truncated"]
    assert cut == 10  # the two long kinds of title, of 15
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "max_tokens" in r.getMessage()]
    assert len(warnings) == 1, caplog.text
    # the template "{title}. {text}" gives "the movie the movie the movie 13.": [CLS] + 6 words + "13"
    # (2 pieces) + "." + [SEP] = 11 tokens; "dark night 14 hello world x 6.": 1 + 2 + 2 + 12 + 1 + 1 = 19
    assert warnings[0].startswith(f"text_features: {cut} of {NUM_ITEMS} texts (66.7%) are cut at max_tokens 8;")
    assert warnings[0].endswith("text_features.max_tokens 19 would fit 95% of them")


def test_a_few_cut_texts_are_only_counted(catalogue, tiny_bert, tmp_path, caplog):  # noqa: F811
    config = text_config(tiny_bert, max_tokens=12)
    with caplog.at_level(logging.INFO, logger="pipeline"):
        extract_text_features(config, catalogue / "ingest/items.parquet", tmp_path / TEXT)
    assert "text_features: 5 of 15 texts (33.3%) cut at max_tokens 12" in caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


# --- item 3: ingest's counts and lines ------------------------------------------------------


def test_ingest_of_titles_only_counts_no_empty_text_and_reads_no_images(tmp_path, caplog):
    raw = read_generic(write_catalogue(tmp_path / "raw"), TITLES_ONLY)
    with caplog.at_level(logging.INFO, logger="pipeline"):
        result = ingest(raw, SplitRules())
        write(result, tmp_path / "ingest", tmp_path / "ingest.json", {})
    counts = read_json(tmp_path / "ingest.json")["counts"]
    assert "empty_text" not in counts and counts["empty_title_and_text"] == 0  # every title is the item's text
    assert counts["image_none"] == NUM_ITEMS
    assert "images" not in caplog.text  # neither "checking images" nor "packing images": there are none
    assert pq.read_table(tmp_path / "ingest/images.parquet").column("image").null_count == NUM_ITEMS


def test_with_a_text_column_an_item_with_a_title_only_is_counted_once(tmp_path):
    folder = write_catalogue(tmp_path / "raw")
    items = pl.read_csv(folder / "items.csv")
    descriptions = ["a description"] * (NUM_ITEMS - 3) + ["", "", ""]
    items.with_columns(description=pl.Series(descriptions), title=pl.Series([*titles()[:-1], ""])).write_csv(folder / "items.csv")
    counts = ingest(read_generic(folder, GenericOptions(image_column=None)), SplitRules()).report["counts"]
    assert counts["empty_text"] == 2 and counts["empty_title_and_text"] == 1  # the last item has neither


# --- item 4: the sources line, warning levels, a checkpoint of other data ------------------


@pytest.mark.parametrize(("variant", "line"), [
    ("sasrec_id", "sources: id (100.0% of items, used), text (100.0% of items: not read by sasrec_id), image (0.0%"),
    ("text_only", "sources: id (100.0% of items: not read by text_only), text (100.0% of items, used), image (0.0%"),
    ("odmt", "sources: id (100.0% of items, used), text (100.0% of items, used), image (0.0%"),
])
def test_the_sources_line_says_what_the_variant_reads(catalogue, variant, line):
    cfg = train_config(catalogue, variant)
    assert find_sources(cfg).describe(cfg).startswith(line)


def test_warnings_carry_their_level(catalogue, tmp_path, formatted_log):
    train(train_config(catalogue, epochs=1), tmp_path / "run", tmp_path / "logs")
    lines = formatted_log.getvalue().splitlines()
    ramp = [line for line in lines if "distill.ramp 20 > epochs 1" in line]
    assert len(ramp) == 1 and " pipeline: WARNING: distill.ramp" in ramp[0]
    sources = next(line for line in lines if "sources:" in line)
    assert " pipeline: sources: id" in sources  # info lines stay as they were


def test_a_checkpoint_of_other_data_is_dropped_because_the_inputs_changed(catalogue, tmp_path, caplog):
    data = tmp_path / "data"
    ingest_titles_only(write_catalogue(tmp_path / "raw"), data)
    train(train_config(data, features=catalogue, epochs=3), tmp_path / "run", tmp_path / "logs")
    # another dataset at the same paths: two more users
    ingest_titles_only(write_catalogue(tmp_path / "other", NUM_USERS + 2), data)
    with caplog.at_level(logging.INFO, logger="pipeline"):
        train(train_config(data, features=catalogue, epochs=1), tmp_path / "run", tmp_path / "logs")
    assert "input files changed (" in caplog.text and "sequences.parquet" in caplog.text
    assert "more than epochs" not in caplog.text and "resuming" not in caplog.text


# --- item 5: the report's words ---------------------------------------------------------------


def test_the_report_counts_targets_that_can_never_be_hit_in_neutral_words(catalogue, tmp_path):
    cfg = train_config(catalogue, epochs=1)
    model, info = train(cfg, tmp_path / "models/odmt-s1", tmp_path / "logs/odmt-s1")
    sequences = pq.read_table(catalogue / "ingest/sequences.parquet")
    sources = {"used": info["sources"], "present": info["source_present"]}
    provenance = {"run": "odmt-s1", "variant": "odmt", "seed": 1, "sources": sources}
    score_run(model, info["max_len"], sequences, ScoreConfig(k=10), tmp_path / "candidates", provenance)
    metrics, _, _ = evaluate_run(tmp_path / "candidates", sequences, EvaluateConfig(ks=[10]))
    write_json(metrics, tmp_path / "metrics/odmt-s1.json")

    report = markdown_report(load_runs(tmp_path / "metrics"), ReportConfig(metrics=["hr@10"]))
    assert (
        f"Targets already in the user's history: {REPEATERS} of {NUM_USERS} test users, 0 of {NUM_USERS} validation users; "
        "excluded with the history, they can never be hit (test HR@k at most 75.00%)."
    ) in report

    page = recommendations_html(
        pq.read_table(tmp_path / "candidates/test.parquet"), sequences, pq.read_table(catalogue / "ingest/items.parquet"),
        catalogue / "ingest/images.parquet", ReportConfig(),
    )
    assert "the item the user interacted with next" in page and "watched" not in page


def test_readme_sections_named_in_params_and_code_exist():
    """A section named in params, code, benchmarks, scripts or tests (README or docs/<page>.md,
    then the heading in double quotes) is a heading of that page: renaming or moving one fails here."""
    def headings(page: Path) -> set[str]:
        return {line.lstrip("#").strip() for line in page.read_text().splitlines() if re.match(r"#{1,6} ", line)}

    files = [
        ROOT / "params.yaml", ROOT / "params-paper.yaml", *ROOT.glob("pipeline/**/*.py"), *ROOT.glob("stages/*.py"),
        *ROOT.glob("benchmarks/*.py"), *ROOT.glob("scripts/*"), *ROOT.glob("tests/*.py"),
    ]
    reference = re.compile(r'(README|docs/[\w-]+\.md),? "([^"]+)"')
    named = {(f.name, page, " ".join(name.split())) for f in files for page, name in reference.findall(f.read_text())}
    pages = {page for _, page, _ in named}
    assert {"docs/training.md", "docs/paper.md", "docs/features.md"} <= pages
    missing = [
        (f, page, name) for f, page, name in named
        if not (ROOT / ("README.md" if page == "README" else page)).is_file()
        or name not in headings(ROOT / ("README.md" if page == "README" else page))
    ]
    assert not missing


# --- item 6: no local path published ----------------------------------------------------------


def run_ingest_stage(project: Path, path: str, image_column: str | None = None, **ingest_params) -> subprocess.CompletedProcess:
    """stages/ingest.py from `project` (its working folder, as under dvc) with ingest.path `path`."""
    generic = {"text_columns": [], "image_column": image_column}
    params = {"ingest": {"adapter": "generic", "path": path, "generic": generic, **ingest_params}}
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    stage = [sys.executable, str(ROOT / "stages/ingest.py")]
    return subprocess.run(stage, cwd=project, capture_output=True, text=True, check=True)


def test_an_absolute_ingest_path_is_not_published(tmp_path):
    outside = write_catalogue(tmp_path / "home/alice/catalogue")
    project = tmp_path / "project"
    project.mkdir()
    stage = run_ingest_stage(project, str(outside))
    source = read_metadata(project / "data/ingest/sequences.parquet")["source"]
    assert source["adapter"] == "generic" and str(tmp_path) not in str(source)
    assert source["path"].startswith("catalogue (outside the project; sha256 of its path ")
    assert f"WARNING: ingest.path {outside} is absolute: params.yaml and dvc.lock" in stage.stderr

    inside = write_catalogue(project / "data/raw/catalogue")  # absolute, but inside the project
    run_ingest_stage(project, str(inside))
    assert read_metadata(project / "data/ingest/items.parquet")["source"]["path"] == "data/raw/catalogue"

    run_ingest_stage(project, str(outside), publish_path=True)  # asked for
    assert read_metadata(project / "data/ingest/sequences.parquet")["source"]["path"] == str(outside)


def test_image_paths_under_an_absolute_ingest_path_are_not_published(tmp_path):
    """items.parquet keeps each image's reference: under the dataset folder as the metadata names it."""
    outside = write_catalogue(tmp_path / "home/alice/catalogue")
    items = pl.read_csv(outside / "items.csv")
    items.with_columns(picture=pl.format("pics/{}.png", "item_id")).write_csv(outside / "items.csv")
    for key in items["item_id"]:
        make_image(outside / f"pics/{key}.png", "PNG")
    project = tmp_path / "project"
    project.mkdir()
    run_ingest_stage(project, str(outside), image_column="picture")
    source = read_metadata(project / "data/ingest/items.parquet")["source"]["path"]
    rows = pq.read_table(project / "data/ingest/items.parquet").to_pylist()
    assert all(row["has_image"] for row in rows)  # the images are read all the same
    assert [row["image_ref"] for row in rows] == [f"{source}/pics/{row['item_key']}.png" for row in rows]
    assert str(tmp_path) not in source and source.startswith("catalogue (outside the project")
