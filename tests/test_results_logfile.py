"""LogFile: append, read by line range, crash repair, readers beside a writer (real processes)."""

from __future__ import annotations

import errno
import os
import signal
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from results import logfile as logfile_module
from results.log import LogRecord
from results.logfile import LogFile, LogWriteError

ROOT = Path(__file__).resolve().parent.parent
DT = "2023-01-10T10:00:00.123456"


def records(start: int, stop: int, lvl: str = "target") -> list[LogRecord]:
    return [LogRecord(DT, lvl, f"line {i} é😀 <x> \x1b[0m" + "x" * (i % 37)) for i in range(start, stop)]


def line_starts(data: bytes) -> list[int]:
    """Offsets of the complete lines of a log, computed independently of results/."""
    starts, pos = [], 0
    while True:
        end = data.find(b"\n", pos)
        if end < 0:
            return starts
        starts.append(pos)
        pos = end + 1


def index_entries(path: Path) -> list[int]:
    data = path.read_bytes()
    return [value for (value,) in struct.iter_unpack("<Q", data[: len(data) // 8 * 8])]


def assert_consistent(path: Path) -> None:
    data = path.read_bytes()
    assert data == b"" or data.endswith(b"\n")
    assert index_entries(path.with_suffix(".idx")) == line_starts(data)


def test_append_and_read_ranges(tmp_path: Path) -> None:
    path = tmp_path / "output.yaml"
    log = LogFile(path)
    assert log.count() == 0 and log.read() == [] and log.records() == []
    assert not path.exists(), "opening must not create the files"
    assert log.append(records(0, 10)) == 10
    assert log.append(records(10, 25)) == 25
    assert log.append([]) == 25
    assert log.count() == 25
    assert log.records() == records(0, 25)
    assert log.records(3, 7) == records(3, 7)
    assert log.records(20) == records(20, 25)
    assert log.records(24, 1000) == records(24, 25)
    assert log.read(5, 5) == [] and log.read(9, 3) == [] and log.read(30, 40) == []
    assert log.records(-4, 2) == records(0, 2)
    assert log.read(0, 1) == [records(0, 1)[0].to_line().rstrip("\n")]
    assert_consistent(path)
    log.flush()
    log.close()
    # A second LogFile on the same files sees the same lines and appends after them.
    with LogFile(path) as again:
        assert again.count() == 25
        assert again.append(records(25, 26)) == 26
        assert again.records(25) == records(25, 26)
    assert_consistent(path)


def test_index_is_little_endian_line_starts(tmp_path: Path) -> None:
    path = tmp_path / "output.yaml"
    with LogFile(path) as log:
        log.append(records(0, 100))
    data = path.read_bytes()
    assert index_entries(tmp_path / "output.idx") == line_starts(data)
    assert (tmp_path / "output.idx").stat().st_size == 800


def test_append_lines(tmp_path: Path) -> None:
    with LogFile(tmp_path / "output.yaml") as log:
        lines = [r.to_line() for r in records(0, 3)]
        assert log.append_lines([lines[0], lines[1].rstrip("\n")]) == 2
        assert log.append_lines(["- foreign line with a raw \r inside", "\ud800 surrogate"]) == 4
        with pytest.raises(ValueError, match="newline"):
            log.append_lines([lines[2], "two\nlines"])
        assert log.count() == 4
        assert log.records(0, 2) == records(0, 2)
        assert log.read(2) == ["- foreign line with a raw \r inside", "\\ud800 surrogate"]
    assert_consistent(tmp_path / "output.yaml")


def test_large_log_reads_only_what_it_needs(tmp_path: Path) -> None:
    path = tmp_path / "output.yaml"
    with LogFile(path) as log:
        for start in range(0, 100_000, 10_000):
            log.append(records(start, start + 10_000))
        begin = time.perf_counter()
        for start in range(0, 100_000, 997):
            assert len(log.read(start, start + 100)) == min(100, 100_000 - start)
        elapsed = time.perf_counter() - begin
        assert log.records(99_999) == records(99_999, 100_000)
        assert log.records(50_000, 50_002) == records(50_000, 50_002)
    assert elapsed < 1.0, f"101 range reads of a 100,000-line log took {elapsed:.2f}s"


def test_repair_drops_a_torn_last_line(tmp_path: Path) -> None:
    path = tmp_path / "output.yaml"
    with LogFile(path) as log:
        log.append(records(0, 5))
    with open(path, "ab") as handle:
        handle.write(records(5, 6)[0].to_line().encode()[:30])  # the writer died mid-line
    log = LogFile(path)
    assert log.count() == 5 and log.records() == records(0, 5)
    assert_consistent(path)
    assert log.append(records(5, 7)) == 7
    assert log.records() == records(0, 7)


def test_repair_indexes_lines_written_before_a_crash(tmp_path: Path) -> None:
    path = tmp_path / "output.yaml"
    with LogFile(path) as log:
        log.append(records(0, 5))
    with open(path, "ab") as handle:  # lines written, index entries never written
        handle.write("".join(r.to_line() for r in records(5, 9)).encode())
    with open(tmp_path / "output.idx", "ab") as handle:  # plus half an index entry
        handle.write(b"\x07\x00\x00")
    log = LogFile(path)
    assert log.count() == 9 and log.records() == records(0, 9)
    assert_consistent(path)


def test_repair_cuts_index_entries_past_the_log(tmp_path: Path) -> None:
    path = tmp_path / "output.yaml"
    with LogFile(path) as log:
        log.append(records(0, 8))
    size = path.stat().st_size
    starts = line_starts(path.read_bytes())
    os.truncate(path, starts[6])  # the log lost its last two lines (no fsync before power loss)
    log = LogFile(path)
    assert log.count() == 6 and log.records() == records(0, 6)
    assert path.stat().st_size < size
    assert_consistent(path)


def test_repair_rebuilds_a_missing_or_garbage_index(tmp_path: Path) -> None:
    path = tmp_path / "output.yaml"
    with LogFile(path) as log:
        log.append(records(0, 20))
    (tmp_path / "output.idx").unlink()
    assert LogFile(path).records() == records(0, 20)
    assert_consistent(path)
    (tmp_path / "output.idx").write_bytes(struct.pack("<3Q", 0, 5, 9))  # not line starts
    assert LogFile(path).records() == records(0, 20)
    assert_consistent(path)


def test_an_empty_log_with_a_stale_index(tmp_path: Path) -> None:
    path = tmp_path / "output.yaml"
    path.write_bytes(b"")
    (tmp_path / "output.idx").write_bytes(struct.pack("<2Q", 0, 10))
    log = LogFile(path)
    assert log.count() == 0
    assert log.append(records(0, 1)) == 1
    assert_consistent(path)


WRITER = """
import sys, time
from results.log import LogRecord
from results.logfile import LogFile
log = LogFile(sys.argv[1])
n = 0
for batch in range(int(sys.argv[2])):
    size = 1 + batch % 13
    log.append([LogRecord("2023-01-10T10:00:00.000000", "target", f"seq {n + i} " + "y" * (i * 7 % 300))
                for i in range(size)])
    n += size
    if float(sys.argv[3]):
        time.sleep(float(sys.argv[3]))
print(n, flush=True)
"""


def start_writer(path: Path, batches: int, pause: float) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", WRITER, str(path), str(batches), str(pause)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )


def test_readers_while_a_process_appends(tmp_path: Path) -> None:
    path = tmp_path / "output.yaml"
    writer = start_writer(path, 400, 0.001)
    reader = LogFile(path)
    seen = 0
    opened = 0
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        done = writer.poll() is not None
        count = reader.count()
        assert count >= seen
        for number, record in enumerate(reader.records(seen, count), seen):
            assert record.msg.startswith(f"seq {number} "), (number, record)
        seen = count
        # Opening another LogFile runs the crash check under the lock: it must never
        # mistake the writer's append in progress for a torn line.
        LogFile(path).close()
        opened += 1
        if done:
            break
    else:
        writer.kill()
        pytest.fail("the writer did not finish in 60 s")
    total = int(writer.stdout.read())
    assert writer.wait(timeout=10) == 0
    assert reader.count() == total == seen and opened > 10
    assert_consistent(path)


def test_threads_appending_to_one_file(tmp_path: Path) -> None:
    path = tmp_path / "output.yaml"
    shared = LogFile(path)

    def append(worker: int) -> None:
        own = LogFile(path) if worker % 2 else shared  # same object and separate ones
        for batch in range(50):
            own.append([LogRecord(DT, "info", f"w{worker} b{batch} i{i}") for i in range(7)])

    threads = [threading.Thread(target=append, args=(worker,)) for worker in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
        assert not thread.is_alive()
    assert shared.count() == 4 * 50 * 7
    messages = [record.msg for record in shared.records()]
    assert sorted(messages) == sorted(f"w{w} b{b} i{i}" for w in range(4) for b in range(50) for i in range(7))
    assert_consistent(path)


def test_a_killed_writer_leaves_a_repairable_log(tmp_path: Path) -> None:
    path = tmp_path / "output.yaml"
    writer = start_writer(path, 100_000, 0)
    deadline = time.monotonic() + 30
    while (not path.exists() or path.stat().st_size < 200_000) and time.monotonic() < deadline:
        time.sleep(0.01)
    writer.send_signal(signal.SIGKILL)
    writer.wait(timeout=10)
    log = LogFile(path)
    count = log.count()
    assert count > 100
    assert_consistent(path)
    for number, record in enumerate(log.records()):
        assert record.msg.startswith(f"seq {number} ")
    assert log.append(records(0, 1)) == count + 1


# ---- write errors: nothing half written stays, nothing is lost ----


def reference_log(tmp_path: Path, batches: list[list[LogRecord]]) -> bytes:
    """The bytes of a log holding ``batches`` written without any failure."""
    path = tmp_path / "reference" / "output.yaml"
    path.parent.mkdir()
    with LogFile(path) as log:
        for batch in batches:
            log.append(batch)
    return path.read_bytes()


@pytest.mark.parametrize("error", [errno.ENOSPC, errno.EIO], ids=["ENOSPC", "EIO"])
@pytest.mark.parametrize("failing", ["log", "index"])
def test_an_append_failing_midway_is_rolled_back_to_the_last_good_line(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: int, failing: str) -> None:
    path = tmp_path / "output.yaml"
    batches = [records(0, 10), records(10, 30), records(30, 45)]
    log = LogFile(path)
    assert log.append(batches[0]) == 10
    good = path.read_bytes(), (tmp_path / "output.idx").read_bytes()
    real_write_all = logfile_module._write_all
    calls: list[int] = []

    def failing_write(fd: int, data: bytes) -> None:
        calls.append(fd)
        if len(calls) == (1 if failing == "log" else 2):
            os.write(fd, data[: len(data) // 2 + 3])  # part of it reached the file
            raise OSError(error, os.strerror(error))
        real_write_all(fd, data)

    monkeypatch.setattr(logfile_module, "_write_all", failing_write)
    with pytest.raises(LogWriteError) as raised:
        log.append(batches[1])
    assert raised.value.errno == error and raised.value.lines == 10
    assert str(path) in str(raised.value) and os.strerror(error) in str(raised.value)
    # the log and its index are back where they were, byte for byte
    assert (path.read_bytes(), (tmp_path / "output.idx").read_bytes()) == good
    assert log.count() == 10 and LogFile(path).count() == 10
    # the writer sends the batch again: appended once, whole
    monkeypatch.setattr(logfile_module, "_write_all", real_write_all)
    assert log.append(batches[1]) == 30
    assert log.append(batches[2]) == 45
    assert log.flush() == 45
    assert_consistent(path)
    assert path.read_bytes() == reference_log(tmp_path, batches)


@pytest.mark.parametrize("error", [errno.ENOSPC, errno.EIO], ids=["ENOSPC", "EIO"])
def test_a_failed_flush_cuts_the_log_back_to_the_last_durable_line(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: int) -> None:
    path = tmp_path / "output.yaml"
    batches = [records(0, 10), records(10, 20), records(20, 25), records(25, 40)]
    log = LogFile(path)
    log.append(batches[0])
    assert log.flush() == 10
    durable = path.read_bytes(), (tmp_path / "output.idx").read_bytes()
    log.append(batches[1])
    log.append(batches[2])
    real_sync = os.fdatasync

    def failing_sync(fd: int) -> None:
        raise OSError(error, os.strerror(error))

    monkeypatch.setattr(logfile_module.os, "fdatasync", failing_sync)
    with pytest.raises(LogWriteError, match="cannot make durable") as raised:
        log.flush()
    assert raised.value.errno == error and raised.value.lines == 10
    # after a failed fsync the kernel may have dropped those pages: they are not kept
    assert (path.read_bytes(), (tmp_path / "output.idx").read_bytes()) == durable
    assert log.count() == 10
    monkeypatch.setattr(logfile_module.os, "fdatasync", real_sync)
    for batch in batches[1:]:
        log.append(batch)
    assert log.flush() == 40
    assert path.read_bytes() == reference_log(tmp_path, batches)
    assert_consistent(path)


def test_a_full_filesystem_loses_and_doubles_nothing(tmp_path: Path, tmpfs) -> None:
    fs = tmpfs("small", 1 << 20)
    path = fs.path / "jobs" / "output.yaml"
    path.parent.mkdir()
    batches = [records(n * 200, n * 200 + 200) for n in range(30)]  # about 18 kB each
    log = LogFile(path)
    appended, failures = 0, 0
    for number, batch in enumerate(batches):
        # the disk fills up again and again, leaving room for zero to two batches
        filler = fs.fill(leave=(number % 3) * 20_000)
        while True:
            try:
                appended = log.append(batch)
                assert log.flush() == appended
                break
            except LogWriteError as exc:
                assert exc.errno == errno.ENOSPC and exc.lines == appended
                assert log.count() == appended
                assert_consistent(path)
                failures += 1
                assert failures < 100, "the batch never went through"
                filler.unlink(missing_ok=True)  # space comes back: the writer sends the batch again
    assert failures >= 5 and appended == 6000
    log.close()
    assert path.read_bytes() == reference_log(tmp_path, batches)
    assert_consistent(path)
