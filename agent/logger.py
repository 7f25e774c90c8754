"""The job log: LAVA ``output.yaml`` records, written as they happen.

The log file is append-only with a line index (``results.logfile.LogFile``), so the agent daemon
can stream it to the master by line number and resume after a restart without losing a line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TextIO

from results.log import LogRecord, now_dt
from results.logfile import LogFile


class JobLogger:
    """Writes log records to ``output.yaml`` (when a path is given) and optionally to a stream."""

    def __init__(self, path: Path | None, echo: TextIO | None = None) -> None:
        self.file = LogFile(path) if path is not None else None
        self.echo = echo

    def log(self, lvl: str, msg: Any) -> None:
        record = LogRecord(now_dt(), lvl, msg)
        if self.file is not None:
            self.file.append([record])
        if self.echo is not None:
            self.echo.write(record.to_line())
            self.echo.flush()

    def debug(self, msg: Any) -> None:
        self.log("debug", msg)

    def info(self, msg: Any) -> None:
        self.log("info", msg)

    def warning(self, msg: Any) -> None:
        self.log("warning", msg)

    def error(self, msg: Any) -> None:
        self.log("error", msg)

    def exception(self, msg: Any = None) -> None:
        """An ``exception`` record: ``msg``, by default the traceback of the exception being handled."""
        if msg is None:
            import traceback  # only when something went wrong: it is slow to import

            msg = traceback.format_exc()
        self.log("exception", msg)

    def results(self, msg: dict) -> None:
        self.log("results", msg)

    def target(self, msg: str) -> None:
        """A line the board printed on its console."""
        self.log("target", msg)

    def input(self, msg: str) -> None:
        """What the dispatcher typed on the board's console."""
        self.log("input", msg)

    def event(self, msg: str) -> None:
        self.log("event", msg)

    def feedback(self, msg: str) -> None:
        self.log("feedback", msg)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
