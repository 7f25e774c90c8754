"""Boards with their root over NFS, by hand (no job language yet): the Debian root extracted by
agent/rootfs.py, exported by agent/nfs.py from the real nfs-ganesha, mounted by the NFS initramfs
(klibc's nfsmount, NFSv3 through the portmapper) with LAVA's kernel arguments
(``root=/dev/nfs rw nfsroot=SERVER:PATH,tcp,hard ip=dhcp``). QEMU's user network takes the board's
connections to 10.0.2.2 to the worker's loopback, where ganesha and rpcbind listen.

What a board prints when it never gets its root is pinned here too, for the boot strategies to
detect it: the kernel's "VFS: Unable to mount root fs" panic, and the initramfs giving up.
"""

from __future__ import annotations

import time
from pathlib import Path

import pexpect
import pytest
from test_dut_images import shell as board_shell

from agent import nfs, rootfs, scratch

SHELL = "root@pumice-nfs:~# "
JOB = 800_000 + __import__("os").getpid() % 10_000


@pytest.fixture
def job_root(nfs_settings, nfs_server):
    """``job_root(job, archive)``: the archive extracted (agent/rootfs.py) into the job's root and
    exported; every root is unexported and removed at the end."""
    made: list[tuple[str, Path]] = []

    def make(job: int, archive: Path) -> nfs.Export:
        directory = nfs.make_root(nfs_settings, job)
        made.append((nfs.export_name(job), directory))
        with archive.open("rb") as source:
            done = rootfs.extract(source, directory, url=archive.as_uri())
        print(f"job {job}: {done.members} members, {done.file_bytes >> 20} MiB extracted in {done.seconds:.1f} s")
        return nfs_server.add(nfs.export_name(job), done.root, directory)

    yield make
    for name, directory in made:
        nfs_server.remove(name)
        scratch.remove_tree(directory)
        assert not directory.exists()


def amd64_argv(dut_images, initramfs: Path | None, append: str) -> list[str]:
    """The amd64 board, under TCG as the other tests' boards (this machine's KVM is not usable)."""
    argv = ["qemu-system-x86_64", "-m", "512", "-nographic", "-monitor", "none",
            "-kernel", str(dut_images.amd64.kernel), "-append", append,
            "-netdev", "user,id=net0", "-device", "virtio-net-pci,netdev=net0"]
    return argv + (["-initrd", str(initramfs)] if initramfs else [])


#: base.jinja2's base_ip_args for a device with a static address: "ip=%s::%s:%s:::off:%s:"
STATIC_IP = "ip=10.0.2.15::10.0.2.2:255.255.255.0:::off:10.0.2.3:"


def nfs_append(console: str, export: str, extra: str = "", ip: str = "ip=dhcp") -> str:
    """LAVA's NFS kernel arguments (base.jinja2: base_nfsroot_args, base_ip_args)."""
    return f"console={console},115200 loglevel=6 root=/dev/nfs rw nfsroot=10.0.2.2:{export},tcp,hard {ip} {extra}"


def login(child: pexpect.spawn) -> float:
    """From power on to a root shell on the console (the root's getty, an empty root password)."""
    start = time.monotonic()
    child.expect(r"Linux version [0-9]", timeout=60)
    child.expect_exact("init: mounting the NFS root", timeout=60)
    child.expect(r"pumice-nfs login: ", timeout=240)
    child.sendline("root")
    child.expect_exact(SHELL, timeout=60)
    return time.monotonic() - start


def shell(child: pexpect.spawn, command: str, timeout: float = 30) -> list[str]:
    """A command at the root shell; its output lines."""
    return board_shell(child, command, timeout, prompt=SHELL)


def test_amd64_board_boots_debian_over_nfs_and_writes_into_the_export(dut_images, nfs_root_images, job_root,
                                                                       qemu):
    export = job_root(JOB, nfs_root_images.amd64_rootfs)
    child = qemu(amd64_argv(dut_images, nfs_root_images.amd64_initramfs, nfs_append("ttyS0", export.path)))
    seconds = login(child)
    print(f"amd64: root shell over NFS {seconds:.1f} s after power on")
    mounts = [line for line in shell(child, "cat /proc/mounts") if line.split()[1:2] == ["/"]]
    assert len(mounts) == 1 and mounts[0].startswith(f"10.0.2.2:{export.path} / nfs rw,") and "vers=3" in mounts[0]
    assert shell(child, "systemctl is-system-running --wait || true")[-1] in ("running", "degraded")
    assert shell(child, "uname -m; id -u") == ["x86_64", "0"]
    shell(child, "echo written by the board > /root/from-board && mkdir -p /var/lib/test && sync")
    written = export.path / "root/from-board"
    assert written.read_text() == "written by the board\n"
    assert (written.stat().st_uid, written.stat().st_gid) == (0, 0), "root is root on the board's root"
    assert shell(child, "ls /usr/sbin/sshd && systemctl is-active ssh") == ["/usr/sbin/sshd", "active"]
    assert shell(child, "ls -l /dev/null")[0].startswith("crw-rw-rw- 1 root root 1, 3")


def test_two_boards_boot_at_once_each_on_its_own_root(dut_images, nfs_root_images, job_root, qemu):
    """The second board has a static address (LAVA's ip= for a device without DHCP)."""
    exports = [job_root(JOB + n, nfs_root_images.amd64_rootfs) for n in (1, 2)]
    boards = [qemu(amd64_argv(dut_images, nfs_root_images.amd64_initramfs, nfs_append("ttyS0", e.path, ip=ip)))
              for e, ip in zip(exports, ("ip=dhcp", STATIC_IP), strict=True)]
    for n, board in enumerate(boards):
        login(board)
        shell(board, f"echo board {n} > /root/whoami && sync")
    for n, export in enumerate(exports):
        assert (export.path / "root/whoami").read_text() == f"board {n}\n"
    assert shell(boards[0], "cat /root/whoami") == ["board 0"]
    assert shell(boards[1], "cat /root/whoami") == ["board 1"]
    assert "inet 10.0.2.15/24" in " ".join(shell(boards[1], "ip -4 addr show dev eth0"))
    assert shell(boards[1], "ip route show default") == ["default via 10.0.2.2 dev eth0"]


def test_arm64_board_boots_through_uboot_tftp_with_its_root_over_nfs(dut_images, nfs_root_images, job_root, qemu,
                                                                     tmp_path):
    board = dut_images.arm64
    export = job_root(JOB + 3, nfs_root_images.arm64_rootfs)
    tftp = tmp_path / "tftp"
    tftp.mkdir()
    for source, name in ((board.kernel, "Image"), (nfs_root_images.arm64_initramfs, "ramdisk.cpio.gz"),
                         (board.dtb, "virt.dtb")):
        (tftp / name).symlink_to(source)
    child = qemu(["qemu-system-aarch64", "-machine", "virt", "-cpu", "cortex-a57", "-m", "512", "-nographic",
                  "-bios", str(board.uboot), "-monitor", "none",
                  "-netdev", f"user,id=net0,tftp={tftp}", "-device", "virtio-net-device,netdev=net0"])
    session = dut_images.manifest["arches"]["arm64"]["u_boot"]
    child.expect_exact(session["interrupt_prompt"])
    child.send(" ")
    prompt = session["bootloader_prompt"] + " "
    child.expect_exact(prompt)
    addr = board.addresses
    # base-uboot.jinja2's nfs commands, as LAVA substitutes them
    for command in ["setenv serverip 10.0.2.2; setenv ipaddr 10.0.2.15; setenv netmask 255.255.255.0",
                    f"tftp {addr['KERNEL_ADDR']} Image",
                    f"tftp {addr['RAMDISK_ADDR']} ramdisk.cpio.gz; setenv initrd_size ${{filesize}}",
                    f"tftp {addr['DTB_ADDR']} virt.dtb",
                    f"setenv bootargs '{nfs_append('ttyAMA0', export.path)}'"]:
        child.sendline(command)
        child.expect_exact(prompt, timeout=60)
    child.sendline(f"booti {addr['KERNEL_ADDR']} {addr['RAMDISK_ADDR']}:${{initrd_size}} {addr['DTB_ADDR']}")
    child.expect_exact(session["boot_message"])
    seconds = login(child)
    print(f"arm64: root shell over NFS {seconds:.1f} s after booti")
    assert shell(child, "uname -m") == ["aarch64"]
    shell(child, "echo arm64 was here > /root/from-board && sync")
    assert (export.path / "root/from-board").read_text() == "arm64 was here\n"


# --- a board without its root ---------------------------------------------------------------------


def test_a_path_that_is_not_exported_ends_in_the_initramfs_giving_up_and_a_kernel_panic(
        dut_images, nfs_root_images, nfs_settings, nfs_server, qemu):
    missing = nfs_settings.export_root / nfs.export_name(JOB + 4)  # never exported
    child = qemu(amd64_argv(dut_images, nfs_root_images.amd64_initramfs,
                            nfs_append("ttyS0", missing, "rootdelay=3")))
    child.expect_exact(f"init: mounting the NFS root 10.0.2.2:{missing}")
    child.expect(r"mount call failed|Permission denied|No such file", timeout=60)
    child.expect_exact(f"init: cannot mount the NFS root 10.0.2.2:{missing}: giving up after 3 tries", timeout=60)
    child.expect_exact("Kernel panic - not syncing: Attempted to kill init!", timeout=30)


def test_a_stopped_server_ends_the_same_way_and_the_server_starts_again(dut_images, nfs_root_images, job_root,
                                                                         nfs_server, qemu):
    export = job_root(JOB + 5, nfs_root_images.amd64_rootfs)
    with nfs_server.locked():  # nobody else changes the exports while the server is down
        pid = nfs_server.pid()
        assert pid is not None
        __import__("os").kill(pid, 15)
        deadline = time.monotonic() + 30
        while nfs_server.pid() is not None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert nfs_server.answers() is not None
        child = qemu(amd64_argv(dut_images, nfs_root_images.amd64_initramfs,
                                nfs_append("ttyS0", export.path, "rootdelay=3")))
        child.expect_exact(f"init: cannot mount the NFS root 10.0.2.2:{export.path}: giving up", timeout=120)
        child.expect_exact("Kernel panic - not syncing: Attempted to kill init!", timeout=30)
    nfs_server.ensure_running()  # started again, with the exports it had
    assert export.name in {e.name for e in nfs_server.exports()}
    from agent import rpc

    assert rpc.mount("127.0.0.1", str(export.path))


def test_a_kernel_without_an_nfs_ramdisk_panics_unable_to_mount_root(dut_images, nfs_settings, qemu):
    # Debian's kernel has NFS as modules: with no initramfs it cannot mount root=/dev/nfs itself
    child = qemu(amd64_argv(dut_images, None, nfs_append("ttyS0", nfs_settings.export_root / "none")))
    child.expect_exact("VFS: Unable to mount root fs", timeout=120)
    child.expect_exact("Kernel panic - not syncing: VFS: Unable to mount root fs on", timeout=30)
