"""Stage `report`: all evaluated runs side by side, and what the recommendations look like.

    python stages/report.py [--params params.yaml]

Reads every metrics/*.json and, for the picture, data/candidates/{report.showcase_run}/test.parquet
with data/ingest/{sequences,items,images}.parquet; writes reports/report.md and
reports/recommendations.html (self-contained).
"""

from _common import stage_args

from pathlib import Path

import pyarrow.parquet as pq

from pipeline.config import load_section
from pipeline.io import atomic_path
from pipeline.report import ReportConfig, load_runs, markdown_report, recommendations_html

args = stage_args(__doc__)
config = load_section(ReportConfig, "report", args.params)
ingest = Path("data/ingest")
pages = {
    "reports/report.md": markdown_report(load_runs(Path("metrics")), config),
    "reports/recommendations.html": recommendations_html(
        pq.read_table(Path("data/candidates") / config.showcase_run / "test.parquet"),
        pq.read_table(ingest / "sequences.parquet"),
        pq.read_table(ingest / "items.parquet", columns=["item_idx", "title"]),
        ingest / "images.parquet",
        config,
    ),
}
for path, text in pages.items():
    with atomic_path(path) as tmp:
        tmp.write_text(text)
