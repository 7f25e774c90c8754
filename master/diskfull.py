"""What the master does when its data directory, or its database, is full (or fails to write).

A full disk is a state of the lab that an admin fixes, not a bug: nothing the master was told is
dropped, nothing is half recorded, and the log says so once a minute rather than once a request.

- :func:`is_full`: ENOSPC/EDQUOT, SQLite's "database or disk is full" (SQLITE_FULL), PostgreSQL's
  disk_full, anywhere in the exception's chain (peewee reports SQLite's error as the context of a
  failed rollback).
- :func:`refusal`: the error a request gets (507, :class:`~master.errors.StorageFull`): "the
  master's data directory is full: DIR has N kB free (...)".
- :func:`report`: logs a storage failure once per :data:`REPORT_INTERVAL` seconds with the count
  of the ones not logged, and once when writes succeed again (:func:`recovered`).
- :func:`retry`: for the master's own threads (broker, scheduler): call until the write goes
  through, so that state changes arriving meanwhile (a job's end, a claim) are recorded late, not
  lost.
"""

from __future__ import annotations

import errno
import logging
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from master.errors import StorageFull

log = logging.getLogger("pumice.storage")

#: seconds between two log lines about the same storage condition
REPORT_INTERVAL = 60.0
#: longest wait between two tries of :func:`retry`
RETRY_MAX_WAIT = 5.0

_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
_IO_ERRNOS = (errno.EIO, errno.EROFS)
_SQLITE_FULL = 13
_SQLITE_IOERR = 10
_PG_DISK_FULL = "53100"

T = TypeVar("T")


def _chain(exc: BaseException) -> list[BaseException]:
    """The exception, its causes and contexts, and the driver errors peewee wraps (``orig``)."""
    seen: list[BaseException] = []
    todo: list[BaseException | None] = [exc]
    while todo and len(seen) < 20:
        item = todo.pop()
        if item is None or any(item is s for s in seen):
            continue
        seen.append(item)
        todo += [item.__cause__, item.__context__, getattr(item, "orig", None)]
        if item.args and isinstance(item.args[0], BaseException):
            todo.append(item.args[0])
    return seen


def _full_cause(exc: BaseException) -> BaseException | None:
    for item in _chain(exc):
        if isinstance(item, OSError) and item.errno in _FULL_ERRNOS:
            return item
        if (getattr(item, "sqlite_errorcode", 0) or 0) & 0xFF == _SQLITE_FULL:
            return item
        if getattr(item, "pgcode", None) == _PG_DISK_FULL or type(item).__name__ == "DiskFull":  # psycopg2
            return item
        if isinstance(item, StorageFull):
            return item
    return None


def is_full(exc: BaseException) -> bool:
    """Whether ``exc`` (or what caused it) says the disk or the database is full."""
    return _full_cause(exc) is not None


def _size(value: int) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if value < 1000 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{value} B"  # unreachable


def _data_dir() -> Path | None:
    try:
        from master.instance import current

        return current().data_dir
    except RuntimeError:
        return None


def _where(cause: BaseException) -> tuple[str, Path | None]:
    """What is full (the data directory or the database) and a path on that filesystem."""
    if getattr(cause, "pgcode", None) == _PG_DISK_FULL or type(cause).__name__ == "DiskFull":
        return "database", None
    filename = getattr(cause, "filename", None)
    if filename:
        return "data directory", Path(filename)
    if getattr(cause, "sqlite_errorcode", None) is not None:
        from master.db import db

        database = getattr(db.obj, "database", None)
        if database:
            return "data directory", Path(database)
    return "data directory", _fullest()


def _fullest() -> Path | None:
    """The data directory, or its store or site when they are on a fuller filesystem of their own."""
    data = _data_dir()
    if data is None:
        return None
    candidates = [path for path in (data, data / "store", data / "site") if path.exists()]
    try:
        return min(candidates, key=lambda path: shutil.disk_usage(path).free)
    except (OSError, ValueError):
        return data


def describe(exc: BaseException) -> str:
    """One line for a storage failure: what is full, where, how much space is left, and why."""
    cause = _full_cause(exc)
    if isinstance(cause, StorageFull):
        return cause.message
    if cause is None:
        return f"cannot write the master's data directory ({_data_dir()}): {exc}"
    kind, path = _where(cause)
    if path is None:
        return f"the master's {kind} is full (PostgreSQL: {str(cause).strip().splitlines()[0]})"
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    # the data directory, or the filesystem inside it that is full (a store on its own disk)
    shown = data = _data_dir()
    mount = probe
    while not mount.is_mount() and mount != mount.parent:
        mount = mount.parent
    if data is None or data not in (path, *path.parents) or data in mount.parents:
        shown = mount
    try:
        usage = shutil.disk_usage(probe)
        free = f"{_size(usage.free)} free of {_size(usage.total)}"
    except OSError:
        free = "free space unknown"
    reason = getattr(cause, "strerror", None) or str(cause)
    return f"the master's {kind} is full: {shown} has {free} ({reason}, writing {path})"


def refusal(exc: BaseException, what: str) -> StorageFull:
    """The 507 error a request gets when ``exc`` says the storage is full (reported once per
    interval, see :func:`report`)."""
    if isinstance(exc, StorageFull):
        return exc
    message = describe(exc)
    report(exc, what)
    return StorageFull(f"{message}; {what} was refused: try again once an admin has freed space")


class _Reporter:
    """Once-per-interval logging of storage failures, by condition (full, or another errno)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last: dict[str, float] = {}
        self._quiet: dict[str, int] = {}

    def report(self, exc: BaseException, what: str) -> None:
        key = "full" if is_full(exc) else _io_error(exc) or type(exc).__name__
        now = time.monotonic()
        with self._lock:
            last = self._last.get(key)
            if last is not None and now - last < REPORT_INTERVAL:
                self._quiet[key] = self._quiet.get(key, 0) + 1
                return
            quiet = self._quiet.pop(key, 0)
            self._last[key] = now
        more = f" ({quiet} more storage failure(s) in the last {now - last:.0f} s)" if last is not None else ""
        log.error("%s: %s%s", what, describe(exc), more)

    def recovered(self) -> None:
        if not self._last:
            return
        with self._lock:
            quiet = sum(self._quiet.values())
            self._last.clear()
            self._quiet.clear()
        log.warning("the master's storage accepts writes again (%d storage failure(s) not logged since the "
                    "last report)", quiet)


_reporter = _Reporter()


def report(exc: BaseException, what: str) -> None:
    """Log the storage failure ``exc`` met while doing ``what``, at most once per
    :data:`REPORT_INTERVAL` for each condition, with the count of the ones not logged."""
    _reporter.report(exc, what)


def recovered() -> None:
    """A write went through: if failures were reported, say once that they are over."""
    _reporter.recovered()


def _io_error(exc: BaseException) -> str | None:
    """The name of the I/O error in ``exc``'s chain (EIO, EROFS, SQLite's SQLITE_IOERR), if any."""
    for item in _chain(exc):
        if isinstance(item, OSError) and item.errno in _IO_ERRNOS:
            return errno.errorcode[item.errno]
        if (getattr(item, "sqlite_errorcode", 0) or 0) & 0xFF == _SQLITE_IOERR:
            return "SQLITE_IOERR"
    return None


def is_storage_error(exc: BaseException) -> bool:
    """A full disk or database, or an I/O error of the data directory (EIO, EROFS, SQLITE_IOERR)."""
    return is_full(exc) or _io_error(exc) is not None


def retry(func: Callable[..., T], *args: Any, what: str, stop: threading.Event | None = None,
          **kwargs: Any) -> T:
    """``func(*args, **kwargs)``, called again while it fails with a storage error (reported
    once per interval), waiting 0.1 s doubling to :data:`RETRY_MAX_WAIT` between tries. Other
    errors, and the last storage error once ``stop`` is set, are raised."""
    wait = 0.1
    failed = False
    while True:
        try:
            result = func(*args, **kwargs)
        except Exception as exc:
            if not is_storage_error(exc) or (stop is not None and stop.is_set()):
                raise
            report(exc, what)
            failed = True
            if stop is not None:
                stop.wait(wait)
            else:
                time.sleep(wait)
            wait = min(wait * 2, RETRY_MAX_WAIT)
            continue
        if failed:
            recovered()
        return result

