"""An append-only log file with a line index, for logs of any size read by line range.

``output.yaml`` holds the lines; ``output.idx`` (``path.with_suffix(".idx")``) holds, for each
line, the byte offset where it starts, as an 8-byte little-endian unsigned integer. Reading
lines N..M costs two reads whatever the size of the log.

Safety:

- Every append writes the lines first and their index entries second, under an exclusive
  ``flock`` on the log. A reader only uses lines the index knows, so it never sees a
  half-written line, and several readers and writers (threads or processes) can share a file.
- A crash can leave a torn last line (no newline), lines without index entries, or index
  entries without lines. Opening a LogFile (and every append) checks the tail of both files
  under the lock and repairs them: the torn line is dropped, the index is completed from the
  log or cut back. Without write access the repair is skipped and the file is read as it is.
- ``flush()`` fsyncs both files (writes go straight to the OS, there is no user-space buffer).
- A write that fails (ENOSPC, EIO...) leaves nothing behind: the log and its index are cut back
  to where they were before the append, and :class:`LogWriteError` says at which line. A flush
  that fails cuts them back to what the last flush made durable (after a failed fsync the
  kernel may have dropped the pages it could not write). So a writer that acknowledges lines
  only after ``flush()`` and appends again from the line count it is told never loses nor
  doubles a line. (One flushing writer per log: a rollback does not know another's appends.)
"""

from __future__ import annotations

import bisect
import fcntl
import os
import sys
import threading
from array import array
from collections.abc import Iterable
from pathlib import Path

from results.log import LogRecord

_CHUNK = 1 << 20
_SWAP = sys.byteorder != "little"  # the index is little-endian on every machine


def _warning(message: str, *args: object) -> None:
    """Log a repair on ``pumice.results``. Repairs are rare: logging is imported only for them
    (it costs milliseconds at the start of every ``pumice-run``)."""
    import logging

    logging.getLogger("pumice.results").warning(message, *args)


def _pread_all(fd: int, size: int, offset: int) -> bytes:
    parts = []
    while size > 0:
        data = os.pread(fd, min(size, 1 << 30), offset)
        if not data:
            break
        parts.append(data)
        size -= len(data)
        offset += len(data)
    return b"".join(parts)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _fsync_directory(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _offsets(data: bytes) -> array:
    entries = array("Q")
    entries.frombytes(data[: len(data) // 8 * 8])
    if _SWAP:
        entries.byteswap()
    return entries


def _pack(entries: array) -> bytes:
    if _SWAP:
        entries = array("Q", entries)
        entries.byteswap()
    return entries.tobytes()


def _find_newline(fd: int, start: int, stop: int) -> int:
    """Position of the first LF in [start, stop), or -1."""
    pos = start
    while pos < stop:
        chunk = os.pread(fd, min(_CHUNK, stop - pos), pos)
        if not chunk:
            return -1
        found = chunk.find(b"\n")
        if found >= 0:
            return pos + found
        pos += len(chunk)
    return -1


def _last_line_end(fd: int, size: int) -> int:
    """The offset just past the last LF of the file (0 if there is none)."""
    pos = size
    while pos > 0:
        start = max(0, pos - _CHUNK)
        found = os.pread(fd, pos - start, start).rfind(b"\n")
        if found >= 0:
            return start + found + 1
        pos = start
    return 0


class LogWriteError(OSError):
    """An append or a flush that failed (``errno`` is the cause's: ENOSPC, EIO...). The log and
    its index were cut back to ``lines`` lines; None when that failed too (the next append, or
    opening the log again, repairs it: count its lines then)."""

    def __init__(self, path: Path, cause: OSError, lines: int | None, what: str) -> None:
        super().__init__(cause.errno, cause.strerror or str(cause), str(path))
        self.lines = lines
        self.what = what

    def __str__(self) -> str:
        where = (f"the log is back at its last good line ({self.lines} lines)" if self.lines is not None
                 else "cutting it back failed too: it is repaired when it is next opened")
        return f"{self.what} {self.filename}: {self.strerror}; {where}"


class _Index:
    """Random access to the entries of an open index file."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.count = os.fstat(fd).st_size // 8

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: int) -> int:
        return _offsets(os.pread(self.fd, 8, i * 8))[0]


class LogFile:
    """An ``output.yaml`` log with its ``.idx`` line index; see the module doc.

    Files are created by the first append, so a LogFile can be opened to read a log that does
    not exist yet (it has 0 lines). Usable as a context manager.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.index_path = self.path.with_suffix(".idx")
        self._lock = threading.Lock()
        self._log_fd: int | None = None  # writer side, opened by the first append
        self._idx_fd: int | None = None
        self._read_fds: tuple[int, int] | None = None
        #: (log size, index size) that the last flush made durable (or found when the writer opened)
        self._synced: tuple[int, int] | None = None
        #: the writer created the files: their directory entries need an fsync too
        self._created = False
        if self.path.exists():
            self._repair_on_open()

    # -- writing -------------------------------------------------------------------------

    def append(self, records: Iterable[LogRecord]) -> int:
        """Append records; return the log's new line count."""
        return self._append([record.to_line().encode("utf-8") for record in records])

    def append_lines(self, lines: list[str]) -> int:
        """Append already formatted lines (a missing final newline is added); return the new
        line count. A line holding a newline other than its last character is refused."""
        encoded = []
        for number, line in enumerate(lines):
            body = line[:-1] if line.endswith("\n") else line
            if "\n" in body:
                raise ValueError(
                    f"line {number} of the batch holds a newline; one log line may not span lines: {body[:80]!r}"
                )
            encoded.append(body.encode("utf-8", "backslashreplace") + b"\n")
        return self._append(encoded)

    def _append(self, encoded: list[bytes]) -> int:
        with self._lock:
            log_fd, idx_fd = self._writer_fds()
            fcntl.flock(log_fd, fcntl.LOCK_EX)
            try:
                if not self._consistent(log_fd, idx_fd):
                    self._repair(log_fd, idx_fd)
                log_size, idx_size = os.fstat(log_fd).st_size, os.fstat(idx_fd).st_size
                if self._synced is None:
                    self._synced = (log_size, idx_size)
                if not encoded:
                    return idx_size // 8
                pos = log_size
                entries = array("Q")
                for line in encoded:
                    entries.append(pos)
                    pos += len(line)
                try:
                    _write_all(log_fd, b"".join(encoded))
                    _write_all(idx_fd, _pack(entries))
                except OSError as exc:
                    # a partly written batch must not stay: the writer appends it again
                    done = self._cut_back(log_fd, idx_fd, log_size, idx_size)
                    raise LogWriteError(self.path, exc, idx_size // 8 if done else None,
                                        "cannot append to") from exc
                return os.fstat(idx_fd).st_size // 8
            finally:
                if self._log_fd is not None:
                    fcntl.flock(log_fd, fcntl.LOCK_UN)

    def _writer_fds(self) -> tuple[int, int]:
        if self._log_fd is None:
            flags = os.O_RDWR | os.O_APPEND | os.O_CREAT | getattr(os, "O_CLOEXEC", 0)
            self._created = not self.path.exists() or not self.index_path.exists()
            self._log_fd = os.open(self.path, flags, 0o644)
            self._idx_fd = os.open(self.index_path, flags, 0o644)
            self._synced = None  # taken by the first append, after its repair
        assert self._idx_fd is not None
        return self._log_fd, self._idx_fd

    def _cut_back(self, log_fd: int, idx_fd: int, log_size: int, idx_size: int) -> bool:
        """Truncate both files to these sizes (caller holds the lock); False when that fails: the
        writer side is closed then, so that the next append reopens and repairs."""
        try:
            os.ftruncate(log_fd, log_size)
            os.ftruncate(idx_fd, idx_size)
        except OSError:
            self._close_writer()
            return False
        return True

    def _close_writer(self) -> None:
        for fd in (self._log_fd, self._idx_fd):
            if fd is not None:
                os.close(fd)  # also releases the lock
        self._log_fd = self._idx_fd = None
        self._synced = None

    def flush(self) -> int:
        """Make the appended lines durable (fdatasync of the log and its index, and of their
        directory when they were created); returns the number of durable lines.

        Raises :class:`LogWriteError` when the system cannot: both files are then cut back to
        what the previous flush made durable, its ``lines`` say how many lines that is.
        """
        with self._lock:
            if self._log_fd is None or self._idx_fd is None:
                return self.count()
            log_fd, idx_fd = self._log_fd, self._idx_fd
            fcntl.flock(log_fd, fcntl.LOCK_EX)
            try:
                sizes = os.fstat(log_fd).st_size, os.fstat(idx_fd).st_size
                try:
                    os.fdatasync(log_fd)
                    os.fdatasync(idx_fd)
                    if self._created:
                        _fsync_directory(self.path.parent)
                        self._created = False
                except OSError as exc:
                    back = self._synced
                    if back is None:  # nothing known durable: leave it to the repair on reopening
                        self._close_writer()
                    done = back is not None and self._cut_back(log_fd, idx_fd, *back)
                    raise LogWriteError(self.path, exc, back[1] // 8 if back and done else None,
                                        "cannot make durable") from exc
                self._synced = sizes
                return sizes[1] // 8
            finally:
                if self._log_fd is not None:
                    fcntl.flock(log_fd, fcntl.LOCK_UN)

    # -- crash repair --------------------------------------------------------------------

    def _repair_on_open(self) -> None:
        try:
            log_fd = os.open(self.path, os.O_RDWR | getattr(os, "O_CLOEXEC", 0))
        except OSError:
            return  # read-only access: use the files as they are
        try:
            idx_fd = os.open(self.index_path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
        except OSError:
            os.close(log_fd)
            return
        try:
            fcntl.flock(log_fd, fcntl.LOCK_EX)
            if not self._consistent(log_fd, idx_fd):
                self._repair(log_fd, idx_fd)
        finally:
            os.close(idx_fd)
            os.close(log_fd)  # also releases the lock

    @staticmethod
    def _consistent(log_fd: int, idx_fd: int) -> bool:
        """Cheap tail check: whole index entries, the last one starting the log's last line."""
        size = os.fstat(log_fd).st_size
        idx_size = os.fstat(idx_fd).st_size
        if idx_size % 8:
            return False
        if size == 0:
            return idx_size == 0
        if idx_size == 0 or os.pread(log_fd, 1, size - 1) != b"\n":
            return False
        last = _Index(idx_fd)[idx_size // 8 - 1]
        if last >= size or (last and os.pread(log_fd, 1, last - 1) != b"\n"):
            return False
        return _find_newline(log_fd, last, size) == size - 1

    def _repair(self, log_fd: int, idx_fd: int) -> None:
        """Make log and index agree again (caller holds the lock)."""
        size = os.fstat(log_fd).st_size
        end = _last_line_end(log_fd, size)
        if end < size:
            _warning("%s: dropping a torn last line (%d bytes without a newline)", self.path, size - end)
            os.ftruncate(log_fd, end)
        if os.fstat(idx_fd).st_size % 8:
            os.ftruncate(idx_fd, os.fstat(idx_fd).st_size // 8 * 8)
        index = _Index(idx_fd)
        # Keep the entries that point inside the log (they are increasing)...
        keep = bisect.bisect_left(index, end)
        if keep and index[keep - 1] and os.pread(log_fd, 1, index[keep - 1] - 1) != b"\n":
            keep = 0  # ...unless the last one is not a line start: rebuild all of it
        # ...and index the lines after the last kept one.
        entries = array("Q", [] if keep or not end else [0])
        pos = index[keep - 1] if keep else 0
        while True:
            newline = _find_newline(log_fd, pos, end)
            if newline < 0 or newline + 1 >= end:
                break
            pos = newline + 1
            entries.append(pos)
        if keep != len(index) or entries:
            _warning(
                "%s: repairing the line index (%d entries kept, %d added)", self.index_path, keep, len(entries)
            )
            os.ftruncate(idx_fd, keep * 8)
            os.lseek(idx_fd, 0, os.SEEK_END)
            _write_all(idx_fd, _pack(entries))

    # -- reading -------------------------------------------------------------------------

    def _readers(self) -> tuple[int, int] | None:
        if self._read_fds is None:
            try:
                log_fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
            except FileNotFoundError:
                return None
            try:
                idx_fd = os.open(self.index_path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
            except FileNotFoundError:
                os.close(log_fd)
                return None
            with self._lock:
                if self._read_fds is None:
                    self._read_fds = (log_fd, idx_fd)
                else:
                    os.close(log_fd)
                    os.close(idx_fd)
        return self._read_fds

    def count(self) -> int:
        """The number of complete lines in the log."""
        fds = self._readers()
        return os.fstat(fds[1]).st_size // 8 if fds else 0

    def read(self, start: int = 0, end: int | None = None) -> list[str]:
        """Lines ``start`` to ``end - 1`` (0-based, like a slice; clamped to the log), without
        their newlines. Cost is proportional to the lines read, not to the log size."""
        fds = self._readers()
        if fds is None:
            return []
        log_fd, idx_fd = fds
        count = os.fstat(idx_fd).st_size // 8
        start = max(0, start)
        end = count if end is None else min(end, count)
        if start >= end:
            return []
        # One more entry than lines read gives where the last one ends.
        entries = _offsets(os.pread(idx_fd, (end - start + 1) * 8, start * 8))
        begin = entries[0]
        if len(entries) > end - start:
            stop = entries[end - start]
        else:  # the log's last indexed line: it ends at its newline
            last = entries[-1]
            newline = _find_newline(log_fd, last, os.fstat(log_fd).st_size)
            if newline < 0:
                raise OSError(f"{self.path}: the index points past the end of the log; reopen it to repair")
            stop = newline + 1
        data = _pread_all(log_fd, stop - begin, begin)
        lines = data.decode("utf-8", "replace").split("\n")
        lines.pop()  # after the final newline
        return lines

    def records(self, start: int = 0, end: int | None = None) -> list[LogRecord]:
        """Lines ``start`` to ``end - 1`` parsed as LogRecords."""
        return [LogRecord.from_line(line) for line in self.read(start, end)]

    # -- lifetime ------------------------------------------------------------------------

    def close(self) -> None:
        """Close the file descriptors (the LogFile can be used again: they reopen on demand)."""
        with self._lock:
            self._close_writer()
            for fd in self._read_fds or ():
                os.close(fd)
            self._read_fds = None

    def __enter__(self) -> LogFile:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"LogFile({str(self.path)!r})"
