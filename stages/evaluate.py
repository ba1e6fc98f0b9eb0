"""Stage `evaluate`: metrics of one run from its candidates.

    python stages/evaluate.py --run odmt-s1 [--params params.yaml]

Reads data/candidates/{run}/ and data/ingest/sequences.parquet (the targets); writes
metrics/{run}.json (HR/NDCG/MRR per split, ranking and cutoff, plus the protocol),
metrics/{run}.users.parquet (each user's rank and metrics per split and ranking: what
`python -m pipeline.compare` pairs between runs) and plots/at_k/{run}.json (fused metrics at
every cutoff 1..K, for `dvc plots show`).
"""

from _common import run_option, stage_args

from pathlib import Path


from pipeline import schema
from pipeline.config import load_section
from pipeline.evaluation import EvaluateConfig, evaluate_run
from pipeline.io import read_checked, write_json, write_table
from pipeline.progress import log

args = stage_args(__doc__, run_option)
config = load_section(EvaluateConfig, "evaluate", args.params)
result, curve, users = evaluate_run(Path("data/candidates") / args.run, read_checked("data/ingest/sequences.parquet", schema.SEQUENCES, schema.REINGEST), config)
write_json(result, Path("metrics") / f"{args.run}.json")
write_table(users, Path("metrics") / f"{args.run}.users.parquet", users.schema, metadata={"run": result["run"]})
write_json(curve, Path("plots/at_k") / f"{args.run}.json")
for split in ("valid", "test"):
    log.info("%s %s: %s", args.run, split, ", ".join(f"{name} {value:.4f}" for name, value in result[split]["fused"].items()))
