"""Concise progress for long loops: items/s and ETA, at most one line every few seconds."""

from __future__ import annotations

import logging
import sys
import time

log = logging.getLogger("pipeline")


class LevelFormatter(logging.Formatter):
    """Lines as `time name: message`; a warning or error carries its level (`WARNING: message`),
    so that it stands out from the info lines around it."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(name)s: %(level)s%(message)s", datefmt="%H:%M:%S")

    def format(self, record: logging.LogRecord) -> str:
        record.level = f"{record.levelname}: " if record.levelno >= logging.WARNING else ""
        return super().format(record)


def setup_logging(level: int = logging.INFO) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(LevelFormatter())
    logging.basicConfig(level=level, handlers=[handler])


class Progress:
    """Call ``update(n)`` as work is done; logs rate and ETA every ``every_s`` seconds (nothing
    when ``quiet``: a loop with no real work to report)."""

    def __init__(self, what: str, total: int | None = None, unit: str = "items", every_s: float = 5.0, quiet: bool = False):
        self.what, self.total, self.unit, self.every_s, self.quiet = what, total, unit, every_s, quiet
        self.done = 0
        self.start = self.last = time.perf_counter()

    def update(self, n: int) -> None:
        self.done += n
        now = time.perf_counter()
        if now - self.last >= self.every_s and not self.quiet:
            self.last = now
            log.info("%s: %s", self.what, self._status(now))

    def close(self) -> float:
        """Log the final rate and return it (units per second)."""
        now = time.perf_counter()
        if not self.quiet:
            log.info("%s: done, %s", self.what, self._status(now))
        return self.rate(now)

    def rate(self, now: float | None = None) -> float:
        elapsed = (now or time.perf_counter()) - self.start
        return self.done / elapsed if elapsed > 0 else 0.0

    def _status(self, now: float) -> str:
        rate = self.rate(now)
        text = f"{self.done}" + (f"/{self.total}" if self.total else "") + f" {self.unit}, {rate:.1f} {self.unit}/s"
        if self.total and rate > 0 and self.done < self.total:
            text += f", ETA {(self.total - self.done) / rate:.0f}s"
        return text
