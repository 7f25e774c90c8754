"""Session fixtures shared by Pumice's tests: the emulated boards' images, a loopback HTTP server
and the LAVA corpus.

- ``dut_images``: paths of the DUT kernels/initramfs/dtb/U-Boot (built into ``$PUMICE_CACHE``,
  default ``~/.cache/pumice``, by ``tools/build_dut_images.py`` when absent or stale).
- ``http_server``: a directory served over HTTP on 127.0.0.1 (ephemeral port).
- ``lava_corpus``: the LAVA 2023.01 test data in ``../shared/lava-corpus``.
- ``allowing()``: a worker's dispatcher configuration whose file policy allows exactly what a test
  reads from this machine (its image directories, its loopback servers).
- ``tmpfs``: mounts small tmpfs filesystems (root) that a test fills, unmounted afterwards.
- ``database_url`` (SQLite, and PostgreSQL when ``PUMICE_TEST_PG`` is set) and ``lab``: a master
  instance with a small lab (helpers in ``support/``).
- ``arm64_board`` (one per module) and ``board`` (one test): the emulated arm64 board (``boards/``).
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from boards import Arm64Board, start_board
from support.master import BACKENDS, Lab, build_lab, database

ROOT = Path(__file__).resolve().parent.parent
LOG = logging.getLogger("pumice.tests")


# --- DUT images ---------------------------------------------------------------------------------


def load_tool(script: str) -> ModuleType:
    """``tools/SCRIPT.py`` as a module (tools/ is a script directory, not a package)."""
    name = f"pumice_{script}"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{script}.py")
        assert spec and spec.loader
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up while the class is built
        spec.loader.exec_module(module)
    return sys.modules[name]


def load_dut_builder() -> ModuleType:
    """tools/build_dut_images.py as a module."""
    return load_tool("build_dut_images")


@dataclass(frozen=True)
class BoardImages:
    """The images of one emulated board, and how to boot them."""

    kernel: Path
    ramdisk: Path
    console: str  # ttyS0 / ttyAMA0
    command_line: str  # a kernel command line that works (prints "Linux version", then quiet)
    dtb: Path | None = None
    uboot: Path | None = None
    addresses: dict[str, str] | None = None  # U-Boot KERNEL_ADDR, RAMDISK_ADDR, DTB_ADDR

    @property
    def directory(self) -> Path:
        """The directory holding the images (a TFTP root for the U-Boot board)."""
        return self.kernel.parent


@dataclass(frozen=True)
class DutImages:
    """Every DUT image: ``amd64`` (QEMU -kernel/-initrd), ``arm64`` (U-Boot + TFTP)."""

    cache: Path
    amd64: BoardImages
    arm64: BoardImages
    manifest: dict


@pytest.fixture(scope="session")
def dut_builder() -> ModuleType:
    """The DUT image builder module (build_images, load_manifest, ARCHES, ...)."""
    return load_dut_builder()


@pytest.fixture(scope="session")
def dut_images(dut_builder: ModuleType) -> DutImages:
    """The DUT images in the cache, built first when absent or stale (a no-op otherwise)."""
    cache = Path(os.environ.get("PUMICE_CACHE") or "~/.cache/pumice").expanduser()
    try:
        manifest = dut_builder.build_images(cache)
    except dut_builder.BuildError as exc:
        pytest.fail(f"cannot build the DUT images in {cache}/dut (see `make images`): {exc}")
    arches = manifest["arches"]
    out = cache / "dut"
    return DutImages(
        cache=cache,
        amd64=BoardImages(
            kernel=out / "amd64" / "vmlinuz",
            ramdisk=out / "amd64" / "initramfs.cpio.gz",
            console=arches["amd64"]["console"],
            command_line=arches["amd64"]["kernel_command_line"],
        ),
        arm64=BoardImages(
            kernel=out / "arm64" / "Image",
            ramdisk=out / "arm64" / "initramfs.cpio.gz",
            dtb=out / "arm64" / "virt.dtb",
            uboot=out / "arm64" / "u-boot.bin",
            console=arches["arm64"]["console"],
            command_line=arches["arm64"]["kernel_command_line"],
            addresses={
                key: arches["arm64"]["u_boot"][key] for key in ("KERNEL_ADDR", "RAMDISK_ADDR", "DTB_ADDR")
            },
        ),
        manifest=manifest,
    )


# --- the worker's file policy -------------------------------------------------------------------


def allowing(dirs: Iterable[Path | str] = (), addresses: Iterable[str] = (), **config: object) -> dict:
    """A worker's dispatcher configuration: ``config`` and a file policy (agent.policy) that allows
    exactly reading files under ``dirs`` and reaching ``addresses`` of the worker itself (the
    ``127.0.0.1:PORT`` of the tests' loopback servers: :attr:`HttpServer.address`). The tests'
    jobs read their images from this machine, which a worker refuses by default."""
    return {**config, "allowed_file_dirs": [str(d) for d in dirs], "allowed_local_addresses": list(addresses)}


# --- HTTP server --------------------------------------------------------------------------------


class _QuietHandler(SimpleHTTPRequestHandler):
    """Static files; requests are logged through logging, not printed on stderr."""

    def log_message(self, format: str, *args: object) -> None:
        LOG.debug("http: " + format, *args)


class HttpServer:
    """A ThreadingHTTPServer serving ``root`` on 127.0.0.1 from a thread."""

    def __init__(self, root: Path) -> None:
        self.root = root
        handler = functools.partial(_QuietHandler, directory=str(root))
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        self.port: int = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.1},
            name="pumice-test-http",
            daemon=True,
        )
        self._thread.start()

    @property
    def address(self) -> str:
        """``127.0.0.1:PORT``: what a worker's file policy must allow for jobs to download from it."""
        return f"127.0.0.1:{self.port}"

    def url(self, path: str = "") -> str:
        """URL of a file under ``root``, as seen from this host."""
        return f"http://127.0.0.1:{self.port}/{path.lstrip('/')}"

    def guest_url(self, path: str = "") -> str:
        """The same URL as seen from a QEMU board on user networking (the host is 10.0.2.2)."""
        return f"http://10.0.2.2:{self.port}/{path.lstrip('/')}"

    def close(self) -> None:
        """Stop serving and release the port."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


@pytest.fixture(scope="session")
def http_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HttpServer]:
    """Serves ``.root`` (a temporary directory where tests place files) over HTTP."""
    server = HttpServer(tmp_path_factory.mktemp("http"))
    try:
        yield server
    finally:
        server.close()


# --- LAVA corpus --------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def lava_corpus() -> Path:
    """The LAVA 2023.01 corpus (``$PUMICE_LAVA_CORPUS`` or ``../shared/lava-corpus``)."""
    path = Path(os.environ.get("PUMICE_LAVA_CORPUS") or ROOT.parent / "shared" / "lava-corpus")
    if not path.is_dir():
        pytest.skip(f"LAVA corpus not found at {path} (set PUMICE_LAVA_CORPUS to its directory)")
    return path


# --- a small filesystem to fill -----------------------------------------------------------------


class Tmpfs:
    """A tmpfs mounted on ``path`` (``size`` bytes): a data directory whose disk a test fills."""

    def __init__(self, path: Path, size: int) -> None:
        import subprocess

        self.path = path
        self.size = size
        path.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(path)],
                              capture_output=True, text=True, timeout=30)
        if done.returncode != 0:
            pytest.fail(f"cannot mount a tmpfs on {path} (the disk-full tests need root): {done.stderr.strip()}")
        self.mounted = True

    def free(self) -> int:
        stat = os.statvfs(self.path)
        return stat.f_bavail * stat.f_frsize

    def fill(self, name: str = "filler", leave: int = 0) -> Path:
        """Write a file until the filesystem has at most ``leave`` bytes free; returns its path."""
        filler = self.path / name
        fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            block = b"\0" * 65536
            while self.free() > leave:
                try:
                    os.write(fd, block[: max(4096, min(len(block), self.free() - leave))])
                except OSError:
                    break
        finally:
            os.close(fd)
        return filler

    def unmount(self) -> None:
        import subprocess

        if not self.mounted:
            return
        done = subprocess.run(["umount", str(self.path)], capture_output=True, text=True, timeout=60)
        if done.returncode != 0:  # still in use by a process the test could not stop: detach it
            subprocess.run(["umount", "-l", str(self.path)], capture_output=True, text=True, timeout=60)
        self.mounted = False


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Callable[..., Tmpfs]]:
    """``tmpfs(name, size)`` mounts a tmpfs of ``size`` bytes on ``tmp_path/name``; every mount is
    unmounted at the end of the test, whatever happened."""
    mounted: list[Tmpfs] = []

    def mount(name: str = "tmpfs", size: int = 8 << 20) -> Tmpfs:
        fs = Tmpfs(tmp_path / name, size)
        mounted.append(fs)
        return fs

    try:
        yield mount
    finally:
        for fs in reversed(mounted):
            fs.unmount()


# --- container images ---------------------------------------------------------------------------


def load_container_builder() -> ModuleType:
    """tools/build_container_images.py as a module."""
    return load_tool("build_container_images")


@pytest.fixture(scope="session")
def container_images() -> dict:
    """The test container images (Debian base, qemu, lava-test, mkbootimg) in podman's storage,
    built first when absent or stale; the builder's stamp (names, ids, sizes, build times)."""
    builder = load_container_builder()
    cache = Path(os.environ.get("PUMICE_CACHE") or "~/.cache/pumice").expanduser()
    try:
        return builder.build_images(cache)
    except builder.BuildError as exc:
        pytest.fail(f"cannot build the container images (see `make container-images`): {exc}")


@pytest.fixture(scope="session")
def pumice_container_images(container_images: dict) -> dict:
    """Pumice's own agent and master images, built from this tree's wheels (and the test images)."""
    builder = load_container_builder()
    cache = Path(os.environ.get("PUMICE_CACHE") or "~/.cache/pumice").expanduser()
    try:
        return builder.build_images(cache, [builder.TEST_IMAGES["base"], *builder.pumice_specs(cache)])
    except builder.BuildError as exc:
        pytest.fail(f"cannot build Pumice's images: {exc}")


# --- the worker's NFS server (agent/nfs.py) ------------------------------------------------------

#: NFS has fixed ports (111, 2049, 20048): one nfs-ganesha per machine serves every test session;
#: its state (the export files, their lock) is machine-wide, each session's roots are its own
NFS_TEST_STATE = Path("/var/lib/pumice-tests/nfs-state")


@pytest.fixture(scope="session")
def nfs_settings(tmp_path_factory: pytest.TempPathFactory):
    """The NFS part of a test worker's dispatcher configuration: ganesha, started when not running,
    job roots under a directory of this session, boards (QEMU user networking) reach it at 10.0.2.2."""
    from agent.nfs import NfsSettings

    return NfsSettings(export_root=tmp_path_factory.mktemp("nfs-roots"), address="10.0.2.2",
                       state_dir=NFS_TEST_STATE, start=True)


@pytest.fixture
def nfs_server(nfs_settings):
    """The running NFS server (started when needed); every export a test leaves is removed after
    it, and the test fails if one was left."""
    from agent import nfs, scratch

    server = nfs.server(nfs_settings)
    server.ensure_running()
    yield server
    left = server.exports()
    for export in left:
        server.remove(export.name)
        scratch.remove_tree(export.directory)
    assert not left, f"exports left by the test: {left}"


@dataclass(frozen=True)
class NfsRootImages:
    """The NFS-rootable DUTs: the Debian roots (xz tarballs) and the initramfs that mounts them."""

    amd64_rootfs: Path
    arm64_rootfs: Path
    amd64_initramfs: Path
    arm64_initramfs: Path
    manifest: dict


@pytest.fixture(scope="session")
def nfs_root_images(dut_images: DutImages, dut_builder: ModuleType) -> NfsRootImages:
    """The NFS roots in the cache, built first when absent or stale (debootstrap: minutes, once)."""
    try:
        manifest = dut_builder.build_rootfs_images(dut_images.cache, ("amd64", "arm64"))
    except dut_builder.BuildError as exc:
        pytest.fail(f"cannot build the NFS roots in {dut_images.cache}/dut (see `make images`): {exc}")
    out = dut_images.cache / "dut"
    return NfsRootImages(amd64_rootfs=out / "amd64" / "nfsrootfs.tar.xz",
                         arm64_rootfs=out / "arm64" / "nfsrootfs.tar.xz",
                         amd64_initramfs=out / "amd64" / "initramfs-nfs.cpio.gz",
                         arm64_initramfs=out / "arm64" / "initramfs-nfs.cpio.gz", manifest=manifest)


# --- QEMU boards driven through their console ----------------------------------------------------


@pytest.fixture
def qemu() -> Iterator[Callable[..., Any]]:
    """``qemu(argv, timeout=60)`` starts QEMU under pexpect (``timeout``: the default of each
    expect); every QEMU started is killed at the end, also on failure, and its console printed."""
    import io

    import pexpect

    children: list[tuple[pexpect.spawn, io.StringIO]] = []

    def spawn(argv: list[str], timeout: float = 60) -> Any:
        console = io.StringIO()
        child = pexpect.spawn(argv[0], argv[1:], encoding="utf-8", codec_errors="replace", timeout=timeout)
        child.logfile_read = console
        children.append((child, console))
        return child

    try:
        yield spawn
    finally:
        for child, console in children:
            child.terminate(force=True)
            child.close()
            # Shown by pytest when the test failed: what the board said.
            print(f"--- console of {child.args[0].decode()} (last 4000 chars) ---\n{console.getvalue()[-4000:]}")


# --- a master instance on each database backend (helpers: support.master) -------------------------


@pytest.fixture(params=BACKENDS)
def database_url(request: pytest.FixtureRequest) -> Iterator[str | None]:
    """None for SQLite (the data directory's file), or a PostgreSQL URL with a fresh schema."""
    with database(request.param) as url:
        yield url


@pytest.fixture
def lab(tmp_path: Path, database_url: str | None) -> Lab:
    """A master instance in a temporary data directory with a small lab (:func:`support.master.build_lab`)."""
    return build_lab(tmp_path / "data", database_url)


# --- the emulated arm64 board (helpers: boards) ---------------------------------------------------


@pytest.fixture(scope="module")
def arm64_board(dut_images, tmp_path_factory) -> Iterator[Arm64Board]:
    """The emulated arm64 board with its cable and ser2net, for one test module."""
    # a short path: unix socket names are limited to 107 bytes
    directory = Path(tmp_path_factory.mktemp("board", numbered=True))
    board = start_board(dut_images.arm64.uboot, directory)
    try:
        yield board
    finally:
        board.stop()


@pytest.fixture
def board(arm64_board: Arm64Board) -> Iterator[Arm64Board]:
    """The module's board for one test; its faults are undone and it is off afterwards."""
    try:
        yield arm64_board
    finally:
        arm64_board.heal()
        arm64_board.power_off()
