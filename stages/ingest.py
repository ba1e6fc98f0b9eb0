"""Stage `ingest`: raw source -> data/ingest/*.parquet (items, images, interactions, split)
and reports/ingest.json (rows read, kept, dropped per reason)."""

from _common import stage_args

from pathlib import Path

from pipeline.config import load_section
from pipeline.ingest import ADAPTERS, IngestConfig, ingest, write

args = stage_args(__doc__)
config = load_section(IngestConfig, "ingest", args.params)
project = Path.cwd()  # dvc runs stages from the project's root
provenance = config.provenance(project)
raw = ADAPTERS[config.adapter](Path(config.path), config.adapter_options())
result = ingest(raw, config.rules)
result.items = config.recorded_items(result.items, project)
write(result, Path("data/ingest"), Path("reports/ingest.json"), provenance)
