"""Stage `report`: all evaluated runs side by side, and what the recommendations look like.

    python stages/report.py [--params params.yaml]

Reads every metrics/*.json with the per-user metrics/{run}.users.parquet beside it (intervals
and significance tests) and, for the picture, data/candidates/{report.showcase_run}/test.parquet
with data/ingest/{sequences,items,images}.parquet; writes reports/report.md,
reports/recommendations.html (self-contained) and reports/charts/*.png (training curves from
logs/{run}/, metrics at K from plots/at_k/), embedded in report.md.
"""

from _common import stage_args

from pathlib import Path

import pyarrow.parquet as pq

from pipeline.charts import charts_markdown, report_charts
from pipeline import schema
from pipeline.config import load_section
from pipeline.io import atomic_path, read_checked
from pipeline.report import ReportConfig, group_by_variant, load_runs, load_user_values, markdown_report, recommendations_html

args = stage_args(__doc__)
config = load_section(ReportConfig, "report", args.params)
ingest = Path("data/ingest")
runs = load_runs(Path("metrics"))
charts = report_charts(runs, Path("plots/at_k"), Path("logs"), Path("reports/charts"), list(group_by_variant(runs, config)))
pages = {
    "reports/report.md": markdown_report(runs, config, load_user_values(Path("metrics"), runs)) + charts_markdown(charts, "charts"),
    "reports/recommendations.html": recommendations_html(
        pq.read_table(Path("data/candidates") / config.showcase_run / "test.parquet"),
        read_checked(ingest / "sequences.parquet", schema.SEQUENCES, schema.REINGEST),
        read_checked(ingest / "items.parquet", schema.ITEMS, schema.REINGEST, ["item_idx", "title"]),
        ingest / "images.parquet",
        config,
    ),
}
for path, text in pages.items():
    with atomic_path(path) as tmp:
        tmp.write_text(text)
