"""Planted faults: a hostile but realistic catalogue, one class per area.

Each test plants one fault (or a few of one kind) and asserts its exact outcome: the count it
is reported under, a conversion, a refusal, or the text of the error that stops the stage.
Path tests also assert that nothing outside the dataset folder was opened or stat'ed.
The last classes plant faults in what crosses the team's DVC remote (model files), in resumed
training and in params files.
"""

from __future__ import annotations

import dataclasses
import gzip
import inspect
import io
import json
import logging
import os
import re
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import faiss
import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch
import transformers
import yaml
from PIL import Image
from test_adapters import GENERIC
from test_features import png_header

from pipeline import schema
from pipeline.export import ExportMismatch
from pipeline.commands import check_launcher
from pipeline.config import SECTIONS, ConfigError, from_dict, load_section
from pipeline.features.image import decode_image
from pipeline.features.text import TextFeaturesConfig, item_text, text_outcomes
from pipeline.images import BOMB, UNREADABLE, ImageRefused, open_image
from pipeline.ingest import IngestConfig, SourceError, SplitRules, ingest
from pipeline.ingest.adapters.amazon2018 import Amazon2018Options, read_amazon2018
from pipeline.ingest.adapters.generic import GenericOptions, read_generic
from pipeline.ingest.adapters.hm import HMOptions, read_hm
from pipeline.ingest.adapters.movielens_mm import MovielensOptions, read_movielens_mm
from pipeline.io import ArtifactError, atomic_path, write_json, write_table
from pipeline.report import ReportConfig, escape, recommendations_html, thumbnail_uri
from pipeline.recommend import main as recommend_main
from pipeline.schema import candidates_schema
from pipeline.training import TrainConfig, checkpoint, load_trained
from pipeline.training import trainer
from pipeline.training.trainer import native_bf16, train
from tests.project import attempt, make_project
from tests.test_recommend import run_stage
from tests.test_training import toy_config
from tests.toy import make_toy_dataset

ROOT = Path(__file__).resolve().parents[1]

# --- helpers ---------------------------------------------------------------------------------

_RECORDERS: list[list[str]] = []


def _audit(event: str, args: tuple) -> None:
    if _RECORDERS and event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
        for paths in _RECORDERS:
            paths.append(os.fsdecode(args[0]))


sys.addaudithook(_audit)  # every open() / io.open / os.open of this process, whoever calls it


@pytest.fixture
def touched(monkeypatch) -> list[str]:
    """The paths opened (audit event 'open') or stat'ed (os.stat) while the test runs."""
    paths: list[str] = []
    real_stat = os.stat

    def stat(path, *args, **kwargs):
        if isinstance(path, (str, bytes, os.PathLike)):
            paths.append(os.fsdecode(path))
        return real_stat(path, *args, **kwargs)

    monkeypatch.setattr(os, "stat", stat)
    _RECORDERS.append(paths)
    yield paths
    _RECORDERS.remove(paths)


def under(paths: list[str], folder: Path) -> list[str]:
    """The recorded paths that lie in `folder`, symlinks resolved."""
    return [p for p in list(paths) if Path(os.path.realpath(p)).is_relative_to(os.path.realpath(folder))]


def image_bytes(size: tuple[int, int] = (40, 60), mode: str = "RGB", fmt: str = "PNG") -> bytes:
    out = io.BytesIO()
    Image.new(mode, size, 128).save(out, fmt)
    return out.getvalue()


def bomb(side: int = 40_000) -> bytes:
    """A few hundred bytes whose header claims side x side pixels (PIL's own limit: 2 x 89.5M)."""
    return png_header(side, side)


def write_generic(root: Path, pictures: dict[str, str | None], times: list[str] | None = None) -> GenericOptions:
    """Users u1, u2 with items i1..i5 each, in the columns of test_adapters' GENERIC; `pictures`
    maps item -> image column value (relative paths: relative to the dataset folder)."""
    root.mkdir(parents=True, exist_ok=True)
    times = times or [str(1000 + n) for n in range(10)]
    lines = ["user,item,when"] + [f"u{1 + n // 5},i{1 + n % 5},{t}" for n, t in enumerate(times)]
    (root / "inter.csv").write_text("\n".join(lines) + "\n")
    items = ["sku,name,blurb,extra,picture"] + [f"i{k},Item {k},text {k},,{pictures.get(f'i{k}') or ''}" for k in range(1, 6)]
    (root / "things.csv").write_text("\n".join(items) + "\n")
    return replace(GENERIC, image_dir=None)


def has_image(result, key: str) -> bool:
    return result.items.filter(result.items["item_key"] == key)["has_image"][0]


def write_movielens(
    root: Path, times: list[str], posters: dict[str, bytes] | None = None, movie_ids: list[str] | None = None
) -> Path:
    """ratings.csv with one row per time (40 users x 20 movies when there are 800), items.csv, posters."""
    root.mkdir(parents=True, exist_ok=True)
    movie_ids = movie_ids or [str(m) for m in range(1, 21)]
    ratings = ["user_id,movie_id,rating,unix_timestamp"]
    ratings += [f"{1 + n // len(movie_ids)},{movie_ids[n % len(movie_ids)]},4,{t}" for n, t in enumerate(times)]
    (root / "ratings.csv").write_text("\n".join(ratings) + "\n")
    items = ["movie_id,title,overview"] + [f"{m},Movie {m},Plot {m}" for m in movie_ids]
    (root / "items.csv").write_text("\n".join(items) + "\n")
    (root / "posters").mkdir(exist_ok=True)
    for name, data in (posters or {}).items():
        (root / "posters" / f"{name}.jpg").write_bytes(data)
    return root


def valid_times(n: int = 800) -> list[str]:
    return [str(1_000_000 + i) for i in range(n)]


def with_bad(times: list[str], bad: dict[int, str]) -> list[str]:
    """`times` with data rows (1-based, header not counted) replaced."""
    return [bad.get(row, t) for row, t in enumerate(times, 1)]


# --- images ----------------------------------------------------------------------------------


class TestImages:
    """Broken, huge, tiny and odd images: ingest's header check, the image stage, the report."""

    def ingest_with_posters(self, tmp_path: Path, posters: dict[str, bytes], **rules):
        root = write_movielens(tmp_path / "ml", valid_times(100), posters)  # 5 users x 20 movies: all kept
        return ingest(read_movielens_mm(root, MovielensOptions()), SplitRules(max_user_interactions=20, **rules))

    def test_decompression_bomb_is_counted_not_a_crash(self, tmp_path):
        data = bomb()  # 40000 x 40000: PIL itself raises DecompressionBombError on open
        assert len(data) < 400
        result = self.ingest_with_posters(tmp_path, {"1": data, "2": image_bytes()})
        assert result.report["counts"]["image_bomb"] == 1 and not has_image(result, "1") and has_image(result, "2")

    def test_image_over_max_image_pixels_is_refused_by_ingest(self, tmp_path):
        result = self.ingest_with_posters(tmp_path, {"1": image_bytes((200, 200))}, max_image_pixels=10_000)
        assert result.report["counts"]["image_bomb"] == 1 and not has_image(result, "1")

    def test_garbage_bytes_are_unreadable(self, tmp_path):
        result = self.ingest_with_posters(tmp_path, {"1": b"GIF89a but not really" * 10})
        assert result.report["counts"]["image_unreadable"] == 1 and not has_image(result, "1")

    def test_empty_file_is_unreadable(self, tmp_path):
        result = self.ingest_with_posters(tmp_path, {"1": b""})
        assert result.report["counts"]["image_unreadable"] == 1

    def test_file_over_max_image_bytes_is_too_large(self, tmp_path):
        result = self.ingest_with_posters(tmp_path, {"1": image_bytes()}, max_image_bytes=50)
        assert result.report["counts"]["image_too_large"] == 1 and not has_image(result, "1")

    def test_a_folder_named_like_the_image_is_missing(self, tmp_path):
        root = write_movielens(tmp_path / "ml", valid_times(100))
        (root / "posters" / "1.jpg").mkdir()
        result = ingest(read_movielens_mm(root, MovielensOptions()), SplitRules(max_user_interactions=20))
        assert result.report["counts"]["image_missing"] == 20

    def test_one_pixel_image_is_counted_and_kept(self, tmp_path):
        result = self.ingest_with_posters(tmp_path, {"1": image_bytes((1, 1)), "2": image_bytes((32, 500))})
        assert result.report["counts"]["image_too_small"] == 1 and has_image(result, "1") and has_image(result, "2")

    def test_tiny_image_is_dropped_when_asked(self, tmp_path):
        result = self.ingest_with_posters(tmp_path, {"1": image_bytes((31, 400))}, drop_small_images=True)
        assert result.report["counts"]["image_too_small"] == 1 and not has_image(result, "1")

    def test_truncated_image_passes_the_header_check_and_is_unreadable_in_the_image_stage(self, tmp_path):
        photo = Image.fromarray(np.random.default_rng(0).integers(0, 256, (60, 40, 3), dtype=np.uint8))
        out = io.BytesIO()
        photo.save(out, "JPEG")
        truncated = out.getvalue()[: len(out.getvalue()) // 2]
        result = self.ingest_with_posters(tmp_path, {"1": truncated})
        assert has_image(result, "1") and "image_unreadable" not in result.report["counts"]
        assert decode_image(truncated, 16, "bicubic", 10_000)[1] == "unreadable"

    def test_image_stage_refuses_a_bomb_before_decoding(self):
        pixels, outcome, detail = decode_image(bomb(), 16, "bicubic", max_pixels=50_000_000)
        assert pixels is None and outcome == "too_large" and "exceeds limit" in detail

    @pytest.mark.parametrize("mode", ["L", "CMYK", "P", "RGBA", "I;16"])
    def test_odd_modes_are_converted(self, mode):
        fmt = "JPEG" if mode == "CMYK" else "PNG"
        pixels, outcome, _ = decode_image(image_bytes((8, 8), mode, fmt), 4, "bicubic", 10_000)
        assert outcome == f"converted_{mode}" and pixels.shape == (4, 4, 3)

    def test_report_thumbnail_of_a_bomb_or_garbage_is_a_placeholder(self):
        assert thumbnail_uri(bomb(), 120) is None
        assert thumbnail_uri(bomb(10_000), 120) is None  # 100M pixels: over the default 50M, under PIL's error limit
        assert thumbnail_uri(image_bytes((200, 200)), 120, max_pixels=10_000) is None
        assert thumbnail_uri(b"\x89PNG\r\n\x1a\n garbage", 120) is None
        assert thumbnail_uri(image_bytes((60, 90)), 30).startswith("data:image/jpeg;base64,")

    def test_open_image_reasons(self):
        with pytest.raises(ImageRefused) as refused:
            open_image(bomb(), 2_000_000_000, lambda image: image.size)  # past our limit: PIL's own error
        assert refused.value.reason == BOMB
        with pytest.raises(ImageRefused) as refused:
            open_image(image_bytes()[:60], 10_000, lambda image: image.load())  # an error while decoding
        assert refused.value.reason == UNREADABLE
        with pytest.raises(ImageRefused) as refused:
            open_image(image_bytes(), 10_000, lambda image: 1 / 0)
        assert refused.value.reason == UNREADABLE and "ZeroDivisionError" in refused.value.detail

    def test_pil_opens_images_only_in_the_guarded_function(self, tmp_path, monkeypatch):
        callers = []
        real_open = Image.open

        def spy(*args, **kwargs):
            callers.append(Path(inspect.stack()[1].filename).name)
            return real_open(*args, **kwargs)

        monkeypatch.setattr(Image, "open", spy)
        self.ingest_with_posters(tmp_path, {"1": image_bytes()})
        decode_image(image_bytes(), 8, "bicubic", 10_000)
        thumbnail_uri(image_bytes(), 30)
        assert len(callers) == 3 and set(callers) == {"images.py"}


# --- paths -----------------------------------------------------------------------------------


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A folder next to the dataset holding a real image that must never be read."""
    folder = tmp_path / "outside"
    folder.mkdir()
    (folder / "secret.png").write_bytes(image_bytes())
    return folder


class TestPaths:
    """Image references that leave the dataset folder are counted and never opened."""

    def test_dot_dot_path_to_an_existing_file(self, tmp_path, outside, touched):
        root = tmp_path / "data"
        options = write_generic(root, {"i1": "../outside/secret.png", "i2": "pics/ok.png"})
        (root / "pics").mkdir()
        (root / "pics" / "ok.png").write_bytes(image_bytes())
        result = ingest(read_generic(root, options), SplitRules())
        assert result.report["counts"]["image_outside_root"] == 1 and not has_image(result, "i1") and has_image(result, "i2")
        assert under(touched, root / "pics") and not under(touched, outside)

    def test_a_nul_byte_in_an_image_path_is_counted_and_named(self, tmp_path, caplog):
        root = tmp_path / "data"
        options = write_generic(root, {"i1": "pics/ok.png\x00.jpg", "i2": "pics/ok.png"})
        (root / "pics").mkdir()
        (root / "pics" / "ok.png").write_bytes(image_bytes())
        with caplog.at_level(logging.WARNING, logger="pipeline"):
            result = ingest(read_generic(root, options), SplitRules())
        assert result.report["counts"]["image_bad_path"] == 1 and not has_image(result, "i1") and has_image(result, "i2")
        assert "ingest: item i1: image_bad_path (" in caplog.text and "/pics/ok.png\\x00.jpg')" in caplog.text

    def test_dot_dot_inside_the_folder_is_fine(self, tmp_path):
        root = tmp_path / "data"
        (root / "pics").mkdir(parents=True)
        (root / "pics" / "ok.png").write_bytes(image_bytes())
        options = write_generic(root, {"i1": "../data/pics/../pics/ok.png"})
        assert has_image(ingest(read_generic(root, options), SplitRules()), "i1")

    def test_absolute_path_outside_is_refused(self, tmp_path, outside, touched):
        options = write_generic(tmp_path / "data", {"i1": str(outside / "secret.png")})
        result = ingest(read_generic(tmp_path / "data", options), SplitRules())
        assert result.report["counts"]["image_absolute_path"] == 1 and not has_image(result, "i1")
        assert not under(touched, outside)

    def test_absolute_path_inside_needs_the_param(self, tmp_path):
        root = tmp_path / "data"
        options = write_generic(root, {"i1": str(root / "in.png")})
        (root / "in.png").write_bytes(image_bytes())
        assert ingest(read_generic(root, options), SplitRules()).report["counts"]["image_absolute_path"] == 1
        allowed = ingest(read_generic(root, replace(options, allow_absolute_image_paths=True)), SplitRules())
        assert has_image(allowed, "i1") and "image_absolute_path" not in allowed.report["counts"]

    def test_allowed_absolute_path_still_stays_inside_the_allowed_folders(self, tmp_path, outside, touched):
        options = replace(write_generic(tmp_path / "data", {"i1": str(outside / "secret.png")}), allow_absolute_image_paths=True)
        result = ingest(read_generic(tmp_path / "data", options), SplitRules())
        assert result.report["counts"]["image_outside_root"] == 1 and not under(touched, outside)

    def test_image_dir_outside_needs_the_param(self, tmp_path, outside):
        options = replace(
            write_generic(tmp_path / "data", {"i1": "secret.png", "i2": str(outside / "secret.png")}), image_dir=str(outside)
        )
        with pytest.raises(SourceError, match=r"image_dir lies outside the dataset folder .*allow_absolute_image_paths: true"):
            read_generic(tmp_path / "data", options)
        result = ingest(read_generic(tmp_path / "data", replace(options, allow_absolute_image_paths=True)), SplitRules())
        assert has_image(result, "i1") and has_image(result, "i2")  # the folder the params name, and only it

    def test_symlink_pointing_outside(self, tmp_path, outside, touched):
        root = tmp_path / "data"
        options = write_generic(root, {"i1": "link.png"})
        (root / "link.png").symlink_to(outside / "secret.png")
        result = ingest(read_generic(root, options), SplitRules())
        assert result.report["counts"]["image_outside_root"] == 1 and not under(touched, outside)

    def test_symlinked_folder_pointing_outside(self, tmp_path, outside, touched):
        root = tmp_path / "data"
        options = write_generic(root, {"i1": "pics/secret.png"})
        (root / "pics").symlink_to(outside)
        result = ingest(read_generic(root, options), SplitRules())
        assert result.report["counts"]["image_outside_root"] == 1 and not under(touched, outside)

    def test_symlink_inside_the_folder_is_followed(self, tmp_path):
        root = tmp_path / "data"
        options = write_generic(root, {"i1": "link.png"})
        (root / "real.png").write_bytes(image_bytes())
        (root / "link.png").symlink_to(root / "real.png")
        assert has_image(ingest(read_generic(root, options), SplitRules()), "i1")

    def test_movielens_id_that_climbs_out(self, tmp_path, outside, touched):
        ids = [str(m) for m in range(1, 20)] + ["../../outside/secret"]
        (outside / "secret.jpg").write_bytes(image_bytes(fmt="JPEG"))
        root = write_movielens(tmp_path / "ml", valid_times(100), movie_ids=ids)
        touched.clear()  # what the test itself wrote
        result = ingest(read_movielens_mm(root, MovielensOptions()), SplitRules())
        assert result.report["counts"]["image_outside_root"] == 1 and not under(touched, outside)

    def test_hm_images_dir_param_outside(self, tmp_path, outside, touched):
        key = "0108775015"
        (outside / key[:3]).mkdir()
        (outside / key[:3] / f"{key}.jpg").write_bytes(image_bytes(fmt="JPEG"))
        root = tmp_path / "hm"
        root.mkdir()
        rows = ["t_dat,customer_id,article_id"] + [f"2020-09-1{d},c1,{key}" for d in range(5)]
        (root / "transactions_train.csv").write_text("\n".join(rows) + "\n")
        (root / "articles.csv").write_text(f"article_id,prod_name,detail_desc\n{key},Top,Jersey\n")
        touched.clear()
        result = ingest(
            read_hm(root, HMOptions(images_dir="../outside", text_columns=("detail_desc",))), SplitRules(min_user_interactions=3)
        )
        assert result.report["counts"]["image_outside_root"] == 1 and not under(touched, outside)


# --- rows ------------------------------------------------------------------------------------


class TestRows:
    """Unreadable values: the row is dropped and counted with its real row number, until a
    column is mostly unreadable; then ingest stops naming file, column, row and value."""

    def test_one_bad_timestamp_in_800_rows(self, tmp_path):
        root = write_movielens(tmp_path / "ml", with_bad(valid_times(), {761: "not-a-time"}))
        result = ingest(read_movielens_mm(root, MovielensOptions()), SplitRules())
        assert result.report["counts"]["bad_timestamp"] == 1 and result.report["users"] == 40
        (bad,) = result.report["bad_values"]
        assert (bad["column"], bad["rows"], bad["examples"], bad["values_read"]) == (
            "unix_timestamp",
            [761],
            ["'not-a-time'"],
            800,
        )

    def test_generic_integer_column_with_one_bad_value_names_the_real_row(self, tmp_path):
        # before: the column was parsed as ISO dates and the error blamed row 1 ('1000000', a valid value)
        times = with_bad(valid_times(10), {7: "not-a-time"})
        options = write_generic(tmp_path / "data", {}, times)
        result = ingest(
            read_generic(tmp_path / "data", replace(options, image_column=None)),
            SplitRules(min_user_interactions=4, max_bad_fraction=0.2),
        )
        (bad,) = result.report["bad_values"]
        assert (bad["rows"], bad["examples"], result.report["counts"]["bad_timestamp"]) == ([7], ["'not-a-time'"], 1)

    def test_generic_iso_column_with_one_bad_value(self, tmp_path):
        times = with_bad([f"2020-01-{d:02d}T10:00:00" for d in range(1, 11)], {3: "2020-13-45"})
        options = replace(write_generic(tmp_path / "data", {}, times), image_column=None)
        result = ingest(read_generic(tmp_path / "data", options), SplitRules(min_user_interactions=4, max_bad_fraction=0.2))
        assert result.report["bad_values"][0]["rows"] == [3] and result.report["counts"]["bad_timestamp"] == 1

    def test_first_five_rows_are_named_and_all_counted(self, tmp_path):
        bad = {row: f"bad{row}" for row in (5, 90, 200, 201, 333, 500, 799)}
        root = write_movielens(tmp_path / "ml", with_bad(valid_times(), bad))
        result = ingest(read_movielens_mm(root, MovielensOptions()), SplitRules())
        assert result.report["counts"]["bad_timestamp"] == 7
        assert result.report["bad_values"][0]["rows"] == [5, 90, 200, 201, 333]

    def test_mostly_unreadable_column_stops_naming_file_column_and_row(self, tmp_path):
        times = with_bad(valid_times(), {row: "2020-01-01" for row in range(3, 800, 5)})  # 160 of 800: 20%
        root = write_movielens(tmp_path / "ml", times)
        raw = read_movielens_mm(root, MovielensOptions())
        message = (
            r"ratings\.csv: column 'unix_timestamp' row 3: expected an integer, got '2020-01-01'; "
            r"160 of 800 values are unreadable, more than ingest.rules.max_bad_fraction 0.1"
        )
        with pytest.raises(SourceError, match=message):
            ingest(raw, SplitRules())
        assert ingest(raw, SplitRules(max_bad_fraction=0.25)).report["counts"]["bad_timestamp"] == 160

    def test_zero_tolerance(self, tmp_path):
        root = write_movielens(tmp_path / "ml", with_bad(valid_times(), {761: "x"}))
        with pytest.raises(SourceError, match="row 761"):
            ingest(read_movielens_mm(root, MovielensOptions()), SplitRules(max_bad_fraction=0.0))

    def test_padded_integer_is_read(self, tmp_path):
        root = write_movielens(tmp_path / "ml", with_bad(valid_times(100), {4: " 1000003 "}))
        assert "bad_timestamp" not in ingest(read_movielens_mm(root, MovielensOptions()), SplitRules()).report["counts"]

    def test_hm_row_bad_in_two_columns_is_counted_once(self, tmp_path):
        rows = ["t_dat,customer_id,article_id"] + [f"2020-09-{10 + d},c1,108775015" for d in range(12)] + ["someday,c1,0108-775"]
        (tmp_path / "transactions_train.csv").write_text("\n".join(rows) + "\n")
        (tmp_path / "articles.csv").write_text("article_id,prod_name,detail_desc\n108775015,Top,Jersey\nnot-an-id,Bad,Row\n")
        result = ingest(read_hm(tmp_path, HMOptions(text_columns=("detail_desc",))), SplitRules(max_bad_fraction=0.5))
        counts = result.report["counts"]
        assert counts["bad_timestamp"] == 1 and "bad_item" not in counts and counts["bad_item_key"] == 1
        assert [(b["column"], b["rows"]) for b in result.report["bad_values"]] == [("t_dat", [13]), ("article_id", [2])]

    def test_amazon_ids_and_times_of_the_wrong_type(self, tmp_path):
        reviews = [{"reviewerID": "A", "asin": f"B{k}", "unixReviewTime": 100 + k} for k in range(1, 21)]
        reviews[3]["reviewerID"] = {"id": "A"}  # line 4
        reviews[7]["asin"] = 3.5  # line 8
        reviews[11]["unixReviewTime"] = "last week"  # line 12
        (tmp_path / "r.json").write_text("\n".join(json.dumps(r) for r in reviews) + "\n")
        meta = [{"asin": f"B{k}", "title": f"t{k}"} for k in range(1, 21)] + [{"asin": ["B1"], "title": "list id"}]
        (tmp_path / "m.json.gz").write_bytes(gzip.compress("\n".join(json.dumps(m) for m in meta).encode()))
        raw = read_amazon2018(tmp_path, Amazon2018Options(reviews_file="r.json", meta_file="m.json.gz"))
        result = ingest(raw, SplitRules(max_bad_fraction=0.1))
        counts = result.report["counts"]
        assert (counts["bad_user"], counts["bad_item"], counts["bad_timestamp"], counts["bad_item_key"]) == (1, 1, 1, 1)
        where = {b["column"]: (b["where"], b["rows"]) for b in result.report["bad_values"] if b["reason"] != "bad_item_key"}
        assert where == {"reviewerID": ("line", [4]), "asin": ("line", [8]), "unixReviewTime": ("line", [12])}

    def test_bytes_that_are_not_utf8_are_replaced_and_counted(self, tmp_path):
        root = write_movielens(tmp_path / "ml", valid_times(100))
        items = (root / "items.csv").read_bytes().replace(b"Movie 7,", b"Movie \xff\xfe 7,")
        (root / "items.csv").write_bytes(items)
        result = ingest(read_movielens_mm(root, MovielensOptions()), SplitRules(max_user_interactions=20))
        assert result.report["counts"]["invalid_utf8"] == 1
        assert result.items.filter(result.items["item_key"] == "7")["title"][0] == "Movie \ufffd\ufffd 7"

    def test_missing_column_still_stops(self, tmp_path):
        root = write_movielens(tmp_path / "ml", valid_times(20))
        (root / "ratings.csv").write_text("user_id,movie_id,when\n1,2,3\n")
        with pytest.raises(SourceError, match=r"ratings\.csv: missing column\(s\) \['unix_timestamp'\]"):
            read_movielens_mm(root, MovielensOptions())

    def test_parquet_list_column_as_user_id_stops(self, tmp_path):
        frame = pl.DataFrame({"user_id": [["a"], ["b"]], "item_id": ["1", "2"], "timestamp": [1, 2]})
        frame.write_parquet(tmp_path / "i.parquet")
        pl.DataFrame({"item_id": ["1", "2"], "title": ["a", "b"], "description": ["", ""]}).write_parquet(tmp_path / "m.parquet")
        with pytest.raises(SourceError, match=r"i\.parquet: column 'user_id' holds List\(String\) values"):
            read_generic(tmp_path, GenericOptions(interactions_file="i.parquet", items_file="m.parquet"))

    def test_max_bad_fraction_is_checked(self):
        with pytest.raises(ConfigError, match=r"ingest\.rules: max_bad_fraction must be in 0\.\.1, got 1\.5"):
            from_dict(IngestConfig, {"rules": {"max_bad_fraction": 1.5}}, "ingest")


# --- empty results ---------------------------------------------------------------------------


class TestEmpty:
    """Nothing left: ingest stops and says which rule removed what."""

    def test_header_only_interactions_file(self, tmp_path):
        root = write_movielens(tmp_path / "ml", [])
        with pytest.raises(SourceError, match="no interactions read: the interactions file holds no data rows"):
            ingest(read_movielens_mm(root, MovielensOptions()), SplitRules())

    def test_every_user_too_short(self, tmp_path):
        root = write_movielens(tmp_path / "ml", valid_times(80), movie_ids=["1", "2", "3", "4"])  # 20 users x 4
        with pytest.raises(
            SourceError,
            match=r"no users left after the rules \(80 interactions read; removed: .*short_user 80.*min_user_interactions \(5\)",
        ):
            ingest(read_movielens_mm(root, MovielensOptions()), SplitRules())

    def test_items_file_without_rows(self, tmp_path):
        root = write_movielens(tmp_path / "ml", valid_times(100))
        (root / "items.csv").write_text("movie_id,title,overview\n")
        with pytest.raises(SourceError, match=r"removed: .*unknown_item 100"):
            ingest(read_movielens_mm(root, MovielensOptions()), SplitRules())


# --- text and the HTML page ------------------------------------------------------------------


TEMPLATE = TextFeaturesConfig().template  # "{title}. {text}"


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    vocab = tmp_path_factory.mktemp("vocab") / "vocab.txt"
    vocab.write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\n.\nthe\nmovie\ntoy\nstory\n")
    return transformers.BertTokenizer(vocab=str(vocab))


class TestText:
    """Texts the encoder cannot see whole get their own outcome in the feature file's metadata."""

    @staticmethod
    def outcomes(tokenizer, texts: list[str]) -> list[str]:
        return text_outcomes(tokenizer, tokenizer(texts)["input_ids"], 8)

    def test_100k_character_title_is_unknown_only(self, tokenizer):
        assert self.outcomes(tokenizer, ["x" * 100_000 + ". the movie", "x" * 100_000]) == ["fits", "unknown_only"]

    def test_100k_character_title_in_the_default_template_is_unknown_only(self, tokenizer):
        filled = [item_text(TEMPLATE, True, "x" * 100_000, ""), item_text(TEMPLATE, True, "x" * 100_000, "toy story")]
        assert filled[0].endswith(".") and self.outcomes(tokenizer, filled) == ["unknown_only", "fits"]

    def test_long_text_is_truncated(self, tokenizer):
        assert self.outcomes(tokenizer, ["the movie " * 50_000, "toy story"]) == ["truncated", "fits"]

    def test_script_the_vocabulary_lacks_is_unknown_only(self, tokenizer):
        assert self.outcomes(tokenizer, ["北京 東京", "toy story"]) == ["unknown_only", "fits"]


class TestHtml:
    """Titles on the recommendations page: markup escaped, control characters made visible."""

    @pytest.mark.parametrize(
        ("title", "shown"),
        [
            ("Evil\u202ecod.exe", "Evil\ufffdcod.exe"),  # right-to-left override
            ("Nul\x00byte", "Nul\ufffdbyte"),
            ("Bell\x07 and \x1b[31m", "Bell\ufffd and \ufffd[31m"),
            ("C1\x85\x9b", "C1\ufffd\ufffd"),
            ("Isolate\u2066x\u2069", "Isolate\ufffdx\ufffd"),
            ("<script>alert(1)</script>", "&lt;script&gt;alert(1)&lt;/script&gt;"),
            ("Tab\tand\nnewline", "Tab\tand\nnewline"),
        ],
    )
    def test_escape(self, title, shown):
        assert escape(title) == shown

    def test_page_with_hostile_titles_and_a_bomb_poster(self, tmp_path):
        titles = ["Evil\u202eexe", "Nul\x00", "<b>bold</b>", "Fine"]
        items = pa.table({"item_idx": np.arange(1, 5, dtype=np.int32), "title": titles})
        images = pa.table({"item_idx": np.arange(1, 5, dtype=np.int32), "image": [bomb(), b"junk", None, image_bytes()]})
        write_table(images, tmp_path / "images.parquet", schema.IMAGES)
        sequences = pa.table(
            {"user_idx": [0], "user_key": ["u\u202e1"], "train_items": [[1]], "valid_item": [2], "test_item": [3]}
        ).cast(schema.SEQUENCES)
        candidates = pa.table({"user_idx": [0], "items": [[4, 3]], "scores": [[2.0, 1.0]]}).cast(candidates_schema(["fused"]))
        page = recommendations_html(
            candidates, sequences, items, tmp_path / "images.parquet", ReportConfig(top_n=2, thumb_height=30)
        )
        assert not any(c in page for c in ("\u202e", "\x00", "<b>"))
        assert "Evil\ufffdexe" in page and "User u\ufffd1" in page and "&lt;b&gt;bold&lt;/b&gt;" in page
        assert page.count("data:image/jpeg;base64,") == 1  # only the good poster; the bomb is a placeholder


# --- artifacts, resume, interrupted writes, params ------------------------------------------


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> Path:
    return make_toy_dataset(tmp_path_factory.mktemp("toy"), num_users=16, num_items=20, seq_len=7)


class RunsCode:
    """Unpickling this object creates a marker file: proof that loading ran code."""

    marker: Path

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def crafted_pickle(path: Path, marker: Path) -> None:
    payload = RunsCode()
    payload.marker = marker
    with path.open("wb") as f:
        torch.save({"params": {}, "state_dict": payload, "epoch": 1}, f)


class TestArtifactsFromTheRemote:
    """model.pt and checkpoint.pt arrive through `dvc pull`: they load as data or not at all."""

    def test_a_crafted_checkpoint_is_refused_and_runs_nothing(self, toy, tmp_path):
        marker = tmp_path / "pwned"
        (tmp_path / "run").mkdir()
        crafted_pickle(tmp_path / "run/checkpoint.pt", marker)
        with pytest.raises(checkpoint.UntrustedArtifactError, match=r"checkpoint\.pt: refused to load: .*would run code"):
            train(toy_config(toy), tmp_path / "run", tmp_path / "logs")
        assert not marker.exists()

    def test_a_crafted_model_is_refused_and_runs_nothing(self, tmp_path):
        marker = tmp_path / "pwned"
        (tmp_path / "run").mkdir()
        crafted_pickle(tmp_path / "run/model.pt", marker)
        with pytest.raises(checkpoint.UntrustedArtifactError, match=r"model\.pt: refused to load: .*delete it and rerun `dvc repro`"):
            load_trained(tmp_path / "run", TrainConfig())
        assert not marker.exists()

    def test_the_files_training_writes_load_as_plain_data(self, toy, tmp_path):
        train(toy_config(toy), tmp_path / "run", tmp_path / "logs")
        for name in ("model.pt", "checkpoint.pt"):
            state = torch.load(tmp_path / "run" / name, weights_only=True)
            assert isinstance(state["params"], dict) and state["params"]["epochs"] == 1



@pytest.fixture(scope="module")
def trained(toy, tmp_path_factory) -> Path:
    """A finished toy run: models/odmt-s1/{model,checkpoint}.pt."""
    run = tmp_path_factory.mktemp("trained") / "models/odmt-s1"
    train(toy_config(toy), run, run.parent.parent / "logs")
    return run


def corrupt(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "random bytes":
        path.write_bytes(np.random.default_rng(0).bytes(len(data)))
    elif how == "missing keys":
        torch.save({"state_dict": {}}, path)
    else:  # NaN weights
        saved = torch.load(path, weights_only=True)
        weights = saved["state_dict" if "state_dict" in saved else "model"]
        name = next(k for k, v in weights.items() if v.is_floating_point())
        weights[name].view(-1)[:3] = torch.nan
        torch.save(saved, path)


class TestCorruptArtifacts:
    """A cut, empty, foreign, incomplete or NaN model.pt is named with what to rerun; such a
    checkpoint.pt is logged and training starts afresh."""

    @pytest.mark.parametrize(
        ("how", "error"),
        [
            ("truncated", r"model\.pt: cut short or corrupt \("),
            ("empty", r"model\.pt: empty file"),
            ("random bytes", r"model\.pt: not a file the train stage writes, corrupt or of another format"),
            ("missing keys", r"model\.pt: params, info missing"),
            ("nan", r"model\.pt: state_dict\.\S+ holds 3 NaN or infinite values"),
        ],
    )
    def test_a_broken_model_is_named_with_the_stage_to_rerun(self, trained, tmp_path, how, error):
        run = tmp_path / "models/odmt-s1"
        run.mkdir(parents=True)
        shutil.copy(trained / "model.pt", run / "model.pt")
        corrupt(run / "model.pt", how)
        with pytest.raises(ArtifactError, match=error + r".*delete it and rerun `dvc repro train@odmt-1`"):
            load_trained(run, TrainConfig())

    @pytest.mark.parametrize("how", ["truncated", "empty", "random bytes", "missing keys", "nan"])
    def test_a_broken_checkpoint_starts_afresh_and_says_so(self, toy, trained, tmp_path, caplog, how):
        run = tmp_path / "models/odmt-s1"
        run.mkdir(parents=True)
        shutil.copy(trained / "checkpoint.pt", run / "checkpoint.pt")
        corrupt(run / "checkpoint.pt", how)
        with caplog.at_level(logging.INFO, logger="pipeline"):
            _, info = train(toy_config(toy), run, tmp_path / "logs")
        assert f"{run / 'checkpoint.pt'}: " in caplog.text and "; starting afresh" in caplog.text
        assert "resuming" not in caplog.text and info == torch.load(trained / "model.pt", weights_only=True)["info"]

    def test_nan_vectors_in_an_export_are_refused(self, exported, tmp_path, monkeypatch):
        project = copy_project(exported, tmp_path)
        items = pq.read_table(project / f"exports/{RUN}/items.parquet")
        vectors = np.array(items.column("vector").to_pylist(), dtype=np.float32)
        vectors[4, :2] = np.nan
        column = pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel()), vectors.shape[1])
        pq.write_table(items.set_column(2, "vector", column).replace_schema_metadata(items.schema.metadata), project / f"exports/{RUN}/items.parquet")
        proc = serve(project / f"exports/{RUN}", {"u": ["i1"]}, tmp_path)
        assert proc.returncode != 0 and "items.parquet holds NaN or infinite vector values" in proc.stderr
        with pytest.raises(ExportMismatch, match=r"items\.parquet holds 2 NaN or infinite vector values"):
            run_stage(project, "recommend.py", "--run", RUN, monkeypatch=monkeypatch)


class TestParquetInputs:
    """An ingest table of the wrong schema, or cut short, is named with the column and the stage to rerun."""

    @staticmethod
    def stage_with(exported: Path, tmp_path: Path, monkeypatch, table: str, change) -> None:
        project = copy_project(exported, tmp_path)
        path = project / "data/ingest" / table
        change(path)
        run_stage(project, "recommend.py", "--run", RUN, monkeypatch=monkeypatch)

    @pytest.mark.parametrize(
        ("table", "change", "error"),
        [
            ("items.parquet", lambda p: pq.write_table(pq.read_table(p).set_column(1, "item_key", pa.array(range(20))), p),
             r"items\.parquet: column item_key is int64, expected string"),
            ("sequences.parquet", lambda p: pq.write_table(pq.read_table(p).drop(["test_item"]), p),
             r"sequences\.parquet: column test_item is missing"),
            ("sequences.parquet", lambda p: p.write_bytes(p.read_bytes()[:-100]),
             r"sequences\.parquet: not a readable Parquet file, cut short or corrupt"),
        ],
    )  # fmt: skip
    def test_a_wrong_ingest_table_is_named(self, exported, tmp_path, monkeypatch, table, change, error):
        with pytest.raises(ArtifactError, match=error + r".*rerun `dvc repro ingest`"):
            self.stage_with(exported, tmp_path, monkeypatch, table, change)



class TestCpuSwitches:
    """bfloat16 switches on a CPU without bfloat16 instructions are named in the log."""

    AVX2 = "processor\t: 0\nflags\t\t: fpu sse sse2 avx avx2 fma\n"

    @pytest.mark.parametrize(
        ("cpuinfo", "native"),
        [(AVX2, False), (AVX2.replace("avx2", "avx2 avx512f avx512_bf16"), True), ("Features\t: fp asimd sve bf16\n", True),
         ("Features\t: fp asimd\n", False), ("flags\t: amx_tile amx_bf16\n", True)],
    )  # fmt: skip
    def test_native_bf16_is_read_from_the_cpu_flags(self, cpuinfo, native):
        assert native_bf16(cpuinfo) is native

    @pytest.mark.parametrize("flags", ["avx2", "avx2 avx512_bf16"])
    def test_training_warns_when_bfloat16_would_be_emulated(self, toy, tmp_path, monkeypatch, caplog, flags):
        (tmp_path / "cpuinfo").write_text(f"flags\t: fpu {flags}\n")
        monkeypatch.setattr(trainer, "CPUINFO", tmp_path / "cpuinfo")
        with caplog.at_level(logging.WARNING, logger="pipeline"):
            train(toy_config(toy, cpu_bf16_validation=True), tmp_path / "run", tmp_path / "logs")
        warned = "train.cpu_bf16_validation: this CPU has no bfloat16 instructions (none of amx_bf16, avx512_bf16, bf16 in"
        assert (warned in caplog.text) is (flags == "avx2")

class TestResume:
    """A persisted checkpoint resumes only when nothing it was made from has changed."""

    def test_changed_training_code_starts_afresh(self, toy, tmp_path, monkeypatch, caplog):
        cfg = toy_config(toy, epochs=2)
        train(cfg, tmp_path / "run", tmp_path / "logs")
        edited = {**checkpoint.code_digest(), "pipeline/training/loss.py": "0" * 64}
        monkeypatch.setattr(checkpoint, "code_digest", lambda: edited)
        with caplog.at_level(logging.INFO, logger="pipeline"):
            _, rerun = train(cfg, tmp_path / "run", tmp_path / "logs")
        assert "code changed (pipeline/training/loss.py); starting afresh" in caplog.text
        assert "resuming" not in caplog.text
        _, fresh = train(cfg, tmp_path / "fresh", tmp_path / "fresh-logs")
        assert rerun == fresh and rerun["epochs_trained"] == 2

    def test_code_digest_sees_an_edit_of_any_listed_source(self, tmp_path):
        (tmp_path / "pkg").mkdir()
        (tmp_path / "pkg/a.py").write_text("x = 1\n")
        (tmp_path / "b.py").write_text("y = 2\n")
        before = checkpoint.code_digest(("pkg", "b.py"), tmp_path)
        (tmp_path / "pkg/a.py").write_text("x = 2\n")
        after = checkpoint.code_digest(("pkg", "b.py"), tmp_path)
        assert sorted(before) == ["b.py", "pkg/a.py"] and before["pkg/a.py"] != after["pkg/a.py"]

    def test_the_digested_code_is_what_dvc_lists_for_train(self):
        deps = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["train"]["deps"]
        code = [d for d in deps if d.startswith(("pipeline", "stages"))]
        assert sorted(code) == sorted(checkpoint.TRAIN_CODE)

    def test_fewer_epochs_than_the_checkpoint_trains_afresh(self, toy, tmp_path, caplog):
        cfg = toy_config(toy, epochs=3)
        train(cfg, tmp_path / "run", tmp_path / "logs")
        with caplog.at_level(logging.INFO, logger="pipeline"):
            _, shorter = train(dataclasses.replace(cfg, epochs=1), tmp_path / "run", tmp_path / "logs")
        assert "trained 3 epochs, more than epochs: 1; starting afresh" in caplog.text
        assert shorter["epochs_trained"] == 1 and shorter["best_epoch"] == 1

    def test_resumed_curves_have_no_duplicate_steps(self, toy, tmp_path):
        cfg = toy_config(toy, epochs=3)
        train(dataclasses.replace(cfg, epochs=2), tmp_path / "run", tmp_path / "logs")
        # killed after logging epoch 2 but before its checkpoint: the checkpoint still says epoch 1
        train(dataclasses.replace(cfg, epochs=1), tmp_path / "one", tmp_path / "one-logs")
        (tmp_path / "one/checkpoint.pt").replace(tmp_path / "run/checkpoint.pt")
        train(cfg, tmp_path / "run", tmp_path / "logs")
        for curve in (tmp_path / "logs/plots/metrics").rglob("*.tsv"):
            header, *rows = (line.split("\t") for line in curve.read_text().splitlines())
            steps = [row[header.index("step")] for row in rows]
            assert steps == ["1", "2", "3"], curve


class TestInterruptedWrites:
    def test_a_killed_writes_temp_file_is_removed_by_the_next_write(self, tmp_path):
        leftover = tmp_path / ".metrics.json.abc123.tmp"  # what a SIGKILL mid-write leaves
        leftover.write_text("{half")
        other = tmp_path / ".other.json.abc123.tmp"  # another target's: not ours to remove
        other.write_text("{")
        write_json({"a": 1}, tmp_path / "metrics.json")
        assert not leftover.exists() and other.exists()
        assert sorted(p.name for p in tmp_path.iterdir()) == [".other.json.abc123.tmp", "metrics.json"]

    def test_a_failed_write_leaves_the_old_file_and_no_temp_file(self, tmp_path):
        target = tmp_path / "table.parquet"
        target.write_bytes(b"old")
        with pytest.raises(RuntimeError), atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("killed")
        assert target.read_bytes() == b"old" and os.listdir(tmp_path) == ["table.parquet"]

    def test_git_and_dvc_ignore_temp_files(self):
        for name in (".gitignore", ".dvcignore"):
            assert ".*.tmp" in (ROOT / name).read_text().splitlines(), name


class TestParams:
    @staticmethod
    def params(tmp_path: Path, data: dict | str) -> Path:
        path = tmp_path / "params.yaml"
        path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
        return path

    def test_a_misspelled_section_is_an_error_naming_it(self, tmp_path):
        path = self.params(tmp_path, {"train": {}, "trian": {"lr": 0.1}})
        with pytest.raises(ConfigError, match=r"params\.yaml: trian: unknown section \(known: ingest, "):
            load_section(TrainConfig, "train", path)

    def test_every_section_of_the_shipped_params_is_known(self):
        for name in ("params.yaml", "params-paper.yaml"):
            assert set(yaml.safe_load((ROOT / name).read_text())) <= set(SECTIONS), name

    @pytest.mark.parametrize(("written", "value"), [("1e-3", 1e-3), ("5E-4", 5e-4), ("1.5e-2", 0.015), ("+2e0", 2.0)])
    def test_scientific_notation_is_a_number(self, tmp_path, written, value):
        path = self.params(tmp_path, f"train:\n  lr: {written}\n  epochs: 1e1\n")
        cfg = load_section(TrainConfig, "train", path)
        assert cfg.lr == value and cfg.epochs == 10 and isinstance(cfg.epochs, int)

    def test_a_fractional_count_names_the_key(self, tmp_path):
        with pytest.raises(ConfigError, match=r"train\.epochs: expected int, got float 0\.01"):
            load_section(TrainConfig, "train", self.params(tmp_path, "train:\n  epochs: 1e-2\n"))

    def test_a_word_where_a_number_goes_names_the_key(self, tmp_path):
        with pytest.raises(ConfigError, match=r"train\.model\.width: expected int, got str 'wide'"):
            load_section(TrainConfig, "train", self.params(tmp_path, {"train": {"model": {"width": "wide"}}}))

    def test_broken_yaml_names_the_file_and_line(self, tmp_path):
        with pytest.raises(ConfigError, match=r"params\.yaml: not valid YAML at line 3, column 1: expected ',' or '\]'"):
            load_section(TrainConfig, "train", self.params(tmp_path, "train:\n  lr: [1\n"))

    def test_a_range_error_names_the_section_and_key(self, tmp_path):
        with pytest.raises(ConfigError, match=r"train: epochs must be >= 1, got 0"):
            load_section(TrainConfig, "train", self.params(tmp_path, {"train": {"epochs": 0}}))


def test_no_code_path_unpickles_freely():
    # the one place that deserialises model files is checkpoint.load (weights_only=True)
    offenders = [
        str(p.relative_to(ROOT))
        for folder in ("pipeline", "stages")
        for p in (ROOT / folder).rglob("*.py")
        if "weights_only=False" in p.read_text() or "pickle.load" in p.read_text()
    ]
    assert offenders == []


# --- the export: no code when loaded, its files checked against each other and the model ---

RUN = "odmt-s1"


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    """A project folder as the DAG leaves it after export@odmt-s1, and a second model's export
    (odmt-s2) beside it."""
    root = tmp_path_factory.mktemp("exported")
    data = make_toy_dataset(root / "data", num_users=16, num_items=20, seq_len=7)
    (root / "params.yaml").write_text(yaml.safe_dump({"recommend": {"runs": [RUN], "k": 3}, "train": {}, "report": {}}))
    with pytest.MonkeyPatch.context() as mp:
        for seed in (1, 2):
            train(toy_config(data, seed=seed), root / f"models/odmt-s{seed}", root / f"logs/odmt-s{seed}")
            run_stage(root, "export.py", "--run", f"odmt-s{seed}", monkeypatch=mp)
    return root


def copy_project(exported: Path, tmp_path: Path) -> Path:
    shutil.copytree(exported, tmp_path / "project")
    return tmp_path / "project"


def serve(export: Path, histories: dict, cwd: Path) -> subprocess.CompletedProcess:
    """examples/score_from_export.py in a fresh `python -I` process."""
    (cwd / "histories.json").write_text(json.dumps(histories))
    script = ROOT / "examples/score_from_export.py"
    return subprocess.run([sys.executable, "-I", str(script), str(export), "histories.json"], cwd=cwd, capture_output=True, text=True)


class TestExport:
    def test_a_crafted_user_encoder_runs_nothing_in_the_client(self, exported, tmp_path):
        project, marker = copy_project(exported, tmp_path), tmp_path / "pwned"
        crafted_pickle(project / f"exports/{RUN}/user_encoder.onnx", marker)
        proc = serve(project / f"exports/{RUN}", {"u": ["i1", "i2"]}, tmp_path)
        assert proc.returncode != 0 and "user_encoder.onnx: not a loadable ONNX model" in proc.stderr
        assert not marker.exists()

    def test_the_client_refuses_an_index_of_another_export(self, exported, tmp_path):
        project = copy_project(exported, tmp_path)
        shutil.copy(project / "exports/odmt-s2/index.faiss", project / f"exports/{RUN}/index.faiss")
        proc = serve(project / f"exports/{RUN}", {"u": ["i1", "i2"]}, tmp_path)
        assert proc.returncode != 0 and "index.faiss is not the one items.parquet was written with" in proc.stderr

    @pytest.mark.parametrize(
        ("rows", "dim", "error"),
        [
            (2000, 24, r"2000 index rows and 20 in items\.parquet, the model has 20 items"),
            (20, 64, r"64-dimensional index, the model's vectors have 24"),
            (20, 24, r"index\.faiss is not the one items\.parquet was written with"),
        ],
    )
    def test_recommend_refuses_an_index_that_does_not_fit(self, exported, tmp_path, monkeypatch, rows, dim, error):
        project = copy_project(exported, tmp_path)
        index = faiss.IndexFlatIP(dim)
        index.add(np.random.default_rng(0).standard_normal((rows, dim), dtype=np.float32))
        faiss.write_index(index, str(project / f"exports/{RUN}/index.faiss"))
        with pytest.raises(ExportMismatch, match=rf"exports/{RUN}: .*{error}.*rerun `dvc repro export@{RUN}`"):
            run_stage(project, "recommend.py", "--run", RUN, monkeypatch=monkeypatch)
        assert not (project / "data/recommendations").exists()

    def test_recommend_refuses_the_export_of_another_model(self, exported, tmp_path, monkeypatch):
        project = copy_project(exported, tmp_path)
        shutil.rmtree(project / f"exports/{RUN}")
        shutil.copytree(project / "exports/odmt-s2", project / f"exports/{RUN}")
        with pytest.raises(ExportMismatch, match=rf"exported from another model than models/{RUN}/model\.pt"):
            run_stage(project, "recommend.py", "--run", RUN, monkeypatch=monkeypatch)


    def test_a_model_file_does_not_choose_the_feature_files_read(self, exported, tmp_path, monkeypatch, touched):
        """model.pt's params name feature files outside the project: the stage reads the params' own."""
        project, outside = copy_project(exported, tmp_path), tmp_path / "outside"
        shutil.copytree(project / "data/features", outside)
        saved = checkpoint.load(project / f"models/{RUN}/model.pt")
        saved["params"] |= {"text_features": str(outside / "text.parquet"), "image_features": str(outside / "image.parquet")}
        checkpoint.save(saved, project / f"models/{RUN}/model.pt")
        touched.clear()  # the copies above
        run_stage(project, "export.py", "--run", RUN, monkeypatch=monkeypatch)
        assert under(touched, outside) == [] and under(touched, project / "data/features")



@pytest.fixture
def recommended(exported, tmp_path, monkeypatch) -> Path:
    """A copy of the exported project with its recommendations, as the current folder."""
    project = copy_project(exported, tmp_path)
    run_stage(project, "recommend.py", "--run", RUN, monkeypatch=monkeypatch)
    return project


class TestOneUser:
    """`python -m pipeline.recommend --run R --user U`: bad arguments and odd data are named."""

    def test_a_negative_top_is_refused(self, recommended, capsys):
        with pytest.raises(SystemExit):
            recommend_main(["--run", RUN, "--user", "u1", "--top", "-3"])
        assert "argument --top: expected an integer >= 1, got '-3'" in capsys.readouterr().err

    def test_html_into_a_missing_folder_names_it(self, recommended, tmp_path, caplog):
        assert recommend_main(["--run", RUN, "--user", "u1", "--html", str(tmp_path / "nowhere/u1.html")]) == 1
        assert f"the folder {tmp_path / 'nowhere'} does not exist" in caplog.text

    def test_a_user_missing_from_the_sequences_is_named(self, recommended, caplog):
        path = recommended / "data/ingest/sequences.parquet"
        sequences = pq.read_table(path)
        pq.write_table(sequences.filter(pc.not_equal(sequences["user_key"], "u1")), path)
        assert recommend_main(["--run", RUN, "--user", "u1"]) == 1
        assert "user 'u1' is in data/recommendations/odmt-s1.parquet but not in data/ingest/sequences.parquet" in caplog.text

    def test_control_characters_and_ansi_escapes_do_not_reach_the_terminal(self, recommended, capsys):
        path = recommended / "data/ingest/items.parquet"
        items = pq.read_table(path)
        titles = [f"\x1b[2J\x1b[31mEvil {i}\x07\u202e" for i in range(items.num_rows)]
        write_table(items.set_column(2, "title", pa.array(titles)), path, schema.ITEMS)
        assert recommend_main(["--run", RUN, "--user", "u1"]) == 0
        out = capsys.readouterr().out
        assert "\ufffd[2J\ufffd[31mEvil " in out and not any(c in out for c in "\x1b\x07\u202e")

# --- params that dvc.yaml writes into command lines ------------------------------------------

CRAFTED_PARAMS = {
    "score.launcher": {"score": {"launcher": "touch MARK; python"}},
    "text_features.launcher": {"text_features": {"launcher": "python $(touch MARK)"}},
    "image_features.launcher": {"image_features": {"launcher": "torchrun --nproc_per_node `touch MARK`"}},
    r"runs.variant\[1\]": {"runs": {"variant": ["odmt", "x; touch MARK #"]}},
    r"runs.seed\[0\]": {"runs": {"seed": ["1 && touch MARK"]}},
    r"recommend.runs\[0\]": {"recommend": {"runs": ["odmt-s1; touch MARK"]}},
}


def make_route(repo: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    """`make repro` in ``repo`` with a stand-in .venv: this interpreter, installed already."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin/python").write_text(f'#!/bin/sh\nexec {sys.executable} "$@"\n')
    (venv / "bin/python").chmod(0o755)
    (venv / ".installed-requirements.txt").touch()
    return subprocess.run(["make", "-s", "repro", f"VENV={venv}"], cwd=repo, capture_output=True, text=True)


class TestParamsInCommands:
    """dvc.yaml puts these params into shell command lines: each is refused before any runs."""

    @pytest.mark.parametrize("key", list(CRAFTED_PARAMS))
    def test_make_repro_refuses_a_crafted_param_and_runs_nothing(self, key, tmp_path):
        repo = make_project(tmp_path / "repo", CRAFTED_PARAMS[key])
        proc = make_route(repo, tmp_path)
        assert proc.returncode != 0 and re.search(rf"^{key}: .* is not a", proc.stderr, re.M), proc.stderr
        assert "Nothing was run" in proc.stderr and not (repo / "MARK").exists()

    @pytest.mark.parametrize("key", [r"score.launcher", r"runs.variant\[1\]"])
    def test_plain_dvc_repro_stops_at_check_params_and_runs_nothing(self, key, tmp_path):
        repo = make_project(tmp_path / "repo", CRAFTED_PARAMS[key])
        proc = attempt(["dvc", "repro"], repo)
        assert proc.returncode != 0 and "failed to reproduce 'check_params'" in proc.stderr
        assert re.search(rf"{key}: .* is not a", proc.stdout + proc.stderr) and not (repo / "MARK").exists()

    def test_every_param_in_a_command_line_is_checked(self):
        """The params that dvc.yaml interpolates into a `cmd` are those check_params declares."""
        stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
        interpolated = set()
        for stage in stages.values():
            cmd = stage.get("cmd") or stage["do"]["cmd"]
            interpolated |= set(re.findall(r"\$\{([^}]+)\}", cmd))
            interpolated |= {stage[loop][2:-1] for loop in ("foreach",) if loop in stage}
            interpolated |= {v[2:-1] for v in stage.get("matrix", {}).values()}
        interpolated = {name for name in interpolated if not name.startswith(("item", "key"))}
        assert interpolated == {"text_features.launcher", "image_features.launcher", "score.launcher", "runs.variant", "runs.seed", "recommend.runs"}
        declared = set(stages["check_params"]["params"])
        assert {name for name in interpolated if name not in declared and name.split(".")[0] not in declared} == set()
        assert "data/params_check.txt" in stages["ingest"]["deps"]  # so that every stage is downstream of the check

    @pytest.mark.parametrize(
        "launcher", ["python", "torchrun --nproc_per_node 8", "torchrun --standalone --nnodes=1 --nproc-per-node=2"]
    )
    def test_the_documented_launchers_pass(self, launcher):
        assert check_launcher(launcher, "score.launcher") == launcher

    def test_a_stage_refuses_a_run_name_that_is_not_one(self, tmp_path, monkeypatch, capsys):
        with pytest.raises(SystemExit):
            run_stage(tmp_path, "evaluate.py", "--run", "../../etc-s1", monkeypatch=monkeypatch)
        assert "argument --run: --run: '../../etc-s1' is not a run name" in capsys.readouterr().err
