"""The report's PNG charts: drawn from dvclive logs and at-K curves, reproducible, embedded."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.charts import charts_markdown, report_charts
from pipeline.io import write_json


def dvclive_logs(root: Path, run: str, branches: tuple[str, ...], epochs: int = 5) -> None:
    curves = {"train/loss.tsv": "loss", "train/kd_weight.tsv": "kd_weight"}
    curves |= {f"train/ce_{b}.tsv": f"ce_{b}" for b in branches}
    curves |= {f"valid/{b}/hr@10.tsv": "hr@10" for b in ("fused", *branches)}
    if len(branches) > 1:
        curves["train/kd_text_from_id.tsv"] = "kd_text_from_id"
    for name, column in curves.items():
        path = root / run / "plots/metrics" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"step\t{column}\n" + "".join(f"{e}\t{1 / e}\n" for e in range(1, epochs + 1)))


def at_k(root: Path, run: str, level: float) -> dict:
    rows = [{"k": k, "test_hr": level * k / 20, "test_ndcg": level * k / 40, "valid_hr": 0.0, "valid_ndcg": 0.0} for k in range(1, 21)]
    write_json(rows, root / f"{run}.json")
    return {"run": {"run": run, "variant": run.rsplit("-s", 1)[0]}}


def test_charts_are_drawn_for_every_run_reproducibly_and_linked(tmp_path):
    logs, plots = tmp_path / "logs", tmp_path / "at_k"
    dvclive_logs(logs, "odmt-s1", ("id", "text", "image"))
    dvclive_logs(logs, "sasrec_id-s1", ("id",))
    runs = [at_k(plots, "odmt-s1", 0.2), at_k(plots, "odmt-s2", 0.25), at_k(plots, "sasrec_id-s1", 0.1)]
    charts = report_charts(runs, plots, logs, tmp_path / "a", ["odmt", "sasrec_id"])
    # odmt-s2 has no training logs: no curve chart, no crash
    assert [name for _, name in charts] == ["at_k.png", "training-odmt-s1.png", "training-sasrec_id-s1.png"]
    for _, name in charts:
        with Image.open(tmp_path / "a" / name) as image:
            assert image.format == "PNG" and image.width > 800 and image.height > 300
            assert len(np.unique(np.asarray(image.convert("L")))) > 10  # something was drawn
    report_charts(runs, plots, logs, tmp_path / "b", ["odmt", "sasrec_id"])
    for _, name in charts:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    text = charts_markdown(charts, "charts")
    assert "![Training curves of odmt-s1](charts/training-odmt-s1.png)" in text
    assert charts_markdown([], "charts") == ""
