"""Paired comparisons of runs: a planted improvement is found, two runs of one model are noise."""

from __future__ import annotations

import subprocess

import numpy as np
import pyarrow as pa
import pytest

from pipeline import compare
from pipeline.evaluation import user_values
from pipeline.io import write_table
from pipeline.metrics import per_user

USERS = 943  # the embedded data's users


@pytest.fixture(autouse=True)
def fewer_resamples(monkeypatch):
    monkeypatch.setattr(compare, "RESAMPLES", 2000)  # quicker; the p-values here are far from 0.05


def model_runs(gain: float, runs: int = 2, seed: int = 0) -> tuple[np.ndarray, list[np.ndarray]]:
    """Per-user ranks of a baseline model and of `runs` runs of a model whose chance of a hit is
    `gain` higher for every user (0: runs of the same model, each with its own noise). Users
    differ in how predictable they are, as real users do."""
    rng = np.random.default_rng(seed)
    chance = rng.beta(1, 7, USERS)

    def ranks(p: np.ndarray) -> np.ndarray:
        hit = rng.random(USERS) < np.minimum(p, 1)
        return np.where(hit, rng.integers(1, 11, USERS), np.inf)

    return ranks(chance), [ranks(chance + gain) for _ in range(runs)]


def write_run(root, name: str, ranks: np.ndarray, users: np.ndarray | None = None) -> None:
    users = np.arange(len(ranks)) if users is None else users
    table = pa.concat_tables(user_values(users, split, "fused", ranks, (10,)) for split in ("valid", "test"))
    write_table(table, root / f"metrics/{name}.users.parquet", table.schema)


def test_a_planted_improvement_is_detected():
    baseline, (better, _) = model_runs(gain=0.05)
    c = compare.compare(per_user(baseline, (10,))["hr@10"], per_user(better, (10,))["hr@10"])
    assert c.significant and c.verdict() == "better" and c.p_randomization < 0.01 and c.p_t_test < 0.01
    assert 0 < c.difference.low < c.difference.mean < c.difference.high
    assert c.difference.mean == pytest.approx(c.candidate.mean - c.baseline.mean)
    # and the other way round, a regression
    assert compare.compare(per_user(better, (10,))["hr@10"], per_user(baseline, (10,))["hr@10"]).verdict() == "worse"


def test_two_runs_of_the_same_model_are_within_noise():
    # A test at the 5% level flags about 1 in 20 such pairs by chance: 20 pairs of runs of one
    # model (each with its own noise) may give a few, not many.
    flagged = 0
    for seed in range(20):
        _, (first, second) = model_runs(gain=0.0, seed=seed)
        c = compare.compare(per_user(first, (10,))["hr@10"], per_user(second, (10,))["hr@10"])
        flagged += c.significant
        assert c.significant == (not c.difference.low <= 0 <= c.difference.high)  # the interval and the test agree here
    assert flagged <= 3


def test_identical_runs_differ_by_nothing():
    _, (run, _) = model_runs(gain=0.0)
    values = per_user(run, (10,))["hr@10"]
    c = compare.compare(values, values.copy())
    assert (c.difference.mean, c.p_randomization, c.verdict()) == (0.0, 1.0, "within noise")


def test_the_command_pairs_files_runs_and_seeds_and_refuses_other_users(tmp_path, monkeypatch, capsys):
    baseline, runs = model_runs(gain=0.05)
    write_run(tmp_path, "sasrec_id-s1", baseline)
    for seed, ranks in enumerate(runs, 1):
        write_run(tmp_path, f"odmt-s{seed}", ranks)
    monkeypatch.chdir(tmp_path)
    compare.main(["sasrec_id-s1", "odmt-s1,odmt-s2", "--metrics", "hr@10"])
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("| hr@10 |"))
    assert row.endswith("| better |") and "candidate: odmt-s1, odmt-s2" in out
    # the seeds' per-user mean is what is compared
    both = compare.user_matrix([compare.read_user_values(f"odmt-s{s}") for s in (1, 2)], "test", "fused", "hr@10")[1]
    assert f"| {100 * both.mean():.2f} [" in row
    compare.main(["odmt-s1", "metrics/odmt-s1.users.parquet", "--split", "valid"])
    assert "| hr@10 | " in (out := capsys.readouterr().out) and "+0.00 [+0.00, +0.00] | 1.0000 | 1.0000 | within noise |" in out

    write_run(tmp_path, "other-data", baseline[:-1], np.arange(1, USERS))
    with pytest.raises(ValueError, match="other users.*cannot be paired"):
        compare.main(["other-data", "odmt-s1"])
    with pytest.raises(FileNotFoundError, match="run the evaluate stage"):
        compare.main(["gru4rec-s1", "odmt-s1"])


def test_a_run_is_read_as_committed_at_a_git_revision(tmp_path, monkeypatch, capsys):
    baseline, (better, _) = model_runs(gain=0.05)
    write_run(tmp_path, "odmt-s1", baseline)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
    subprocess.run(["git", "init", "-q", "-b", "main"], cwd=tmp_path, check=True)
    subprocess.run(git + ["add", "metrics"], cwd=tmp_path, check=True)
    subprocess.run(git + ["commit", "-qm", "before"], cwd=tmp_path, check=True)
    write_run(tmp_path, "odmt-s1", better)  # the working tree's run, after a change
    monkeypatch.chdir(tmp_path)
    compare.main(["main:odmt-s1", "odmt-s1", "--metrics", "hr@10"])
    assert next(line for line in capsys.readouterr().out.splitlines() if line.startswith("| hr@10 |")).endswith("| better |")
    with pytest.raises(FileNotFoundError, match="not in git"):
        compare.read_user_values("main:sasrec_id-s1")
