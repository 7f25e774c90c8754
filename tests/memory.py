"""The memory of a process tree over a span of time, from /proc (Linux): what a request costs a
master and its validator processes, children born or dead meanwhile included.

``TreeMeter(pid)`` resets the peak RSS (VmHWM) of every process of the tree (``clear_refs``),
notes each one's RSS, and samples the tree every few milliseconds from a thread (new children
are found by their parent's pid); ``stop()`` returns the growth: for each process, its highest
peak seen less its RSS at the start (0 for one born meanwhile, so a validator process that
blew up and was replaced counts in full, and one that died counts with its last peak).

Used by the hostile-input and fuzz tests and by ``make bench`` (tools/bench_master.py).
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path


def _field(pid: int, name: str) -> int | None:
    """A ``/proc/PID/status`` field in kB (None when the process is gone or is a zombie)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(name + ":"):
                return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


def tree(pid: int) -> list[int]:
    """``pid`` and its descendants (from each process's parent in ``/proc/*/stat``)."""
    parents: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry.name}/stat").read_text()
        except OSError:
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        parents.setdefault(parent, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo.extend(parents.get(current, ()))
    return found


def rss_kb(pid: int) -> int:
    """The RSS of the tree of ``pid`` now, in kB."""
    return sum(_field(p, "VmRSS") or 0 for p in tree(pid))


class TreeMeter:
    """Peak memory growth of the tree of ``pid`` between ``start()`` and ``stop()`` (kB)."""

    def __init__(self, pid: int, interval: float = 0.003) -> None:
        self.pid = pid
        self.interval = interval
        self.start_rss: dict[int, int] = {}
        self.peak: dict[int, int] = {}
        self._done = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> TreeMeter:
        for pid in tree(self.pid):
            try:
                Path(f"/proc/{pid}/clear_refs").write_text("5")  # VmHWM := VmRSS
            except OSError:
                continue
            self.start_rss[pid] = _field(pid, "VmRSS") or 0
        self._sample(tree(self.pid))
        self._thread = threading.Thread(target=self._run, name="tree-meter", daemon=True)
        self._thread.start()
        return self

    def _sample(self, pids: list[int]) -> None:
        for pid in pids:
            peak = _field(pid, "VmHWM")
            if peak is not None and peak > self.peak.get(pid, 0):
                self.peak[pid] = peak

    def _run(self) -> None:
        pids = tree(self.pid)
        refreshed = time.monotonic()
        while not self._done.wait(self.interval):
            if time.monotonic() - refreshed > 0.025:  # a new child process: a validator replaced
                pids, refreshed = tree(self.pid), time.monotonic()
            self._sample(pids)

    def stop(self) -> int:
        """The growth in kB: the sum over the tree of each process's peak less its starting RSS."""
        self._done.set()
        if self._thread is not None:
            self._thread.join(5)
        self._sample(tree(self.pid))
        return sum(max(0, peak - self.start_rss.get(pid, 0)) for pid, peak in self.peak.items())
