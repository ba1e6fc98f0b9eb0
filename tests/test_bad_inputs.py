"""Planted faults: each asserts the exact outcome (a counted reason, a conversion, a refusal or
the clear error text), never only that nothing crashed."""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path

import pytest
import torch
import yaml

from pipeline.config import SECTIONS, ConfigError, load_section
from pipeline.io import atomic_path, write_json
from pipeline.training import TrainConfig, checkpoint, load_trained
from pipeline.training.trainer import train
from tests.test_training import toy_config
from tests.toy import make_toy_dataset

ROOT = Path(__file__).resolve().parents[1]


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
            load_trained(tmp_path / "run")
        assert not marker.exists()

    def test_the_files_training_writes_load_as_plain_data(self, toy, tmp_path):
        train(toy_config(toy), tmp_path / "run", tmp_path / "logs")
        for name in ("model.pt", "checkpoint.pt"):
            state = torch.load(tmp_path / "run" / name, weights_only=True)
            assert isinstance(state["params"], dict) and state["params"]["epochs"] == 1


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
