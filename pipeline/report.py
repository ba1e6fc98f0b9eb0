"""The comparison report: every evaluated run side by side (Markdown), and a page that shows
what the recommendations look like (self-contained HTML, item images inlined as base64).

Input is the metrics files the evaluate stage writes (one per run, metrics/{run}.json), so
the report covers whatever runs the DAG evaluated; runs of one variant with different seeds
are aggregated as mean ± sample standard deviation. The per-user files beside them
(metrics/{run}.users.parquet) give each variant's interval over users and the paired tests of
the proposed variant against each other one (pipeline.compare); the words follow those numbers.
"""

from __future__ import annotations

import base64
import html
import io
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from pipeline import compare
from pipeline.commands import check_run
from pipeline.images import MAX_PIXELS, ImageRefused, open_image
from pipeline.io import read_json
from pipeline.sequences import split_users


@dataclass(frozen=True)
class ReportConfig:
    proposed: str = "odmt"  # the variant compared against every other one
    variants: list[str] = field(default_factory=list)  # table rows in this order; empty = all evaluated runs
    metrics: list[str] = field(default_factory=lambda: ["hr@10", "ndcg@10", "mrr@10"])  # table columns, per split
    showcase_run: str = "odmt-s1"  # whose test recommendations the picture shows
    showcase_users: int = 6  # users shown, evenly spread over the user list
    history_shown: int = 8  # most recent history items shown per user
    top_n: int = 10  # recommendations shown per user
    thumb_height: int = 120  # thumbnail height in pixels
    max_pixels: int = MAX_PIXELS  # larger images are not decoded (placeholder instead)

    def validate(self) -> None:
        if min(self.showcase_users, self.history_shown, self.top_n, self.thumb_height) < 1:
            raise ValueError("showcase_users, history_shown, top_n and thumb_height must be >= 1")
        check_run(self.showcase_run, "showcase_run")


# --- the table -------------------------------------------------------------------------------


def load_runs(metrics_dir: Path) -> list[dict]:
    """Every metrics file in ``metrics_dir``, sorted by run name."""
    paths = sorted(Path(metrics_dir).glob("*.json"))
    if not paths:
        raise FileNotFoundError(f"{metrics_dir}: no metrics files (*.json); run the evaluate stage first")
    runs = [read_json(p) for p in paths]
    for path, run in zip(paths, runs):
        if "run" not in run or "protocol" not in run:
            raise ValueError(f"{path}: not a metrics file of the evaluate stage (no 'run' or 'protocol' key)")
    return runs


def load_user_values(metrics_dir: Path, runs: list[dict]) -> dict[str, pa.Table]:
    """Run name -> its per-user file (metrics/{run}.users.parquet), for the runs that have one."""
    paths = {run["run"]["run"]: Path(metrics_dir) / f"{run['run']['run']}.users.parquet" for run in runs}
    return {name: pq.read_table(path) for name, path in paths.items() if path.exists()}


def group_by_variant(runs: list[dict], config: ReportConfig) -> dict[str, list[dict]]:
    """variant -> its runs (one per seed), in table order: config.variants, or the proposed
    variant first and the rest alphabetically."""
    groups: dict[str, list[dict]] = {}
    for run in runs:
        groups.setdefault(run["run"]["variant"], []).append(run)
    order = config.variants or sorted(groups, key=lambda v: (v != config.proposed, v))
    missing = [v for v in order if v not in groups]
    if missing:
        raise ValueError(f"report.variants names {missing} but no metrics file has that variant (found: {sorted(groups)})")
    return {v: groups[v] for v in order}


def mean_std(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (None for a single value)."""
    return float(np.mean(values)), (float(np.std(values, ddof=1)) if len(values) > 1 else None)


def percent(mean: float, std: float | None) -> str:
    return f"{100 * mean:.2f}" + (f" ± {100 * std:.2f}" if std is not None else "")


def relative_gain(ours: float, theirs: float) -> str:
    return f"{100 * (ours - theirs) / theirs:+.1f}%" if theirs > 0 else "n/a"


def cell(group: list[dict], split: str, ranking: str, metric: str) -> str:
    return percent(*mean_std([run[split][ranking][metric] for run in group]))


def markdown_report(runs: list[dict], config: ReportConfig, user_values: dict[str, pa.Table] | None = None) -> str:
    """The report; `user_values`: run name -> its per-user file (metrics/{run}.users.parquet),
    behind the intervals and the significance tests (runs without one get neither)."""
    groups = group_by_variant(runs, config)
    user_values = user_values or {}
    metrics = config.metrics
    label = {m: m.replace("hr", "HR").replace("ndcg", "NDCG").replace("mrr", "MRR") for m in metrics}
    lines = ["# Results", "", *protocol_lines(runs, config), *training_lines(runs)]

    lines += ["", "## All variants", "", "Fused score, in % (mean ± sample std over seeds when several ran).", ""]
    header = ["variant", "seeds"] + [f"{split} {label[m]}" for split in ("valid", "test") for m in metrics]
    lines += [table_row(header), table_row(["---"] * len(header))]
    for variant, group in groups.items():
        name = f"**{variant}**" if variant == config.proposed else variant
        seeds = ", ".join(str(run["run"]["seed"]) for run in group)
        lines.append(table_row([name, seeds] + [cell(group, split, "fused", m) for split in ("valid", "test") for m in metrics]))

    lines += comparison_lines(groups, config, user_values, label)

    branched = {v: g for v, g in groups.items() if len(g[0]["run"]["rankings"]) > 1}
    if branched:
        lines += ["", "## Each branch on its own", "", "Test split, in %: the fused ranking and each branch's own ranking.", ""]
        header = ["variant", "ranking"] + [f"test {label[m]}" for m in metrics]
        lines += [table_row(header), table_row(["---"] * len(header))]
        for variant, group in branched.items():
            for ranking in group[0]["run"]["rankings"]:
                lines.append(table_row([variant, ranking] + [cell(group, "test", ranking, m) for m in metrics]))

    lines += ["", "## What the recommendations look like", ""]
    page = "[recommendations.html](recommendations.html)"
    lines.append(f"{page}: recent history and top {config.top_n} of a few test users of `{config.showcase_run}`.")
    return "\n".join(lines) + "\n"


def comparison_lines(groups: dict[str, list[dict]], config: ReportConfig, user_values: dict[str, pa.Table], label: dict[str, str]) -> list[str]:
    """Each variant's test metrics with a bootstrap interval over users, and the proposed variant
    against each other one: the difference, its interval, a paired randomization test and what
    they say (better, worse or within noise)."""
    ours = groups.get(config.proposed)
    lines = ["", "## Noise and significance", ""]
    tested = {v: g for v, g in groups.items() if all(run["run"]["run"] in user_values for run in g)}
    untested = sorted(set(groups) - set(tested))
    if untested:
        lines += [f"No per-user values (metrics/{{run}}.users.parquet) for {', '.join(untested)}: no interval or test for them; rerun their evaluate stage.", ""]
    lines += [
        f"Test split, fused score, in %: the mean over users [{compare.CONFIDENCE:.0%} bootstrap interval over users; "
        "a variant's seeds averaged per user first]. `python -m pipeline.compare RUN_A RUN_B` compares any two runs alike.",
        "",
    ]
    header = ["variant", "runs"] + [f"test {label[m]}" for m in config.metrics]
    lines += [table_row(header), table_row(["---"] * len(header))]
    for variant, group in tested.items():
        tables = [user_values[run["run"]["run"]] for run in group]
        estimates = [compare.estimate(compare.user_matrix(tables, "test", "fused", m)[1]) for m in config.metrics]
        lines.append(table_row([variant, str(len(group))] + [compare.interval(e) for e in estimates]))

    lines += ["", f"## {config.proposed} against each other variant", ""]
    if ours is None:
        return lines + [f"No run of the proposed variant '{config.proposed}' was evaluated."]
    if config.proposed not in tested:
        return lines + [f"No per-user values for {config.proposed}: no significance test."]
    if len(tested) == 1:
        return lines + ["No other variant with per-user values was evaluated."]
    lines += [
        f"Test split, fused score: {config.proposed} − other in points [{compare.CONFIDENCE:.0%} interval], the relative "
        f"change of the means, and the p-value of a paired randomization test over users ({compare.RESAMPLES} resamples). "
        f"Significant: p < {compare.ALPHA} and the interval excludes 0; otherwise within noise.",
        "",
    ]
    header = ["against"] + [f"test {label[m]}" for m in config.metrics]
    lines += [table_row(header), table_row(["---"] * len(header))]
    ours_tables = [user_values[run["run"]["run"]] for run in ours]
    findings = []
    for variant, group in tested.items():
        if variant == config.proposed:
            continue
        theirs = [user_values[run["run"]["run"]] for run in group]
        cells = []
        for m in config.metrics:
            c = compare.paired(theirs, ours_tables, "test", "fused", m)
            gain = relative_gain(c.candidate.mean, c.baseline.mean)
            cells.append(f"{compare.interval(c.difference, signed=True)}, {gain}, p = {c.p_randomization:.4f}: {c.verdict()}")
            findings.append((variant, m, c))
        lines.append(table_row([variant, *cells]))
    lines += ["", *verdict_lines(findings, config.proposed, label)]
    if any(len(group) == 1 for group in tested.values()):
        lines += [
            "",
            "A variant with one seed: its interval and tests cover which users were sampled, not how much another "
            "training seed would move its numbers; run more seeds (runs.seed) before relying on a small difference.",
        ]
    return lines


def verdict_lines(findings: list[tuple[str, str, compare.Comparison]], proposed: str, label: dict[str, str]) -> list[str]:
    """In words, what the tests say: significantly better or worse on which metrics, and within
    noise on which."""
    lines = []
    for variant in dict.fromkeys(v for v, _, _ in findings):
        verdicts = [(m, c) for v, m, c in findings if v == variant]
        parts = []
        for verdict in ("better", "worse"):
            named = [f"{label[m]} ({100 * c.difference.mean:+.2f} points)" for m, c in verdicts if c.verdict() == verdict]
            if named:
                parts.append(f"significantly {verdict} on {', '.join(named)}")
        noise = [label[m] for m, c in verdicts if not c.significant]
        if noise:
            parts.append(f"within noise on {', '.join(noise)}")
        lines.append(f"- {proposed} against {variant}: " + "; ".join(parts) + ".")
    return lines


def training_lines(runs: list[dict]) -> list[str]:
    """How each run's training ended: epochs, best epoch and why it stopped; a warning for a run
    that hit the maximum while validation was still improving (compared at unequal convergence)."""
    described, warnings = [], []
    for run in runs:
        info = run["run"]
        if "stop_reason" not in info:
            continue
        epochs, best = info["epochs_trained"], info["best_epoch"]
        if info["stop_reason"] == "patience":
            described.append(f"{info['run']} {epochs} epochs (best {best}, early-stopped)")
        else:
            described.append(f"{info['run']} {epochs} epochs (best {best}, the maximum)")
            if info.get("patience") and epochs - best < info["patience"]:
                warnings.append(
                    f"**Warning**: {info['run']} reached the maximum of {epochs} epochs (train.epochs) and its best epoch "
                    f"({best}) was fewer than train.patience ({info['patience']}) epochs before: it may not have converged, "
                    "and variants may be compared at unequal convergence."
                )
    if not described:
        return []
    patience = sorted({run["run"].get("patience") for run in runs if "stop_reason" in run["run"]})
    rule = f"early stopping with patience {', '.join(map(str, patience))} on validation" if patience != [0] else "no early stopping"
    return [f"Training ({rule}; the best-validation epoch's weights are kept): {'; '.join(described)}.", *warnings]


def protocol_lines(runs: list[dict], config: ReportConfig) -> list[str]:
    reference = next((r for r in runs if r["run"]["variant"] == config.proposed), runs[0])
    p = reference["protocol"]
    users = p["users"]["test"]
    history = {"all": "every history item excluded", "all_but_target": "history items excluded except a repeated target"}.get(
        p.get("exclude_history"), "history NOT excluded"
    )
    lines = [
        f"Protocol: {p['split']}; full ranking over all {p['items']} items, {history}; {users} test users, "
        f"{p['users']['valid']} validation users; index `{p['index']}`; model input: {p['model_input']}."
    ]
    if "hr@10" in reference["test"]["fused"]:
        hr = reference["test"]["fused"]["hr@10"]
        error = 100 * math.sqrt(hr * (1 - hr) / users)
        lines.append(f"Noise floor: with {users} users one run's test HR@10 has a standard error of about {error:.2f} points.")
    lines += repeated_target_lines(p)
    lines += source_lines(runs)
    for run in runs:
        # The cutoffs listed may differ between runs without changing any number, and each
        # variant reads its own sources.
        differing = sorted(k for k in set(p) | set(run["protocol"]) if k not in ("ks", "sources") and p.get(k) != run["protocol"].get(k))
        if differing:
            lines.append(f"**Warning**: run {run['run']['run']} differs in protocol ({', '.join(differing)}): not comparable.")
    return lines


def repeated_target_lines(protocol: dict) -> list[str]:
    """How many targets are already in their user's history (repeat consumption), and whether
    they can be hit: under exclude_history `all` they are excluded with the history, never ranked."""
    if "targets_in_history" not in protocol:
        return []
    counts, users = protocol["targets_in_history"], protocol["users"]
    line = (
        f"Targets already in the user's history: {counts['test']} of {users['test']} test users, "
        f"{counts['valid']} of {users['valid']} validation users"
    )
    if not counts["test"] and not counts["valid"]:
        return [line + "."]
    if protocol.get("exclude_history") == "all":
        ceiling = 100 * (1 - counts["test"] / users["test"])
        return [line + f"; excluded with the history, they can never be hit (test HR@k at most {ceiling:.2f}%)."]
    return [line + "; they stay rankable."]


def source_lines(runs: list[dict]) -> list[str]:
    """Which item sources each variant used, and the share of catalogue items having each."""
    used: dict[str, dict] = {}
    for run in runs:
        if "sources" in run["protocol"]:
            used.setdefault(run["run"]["variant"], run["protocol"]["sources"])
    if not used:
        return []
    present = next(iter(used.values()))["present"]
    coverage = ", ".join(f"{name} {100 * present[name]:.1f}%" for name in ("id", "text", "image") if name in present)
    by_variant = "; ".join(f"{variant}: {', '.join(s['used'])}" for variant, s in used.items())
    return [f"Item sources used: {by_variant} (share of catalogue items having each: {coverage})."]


def table_row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


# --- the picture -----------------------------------------------------------------------------


def thumbnail_uri(image: bytes | None, height: int, max_pixels: int = MAX_PIXELS) -> str | None:
    """A JPEG data URI of the image scaled to ``height`` pixels, or None when there is none."""
    if image is None:
        return None

    def thumbnail(img: Image.Image) -> bytes:
        scale = min(4 * height / img.width, height / img.height)
        img.draft("RGB", (max(1, int(img.width * scale)), max(1, int(img.height * scale))))  # JPEG: decode smaller
        img = img.convert("RGB")
        img.thumbnail((4 * height, height))
        out = io.BytesIO()
        img.save(out, format="JPEG", quality=80)
        return out.getvalue()

    try:
        jpeg = open_image(image, max_pixels, thumbnail)
    except ImageRefused:
        return None  # unreadable or too large: shown as a titled placeholder
    return "data:image/jpeg;base64," + base64.b64encode(jpeg).decode()


# Shown as U+FFFD: C0 controls but tab and newline, DEL and C1 controls, bidi embeddings,
# overrides and isolates (a title with U+202E would reverse the text around it on the page).
_DEL_C1_BIDI = "\x7f-\x9f\u202a-\u202e\u2066-\u2069"
UNSAFE_CHARACTERS = re.compile(f"[\x00-\x08\x0b-\x1f{_DEL_C1_BIDI}]")
# In a terminal line, tab and newline too (and ESC, the start of every ANSI escape sequence).
UNSAFE_IN_A_LINE = re.compile(f"[\x00-\x1f{_DEL_C1_BIDI}]")


def escape(text: str) -> str:
    """Text for an HTML page: markup escaped, control and bidi-override characters replaced."""
    return html.escape(UNSAFE_CHARACTERS.sub("\ufffd", text))


def printable(text: str) -> str:
    """Text for one terminal line: control (ANSI escapes included) and bidi characters replaced."""
    return UNSAFE_IN_A_LINE.sub("\ufffd", text)


def showcase_users(num_users: int, count: int) -> np.ndarray:
    """Row positions evenly spread over the user list: no cherry-picking of good cases."""
    return np.unique(np.linspace(0, num_users - 1, min(count, num_users)).round().astype(int))


# Posters are 2:3; a card is one thumbnail with its title underneath, framed green when it is a hit.
STYLE = """
body { font-family: sans-serif; margin: 2em; color: #222 }
section { margin-bottom: 2.5em }
h2 { font-size: 1.1em }
.label { color: #666; font-size: .85em; margin: .6em 0 .2em }
.row { display: flex; gap: 8px; flex-wrap: wrap }
figure { margin: 0; width: WIDTHpx; padding: 3px; border: 3px solid transparent }
figure.hit { border-color: #2a2 }
img, .none { height: HEIGHTpx; width: WIDTHpx; object-fit: cover; display: block }
.none { background: #ddd; font-size: .7em; overflow: hidden }
figcaption { font-size: .7em; line-height: 1.2; height: 2.4em; overflow: hidden }
"""


def recommendations_html(
    candidates: pa.Table, sequences: pa.Table, items: pa.Table, images_path: Path, config: ReportConfig
) -> str:
    """For a few test users: recent history, top-N recommendations (the held-out item framed
    where it was hit) and the held-out item itself, as thumbnails with titles."""
    users = split_users(sequences, "test")
    position = {u: i for i, u in enumerate(candidates.column("user_idx").to_pylist())}
    shown = []  # (user key, recent history, top N, held-out item)
    for row in showcase_users(len(users), config.showcase_users):
        user = int(users.user_idx[row])
        top = candidates.column("items")[position[user]].as_py()[: config.top_n]
        key = sequences.column("user_key")[row].as_py()
        shown.append((key, users.histories.row(row)[-config.history_shown :].tolist(), top, int(users.targets[row])))
    title = f"Recommendations of {escape(config.showcase_run)}"
    intro = (
        f"Test split. Each user's recent history (the model's input; history items are never recommended), "
        f"the top {config.top_n} over the whole catalogue, and the item the user interacted with next, framed green "
        f"where it was recommended. Users are evenly spread over the user list, not picked."
    )
    return poster_page(shown, items, images_path, config, title, intro)


def poster_page(shown: list[tuple], items: pa.Table, images_path: Path, config: ReportConfig, title: str, intro: str) -> str:
    """The page: per (user key, recent history, top N, held-out item or None) a section of
    item thumbnails with titles; ``title`` and ``intro`` are HTML already."""
    needed = sorted({i for _, history, top, target in shown for i in history + top + [target] if i is not None})
    titles = dict(zip(items.column("item_idx").to_pylist(), items.column("title").to_pylist()))
    images = pq.read_table(images_path, columns=["item_idx", "image"], filters=[("item_idx", "in", needed)])
    image_bytes = dict(zip(images.column("item_idx").to_pylist(), images.column("image").to_pylist()))
    thumbs = {item: thumbnail_uri(data, config.thumb_height, config.max_pixels) for item, data in image_bytes.items()}

    def card(item: int, note: str = "", hit: bool = False) -> str:
        title = escape(titles.get(item) or f"item {item}")
        uri = thumbs.get(item)
        picture = f'<img src="{uri}" alt="{title}">' if uri else f'<div class="none">{title}</div>'
        frame = ' class="hit"' if hit else ""
        return f"<figure{frame}>{picture}<figcaption>{note}{title}</figcaption></figure>"

    def row(label: str, cards: list[str]) -> str:
        return f'<div class="label">{label}</div><div class="row">{"".join(cards)}</div>'

    sections = []
    for key, history, top, target in shown:
        hit = target in top
        verdict = f"held-out item at rank {top.index(target) + 1}" if hit else f"held-out item not in the top {config.top_n}"
        sections.append(
            f"<section><h2>User {escape(key)}" + (f" <small>({verdict})</small>" if target is not None else "") + "</h2>"
            + row("Recent history, oldest first", [card(i) for i in history])
            + row(f"Top {len(top)} recommendations", [card(i, f"{rank}. ", i == target) for rank, i in enumerate(top, 1)])
            + (row("Held-out next item", [card(target, "", hit)]) if target is not None else "")
            + "</section>"
        )
    style = STYLE.replace("WIDTH", str(config.thumb_height * 2 // 3)).replace("HEIGHT", str(config.thumb_height))
    return (
        f'<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>{title}</title><style>{style}</style></head>\n'
        f"<body><h1>{title}</h1><p>{intro}</p>\n" + "\n".join(sections) + "\n</body></html>\n"
    )
