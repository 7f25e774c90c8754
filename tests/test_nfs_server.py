"""The worker's NFS server (agent/nfs.py, agent/rpc.py) with the real nfs-ganesha and rpcbind:
the standard ports, exports added and removed by configuration reload, a real NFSv3 client
(libnfs) writing as root, the sweep of dead jobs' exports, and what validation says is missing."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from agent import nfs, rpc, scratch
from agent.errors import ConfigurationError, InfrastructureError, JobError

JOB = 900_000 + os.getpid() % 10_000  # job ids of this session (the server's state is machine-wide)


def new_root(settings, job: int, label: str = "nfsrootfs") -> Path:
    root = nfs.make_root(settings, job, label)
    (root / "etc").mkdir()
    (root / "etc/hostname").write_text(f"job {job}\n")
    return root


def nfs_cp(source: Path, url: str) -> subprocess.CompletedProcess:
    """libnfs's NFSv3 client (through the portmapper, AUTH_SYS as root)."""
    return subprocess.run(["nfs-cp", str(source), url], capture_output=True, text=True, timeout=60)


def test_the_server_speaks_nfs3_mount_and_nfs4_through_rpcbind_on_the_standard_ports(nfs_server):
    for proto in ("udp", "tcp"):
        rpc.ping("127.0.0.1", rpc.NFS, 3, proto)  # LAVA's persistent-NFS check: rpcinfo -u HOST nfs 3
        assert rpc.getport("127.0.0.1", rpc.NFS, 3, proto) == 2049
        assert rpc.getport("127.0.0.1", rpc.MOUNT, 3, proto) == 20048
    rpc.ping("127.0.0.1", rpc.NFS, 4, "tcp")
    done = subprocess.run(["rpcinfo", "-u", "127.0.0.1", "nfs", "3"], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0 and not done.stderr, done.stderr


def test_an_export_is_mountable_at_once_writable_as_root_and_gone_after_removal(nfs_server, nfs_settings, tmp_path):
    root = new_root(nfs_settings, JOB)
    start = time.monotonic()
    export = nfs_server.add(nfs.export_name(JOB), root)
    took = time.monotonic() - start
    print(f"export added and mountable in {took * 1000:.0f} ms")
    assert took < 2.0
    assert export.name == f"pumice-{JOB}-nfsrootfs" and export.path == root and export.export_id >= 40000
    assert rpc.mount("127.0.0.1", str(root))
    assert str(root) in rpc.exports("127.0.0.1")
    source = tmp_path / "written"
    source.write_text("from the board\n")
    done = nfs_cp(source, f"nfs://127.0.0.1{root}/etc/written?version=3")
    assert done.returncode == 0, done.stderr
    written = root / "etc/written"
    assert written.read_text() == "from the board\n"
    assert (written.stat().st_uid, written.stat().st_gid) == (0, 0), "root is not squashed"

    nfs_server.remove(export.name)
    with pytest.raises(rpc.RpcError, match="MNT3ERR_ACCES"):
        rpc.mount("127.0.0.1", str(root))
    assert str(root) not in rpc.exports("127.0.0.1")
    assert nfs_server.exports() == []
    nfs_server.remove(export.name)  # again: nothing to do
    scratch.remove_tree(root)


def test_two_job_roots_are_exported_at_once_and_removed_one_by_one(nfs_server, nfs_settings):
    first, second = new_root(nfs_settings, JOB + 1), new_root(nfs_settings, JOB + 2)
    one = nfs_server.add(nfs.export_name(JOB + 1), first)
    two = nfs_server.add(nfs.export_name(JOB + 2), second)
    assert one.export_id != two.export_id
    assert {e.name for e in nfs_server.exports()} == {one.name, two.name}
    nfs_server.remove(one.name)
    with pytest.raises(rpc.RpcError, match="MNT3ERR_ACCES"):
        rpc.mount("127.0.0.1", str(first))
    assert rpc.mount("127.0.0.1", str(second)), "the other job's root stays exported"
    nfs_server.remove(two.name)
    for root in (first, second):
        scratch.remove_tree(root)


def test_a_root_whose_directory_vanished_does_not_take_the_other_exports_along(nfs_server, nfs_settings):
    gone, kept = new_root(nfs_settings, JOB + 3), new_root(nfs_settings, JOB + 4)
    nfs_server.add(nfs.export_name(JOB + 3), gone)
    scratch.remove_tree(gone)  # a runner killed while removing its tree
    nfs_server.add(nfs.export_name(JOB + 4), kept)  # ganesha skips the vanished one, keeps the rest
    assert rpc.mount("127.0.0.1", str(kept))
    nfs_server.remove(nfs.export_name(JOB + 3))
    nfs_server.remove(nfs.export_name(JOB + 4))
    scratch.remove_tree(kept)


def test_the_sweep_removes_the_exports_and_trees_of_dead_jobs_only(nfs_server, nfs_settings):
    dead, alive = new_root(nfs_settings, JOB + 5), new_root(nfs_settings, JOB + 6)
    orphan = new_root(nfs_settings, JOB + 7)  # a tree whose runner died before exporting it
    nfs_server.add(nfs.export_name(JOB + 5), dead)
    nfs_server.add(nfs.export_name(JOB + 6), alive)
    dispatcher = {"nfs_export_root": str(nfs_settings.export_root), "nfs_state_dir": str(nfs_settings.state_dir),
                  "dispatcher_ip": "10.0.2.2"}
    removed = nfs.sweep(dispatcher, running=lambda job: job == JOB + 6)
    assert sorted(e.name for e in removed) == [nfs.export_name(JOB + 5), nfs.export_name(JOB + 7)]
    assert not dead.exists() and not orphan.exists() and alive.exists()
    with pytest.raises(rpc.RpcError, match="MNT3ERR_ACCES"):
        rpc.mount("127.0.0.1", str(dead))
    assert rpc.mount("127.0.0.1", str(alive))
    nfs_server.remove(nfs.export_name(JOB + 6))
    scratch.remove_tree(alive)


def test_a_path_ganesha_could_not_parse_is_refused(nfs_server, nfs_settings):
    odd = nfs_settings.export_root / 'pumice-1-"quoted"'
    odd.mkdir()
    with pytest.raises(JobError, match="only letters, digits and"):
        nfs_server.add(nfs.export_name(JOB + 8), odd)
    with pytest.raises(JobError, match="not a Pumice export name"):
        nfs_server.add("lab-export", nfs_settings.export_root)
    odd.rmdir()


# --- what validation says -------------------------------------------------------------------------


def test_the_settings_come_from_lava_keys_of_the_dispatcher_configuration(tmp_path):
    settings = nfs.NfsSettings.from_dispatcher({"dispatcher_ip": "192.0.2.1", "dispatcher_nfs_ip": "192.0.2.7",
                                                "nfs_export_root": str(tmp_path), "nfs_clients": "192.0.2.0/24"})
    assert (settings.server, settings.address, settings.clients) == ("nfs-ganesha", "192.0.2.7", ("192.0.2.0/24",))
    assert nfs.NfsSettings.from_dispatcher({"dispatcher_ip": "192.0.2.1"}).address == "192.0.2.1"
    with pytest.raises(ConfigurationError, match="nfs_server: unknown NFS server 'unfs3'; known: nfs-ganesha, "
                                                 "nfs-kernel-server"):
        nfs.NfsSettings.from_dispatcher({"nfs_server": "unfs3"})
    assert nfs.check({"nfs_server": "unfs3"}) == ["nfs_server: unknown NFS server 'unfs3'; known: nfs-ganesha, "
                                                   "nfs-kernel-server"]


def test_validation_says_what_is_missing(nfs_server, tmp_path, monkeypatch):
    blocked = tmp_path / "a-file"
    blocked.write_text("not a directory")
    dispatcher = {"nfs_export_root": str(blocked / "roots"), "nfs_state_dir": str(tmp_path / "state"),
                  "nfs_start": False, "nfs_pid_file": str(tmp_path / "none.pid")}
    monkeypatch.setattr(nfs, "default_route_address", lambda: None)
    assert nfs.check(dispatcher) == [
        f"nfs-ganesha is not running (no live process in {tmp_path}/none.pid) and nfs_start is false",
        f"nfs_export_root {blocked}/roots is not a directory",
        "the NFS server's address is unknown: set dispatcher_nfs_ip (or dispatcher_ip) in the worker's "
        "dispatcher configuration",
    ]
    settings = nfs.NfsSettings.from_dispatcher(dispatcher)
    with pytest.raises(InfrastructureError, match="nfs-ganesha is not running or does not answer .* nfs_start is "
                                                  "false: start the lab's nfs-ganesha service"):
        nfs.server(settings).ensure_running()
    with pytest.raises(ConfigurationError, match="set dispatcher_nfs_ip"):
        settings.server_address()
    monkeypatch.setenv("PATH", str(tmp_path))  # a worker without the packages
    monkeypatch.setattr(nfs, "_portmapper_answers", lambda: False)
    monkeypatch.setattr(nfs, "_which", lambda name: None)
    problems = nfs.check({**dispatcher, "nfs_export_root": str(tmp_path), "dispatcher_ip": "10.0.2.2"})
    assert "rpcbind is not installed (apt-get install rpcbind)" in problems
    assert nfs.check({**dispatcher, "nfs_server": "nfs-kernel-server", "dispatcher_ip": "10.0.2.2",
                      "nfs_export_root": str(tmp_path)}) == [
        "nfs-kernel-server is not installed (apt-get install nfs-kernel-server)"]


def test_a_ready_worker_has_nothing_missing(nfs_server, nfs_settings):
    dispatcher = {"nfs_export_root": str(nfs_settings.export_root), "nfs_state_dir": str(nfs_settings.state_dir),
                  "dispatcher_ip": "10.0.2.2", "nfs_start": False,
                  "nfs_pid_file": str(nfs_settings.state_dir / "ganesha.pid")}
    assert nfs.check(dispatcher) == []
