"""One job in the daemon's spool (``SPOOL/jobs/<id>/``): its ``pumice-run`` process, its state file
and its log, and the environment the runner gets."""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import signal
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from agent import scratch
from agent.messages import End
from results.log import LogRecord, now_dt
from results.logfile import LogFile

log = logging.getLogger("pumice.agent")

#: pumice-run's exit status -> the job's health
EXIT_HEALTH = {0: "Complete", 1: "Incomplete", 2: "Canceled"}

_PR_SET_PDEATHSIG = 1


def job_environment(spec: Mapping[str, Any], base: Mapping[str, str] = os.environ) -> dict[str, str]:
    """The environment of a job's ``pumice-run`` from the worker's env held by the master, in
    LAVA's env.yaml shape: ``purge`` (start empty; PATH is kept so tools are found unless
    overridden), ``removes`` (names to drop), ``overrides`` (names to set: http_proxy...)."""
    env = dict(base)
    if spec.get("purge"):
        env = {"PATH": base["PATH"]} if "PATH" in base else {}
    for name in spec.get("removes") or ():
        env.pop(str(name), None)
    for name, value in (spec.get("overrides") or {}).items():
        env[str(name)] = "" if value is None else str(value)
    return env


# ---- processes ----


def start_time(pid: int) -> str | None:
    """The start time of process ``pid`` (field 22 of /proc/PID/stat), None if it is gone (or a
    zombie): with the pid it names one process, even after pid reuse."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2:].split()
    if len(fields) < 20 or fields[0] in ("Z", "X"):
        return None
    return fields[19]


_prctl: Any = None


def runner_setup() -> None:  # pragma: no cover - runs in the child between fork and exec
    # SIGTERM (not SIGKILL) when the daemon dies: pumice-run then cancels and powers the board off
    _prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def prepare_runner_setup() -> None:
    """Resolve prctl in the daemon, once: the child only calls it (loading libc between fork and
    exec would cost milliseconds on every job start)."""
    global _prctl
    if _prctl is None:
        _prctl = ctypes.CDLL(None, use_errno=True).prctl


def write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True), encoding="utf-8")
    os.replace(tmp, path)


def final_result(logfile: LogFile) -> tuple[str | None, str | None, str | None]:
    """``(result, error_type, error_msg)`` of the ``lava/job`` result near the end of the log
    (all None when there is none)."""
    count = logfile.count()
    for line in reversed(logfile.read(max(0, count - 500), count)):
        if '"results"' not in line or '"job"' not in line:
            continue
        try:
            record = LogRecord.from_line(line)
        except ValueError:
            continue
        msg = record.msg
        if record.lvl == "results" and isinstance(msg, dict) and msg.get("definition") == "lava" \
                and msg.get("case") == "job":
            return msg.get("result"), msg.get("error_type"), msg.get("error_msg")
    return None, None, None


class LocalJob:
    """One job in the spool: its runner process, its state file and its log stream."""

    def __init__(self, directory: Path, state: dict[str, Any]) -> None:
        self.dir = directory
        self.state = state
        self.job_id: int = int(state["job_id"])
        self.proc: subprocess.Popen | None = None
        self.logfile = LogFile(directory / "output.yaml")
        #: lines the master acknowledged, lines sent (streaming position)
        self.acked = 0
        self.sent = 0
        self.progress_at = time.monotonic()
        #: resends of log lines (and of END) since the master last acknowledged something
        self.resends = 0
        self.end_resends = 0
        self.end_sent_at = 0.0
        self.term_at: float | None = None

    # -- state file --

    @property
    def status(self) -> str:
        """running (the runner may run), exited (END to deliver), ended (the master has it all)."""
        return self.state["status"]

    def save(self) -> None:
        write_json(self.dir / "state.json", self.state)

    def update(self, **changes: Any) -> None:
        self.state.update(changes)
        self.save()

    # -- the runner --

    def alive(self) -> bool:
        """Whether the runner process still exists."""
        if self.proc is not None:
            return self.proc.poll() is None
        pid = self.state.get("pid")
        started = start_time(pid) if pid else None
        return started is not None and started == self.state.get("pid_start")

    def signal(self, signum: int) -> None:
        pid = self.state.get("pid")
        if pid and self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    def exited(self, exit_code: int | None, *, lost: str | None = None) -> None:
        """The runner is gone: record the job's outcome (``lost``: why it ended without a status)."""
        _, error_type, error_msg = final_result(self.logfile)
        cancel = self.state.get("cancel")
        if lost:
            health, error_type, error_msg = "Incomplete", "Infrastructure", lost
        elif exit_code in EXIT_HEALTH:
            health = EXIT_HEALTH[exit_code]
            if self.state.get("overrun") and health != "Complete":
                health, error_type, error_msg = "Incomplete", "Infrastructure", self.state["overrun"]
        elif cancel:
            health = "Canceled"
            error_type, error_msg = "Canceled", "the job was canceled (its runner was killed)"
        else:
            health, error_type = "Incomplete", "Infrastructure"
            error_msg = self.state.get("overrun") or (
                f"pumice-run was killed by signal {signal.Signals(-exit_code).name}"
                if exit_code and exit_code < 0
                else f"pumice-run ended with the unexpected exit status {exit_code}")
        if health != "Complete" and (lost or self.state.get("overrun") or exit_code not in EXIT_HEALTH):
            # pumice-run could not say it: the daemon does, in the job's own log (streamed like any line)
            self.logfile.append([LogRecord(now_dt(), "error", f"{error_type} error: {error_msg}")])
        if lost or exit_code not in EXIT_HEALTH:
            self._sweep_scratch()  # pumice-run did not get to remove its scratch directories
        self.update(status="exited", exit_code=exit_code, health=health, error_type=error_type,
                    error_msg=error_msg)
        log.info("job %d: pumice-run ended (%s): %s%s", self.job_id,
                 "lost" if lost else f"exit status {exit_code}", health,
                 f", {error_type}: {error_msg}" if error_type and health != "Complete" else "")

    def _sweep_scratch(self) -> None:
        try:
            dispatcher = json.loads((self.dir / "dispatcher.yaml").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            dispatcher = None
        if not isinstance(dispatcher, dict):
            dispatcher = {}
        for path in scratch.sweep(self.job_id, dispatcher):
            log.info("job %d: removed %s, left by its runner", self.job_id, path)

    def end_message(self) -> End:
        description = self.dir / "description.yaml"
        return End(job_id=self.job_id, health=self.state["health"], lines=self.logfile.count(),
                   error_type=self.state.get("error_type"), error_msg=self.state.get("error_msg"),
                   description=description.read_text(encoding="utf-8", errors="replace")
                   if description.exists() else None)
