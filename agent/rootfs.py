"""Root filesystem archives for NFS roots: download, decompress and extract in one streaming pass.

A Pi-class worker cannot afford LAVA's way (the whole download written to disk, decompressed into a
second file, then unpacked by ``tarfile.extractall``): here the bytes of the download go through
the checksums and into an external decompressor (``gzip``, ``bzip2``, ``xz``, ``zstd``), whose
output Python's ``tarfile`` reads as a stream, member by member. Nothing but the extracted tree
touches the disk; the memory is the decompressor's window plus a few buffers.

The tree is the board's root, not the worker's: numeric owners, modes (set-id bits included when
the agent runs as root), symbolic links kept as they are (absolute ones too), device nodes where
the worker may create them, hard links. Paths are resolved as the board would resolve them, inside
the root (a chroot's view), and never followed on the worker: an absolute symbolic link written
through (``lib -> /usr/lib`` then ``lib/modules/...``) lands inside the root. A member that would
write outside the root is refused with its name: a ``..`` that climbs above the root, a write
through a symbolic link whose relative target climbs out, a hard link to a path outside.

LAVA's semantics kept: ``compression`` is one of gz, bz2, xz, zstd or absent (then the archive's
magic decides, as LAVA's ``tarfile.open`` does for gz, bz2 and xz); ``md5sum``, ``sha256sum`` and
``sha512sum`` are checked on the compressed bytes as downloaded (a mismatch is a JobError saying
``<algo> for '<url>' does not match``); ``prefix`` (``sub/dir/``, relative, ending in ``/``) makes
that directory of the archive the root (LAVA extracts the whole archive and points the board at
the prefix: so do we). A download shorter or longer than announced is an InfrastructureError, an
archive that cannot be read a JobError, a full disk an InfrastructureError that names the member.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import select
import shutil
import stat
import subprocess
import tarfile
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from agent.compressed import MAGIC, declared_size
from agent.errors import InfrastructureError, JobError, PumiceError
from agent.scratch import remove_tree

if TYPE_CHECKING:
    from agent.timeout import Deadline

LOG = logging.getLogger("pumice.rootfs")

#: the decompressors of LAVA's nfsrootfs ``compression`` values, reading stdin, writing stdout
DECOMPRESSORS: dict[str, tuple[str, ...]] = {
    "gz": ("gzip", "-dc"),
    "bz2": ("bzip2", "-dc"),
    "xz": ("xz", "-dc"),
    "zstd": ("zstd", "-dcq"),
}
#: the checksum keys of a LAVA download and their algorithms
CHECKSUMS: dict[str, str] = {"md5sum": "md5", "sha256sum": "sha256", "sha512sum": "sha512"}
#: bytes left free on the worker's disk whatever the archive says (its own logs and spool need room)
DEFAULT_RESERVE = 64 << 20
CHUNK = 64 << 10
#: symbolic links followed while resolving one path (the kernel's limit)
MAX_LINKS = 40


@dataclass
class Extracted:
    """What :func:`extract` made: the tree to remove at the end, the root the board mounts."""

    directory: Path  # the whole extracted tree (removed at the end of the job)
    root: Path  # directory/prefix: what is exported and mounted
    compression: str | None
    compressed_bytes: int = 0
    members: int = 0
    file_bytes: int = 0
    devices_skipped: int = 0
    digests: dict[str, str] = field(default_factory=dict)
    declared_size: int | None = None
    seconds: float = 0.0


class MemberRefused(JobError):
    """An archive member would write outside the root (its name is in the message)."""


def checksums_of(params: Mapping) -> dict[str, str]:
    """The expected digests of a LAVA download's parameters: algorithm -> lower-case hex."""
    return {algo: str(params[key]).strip().lower() for key, algo in CHECKSUMS.items() if params.get(key)}


def check_prefix(prefix: object) -> str | None:
    """What is wrong with a ``prefix`` parameter (LAVA's two rules), or None."""
    if not isinstance(prefix, str) or not prefix:
        return "prefix must be a non-empty string"
    if prefix.startswith("/"):
        return "prefix must not be an absolute path"
    if not prefix.endswith("/"):
        return "prefix must be a directory and end with /"
    return None


# --- space ------------------------------------------------------------------------------------


def free_bytes(path: Path) -> int:
    """Bytes an unprivileged writer may still use on the filesystem of ``path``."""
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


# --- the stream ----------------------------------------------------------------------------------


def _digest(algo: str):  # noqa: ANN202 (a hash object)
    """A new hash object. CPython's own implementations: hashlib would map OpenSSL's libcrypto into
    the runner (3 MB of RSS) for the same result."""
    try:
        import _md5
        import _sha256
        import _sha512

        return {"md5": _md5.md5, "sha256": _sha256.sha256, "sha512": _sha512.sha512}[algo]()
    except ImportError:  # a Python built without them
        import hashlib

        return hashlib.new(algo)


class _Source:
    """The download as read: counts the bytes, updates the digests, keeps the first bytes."""

    def __init__(self, source: BinaryIO, algorithms: list[str]) -> None:
        self.source = source
        self.hashes = {algo: _digest(algo) for algo in algorithms}
        self.count = 0
        self.error: OSError | None = None

    def read(self, size: int = CHUNK) -> bytes:
        try:
            data = self.source.read(size)
        except OSError as exc:
            self.error = exc
            raise
        if data:
            self.count += len(data)
            for digest in self.hashes.values():
                digest.update(data)
        return data


class _Feeder(threading.Thread):
    """Feeds the download into the decompressor's stdin (a thread, so the main thread reads the
    decompressed tar while the download goes on); keeps the error that stopped it."""

    def __init__(self, source: _Source, head: bytes, pipe: BinaryIO) -> None:
        super().__init__(name="rootfs-feeder", daemon=True)
        self.source = source
        self.head = head
        self.pipe = pipe
        self.broken = False
        self.stop = threading.Event()

    def run(self) -> None:
        try:
            data = self.head
            while data and not self.stop.is_set():
                try:
                    self.pipe.write(data)
                except (BrokenPipeError, ValueError):  # ValueError: closed by the main thread's cleanup
                    self.broken = True  # the decompressor gave up: its exit status says why
                    return
                data = self.source.read(CHUNK)
        except OSError:
            pass  # kept by the reader: the main thread reports it
        finally:
            try:
                self.pipe.close()
            except (OSError, ValueError):
                self.broken = True


class _Tree:
    """Writes archive members into ``directory`` with the board's view of paths (never following
    a link on the worker); ``counted`` gathers the figures of :class:`Extracted`."""

    def __init__(self, directory: Path, counted: Extracted, reserve: int) -> None:
        self.top = os.fspath(directory)
        self.counted = counted
        self.reserve = reserve
        self.root = os.geteuid() == 0
        self.directories: list[tuple[str, int, int, int, float]] = []

    # -- paths ---------------------------------------------------------------------------------------
    def real(self, parts: list[str]) -> str:
        return os.path.join(self.top, *parts)

    def resolve(self, name: str, member: str, follow_last: bool = False, create: bool = True) -> list[str]:
        """The components (inside the root) of the real path of ``name``: ``..`` pops one (never
        above the root), absolute symbolic links restart at the root, relative ones from their
        directory. Missing intermediate directories are made (``create``), as tar does."""
        todo = [part for part in name.split("/") if part not in ("", ".")]
        todo.reverse()
        current: list[str] = []
        links = 0
        via: str | None = None  # the symbolic link whose target is being walked
        while todo:
            part = todo.pop()
            if part in ("", "."):
                continue
            if part == "..":
                if not current:
                    where = f"through the symbolic link {via}" if via else "with '..'"
                    raise MemberRefused(f"archive member {member!r} would write outside the root {where}")
                current.pop()
                continue
            candidate = [*current, part]
            last = not todo
            if last and not follow_last:
                return candidate
            path = self.real(candidate)
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                if last:
                    return candidate
                if not create:
                    raise JobError(f"archive member {member!r}: {'/'.join(candidate)} does not exist") from None
                os.mkdir(path, 0o755)
                current = candidate
                continue
            if stat.S_ISLNK(st.st_mode):
                links += 1
                if links > MAX_LINKS:
                    raise JobError(f"archive member {member!r}: too many levels of symbolic links")
                target = os.readlink(path)
                via = f"/{'/'.join(candidate)} -> {target}"
                if target.startswith("/"):
                    current = []
                parts = [p for p in target.split("/") if p not in ("", ".")]
                todo.extend(reversed(parts))
                continue
            if stat.S_ISDIR(st.st_mode) or last:
                current = candidate
                continue
            raise JobError(f"archive member {member!r}: /{'/'.join(candidate)} is not a directory")
        return current

    def clear(self, path: str, member: str, keep_directory: bool = False) -> bool:
        """Make room for a new entry at ``path`` (never following it); True if a directory stays."""
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return False
        if stat.S_ISDIR(st.st_mode):
            if keep_directory:
                return True
            try:
                os.rmdir(path)
            except OSError as exc:
                raise JobError(f"archive member {member!r} replaces a directory that is not empty") from exc
            return False
        os.unlink(path)
        return False

    def space_for(self, size: int, member: str) -> None:
        free = free_bytes(Path(self.top))
        if size + self.reserve > free:
            raise InfrastructureError(
                f"no space left on the worker for archive member {member!r} ({size} bytes): "
                f"{free} bytes free in {self.top}, {self.reserve} kept in reserve"
            )

    # -- members ---------------------------------------------------------------------------------------
    def add(self, tar: tarfile.TarFile, info: tarfile.TarInfo) -> None:
        """Write one member."""
        name = info.name
        if info.isdir():
            parts = self.resolve(name, name, follow_last=True)
            path = self.real(parts)
            if parts and not self.clear(path, name, keep_directory=True):
                os.mkdir(path, 0o700)
            self.directories.append((path, info.mode, info.uid, info.gid, info.mtime))
            return
        parts = self.resolve(name, name)
        if not parts:
            raise JobError(f"archive member {name!r} ({_kind(info)}) would replace the root directory")
        path = self.real(parts)
        if info.isreg():
            self.space_for(info.size, name)
            self.clear(path, name)
            source = tar.extractfile(info)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            try:
                with os.fdopen(fd, "wb", closefd=False) as out:
                    if source is not None:
                        shutil.copyfileobj(source, out, CHUNK)
                self.counted.file_bytes += info.size
                self.own(fd, info)
            finally:
                os.close(fd)
            os.utime(path, (info.mtime, info.mtime), follow_symlinks=False)
        elif info.issym():
            self.clear(path, name)
            os.symlink(info.linkname, path)
            self.own(path, info, link=True)
        elif info.islnk():
            target = self.real(self.resolve(info.linkname, name, create=False))
            if not os.path.lexists(target) or os.path.isdir(target) and not os.path.islink(target):
                raise JobError(f"archive member {name!r}: hard link to {info.linkname!r}, which is not a file "
                               "extracted before it")
            self.clear(path, name)
            os.link(target, path, follow_symlinks=False)
        elif info.ischr() or info.isblk() or info.isfifo():
            self.clear(path, name)
            kind = stat.S_IFIFO if info.isfifo() else stat.S_IFCHR if info.ischr() else stat.S_IFBLK
            try:
                os.mknod(path, kind | 0o600, os.makedev(info.devmajor, info.devminor))
            except PermissionError:
                self.counted.devices_skipped += 1  # an unprivileged worker cannot make device nodes
                return
            self.own(path, info)
            os.utime(path, (info.mtime, info.mtime), follow_symlinks=False)
        else:
            LOG.warning("archive member %r: %s skipped", name, _kind(info))

    def own(self, where: int | str, info: tarfile.TarInfo, link: bool = False) -> None:
        """Numeric owner, then the mode (chown clears set-id bits), of a new entry."""
        if self.root:
            if isinstance(where, int):
                os.fchown(where, info.uid, info.gid)
            else:
                os.chown(where, info.uid, info.gid, follow_symlinks=False)
        if link:
            os.utime(where, (info.mtime, info.mtime), follow_symlinks=False)
            return
        mode = info.mode & (0o7777 if self.root else 0o1777)
        if isinstance(where, int):
            os.fchmod(where, mode)
        else:
            os.chmod(where, mode)  # a device node or fifo just made here: not a link

    def finish(self) -> None:
        """Owners, modes and times of the directories, deepest first (as tar does at its end)."""
        for path, mode, uid, gid, mtime in reversed(self.directories):
            if self.root:
                os.chown(path, uid, gid, follow_symlinks=False)
            os.chmod(path, mode & (0o7777 if self.root else 0o1777))
            os.utime(path, (mtime, mtime), follow_symlinks=False)
        self.directories.clear()


def _kind(info: tarfile.TarInfo) -> str:
    return {tarfile.CONTTYPE: "contiguous file", tarfile.GNUTYPE_SPARSE: "sparse file"}.get(
        info.type, f"entry of type {info.type!r}"
    )


# --- extraction ----------------------------------------------------------------------------------


def extract(
    source: BinaryIO,
    directory: Path,
    *,
    url: str,
    compression: str | None = None,
    checksums: Mapping[str, str] | None = None,
    prefix: str | None = None,
    expected_size: int | None = None,
    reserve: int = DEFAULT_RESERVE,
    deadline: Deadline | None = None,
    progress: Callable[[Extracted], None] | None = None,
    onto: bool = False,
) -> Extracted:
    """Extract the tar archive read from ``source`` (a binary stream: ``read(size)``) into the
    existing, empty ``directory``; return what was made.

    ``url`` names the archive in messages; ``compression`` is LAVA's (None: from the magic);
    ``checksums`` maps md5/sha256/sha512 to the expected hex digest of the compressed bytes;
    ``expected_size`` is the announced length (Content-Length). Free space is checked before
    (the declared size where the format has one, else the download's length) and for every
    member; ``reserve`` bytes are always left free. On any error the tree is removed and the
    error raised: JobError (archive, checksum, member outside the root, bad prefix),
    InfrastructureError (disk full, download cut short, decompressor missing).

    ``onto``: ``directory`` is a root already (kernel modules, the test overlay extracted into it,
    with the same view of paths): its own mode is kept, and nothing is removed on an error.
    """
    started = time.monotonic()
    if compression is not None and compression not in DECOMPRESSORS:
        raise JobError(f"Unknown 'compression' format '{compression}' for {url}; "
                       f"known: {', '.join(DECOMPRESSORS)} or none")
    if prefix is not None and (problem := check_prefix(prefix)):
        raise JobError(problem)
    checksums = dict(checksums or {})
    reader = _Source(source, sorted(checksums))
    try:
        head = reader.read(CHUNK)
    except OSError as exc:
        raise InfrastructureError(f"download of {url} failed: {exc}") from exc
    if compression is None:
        compression = next((name for name, magic in MAGIC.items() if head.startswith(magic)), None)
    result = Extracted(directory=Path(directory), root=Path(directory), compression=compression)
    result.declared_size = declared_size(head, source, compression)
    needed = result.declared_size if result.declared_size is not None else (expected_size or len(head))
    free = free_bytes(directory)
    if needed + reserve > free:
        what = "declares" if result.declared_size is not None else "is at least"
        raise InfrastructureError(
            f"not enough space on the worker for {url}: the archive {what} {needed} bytes, "
            f"{free} bytes free in {directory}, {reserve} kept in reserve"
        )
    if not onto:
        os.chmod(directory, 0o755)  # the root's own mode, unless the archive has a "./" entry
    try:
        _extract(reader, head, result, reserve, url, deadline, progress)
        result.compressed_bytes = reader.count
        if expected_size is not None and expected_size >= 0 and reader.count != expected_size:
            raise InfrastructureError(
                f"Download finished ({reader.count} bytes) but was not expected size "
                f"({expected_size} bytes), check your networking."
            )
        result.digests = {algo: digest.hexdigest() for algo, digest in reader.hashes.items()}
        for algo, expected in checksums.items():
            if result.digests[algo] != expected:
                raise JobError(f"{algo} for '{url}' does not match: expected {expected}, "
                               f"downloaded {result.digests[algo]}")
        if prefix:
            tree = _Tree(result.directory, result, reserve)
            parts = tree.resolve(prefix, prefix, follow_last=True, create=False)
            result.root = Path(tree.real(parts))
            if not result.root.is_dir() or result.root.is_symlink():
                raise JobError(f"prefix {prefix!r} is not a directory of {url}")
    except BaseException:
        if not onto:
            remove_tree(result.directory, keep_top=True)
        raise
    result.seconds = time.monotonic() - started
    return result


def _extract(reader: _Source, head: bytes, result: Extracted, reserve: int, url: str,
             deadline: Deadline | None, progress: Callable[[Extracted], None] | None) -> None:
    """The pipeline: download -> digests -> decompressor -> tarfile -> tree."""
    tree = _Tree(result.directory, result, reserve)
    proc = feeder = None
    # the decompressor's messages: a file in memory (a pipe could fill up and stall it)
    stderr = os.fdopen(os.memfd_create("decompressor-stderr", os.MFD_CLOEXEC), "w+b")
    try:
        if result.compression:
            argv = DECOMPRESSORS[result.compression]
            try:
                proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr,
                                        bufsize=0, close_fds=True)
            except OSError as exc:
                raise InfrastructureError(f"cannot run {argv[0]} to decompress {url}: {exc}") from exc
            feeder = _Feeder(reader, head, proc.stdin)
            feeder.start()
            stream: BinaryIO = proc.stdout
        else:
            stream = _Prepend(head, reader)
        _members(stream, tree, result, url, deadline, progress)
        if proc is not None:
            while proc.stdout.read(CHUNK):  # after the end-of-archive blocks: let it finish
                pass
            feeder.join()
            proc.wait()
        else:
            while reader.read(CHUNK):  # the rest of the download still counts and is hashed
                pass
        cause = _pipeline_error(reader, proc, stderr, result.compression, url)
        if cause is not None:
            raise cause
    except (tarfile.TarError, OSError) as exc:
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise InfrastructureError(
                f"no space left on the worker while extracting {url} into {result.directory} "
                f"(member {getattr(exc, 'member', '?')!r}, {free_bytes(result.directory)} bytes free)"
            ) from exc
        cause = _pipeline_error(reader, proc, stderr, result.compression, url, settle=5.0)
        if cause is not None:  # what the download or the decompressor said explains what tar saw
            raise cause from exc
        if isinstance(exc, tarfile.TarError):
            raise JobError(f"Unable to unpack {url}: {exc}") from exc
        raise InfrastructureError(f"Unable to unpack {url}: {exc}") from exc
    finally:
        if proc is not None:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            for pipe in (proc.stdin, proc.stdout):
                if pipe is not None:
                    with contextlib.suppress(OSError):
                        pipe.close()
        if feeder is not None:
            feeder.stop.set()
            feeder.join(5)
        stderr.close()


def _pipeline_error(reader: _Source, proc: subprocess.Popen | None, stderr: BinaryIO, compression: str | None,
                    url: str, settle: float = 0.0) -> PumiceError | None:
    """The download's failure, else the decompressor's (waiting up to ``settle`` seconds, its
    output drained, for it to end by itself), else None."""
    if proc is not None and settle:
        end = time.monotonic() + settle
        while proc.poll() is None and time.monotonic() < end:
            ready, _, _ = select.select([proc.stdout], [], [], 0.1)
            if ready and not proc.stdout.read(CHUNK):
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(max(0.0, end - time.monotonic()))
                break
    if reader.error is not None:
        return InfrastructureError(f"download of {url} failed: {reader.error}")
    if proc is not None and proc.poll() is not None and proc.returncode > 0:
        stderr.seek(0)
        said = stderr.read(4096).decode(errors="replace").strip()
        return JobError(f"Unable to unpack {url}: {DECOMPRESSORS[compression][0]} exited {proc.returncode}: "
                        f"{said}. Make sure the 'compression' is corresponding to the image file type.")
    return None


class _Prepend:
    """A stream of ``head`` then the rest of ``reader`` (an uncompressed archive)."""

    def __init__(self, head: bytes, reader: _Source) -> None:
        self.head = head
        self.reader = reader

    def read(self, size: int = CHUNK) -> bytes:
        if size < 0:
            size = CHUNK
        if self.head:
            data, self.head = self.head[:size], self.head[size:]
            return data
        return self.reader.read(size)


def _members(stream: BinaryIO, tree: _Tree, result: Extracted, url: str, deadline: Deadline | None,
             progress: Callable[[Extracted], None] | None) -> None:
    last_report = time.monotonic()
    with tarfile.open(fileobj=stream, mode="r|", encoding="utf-8", errors="surrogateescape") as tar:
        while (info := tar.next()) is not None:
            tar.members.clear()  # stream mode keeps every header otherwise: memory grows with the archive
            if deadline is not None:
                deadline.check()
            try:
                tree.add(tar, info)
            except OSError as exc:
                exc.member = info.name  # type: ignore[attr-defined]
                if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise
                raise JobError(f"archive member {info.name!r} of {url}: {exc.strerror or exc}") from exc
            result.members += 1
            if progress is not None and time.monotonic() - last_report >= 5:
                last_report = time.monotonic()
                progress(result)
    tree.finish()
