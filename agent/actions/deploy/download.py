"""Downloads: http(s) and file URLs, with checksums and decompression, retried as LAVA does."""

from __future__ import annotations

import queue
import threading
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import voluptuous as v

from agent.errors import Bug, InfrastructureError, JobError, PumiceError
from agent.pipeline import Action, RetryAction
from agent.policy import PolicyRefusal, scheme_of
from agent.qemu_policy import image_verdict, refusals
from agent.timeout import Deadline

CHECKSUMS = ("md5sum", "sha256sum", "sha512sum")
#: compression -> module whose open() decompresses (imported when a download needs it)
DECOMPRESSORS = {"gz": "gzip", "xz": "lzma", "bz2": "bz2"}
#: the compressions LAVA 2023.01's job schema knows
LAVA_COMPRESSIONS = ("bz2", "gz", "xz", "zip", "zstd")
#: bytes read, hashed and written at a time: 256 KiB takes a quarter of the Python-level steps
#: (reads, hand-overs to the hashing thread, writes) of 64 KiB, for the same peak RSS (at most 4
#: chunks wait to be hashed); larger gains nothing measurable
CHUNK = 1 << 18

#: what an image entry of a deploy block may carry
IMAGE_KEYS = {
    v.Required("url"): str,
    v.Optional("headers"): {str: str},
    v.Optional("compression"): v.Any("gz", "xz", "bz2", "zip", "zstd", None),
    v.Optional("archive"): "tar",
    v.Optional("image_arg"): str,
    v.Optional("md5sum"): str,
    v.Optional("sha256sum"): str,
    v.Optional("sha512sum"): str,
    v.Optional("format"): v.Any("cpio.newc", "ext4", "tar", "qcow2"),
    v.Optional("partition"): int,
    v.Optional("sparse"): bool,
    v.Optional("overlays"): {v.Optional("lava"): bool, str: dict},
    v.Optional("type"): str,
    v.Optional("install_modules"): bool,
    v.Optional("install_overlay"): bool,
    v.Optional("header"): str,
}


class DownloaderAction(RetryAction):
    """Fetch one image of a deploy block, retrying up to three times."""

    name = "download-retry"
    description = "download with retry"
    summary = "download-retry"

    def __init__(self, key: str, params: dict, directory: str = "") -> None:
        super().__init__()
        self.key = key
        self.params = params
        self.directory = directory

    def populate(self, parameters: dict) -> None:
        self.max_retries = 3
        url = self.params.get("url", "")
        scheme = scheme_of(url)
        handler = {"http": HttpDownloadAction, "https": HttpDownloadAction, "file": FileDownloadAction}.get(scheme)
        pipeline = self.child_pipeline(parameters)
        if handler is None:
            if not scheme:
                raise JobError(f"images.{self.key}.url: not a valid URL: {url!r}")
            raise JobError(f"images.{self.key}.url: unsupported URL scheme {scheme!r} in {url!r}; "
                           "known: http, https, file")
        pipeline.add(handler(self.key, self.params, self.directory))
        if (self.params.get("overlays") or {}).get("lava"):
            from agent.actions.deploy.overlay import AppendOverlays

            pipeline.add(AppendOverlays(self.key, self.params))


class DownloadHandler(Action):
    """Common part of the download actions: checksums, decompression, where the file lands."""

    timeout_exception = InfrastructureError

    def __init__(self, key: str, params: dict, directory: str = "") -> None:
        super().__init__()
        self.key = key
        self.params = params
        self.url = params.get("url", "")
        self.directory = directory
        self.transfer: _Transfer | None = None
        #: the deploy block's other downloads (see download_together)
        self.others: list[DownloadHandler] = []

    def validate(self) -> None:
        compression = self.params.get("compression")
        if compression and compression not in DECOMPRESSORS:
            done = "not implemented" if compression in LAVA_COMPRESSIONS else "unknown"
            self.errors.append(f"images.{self.key}.compression: {done}: {compression!r}; "
                               f"Pumice implements: {', '.join(DECOMPRESSORS)}")
        for name in CHECKSUMS:
            value = self.params.get(name)
            if value is not None and not _is_hex(value, name):
                self.errors.append(f"images.{self.key}.{name}: not a hexadecimal {name[:-3]} digest")
        if self.params.get("archive"):
            self.errors.append(f"images.{self.key}.archive: not implemented: unpacking archives at deploy")
        for overlay in self.params.get("overlays") or {}:
            if overlay != "lava":
                self.errors.append(f"images.{self.key}.overlays.{overlay}: not implemented: file and tar "
                                   "overlays (Pumice implements the 'lava' overlay)")

    def destination(self) -> Path:
        name = Path(urlparse(self.url).path).name or self.key
        compression = self.params.get("compression")
        if compression and name.endswith("." + compression):
            name = name[: -len(compression) - 1]
        folder = self.job.workdir / "images" / self.directory / self.key
        folder.mkdir(parents=True, exist_ok=True)
        return folder / name

    def open_source(self, deadline: Deadline):
        raise NotImplementedError

    def run(self, connection: Any, deadline: Deadline) -> Any:
        for other in self.others:  # the first download of a deploy block starts the others
            if not other.started and other.transfer is None:
                other.transfer = _Transfer(other, other.destination(), Deadline.after(other.timeout, other.name))
                other.transfer.start()
        transfer, self.transfer = self.transfer, None  # a retry downloads again, here
        if transfer is None:
            transfer = _Transfer(self, self.destination(), deadline)
            transfer.run()
        elif not transfer.wait(deadline):
            transfer.stop()
            raise self.timed_out(f"downloading {self.url}")
        if transfer.error is not None:
            raise transfer.error
        for name, digest in transfer.hashes.items():
            expected = self.params[name].lower()
            if digest.hexdigest() != expected:
                raise JobError(f"{self.key}: {name[:-3]} checksum mismatch for {self.url}: "
                               f"expected {expected}, got {digest.hexdigest()}")
        count, size = transfer.count, transfer.size
        self.logger.info(f"{self.key}: downloaded {count} bytes from {self.url}"
                         + (f", {size} bytes after decompression" if count != size else ""))
        self.job.data.downloads[self.key] = transfer.dest
        self.results.update({"label": self.key, "size": size, "url": self.url})
        return connection

    def cleanup(self, connection: Any) -> None:
        super().cleanup(connection)
        if self.transfer is not None:  # prefetched, never waited for (an earlier action failed)
            self.transfer.stop()
            self.transfer = None


def download_together(pipeline) -> None:
    """Have the downloads of a deploy block's ``pipeline`` run side by side: when the first one
    starts, the others start on threads of their own (each with its own timeout, from then), so
    that one image comes off the network or goes to disk while another is decompressed, instead of
    one after the other. Each download action still waits for its own, checks it, logs it and
    fails in its turn. (Not earlier than the first download: what comes before, the overlay, is
    Python work that the downloads' threads would slow down.)"""
    downloads = [action for action in pipeline.walk() if isinstance(action, DownloadHandler)]
    for action in downloads:
        action.others = [other for other in downloads if other is not action]


class HttpDownloadAction(DownloadHandler):
    """Download an image over http or https."""

    name = "http-download"
    description = "use http to download the file"
    summary = "http download"

    def validate(self) -> None:
        super().validate()
        for name, value in (self.params.get("headers") or {}).items():
            if any(char in f"{name}{value}" for char in "\r\n"):
                self.errors.append(f"images.{self.key}.headers.{name}: a header cannot hold a line break")

    def open_source(self, deadline: Deadline):
        from agent.fetch import HTTPStatusError, open_url

        try:
            return open_url(self.url, self.job.policy, self.params.get("headers") or {},
                            timeout=deadline.within(30.0))
        except HTTPStatusError as exc:
            # a 4xx is the job's fault (a wrong URL); a 5xx is the server's
            error = JobError if 400 <= exc.code < 500 else InfrastructureError
            raise error(f"cannot download {self.url}: {exc}") from None
        except OSError as exc:  # open_url has unwrapped urllib's URLError already
            raise InfrastructureError(f"cannot download {self.url}: {exc}") from None


class FileDownloadAction(DownloadHandler):
    """Copy an image from a file:// URL on the worker (under a directory its file policy allows)."""

    name = "file-download"
    description = "use file to download the file"
    summary = "file download"

    def open_source(self, deadline: Deadline):
        try:
            return self.job.policy.open_file(self.url)
        except OSError as exc:
            raise JobError(f"cannot read {self.url}: {exc.strerror}") from None


class _Transfer:
    """One download: source to ``dest``, hashed and decompressed on the way, run on the caller's
    thread (``run``) or on a thread of its own (``start``, then ``wait``). What went wrong is kept in
    ``error``; the thread never logs (the action does, once it has waited)."""

    def __init__(self, action: DownloadHandler, dest: Path, deadline: Deadline) -> None:
        import hashlib

        self.action = action
        self.dest = dest
        self.deadline = deadline
        self.hashes = {name: hashlib.new(name[:-3]) for name in CHECKSUMS if action.params.get(name)}
        self.count = 0  # bytes read from the source
        self.size = 0  # bytes written, after decompression
        self.error: PumiceError | None = None
        self.stopped = threading.Event()
        self.thread: threading.Thread | None = None

    def start(self) -> None:
        self.thread = threading.Thread(target=self._run_kept, name=f"download-{self.action.key}", daemon=True)
        self.thread.start()

    def wait(self, deadline: Deadline) -> bool:
        """True once the thread is done, False if ``deadline`` passes first."""
        self.thread.join(deadline.remaining())
        return not self.thread.is_alive()

    def stop(self) -> None:
        """Have the thread give up at its next chunk (a read blocked on a silent server ends at its
        socket timeout: the thread is a daemon, nothing waits for it)."""
        self.stopped.set()

    def _run_kept(self) -> None:
        try:
            self.run()
        except PumiceError as exc:
            self.error = exc
        except Exception as exc:  # a bug: reported by the action like any error of its own
            self.error = Bug(f"downloading {self.action.url}: {type(exc).__name__}: {exc}")

    def run(self) -> None:
        import importlib
        import lzma

        action = self.action
        with action.open_source(self.deadline) as source:
            raw = _Hashing(source, self.hashes, self.deadline, action, self.stopped)
            compression = action.params.get("compression")
            stream = importlib.import_module(DECOMPRESSORS[compression]).open(raw) if compression else raw
            try:
                with open(self.dest, "wb") as out:
                    while chunk := stream.read(CHUNK):
                        out.write(chunk)
                        self.size += len(chunk)
            except InfrastructureError:
                raise
            except (OSError, EOFError, lzma.LZMAError) as exc:
                raise JobError(f"{action.url}: cannot decompress as {compression}: {exc}") from None
            finally:
                raw.finish()
                self.count = raw.count


class _Hashing:
    """A read-through wrapper that hashes what passes and checks the deadline.

    The hashing runs on a thread of its own: hashlib lets go of the GIL on large buffers, so the
    checksums are computed while the next chunk comes off the network and the last one goes to
    disk, instead of adding a third to the download (more on a small worker). ``finish()`` waits
    for the last chunk to be hashed.
    """

    def __init__(self, source, hashes: dict, deadline: Deadline, action: DownloadHandler,
                 stopped: threading.Event) -> None:
        self.source = source
        self.stopped = stopped
        self.hashes = hashes
        self.deadline = deadline
        self.action = action
        self.count = 0
        self.chunks: queue.Queue | None = None
        if hashes:
            self.chunks = queue.Queue(maxsize=4)  # at most 4 chunks (1 MiB) wait to be hashed
            self.hasher = threading.Thread(target=self._hash, name=f"hash-{action.key}", daemon=True)
            self.hasher.start()

    def _hash(self) -> None:
        while (chunk := self.chunks.get()) is not None:
            for digest in self.hashes.values():
                digest.update(chunk)

    def finish(self) -> None:
        """Return once every chunk read so far is hashed."""
        if self.chunks is not None:
            self.chunks.put(None)
            self.hasher.join()
            self.chunks = None

    def read(self, size: int = -1) -> bytes:
        if self.deadline.expired():
            raise self.action.timed_out(f"downloading {self.action.url}")
        if self.stopped.is_set():
            raise InfrastructureError(f"the download of {self.action.url} was stopped")
        try:
            chunk = self.source.read(size if size and size > 0 else CHUNK)
        except OSError as exc:  # a timeout, a reset connection
            raise InfrastructureError(f"download of {self.action.url} failed: {exc}") from None
        if self.chunks is not None and chunk:
            self.chunks.put(chunk)
        self.count += len(chunk)
        return chunk

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        chunk = self.read(len(buffer))
        buffer[: len(chunk)] = chunk
        return len(chunk)


def _is_hex(value: str, name: str) -> bool:
    sizes = {"md5sum": 32, "sha256sum": 64, "sha512sum": 128}
    try:
        int(value, 16)
    except (TypeError, ValueError):
        return False
    return len(value) == sizes[name]




class QCowConversionAction(Action):
    """Convert a downloaded qcow2 image to raw with ``qemu-img`` (as LAVA does for ``format: qcow2``)."""

    name = "qcow2-convert"
    description = "convert qcow2 image using qemu-img"
    summary = "qcow conversion"
    timeout_exception = InfrastructureError

    def __init__(self, key: str) -> None:
        super().__init__()
        self.key = key

    def validate(self) -> None:
        self.require_tool("qemu-img", why="qemu-utils converts qcow2 images")

    def run(self, connection: Any, deadline: Deadline) -> Any:
        import subprocess

        source = self.job.data.downloads[self.key]
        # qemu-img reads what the image names (a backing file, a data file): the worker's file policy
        # decides, as for QEMU (agent.qemu_policy)
        verdict = image_verdict(str(source), "qcow2", str(self.job.workdir), f"image {self.key}")
        for _, message in refusals(verdict, self.job.policy, resolve=True):
            raise PolicyRefusal(message)
        dest = source.with_name(source.name + ".img")
        command = ["qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(source), str(dest)]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=deadline.remaining())
        except subprocess.TimeoutExpired:
            raise self.timed_out("qemu-img convert") from None
        if done.returncode:
            raise JobError(f"{self.key}: not a valid qcow2 image: {done.stderr.strip()}")
        source.unlink()
        self.job.data.downloads[self.key] = dest
        return connection
