"""The worker's NFS server: each job's root exported while the job runs, nothing afterwards.

Boards mount what LAVA's device-type templates tell them: ``nfsroot={NFS_SERVER_IP}:{NFSROOTFS},
tcp,hard`` with no version and no port, through the portmapper (Debian's initramfs mounts with
klibc's ``nfsmount``, NFSv3; the kernel's own nfsroot too). So the server speaks NFSv3 with MOUNT
through rpcbind on the standard ports (111, 2049, and a pinned MOUNT port, 20048), and NFSv4.

Two servers are known (the worker's dispatcher configuration, ``nfs_server``):

``nfs-ganesha`` (default, tested)
    Debian's nfs-ganesha with its VFS backend, in user space. Exports are EXPORT blocks in files
    of Pumice's state directory (``nfs_state_dir``, default /var/lib/pumice/nfs-state): one file a
    job root, ``exports.d/pumice-<job id>-<name>.conf``, all included by ``exports.conf``, which the
    server's main configuration includes (``%include``). Adding or removing an export rewrites
    ``exports.conf`` and sends SIGHUP: ganesha 4.3 re-reads its EXPORT blocks, adds the new ones and
    removes the ones gone (no dbus needed). A new export is mountable ~10 ms after the signal; each
    change waits (bounded) until MOUNT hands out, or refuses, the path. With ``nfs_start`` (default
    true) the agent starts rpcbind and ganesha itself when they are not running, with a main
    configuration of its own (``ganesha.conf`` in the state directory); a lab that runs ganesha as a
    service sets ``nfs_start: false``, ``nfs_pid_file`` and adds ``%include "<state dir>/exports.conf"``
    to its /etc/ganesha/ganesha.conf.
``nfs-kernel-server`` (untested here: this machine's kernel has no nfsd)
    The kernel's server; exports are added and removed with ``exportfs`` (nothing written to
    /etc/exports).

Every export is named ``pumice-<job id>-<name>``, its directory is ``<nfs_export_root>/<that
name>``; :func:`sweep` removes the exports and trees of jobs that are no longer running. The
address the boards reach the server at is LAVA's: ``dispatcher_nfs_ip``, else ``dispatcher_ip``,
else the address of the worker's interface of its default route.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from agent import rpc
from agent.errors import ConfigurationError, InfrastructureError, JobError
from agent.scratch import remove_tree

LOG = logging.getLogger("pumice.nfs")

SERVERS = ("nfs-ganesha", "nfs-kernel-server")
DEFAULT_EXPORT_ROOT = "/var/lib/pumice/nfs"
DEFAULT_STATE_DIR = "/var/lib/pumice/nfs-state"
#: the ports a lab's firewall opens to the boards (TCP and UDP)
PORTS = {"portmapper": 111, "nfs": 2049, "mountd": 20048, "nlockmgr": 32768}
#: Export_Ids of Pumice's exports (a lab's own exports keep the ids below)
EXPORT_IDS = range(40000, 65535)
#: how long an export change may take to show in MOUNT's answers
SETTLE_SECONDS = 10.0
#: characters allowed in an exported path (it is written into ganesha's configuration, quoted)
SAFE_PATH = re.compile(r"^/[A-Za-z0-9._+@/-]*$")
NAME = re.compile(r"^pumice-(\d+)-[A-Za-z0-9._-]+$")

GANESHA_CONFIG = """\
# Written by the Pumice agent (agent/nfs.py): its own nfs-ganesha, started when none runs.
NFS_CORE_PARAM {{
    Protocols = 3, 4;
    NFS_Port = {nfs};
    MNT_Port = {mountd};
    NLM_Port = {nlockmgr};
    Enable_RQUOTA = false;
}}
NFSV4 {{
    # no grace period after a start: the job roots are new, there is no state to recover
    Graceless = true;
    RecoveryRoot = "{state}/v4recov";
}}
NFS_KRB5 {{ Active_krb5 = false; }}
%include "{state}/exports.conf"
"""

EXPORT_BLOCK = """\
# {name}: the root of job {job}, exported by the Pumice agent
EXPORT {{
    Export_Id = {export_id};
    Path = "{path}";
    Pseudo = "{path}";
    Protocols = 3, 4;
    Transports = TCP, UDP;
    SecType = sys;
    Squash = No_Root_Squash;
    Access_Type = {access};
    FSAL {{ Name = VFS; }}
{clients}}}
"""


@dataclass(frozen=True)
class NfsSettings:
    """The NFS part of a worker's dispatcher configuration."""

    server: str = "nfs-ganesha"
    export_root: Path = Path(DEFAULT_EXPORT_ROOT)
    #: where boards reach the server (None: the worker's default-route address, as LAVA)
    address: str | None = None
    #: who may mount (ganesha CLIENT lists / exportfs hosts); "*": anyone, as LAVA's /etc/exports
    clients: tuple[str, ...] = ("*",)
    state_dir: Path = Path(DEFAULT_STATE_DIR)
    #: ganesha's pid file (its SIGHUP target); default: the state directory's, or Debian's
    pid_file: Path | None = None
    #: start rpcbind and ganesha when they are not running
    start: bool = True

    @classmethod
    def from_dispatcher(cls, dispatcher: Mapping | None) -> NfsSettings:
        """The settings from a worker's dispatcher configuration (bad values: ConfigurationError)."""
        config = dispatcher or {}
        server = config.get("nfs_server", "nfs-ganesha")
        if server not in SERVERS:
            raise ConfigurationError(f"nfs_server: unknown NFS server {server!r}; known: {', '.join(SERVERS)}")
        clients = config.get("nfs_clients", ["*"])
        if isinstance(clients, str):
            clients = [clients]
        if not clients or not all(isinstance(c, str) and re.fullmatch(r"[A-Za-z0-9.:/*_-]+", c) for c in clients):
            raise ConfigurationError(f"nfs_clients: expected host names, addresses or networks, got {clients!r}")
        address = config.get("dispatcher_nfs_ip") or config.get("dispatcher_ip")
        pid_file = config.get("nfs_pid_file")
        return cls(
            server=server,
            export_root=Path(config.get("nfs_export_root") or DEFAULT_EXPORT_ROOT),
            address=str(address) if address else None,
            clients=tuple(clients),
            state_dir=Path(config.get("nfs_state_dir") or DEFAULT_STATE_DIR),
            pid_file=Path(pid_file) if pid_file else None,
            start=bool(config.get("nfs_start", True)),
        )

    def server_address(self) -> str:
        """The address boards mount from: the configured one, else LAVA's fallback (the address
        of the worker's interface of its default route)."""
        if self.address:
            return self.address
        found = default_route_address()
        if found is None:
            raise ConfigurationError("the NFS server's address is unknown: set dispatcher_nfs_ip (or "
                                     "dispatcher_ip) in the worker's dispatcher configuration")
        return found


def default_route_address() -> str | None:
    """The worker's IPv4 address on the interface of its default route (no packet is sent)."""
    try:
        with open("/proc/net/route") as routes:
            for line in routes.readlines()[1:]:
                fields = line.split()
                if len(fields) > 2 and fields[1] == "00000000":
                    gateway = socket.inet_ntoa(int(fields[2], 16).to_bytes(4, "little"))
                    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                        sock.connect((gateway, 9))
                        return sock.getsockname()[0]
    except (OSError, ValueError):
        return None
    return None


@dataclass(frozen=True)
class Export:
    """One exported job root."""

    name: str  # pumice-<job id>-<label>
    path: Path  # what boards mount (the tree's root: its directory, or a prefix inside it)
    directory: Path  # the tree to remove at the end (export_root/name)
    export_id: int = 0

    @property
    def job_id(self) -> int:
        return int(NAME.match(self.name).group(1))


def export_name(job_id: int | str, label: str = "nfsrootfs") -> str:
    """``pumice-<job id>-<label>``."""
    name = f"pumice-{int(job_id)}-{label}"
    if not NAME.match(name):
        raise JobError(f"cannot name an NFS export after {label!r}")
    return name


def make_root(settings: NfsSettings, job_id: int | str, label: str = "nfsrootfs") -> Path:
    """The empty directory a job's root is extracted into (``<export root>/pumice-<id>-<label>``);
    a leftover of the same name (a killed runner's) is removed first."""
    directory = settings.export_root / export_name(job_id, label)
    try:
        settings.export_root.mkdir(parents=True, exist_ok=True)
        if directory.exists() or directory.is_symlink():
            remove_tree(directory)
        directory.mkdir(mode=0o755)
    except OSError as exc:
        raise InfrastructureError(f"cannot make the NFS root directory {directory}: {exc}") from exc
    return directory


# --- servers -------------------------------------------------------------------------------------


class NfsServer:
    """What the agent asks of the worker's NFS server (see the module doc)."""

    def __init__(self, settings: NfsSettings) -> None:
        self.settings = settings

    def problems(self) -> list[str]:
        """What is missing for NFS jobs on this worker, each saying what to do (empty: ready)."""
        raise NotImplementedError

    def ensure_running(self) -> None:
        """Make sure the server answers (start it when allowed); InfrastructureError otherwise."""
        raise NotImplementedError

    def add(self, name: str, path: Path, directory: Path | None = None) -> Export:
        """Export ``path`` under ``name`` and wait until it is mountable."""
        raise NotImplementedError

    def remove(self, name: str) -> None:
        """Stop exporting ``name`` (nothing happens when it is not exported)."""
        raise NotImplementedError

    def exports(self) -> list[Export]:
        """Pumice's exports as the server has them."""
        raise NotImplementedError

    # -- shared --------------------------------------------------------------------------------------
    def check_path(self, path: Path) -> Path:
        path = Path(os.path.abspath(path))
        if not SAFE_PATH.match(str(path)):
            raise JobError(f"cannot export {path}: only letters, digits and ._+@/- may appear in its path")
        if not path.is_dir() or path.is_symlink():
            raise InfrastructureError(f"cannot export {path}: not a directory")
        return path

    def wait_mountable(self, path: Path, mountable: bool, what: str) -> float:
        """Wait until MOUNT on the loopback hands out (or refuses) ``path``; the seconds it took."""
        start = time.monotonic()
        deadline = start + SETTLE_SECONDS
        last = ""
        while True:
            try:
                rpc.mount("127.0.0.1", str(path), timeout=2.0)
                if mountable:
                    return time.monotonic() - start
                last = "still mountable"
            except rpc.RpcError as exc:
                if not mountable and "MOUNT refused" in str(exc):
                    return time.monotonic() - start
                last = str(exc)
            if time.monotonic() > deadline:
                raise InfrastructureError(f"{what}: the NFS server did not follow in {SETTLE_SECONDS:.0f} s "
                                          f"({last}){self.log_tail()}")
            time.sleep(0.01)

    def log_tail(self) -> str:
        return ""

    def answers(self, timeout: float = 2.0) -> str | None:
        """None when NFSv3 answers on the loopback through the portmapper (UDP and TCP, as
        ``rpcinfo -u|-t 127.0.0.1 nfs 3``), else what is wrong."""
        try:
            for proto in ("udp", "tcp"):
                rpc.ping("127.0.0.1", rpc.NFS, 3, proto, timeout)
            if not rpc.getport("127.0.0.1", rpc.MOUNT, 3, "tcp", timeout):
                return "MOUNT version 3 is not registered with the portmapper"
        except rpc.RpcError as exc:
            return str(exc)
        return None


class GaneshaServer(NfsServer):
    """nfs-ganesha, exports managed by configuration reload (SIGHUP)."""

    BINARY = "ganesha.nfsd"
    DEBIAN_PID_FILE = Path("/run/ganesha/ganesha.pid")

    @property
    def state(self) -> Path:
        return self.settings.state_dir

    @property
    def pid_file(self) -> Path:
        if self.settings.pid_file:
            return self.settings.pid_file
        return self.state / "ganesha.pid" if self.settings.start else self.DEBIAN_PID_FILE

    def problems(self) -> list[str]:
        found = []
        if not shutil.which(self.BINARY, path=os.environ.get("PATH", "") + ":/usr/bin:/usr/sbin"):
            found.append("nfs-ganesha is not installed (apt-get install nfs-ganesha nfs-ganesha-vfs rpcbind)")
        elif not list(Path("/usr/lib").glob("*/ganesha/libfsalvfs.so")) + list(Path("/usr/lib/ganesha").glob(
                "libfsalvfs.so")):
            found.append("nfs-ganesha's VFS backend is not installed (apt-get install nfs-ganesha-vfs)")
        if not _which("rpcbind") and not _portmapper_answers():
            found.append("rpcbind is not installed (apt-get install rpcbind)")
        if not self.settings.start:
            if self.pid() is None:
                found.append(f"nfs-ganesha is not running (no live process in {self.pid_file}) and nfs_start "
                             "is false")
            elif problem := self.answers():
                found.append(f"nfs-ganesha does not answer NFSv3 through the portmapper: {problem}")
        found += _writable(self.settings.export_root, "nfs_export_root")
        found += _writable(self.state, "nfs_state_dir")
        if self.settings.address is None and default_route_address() is None:
            found.append("the NFS server's address is unknown: set dispatcher_nfs_ip (or dispatcher_ip) in the "
                         "worker's dispatcher configuration")
        return found

    def pid(self) -> int | None:
        try:
            pid = int(self.pid_file.read_text().split()[0])
            os.kill(pid, 0)
        except (OSError, ValueError, IndexError):
            return None
        try:  # a recycled pid is not ganesha
            if Path(f"/proc/{pid}/comm").read_text().strip() != "ganesha.nfsd":
                return None
        except OSError:
            return None
        return pid

    def ensure_running(self) -> None:
        with self.locked():
            self._write_exports()
            if self.pid() is not None and self.answers() is None:
                return
            if not self.settings.start:
                raise InfrastructureError(f"nfs-ganesha is not running or does not answer "
                                          f"({self.answers() or 'no process in ' + str(self.pid_file)}), "
                                          "and nfs_start is false: start the lab's nfs-ganesha service")
            if not _portmapper_answers():
                _start_rpcbind()
            if self.pid() is None:
                self._start()
            deadline = time.monotonic() + 20
            while (problem := self.answers()) is not None:
                if time.monotonic() > deadline or self.pid() is None:
                    raise InfrastructureError(f"nfs-ganesha started but does not answer: {problem}{self.log_tail()}")
                time.sleep(0.05)

    def _start(self) -> None:
        (self.state / "v4recov").mkdir(parents=True, exist_ok=True)
        config = self.state / "ganesha.conf"
        config.write_text(GANESHA_CONFIG.format(state=self.state, **PORTS))
        argv = [_which(self.BINARY) or self.BINARY, "-f", str(config), "-p", str(self.pid_file),
                "-L", str(self.state / "ganesha.log"), "-N", "NIV_EVENT"]
        LOG.info("starting nfs-ganesha: %s", " ".join(argv))
        # ganesha daemonizes itself; its own session, so a job's end never takes it along
        done = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30,
                              start_new_session=True)
        if done.returncode != 0:
            raise InfrastructureError(f"cannot start nfs-ganesha ({done.returncode}): "
                                      f"{(done.stderr or done.stdout).strip()[-500:]}{self.log_tail()}")
        deadline = time.monotonic() + 10
        while self.pid() is None:
            if time.monotonic() > deadline:
                raise InfrastructureError(f"nfs-ganesha exited at its start{self.log_tail()}")
            time.sleep(0.05)

    def log_tail(self) -> str:
        log = self.state / "ganesha.log"
        try:
            with log.open("rb") as fh:
                fh.seek(max(0, log.stat().st_size - 2000))
                lines = fh.read().decode(errors="replace").splitlines()[-5:]
        except OSError:
            return ""
        return "; ganesha's log ends with:\n" + "\n".join(lines) if lines else ""

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """One change at a time on this worker (the runners of several jobs, the daemon's sweep)."""
        (self.state / "exports.d").mkdir(parents=True, exist_ok=True)
        with open(self.state / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _export_files(self) -> list[Path]:
        return sorted(p for p in (self.state / "exports.d").glob("pumice-*.conf") if NAME.match(p.stem))

    def _write_exports(self) -> None:
        """exports.conf: an %include of each export file (written whole, then renamed)."""
        lines = ["# Pumice's job roots (agent/nfs.py): one file a job root\n"]
        lines += [f'%include "{path}"\n' for path in self._export_files()]
        tmp = self.state / "exports.conf.tmp"
        tmp.write_text("".join(lines))
        os.replace(tmp, self.state / "exports.conf")

    def _reload(self) -> None:
        pid = self.pid()
        if pid is None:
            raise InfrastructureError(f"nfs-ganesha is not running (no live process in {self.pid_file})")
        os.kill(pid, signal.SIGHUP)

    def _clients(self) -> tuple[str, str]:
        if self.settings.clients == ("*",):
            return "RW", ""
        listed = ", ".join(self.settings.clients)
        return "None", f"    CLIENT {{ Clients = {listed}; Access_Type = RW; }}\n"

    def add(self, name: str, path: Path, directory: Path | None = None) -> Export:
        if not NAME.match(name):
            raise JobError(f"not a Pumice export name: {name!r}")
        path = self.check_path(path)
        self.ensure_running()
        with self.locked():
            used = {_export_id(p) for p in self._export_files()}
            export_id = next((i for i in EXPORT_IDS if i not in used), None)
            if export_id is None:
                raise InfrastructureError(f"no free NFS Export_Id left in {EXPORT_IDS.start}-{EXPORT_IDS.stop - 1}")
            access, clients = self._clients()
            block = EXPORT_BLOCK.format(name=name, job=NAME.match(name).group(1), export_id=export_id,
                                        path=path, access=access, clients=clients)
            target = self.state / "exports.d" / f"{name}.conf"
            target.write_text(block)
            self._write_exports()
            self._reload()
            seconds = self.wait_mountable(path, True, f"exporting {path}")
        LOG.info("exported %s as %s (Export_Id %d, mountable after %.3f s)", path, name, export_id, seconds)
        return Export(name, path, directory or path, export_id)

    def remove(self, name: str) -> None:
        if not NAME.match(name):
            raise JobError(f"not a Pumice export name: {name!r}")
        with self.locked():
            target = self.state / "exports.d" / f"{name}.conf"
            path = _export_path(target)
            if path is None:
                return
            target.unlink()
            self._write_exports()
            if self.pid() is None:
                return  # nothing exported by a server that is not running
            self._reload()
            self.wait_mountable(Path(path), False, f"removing the export of {path}")
        LOG.info("removed the NFS export %s (%s)", name, path)

    def exports(self) -> list[Export]:
        found = []
        for target in self._export_files():
            path = _export_path(target)
            directory = self.settings.export_root / target.stem
            # another export root's (a second agent sharing the server) is not this worker's to touch
            if path is not None and (Path(path) == directory or directory in Path(path).parents):
                found.append(Export(target.stem, Path(path), directory, _export_id(target)))
        return found


def _export_id(path: Path) -> int:
    match = re.search(r"Export_Id = (\d+);", path.read_text(errors="replace"))
    return int(match.group(1)) if match else 0


def _export_path(path: Path) -> str | None:
    try:
        match = re.search(r'\bPath = "([^"]*)";', path.read_text(errors="replace"))
    except OSError:
        return None
    return match.group(1) if match else None


class KernelServer(NfsServer):
    """The kernel's nfsd through ``exportfs`` (untested here: this machine's kernel has no nfsd)."""

    def _options(self) -> str:
        return "rw,no_root_squash,no_all_squash,async,no_subtree_check,insecure"

    def problems(self) -> list[str]:
        found = []
        if not _which("exportfs"):
            found.append("nfs-kernel-server is not installed (apt-get install nfs-kernel-server)")
        elif problem := self.answers():
            found.append(f"the kernel NFS server does not answer NFSv3 through the portmapper: {problem}")
        found += _writable(self.settings.export_root, "nfs_export_root")
        if self.settings.address is None and default_route_address() is None:
            found.append("the NFS server's address is unknown: set dispatcher_nfs_ip (or dispatcher_ip)")
        return found

    def ensure_running(self) -> None:
        if problem := self.answers():
            raise InfrastructureError(f"the kernel NFS server does not answer: {problem} "
                                      "(systemctl start nfs-kernel-server)")

    def _exportfs(self, *args: str) -> str:
        done = subprocess.run([_which("exportfs") or "exportfs", *args], capture_output=True, text=True,
                              timeout=60)
        if done.returncode != 0:
            raise InfrastructureError(f"exportfs {' '.join(args)} failed: {done.stderr.strip()}")
        return done.stdout

    def add(self, name: str, path: Path, directory: Path | None = None) -> Export:
        path = self.check_path(path)
        self.ensure_running()
        for client in self.settings.clients:
            self._exportfs("-o", self._options(), f"{client}:{path}")
        self.wait_mountable(path, True, f"exporting {path}")
        return Export(name, path, directory or path)

    def remove(self, name: str) -> None:
        for export in self.exports():
            if export.name == name:
                for client in self.settings.clients:
                    self._exportfs("-u", f"{client}:{export.path}")

    def exports(self) -> list[Export]:
        found = []
        root = str(self.settings.export_root.resolve()) + "/"
        for line in self._exportfs("-v").splitlines():
            path = line.split()[0] if line.strip() and line[0] == "/" else ""
            if path.startswith(root):
                name = path[len(root):].split("/")[0]
                if NAME.match(name):
                    found.append(Export(name, Path(path), Path(root) / name))
        return found


def server(settings: NfsSettings) -> NfsServer:
    """The NFS server the settings name."""
    return {"nfs-ganesha": GaneshaServer, "nfs-kernel-server": KernelServer}[settings.server](settings)


def check(dispatcher: Mapping | None) -> list[str]:
    """Validation: what the worker lacks for NFS jobs, each item saying what to do (empty: ready)."""
    try:
        settings = NfsSettings.from_dispatcher(dispatcher)
    except ConfigurationError as exc:
        return [str(exc)]
    return server(settings).problems()


def sweep(dispatcher: Mapping | None, running: Callable[[int], bool]) -> list[Export]:
    """Remove the exports and trees of jobs for which ``running(job id)`` is false (runners that
    died before their cleanup); return them. Trees under the export root with no export go too."""
    settings = NfsSettings.from_dispatcher(dispatcher)
    nfs = server(settings)
    removed = []
    for export in nfs.exports():
        if not running(export.job_id):
            nfs.remove(export.name)
            remove_tree(export.directory)
            removed.append(export)
    with contextlib.suppress(OSError):
        for directory in sorted(settings.export_root.iterdir()):
            match = NAME.match(directory.name)
            if match and directory.is_dir() and not directory.is_symlink() and not running(int(match.group(1))):
                remove_tree(directory)
                removed.append(Export(directory.name, directory, directory))
    return removed


# --- helpers -------------------------------------------------------------------------------------


def _which(name: str) -> str | None:
    return shutil.which(name, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin:/usr/bin")


def _portmapper_answers() -> bool:
    try:
        rpc.call("127.0.0.1", rpc.PORTMAPPER_PORT, rpc.PORTMAPPER, 2, 0, timeout=2.0)
    except rpc.RpcError:
        return False
    return True


def _start_rpcbind() -> None:
    binary = _which("rpcbind")
    if binary is None:
        raise InfrastructureError("rpcbind is not installed (apt-get install rpcbind)")
    Path("/run/rpcbind").mkdir(parents=True, exist_ok=True)
    LOG.info("starting rpcbind")
    done = subprocess.run([binary, "-w"], stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30,
                          start_new_session=True)
    if done.returncode != 0:
        raise InfrastructureError(f"cannot start rpcbind: {(done.stderr or done.stdout).strip()}")
    deadline = time.monotonic() + 10
    while not _portmapper_answers():
        if time.monotonic() > deadline:
            raise InfrastructureError("rpcbind started but does not answer on port 111")
        time.sleep(0.05)


def _writable(path: Path, key: str) -> list[str]:
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        return [f"{key} {path} is not a directory"]
    if not os.access(probe, os.W_OK | os.X_OK):
        return [f"{key} {path} is not writable by the agent"]
    return []
