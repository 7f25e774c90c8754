"""master.diskfull: what counts as a full disk or database, the once-a-minute report, the retry
of the master's own writes."""

from __future__ import annotations

import errno
import logging
import threading

import pytest
from peewee import Model, OperationalError, SqliteDatabase, TextField

from master import diskfull
from master.errors import StorageFull


def sqlite_full_error(fs) -> OperationalError:
    """The error peewee really raises for a transaction on a full disk (SQLite in WAL mode)."""
    database = SqliteDatabase(str(fs.path / "full.db"), pragmas={"journal_mode": "wal"})

    class Row(Model):
        text = TextField()

        class Meta:
            pass

    Row._meta.set_database(database)
    database.connect()
    database.create_tables([Row])
    filler = fs.fill()
    try:
        with pytest.raises(OperationalError) as raised, database.atomic():
            for _ in range(100):
                Row.create(text="x" * 4000)
    finally:
        database.close()
        filler.unlink()
    return raised.value


def test_full_disks_and_databases_are_recognised_whatever_wraps_them(tmpfs) -> None:
    error = sqlite_full_error(tmpfs("sqlite", 1 << 20))
    # peewee reports the failed rollback; SQLite's SQLITE_FULL is in its context
    assert "database or disk is full" not in str(error)
    assert diskfull.is_full(error) and diskfull.is_storage_error(error)
    assert diskfull.is_full(OSError(errno.ENOSPC, "No space left on device", "/x"))
    assert diskfull.is_full(OSError(errno.EDQUOT, "Disk quota exceeded"))
    assert diskfull.is_full(StorageFull("full"))
    import psycopg2.errors

    assert diskfull.is_full(OperationalError(psycopg2.errors.DiskFull("could not extend file")))
    io_error = OSError(errno.EIO, "Input/output error")
    assert not diskfull.is_full(io_error) and diskfull.is_storage_error(io_error)
    assert not diskfull.is_storage_error(ValueError("no"))
    assert not diskfull.is_storage_error(OperationalError("no such table: job"))


def test_a_full_disk_is_described_with_its_path_and_free_space(tmpfs) -> None:
    fs = tmpfs("store", 1 << 20)
    fs.fill()
    text = diskfull.describe(OSError(errno.ENOSPC, "No space left on device", str(fs.path / "jobs" / "1" / "x")))
    assert text.startswith(f"the master's data directory is full: {fs.path} has 0 B free of 1.0 MB ")
    assert f"(No space left on device, writing {fs.path}/jobs/1/x)" in text


def test_a_storage_condition_is_logged_once_per_interval_with_the_count_of_the_rest(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    clock = [1000.0]
    monkeypatch.setattr(diskfull.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(diskfull, "_reporter", diskfull._Reporter())
    full = OSError(errno.ENOSPC, "No space left on device", "/data/store/jobs/1/output.yaml")
    with caplog.at_level(logging.WARNING, logger="pumice.storage"):
        for second in range(150):  # 10 failures a second for 150 s
            clock[0] = 1000.0 + second
            for _ in range(10):
                diskfull.report(full, "job 1: storing its log")
        diskfull.report(OSError(errno.EIO, "Input/output error"), "job 2: storing its log")  # another condition
        diskfull.recovered()
        diskfull.recovered()  # said once
    lines = [record.getMessage() for record in caplog.records]
    assert len(lines) == 5, lines
    assert lines[0].startswith("job 1: storing its log: the master's data directory is full: ")
    assert lines[1].endswith("(599 more storage failure(s) in the last 60 s)")
    assert lines[2].endswith("(599 more storage failure(s) in the last 60 s)")
    assert lines[3].startswith("job 2: storing its log: cannot write the master's data directory")
    assert lines[4] == ("the master's storage accepts writes again (299 storage failure(s) not logged since "
                        "the last report)")


def test_retry_calls_again_until_the_write_goes_through(caplog: pytest.LogCaptureFixture) -> None:
    calls: list[int] = []

    def write(value: int, *, twice: bool) -> int:
        calls.append(value)
        if len(calls) <= 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return value * (2 if twice else 1)

    assert diskfull.retry(write, 21, twice=True, what="recording", stop=threading.Event()) == 42
    assert calls == [21] * 4
    with pytest.raises(ValueError):  # anything else is not waited out
        diskfull.retry(int, "x", what="parsing")

    def always_full() -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    stop = threading.Event()
    stop.set()
    with pytest.raises(OSError):  # a stopping thread gives up
        diskfull.retry(always_full, what="recording", stop=stop)
