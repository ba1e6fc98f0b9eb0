"""PNG charts for the report, drawn with matplotlib: pictures that open anywhere.

`dvc plots show` keeps working from the same files, but its page loads Vega from a CDN and is
blank offline; these PNGs need nothing. Two kinds:
- the training curves of one run (dvclive's logs/{run}/plots/metrics): loss per branch, the
  distillation weight, and validation HR@10 per branch and fused, per epoch;
- metrics against the cutoff K per variant (plots/at_k/{run}.json of the evaluate stage): the
  mean over seeds as a line, the spread over seeds (min..max) as a band.
Files are byte-reproducible: no timestamps or software versions in the PNG metadata.
"""

from __future__ import annotations

import csv
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display: files only
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
import numpy as np  # noqa: E402

from pipeline.io import atomic_path, read_json  # noqa: E402

PNG_METADATA = {"Software": None}  # matplotlib writes its version by default
BRANCH_COLOURS = {"fused": "black", "id": "tab:blue", "text": "tab:orange", "image": "tab:green"}


def read_curve(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """A dvclive .tsv file: (steps, values)."""
    with path.open() as f:
        rows = list(csv.reader(f, delimiter="\t"))[1:]
    return np.array([int(r[0]) for r in rows]), np.array([float(r[1]) for r in rows])


def save(figure: plt.Figure, path: Path) -> None:
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=100, metadata=PNG_METADATA, bbox_inches="tight")
    plt.close(figure)


def training_curves(metrics_dir: Path, run: str, path: Path) -> bool:
    """Draw one run's training curves from its dvclive folder into ``path``; False (nothing
    drawn) when the run has no curves."""
    train, valid = Path(metrics_dir) / "train", Path(metrics_dir) / "valid"
    if not (train / "loss.tsv").exists():
        return False
    figure, (loss_ax, kd_ax, hr_ax) = plt.subplots(1, 3, figsize=(13, 4), layout="constrained")
    # Per-branch terms only: the total (their sum, with the ramped distillation terms) would
    # dwarf them; it is in dvc plots.
    for branch in ("id", "text", "image", "fused"):
        if (train / f"ce_{branch}.tsv").exists():
            loss_ax.plot(*read_curve(train / f"ce_{branch}.tsv"), label=f"{branch}: cross-entropy", color=BRANCH_COLOURS[branch])
    for tsv in sorted(train.glob("kd_*_from_*.tsv")):
        student = tsv.stem.split("_")[1]
        label = tsv.stem.removeprefix("kd_").replace("_from_", " <- ")
        loss_ax.plot(*read_curve(tsv), label=label, color=BRANCH_COLOURS.get(student), linestyle=":")
    loss_ax.set(title="training loss per branch (dotted: distillation)", xlabel="epoch", ylabel="loss")
    if (train / "kd_weight.tsv").exists():
        kd_ax.plot(*read_curve(train / "kd_weight.tsv"), color="tab:purple")
    kd_ax.set(title="distillation weight w(e)", xlabel="epoch", ylim=(-0.05, 1.05))
    for branch in ("fused", "id", "text", "image"):
        tsv = valid / branch / "hr@10.tsv"
        if tsv.exists():
            steps, values = read_curve(tsv)
            width = 2.5 if branch == "fused" else 1.2
            hr_ax.plot(steps, 100 * values, label=branch, color=BRANCH_COLOURS[branch], linewidth=width)
    hr_ax.set(title="validation HR@10 (%)", xlabel="epoch")
    for ax in (loss_ax, hr_ax):
        ax.legend(fontsize=8)
    for ax in (loss_ax, kd_ax, hr_ax):
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs
    figure.suptitle(f"Training of {run}", fontweight="bold")
    save(figure, path)
    return True


def metrics_at_k(curves: dict[str, list[list[dict]]], split: str, path: Path) -> None:
    """``curves``: variant -> one list of {k, <split>_hr, <split>_ndcg, ...} rows per seed.
    Draw HR@K and NDCG@K of ``split`` per variant: mean line, min..max band over seeds."""
    figure, axes = plt.subplots(1, 2, figsize=(12, 4.5), layout="constrained")
    for ax, metric, label in zip(axes, ("hr", "ndcg"), ("HR@K", "NDCG@K")):
        for variant, seeds in curves.items():
            ks = np.array([row["k"] for row in seeds[0]])
            values = 100 * np.array([[row[f"{split}_{metric}"] for row in rows[: len(ks)]] for rows in seeds])
            line = ax.plot(ks, values.mean(0), label=f"{variant} ({len(seeds)} seed{'s' if len(seeds) > 1 else ''})")[0]
            if len(seeds) > 1:
                ax.fill_between(ks, values.min(0), values.max(0), color=line.get_color(), alpha=0.2, linewidth=0)
        ax.set(title=f"{split} {label} (%), mean over seeds, band = min..max", xlabel="cutoff K")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    save(figure, path)


def report_charts(runs: list[dict], at_k_dir: Path, logs_dir: Path, out_dir: Path, order: list[str]) -> list[tuple[str, str]]:
    """Every chart of the report into ``out_dir``; returns (caption, file name) per chart.
    ``runs``: the metrics files' contents; ``order``: variants in table order."""
    out_dir = Path(out_dir)
    charts = []
    curves: dict[str, list[list[dict]]] = {}
    for run in runs:
        path = Path(at_k_dir) / f"{run['run']['run']}.json"
        if path.exists():
            curves.setdefault(run["run"]["variant"], []).append(read_json(path))
    if curves:
        metrics_at_k({v: curves[v] for v in order if v in curves}, "test", out_dir / "at_k.png")
        charts.append(("Test HR@K and NDCG@K per variant (fused score)", "at_k.png"))
    rank = {variant: i for i, variant in enumerate(order)}
    for run in sorted(runs, key=lambda r: (rank.get(r["run"]["variant"], len(order)), r["run"]["run"])):
        name = run["run"]["run"]
        if training_curves(Path(logs_dir) / name / "plots" / "metrics", name, out_dir / f"training-{name}.png"):
            charts.append((f"Training curves of {name}", f"training-{name}.png"))
    return charts


def charts_markdown(charts: list[tuple[str, str]], folder: str) -> str:
    """The report's chart section: each PNG embedded with its caption (paths relative to the report)."""
    if not charts:
        return ""
    lines = ["", "## Charts", "", f"PNG files in `{folder}/` (they need no network; `dvc plots show` draws the same data).", ""]
    for caption, name in charts:
        lines += [f"![{caption}]({folder}/{name})", ""]
    return "\n".join(lines)
