"""`dvc pull --allow-missing`, minus the warning that reads like a failure.

    python -m pipeline.pull [dvc pull options]

The team remote may hold only part of the DAG's outputs (by default the raw data; features
and models once someone pushes them). DVC then warns "Some of the cache files do not exist
neither locally nor on remote" and lists every missing file, or, for a stage that dvc.lock
does not know yet, "No file hash info found for ... It won't be created", one line per
output. A newcomer reads either as an error although `dvc repro` simply computes those files
next. This runs the same pull with those messages replaced by one line; every other message,
the progress bars and the exit status are DVC's own.
"""

from __future__ import annotations

import logging
import os
import sys

MISSING_CACHE = "Some of the cache files do not exist neither locally nor on remote"
NO_HASH = "No file hash info found for"
# Where DVC 3.67 logs them, besides dvc.data_cloud's logger.
LOGGERS = ("dvc_data.index.fetch", "dvc_data.index.checkout", "dvc_data.hashfile.checkout")


class MissingOnRemote(logging.Filter):
    """Drops those warnings and remembers the files they named. The missing-cache warning lists
    "name: PATH, md5: HASH" or only "md5: HASH" per file (depending on the code path), the
    other one names one output path."""

    def __init__(self) -> None:
        super().__init__()
        self.files: list[str] = []

    def filter(self, record: logging.LogRecord) -> bool:
        message = str(record.msg)
        if message.startswith(MISSING_CACHE):
            listed = str(record.args[0]) if record.args else ""
            self.files += [line.removeprefix("name: ").split(",")[0] for line in listed.splitlines() if line.strip()]
            return False
        if message.startswith(NO_HASH):
            path = str(record.args[0]) if record.args else "?"
            self.files.append(os.path.relpath(path) if os.path.isabs(path) else path)
            return False
        return True


def summary(files: list[str]) -> str:
    names = sorted({f for f in files if not f.startswith("md5:")})
    listed = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    return f"Not on the remote yet, so `dvc repro` computes them: {len(files)} file(s){f' ({listed})' if names else ''}."


def main(argv: list[str]) -> int:
    from dvc.cli import main as dvc_main
    from dvc.data_cloud import logger as data_cloud_logger

    missing = MissingOnRemote()
    data_cloud_logger.addFilter(missing)
    for name in LOGGERS:
        logging.getLogger(name).addFilter(missing)
    status = dvc_main(["pull", "--allow-missing", *argv])
    if missing.files:
        print(summary(missing.files))
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
