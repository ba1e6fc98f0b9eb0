"""Is a difference between two runs a finding or noise? Paired statistics over users.

Every user is measured by both runs (the same leave-one-out targets), so runs are compared user
by user: the evaluate stage saves each user's metrics beside the metrics file
(metrics/{run}.users.parquet). From those:

- a confidence interval of a run's metric: a bootstrap over users (scipy.stats.bootstrap);
- the difference of two runs with a bootstrap interval of the mean per-user difference, and a
  paired randomization test (scipy.stats.permutation_test: each user's two values swapped at
  random) with a paired t-test beside it (scipy.stats.ttest_rel).

Several seeds of one variant are aggregated per user (each user's mean over the seeds) before
the users are resampled. The resampling is seeded: the same files give the same intervals and
p-values. The command compares any two runs, from any commit:

    python -m pipeline.compare sasrec_id-s1 odmt-s1               # metrics/{run}.users.parquet
    python -m pipeline.compare main:odmt-s1 odmt-s1               # the file at a git revision
    python -m pipeline.compare odmt-s1,odmt-s2,odmt-s3 path/to/other.users.parquet --split valid

A difference is called significant when the randomization test's p-value is below 0.05 and the
interval of the difference excludes 0; otherwise it is within noise. Each comparison is one
test at the 5% level: across many comparisons some 1 in 20 true nulls is flagged.
"""

from __future__ import annotations

import argparse
import io
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from scipy import stats

CONFIDENCE = 0.95
ALPHA = 0.05  # the randomization test's level for "significant"
RESAMPLES = 10_000
SEED = 0
RESAMPLED_VALUES = 10_000_000  # resamples x users held at once (80 MB), whatever the number of users


@dataclass(frozen=True)
class Estimate:
    mean: float
    low: float  # the bootstrap interval at CONFIDENCE
    high: float


@dataclass(frozen=True)
class Comparison:
    """`candidate` against `baseline` on one metric, over the same users."""

    baseline: Estimate
    candidate: Estimate
    difference: Estimate  # candidate - baseline, mean over users
    p_randomization: float
    p_t_test: float
    users: int

    @property
    def significant(self) -> bool:
        return self.p_randomization < ALPHA and not self.difference.low <= 0 <= self.difference.high

    def verdict(self) -> str:
        """'better', 'worse' (the candidate, significant) or 'within noise'."""
        if not self.significant:
            return "within noise"
        return "better" if self.difference.mean > 0 else "worse"


def estimate(values: np.ndarray) -> Estimate:
    """Mean over users and its bootstrap interval (percentile; the users resampled)."""
    values = np.asarray(values, dtype=np.float64)
    if np.ptp(values) == 0:  # every user alike (all misses, say): nothing to resample
        return Estimate(float(values.mean()), float(values.mean()), float(values.mean()))
    result = stats.bootstrap(
        (values,), np.mean, n_resamples=RESAMPLES, confidence_level=CONFIDENCE, method="percentile",
        vectorized=True, batch=_batch(len(values)), rng=np.random.default_rng(SEED),
    )
    return Estimate(float(values.mean()), float(result.confidence_interval.low), float(result.confidence_interval.high))


def compare(baseline: np.ndarray, candidate: np.ndarray) -> Comparison:
    """Paired comparison of per-user values (the same users in the same order)."""
    baseline, candidate = np.asarray(baseline, dtype=np.float64), np.asarray(candidate, dtype=np.float64)
    if baseline.shape != candidate.shape or baseline.ndim != 1:
        raise ValueError(f"paired values need the same users: {baseline.shape} against {candidate.shape}")
    difference = candidate - baseline
    if not difference.any():  # the same values for every user: no difference at all
        p_randomization = p_t_test = 1.0
    else:
        p_randomization = float(
            stats.permutation_test(
                (candidate, baseline), _mean_difference, permutation_type="samples", n_resamples=RESAMPLES,
                vectorized=True, batch=_batch(len(difference)), rng=np.random.default_rng(SEED),
            ).pvalue
        )
        p_t_test = float(stats.ttest_rel(candidate, baseline).pvalue) if np.ptp(difference) > 0 else 0.0
    return Comparison(estimate(baseline), estimate(candidate), estimate(difference), p_randomization, p_t_test, len(difference))


def _batch(users: int) -> int:
    return max(1, RESAMPLED_VALUES // max(users, 1))


def _mean_difference(x: np.ndarray, y: np.ndarray, axis: int) -> np.ndarray:
    return np.mean(x - y, axis=axis)


# --- per-user files ----------------------------------------------------------------------------


def read_user_values(spec: str, root: Path = Path(".")) -> pa.Table:
    """A per-user file named by `spec`: a path, a run name (metrics/{run}.users.parquet), or
    either after `REV:` for the file as committed at a git revision (`main:odmt-s1`)."""
    revision, colon, name = spec.partition(":")
    if not colon:
        revision, name = "", spec
    path = Path(name) if name.endswith(".parquet") else Path("metrics") / f"{name}.users.parquet"
    if not revision:
        if not (root / path).exists():
            raise FileNotFoundError(f"{root / path}: no per-user file; run the evaluate stage for this run (dvc repro)")
        return pq.read_table(root / path)
    shown = subprocess.run(["git", "show", f"{revision}:{path.as_posix()}"], cwd=root, capture_output=True)
    if shown.returncode:
        raise FileNotFoundError(f"{revision}:{path}: not in git ({shown.stderr.decode().strip()})")
    return pq.read_table(io.BytesIO(shown.stdout))


def user_matrix(tables: list[pa.Table], split: str, ranking: str, metric: str, names: list[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(user_idx, each user's value averaged over the tables: one per seed) for one split, ranking
    and metric. Every table must hold the same users."""
    names = names or [f"table {i + 1}" for i in range(len(tables))]
    users, columns = None, []
    for name, table in zip(names, tables):
        if metric not in table.column_names:
            raise KeyError(f"{name}: no per-user {metric} (it has {', '.join(table.column_names)}); add its cutoff to evaluate.ks")
        rows = table.filter((pc.field("split") == split) & (pc.field("ranking") == ranking)).sort_by("user_idx")
        if rows.num_rows == 0:
            raise ValueError(f"{name}: no rows for split {split!r}, ranking {ranking!r}")
        idx = rows.column("user_idx").to_numpy()
        if users is not None and not np.array_equal(users, idx):
            raise ValueError(f"{name}: other users than {names[0]} in the {split} split: runs on other data cannot be paired")
        users = idx
        columns.append(rows.column(metric).to_numpy())
    return users, np.mean(columns, axis=0)


def paired(baseline: list[pa.Table], candidate: list[pa.Table], split: str, ranking: str, metric: str, names: tuple[list[str], list[str]] | None = None) -> Comparison:
    """The comparison of two groups of runs (their seeds aggregated per user) on one metric."""
    base_names, cand_names = names or (None, None)
    base_users, base_values = user_matrix(baseline, split, ranking, metric, base_names)
    cand_users, cand_values = user_matrix(candidate, split, ranking, metric, cand_names)
    if not np.array_equal(base_users, cand_users):
        raise ValueError(f"the two sides hold other users in the {split} split: runs on other data cannot be paired")
    return compare(base_values, cand_values)


def points(value: float) -> str:
    return f"{100 * value:.2f}"


def interval(e: Estimate, signed: bool = False) -> str:
    form = "{:+.2f}" if signed else "{:.2f}"
    return f"{form.format(100 * e.mean)} [{form.format(100 * e.low)}, {form.format(100 * e.high)}]"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("baseline", help="run name, per-user file or REV:either; several (seeds) joined by commas")
    parser.add_argument("candidate", help="the same, compared against the baseline")
    parser.add_argument("--split", default="test", choices=["valid", "test"])
    parser.add_argument("--ranking", default="fused", help="fused, or a branch: id, text, image")
    parser.add_argument("--metrics", nargs="+", default=["hr@10", "ndcg@10", "mrr@10"])
    args = parser.parse_args(argv)
    sides = [args.baseline.split(","), args.candidate.split(",")]
    tables = [[read_user_values(spec) for spec in side] for side in sides]
    print(f"{args.split} split, {args.ranking} ranking, in % ({100 * CONFIDENCE:.0f}% bootstrap intervals over users; seeds averaged per user)")
    print(f"baseline: {', '.join(sides[0])}\ncandidate: {', '.join(sides[1])}")
    print("| metric | baseline | candidate | candidate - baseline | p (randomization) | p (t-test) | verdict |")
    print("|---|---|---|---|---|---|---|")
    for metric in args.metrics:
        c = paired(tables[0], tables[1], args.split, args.ranking, metric, (sides[0], sides[1]))
        print(f"| {metric} | {interval(c.baseline)} | {interval(c.candidate)} | {interval(c.difference, signed=True)} | {c.p_randomization:.4f} | {c.p_t_test:.4f} | {c.verdict()} |")
    print(f"{c.users} users. 'within noise': p >= {ALPHA} or the interval of the difference contains 0.")


if __name__ == "__main__":
    main()
