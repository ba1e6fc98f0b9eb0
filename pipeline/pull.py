"""`dvc pull --allow-missing`, minus the warning that reads like a failure.

    python -m pipeline.pull [dvc pull options]

The team remote may hold only part of the DAG's outputs (by default the raw data; features
and models once someone pushes them). DVC then warns "Some of the cache files do not exist
neither locally nor on remote" and lists every missing file, which a newcomer reads as an
error although `dvc repro` simply computes those files next. This runs the same pull with
that one message replaced by one line; every other message, the progress bars and the exit
status are DVC's own.
"""

from __future__ import annotations

import logging
import sys

WARNING_START = "Some of the cache files do not exist neither locally nor on remote"


class MissingOnRemote(logging.Filter):
    """Drops DVC's missing-cache warning and remembers what it listed: one line per file,
    "name: PATH, md5: HASH" or only "md5: HASH" depending on the code path that warns."""

    def __init__(self) -> None:
        super().__init__()
        self.files: list[str] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith(WARNING_START):
            return True
        listed = str(record.args[0]) if record.args else ""
        self.files += [line.removeprefix("name: ").split(",")[0] for line in listed.splitlines() if line.strip()]
        return False


def summary(files: list[str]) -> str:
    names = sorted({f for f in files if not f.startswith("md5:")})
    listed = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    return f"Not on the remote yet, so `dvc repro` computes them: {len(files)} file(s){f' ({listed})' if names else ''}."


def main(argv: list[str]) -> int:
    from dvc.cli import main as dvc_main
    from dvc.data_cloud import logger as data_cloud_logger

    missing = MissingOnRemote()
    for logger in (data_cloud_logger, logging.getLogger("dvc_data.index.fetch")):  # the two places that warn
        logger.addFilter(missing)
    status = dvc_main(["pull", "--allow-missing", *argv])
    if missing.files:
        print(summary(missing.files))
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
