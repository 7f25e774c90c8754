"""The emulated boards' images: the manifest, the initramfs contents, and real boots under QEMU.

The boots use QEMU under TCG: amd64 with -kernel/-initrd, arm64 through U-Boot (-bios) and
TFTP from QEMU's user network, as the device types run them.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pexpect
import pytest

PROMPT = "/ # "
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


# --- helpers ------------------------------------------------------------------------------------


def read_cpio(data: bytes) -> dict[str, dict]:
    """Entries of a newc cpio archive: name -> {mode, data, rdev}."""
    entries: dict[str, dict] = {}
    offset = 0
    while True:
        assert data[offset : offset + 6] == b"070701", f"bad cpio header at {offset}"
        fields = [int(data[offset + 6 + 8 * i : offset + 14 + 8 * i], 16) for i in range(13)]
        mode, filesize, rdev, namesize = fields[1], fields[6], (fields[9], fields[10]), fields[11]
        name_start = offset + 110
        name = data[name_start : name_start + namesize - 1].decode()
        body = name_start + namesize + (-(name_start + namesize) % 4)
        if name == "TRAILER!!!":
            return entries
        entries[name] = {"mode": mode, "data": data[body : body + filesize], "rdev": rdev}
        offset = body + filesize + (-(body + filesize) % 4)


def shell(child: pexpect.spawn, command: str, timeout: float = 15, prompt: str = PROMPT) -> list[str]:
    """Run a command at the board's shell; its output lines (without the echoed command)."""
    child.sendline(command)
    child.expect_exact(prompt, timeout=timeout)
    lines = [ANSI.sub("", line).strip() for line in child.before.splitlines()]
    # The first line is the echo of the command itself.
    start = next(i for i, line in enumerate(lines) if line.endswith(command))
    return [line for line in lines[start + 1 :] if line]


def amd64_argv(board, console: list[str], append: str) -> list[str]:
    """qemu-system-x86_64 command line of the amd64 board."""
    return [
        "qemu-system-x86_64", *console, "-m", "512",
        "-kernel", str(board.kernel), "-initrd", str(board.ramdisk), "-append", append,
        "-net", "nic,model=virtio", "-net", "user", "-monitor", "none",
    ]  # fmt: skip


# --- the manifest and the build -----------------------------------------------------------------


EXPECTED_FILES = {
    "amd64": {"vmlinuz", "initramfs.cpio.gz", "initramfs-nfs.cpio.gz"},
    "arm64": {"Image", "initramfs.cpio.gz", "initramfs-nfs.cpio.gz", "virt.dtb", "u-boot.bin"},
}


def test_manifest_is_complete(dut_images, dut_builder):
    manifest = json.loads((dut_images.cache / "dut" / "manifest.json").read_text())
    assert manifest["recipe"] == dut_builder.recipe_hash()
    for arch, files in EXPECTED_FILES.items():
        entry = manifest["arches"][arch]
        assert set(entry["files"]) == files
        for name, info in entry["files"].items():
            path = dut_images.cache / "dut" / arch / name
            assert path.stat().st_size == info["size"]
            assert hashlib.sha256(path.read_bytes()).hexdigest() == info["sha256"], path
        packages = entry["packages"]
        kernels = [
            name for name in packages if re.fullmatch(rf"linux-image-[0-9.]+-[0-9]+-cloud-{arch}", name)
        ]
        assert len(kernels) == 1, packages
        assert packages[kernels[0]]["version"] and packages["busybox-static"]["version"]
        assert entry["kernel_version"] == kernels[0].removeprefix("linux-image-")
        assert entry["kernel_command_line"].startswith(f"console={entry['console']},115200 ")
        assert "quiet" not in entry["kernel_command_line"].split()  # quiet hides "Linux version"
    arm64 = manifest["arches"]["arm64"]
    assert arm64["packages"]["u-boot-qemu"]["version"]
    assert arm64["u_boot"]["KERNEL_ADDR"] == "0x40400000"
    assert arm64["u_boot"]["RAMDISK_ADDR"] == "0x44000000"
    assert arm64["u_boot"]["DTB_ADDR"] == "0x40000000"
    assert arm64["u_boot"]["bootloader_prompt"] == "=>"


def test_rebuild_is_a_quick_noop(dut_images, dut_builder, monkeypatch):
    def no_commands(*args, **kwargs):
        raise AssertionError(f"an up-to-date build ran a command: {args}")

    monkeypatch.setattr(subprocess, "run", no_commands)
    start = time.monotonic()
    assert dut_builder.build_images(dut_images.cache) == dut_images.manifest
    assert time.monotonic() - start < 1


def test_make_images_rerun_is_a_noop(dut_images, dut_builder):
    script = Path(dut_builder.__file__)
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, str(script), "--cache", str(dut_images.cache)],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "up to date" in proc.stdout
    assert time.monotonic() - start < 2  # includes the interpreter's start


@pytest.mark.parametrize("arch", ["amd64", "arm64"])
def test_initramfs_contents(dut_images, dut_builder, arch):
    entries = read_cpio(gzip.decompress((dut_images.cache / "dut" / arch / "initramfs.cpio.gz").read_bytes()))
    init = entries["init"]
    assert init["mode"] == 0o100755
    assert init["data"] == (dut_builder.DUT_FILES / "init").read_bytes()
    assert entries["dev/console"]["mode"] == 0o020600 and entries["dev/console"]["rdev"] == (5, 1)
    assert entries["bin/busybox"]["data"][:4] == b"\x7fELF"
    assert entries["bin/sh"]["mode"] & 0o170000 == 0o120000 and entries["bin/sh"]["data"] == b"busybox"
    assert entries["usr/bin/vmstat"]["mode"] == 0o100755
    for directory in ("bin", "sbin", "usr/bin", "usr/sbin", "proc", "sys", "dev", "tmp"):
        assert entries[directory]["mode"] & 0o170000 == 0o040000, directory
    # Modules: uncompressed, only the needed ones, every dependency loaded before its user.
    kver = dut_images.manifest["arches"][arch]["kernel_version"]
    order = entries["etc/pumice/modules"]["data"].decode().split()
    names = [Path(path).stem for path in order]
    assert order == dut_images.manifest["arches"][arch]["modules"]
    for wanted in dut_builder.ARCHES[arch].modules:
        assert wanted in names
    for position, path in enumerate(order):
        elf = entries[f"lib/modules/{kver}/{path}"]["data"]
        assert elf[:4] == b"\x7fELF"
        for dep in filter(None, dut_builder.modinfo(elf).get("depends", "").split(",")):
            assert dep in names[:position], f"{path} needs {dep} loaded first: {names}"
    shipped = [name for name in entries if name.startswith("lib/modules/") and name.endswith(".ko")]
    assert len(shipped) == len(order)
    assert f"lib/modules/{kver}/modules.dep" in entries


def test_packed_dtb(dut_images):
    blob = dut_images.arm64.dtb.read_bytes()
    assert blob[:4] == b"\xd0\x0d\xfe\xed"
    assert int.from_bytes(blob[4:8], "big") == len(blob) < 64 * 1024


def test_raw_arm64_image(dut_builder, tmp_path):
    image = bytearray(4096)
    image[0x38:0x3C] = b"ARM\x64"
    packed = tmp_path / "vmlinuz"
    packed.write_bytes(gzip.compress(bytes(image)))
    assert dut_builder.raw_arm64_image(packed) == bytes(image)
    packed.write_bytes(b"MZ" + bytes(4094))
    with pytest.raises(dut_builder.BuildError, match="not an arm64 kernel Image"):
        dut_builder.raw_arm64_image(packed)


def test_missing_module_is_named(dut_builder, tmp_path):
    (tmp_path / "kernel").mkdir()
    with pytest.raises(
        dut_builder.BuildError, match=r"kernel module virtio_net \(needed by init\) is not in"
    ):
        dut_builder.resolve_modules(tmp_path, ["virtio_net"])


def test_unfetchable_package_fails_clearly(dut_builder, tmp_path):
    apt = dut_builder.Apt(tmp_path / "apt", "amd64")
    apt.prepare()  # no lists: apt knows no package, and nothing touches the network
    assert "deb [arch=amd64" in (tmp_path / "apt" / "sources.list").read_text()
    with pytest.raises(dut_builder.BuildError) as failure:
        apt.download(["pumice-no-such-package"], tmp_path)
    message = str(failure.value)
    assert "cannot fetch pumice-no-such-package for amd64" in message
    assert "Unable to locate package" in message


def test_unknown_arch(dut_builder, tmp_path):
    with pytest.raises(dut_builder.BuildError, match="unknown architecture sparc; known: amd64, arm64"):
        dut_builder.build_images(tmp_path, ["sparc"])


def test_http_server_serves_its_root(http_server):
    (http_server.root / "sub").mkdir(exist_ok=True)
    (http_server.root / "sub" / "file.txt").write_text("served\n")
    assert http_server.url("sub/file.txt").startswith("http://127.0.0.1:")
    with urllib.request.urlopen(http_server.url("/sub/file.txt"), timeout=10) as response:
        assert response.read() == b"served\n"
    assert http_server.guest_url("sub/file.txt") == f"http://10.0.2.2:{http_server.port}/sub/file.txt"


def test_lava_corpus_fixture(lava_corpus):
    assert (lava_corpus / "README.md").is_file()
    assert (lava_corpus / "device-types").is_dir()


# --- real boots ---------------------------------------------------------------------------------


@pytest.mark.qemu
def test_amd64_boots_to_shell(dut_images, qemu, http_server):
    board = dut_images.amd64
    (http_server.root / "hello.txt").write_text("hello from the host\n")
    start = time.monotonic()
    child = qemu(amd64_argv(board, ["-nographic"], board.command_line))
    child.expect(r"Linux version [0-9]")
    child.expect_exact(PROMPT)
    print(f"amd64: shell prompt {time.monotonic() - start:.2f} s after QEMU started")
    assert shell(child, "uname -m") == ["x86_64"]
    modules = [line.split()[0] for line in shell(child, "lsmod")]
    assert {"virtio_net", "virtio_pci", "virtio_blk", "virtio_console"} <= set(modules)
    assert "inet addr:10.0.2.15" in " ".join(shell(child, "ifconfig eth0"))
    assert shell(child, f"wget -q -O - {http_server.guest_url('hello.txt')}") == ["hello from the host"]
    assert shell(child, "cat /proc/sys/kernel/printk")[0].split()[0] == "1"
    assert shell(child, "vmstat")[1].split()[:4] == ["r", "b", "swpd", "free"]
    assert shell(child, "hostname") == ["pumice-amd64"]
    long_line = "x" * 300  # test shells send long command lines: the echo must stay one line
    assert shell(child, f"echo {long_line}") == [long_line]


@pytest.mark.qemu
def test_amd64_console_is_a_controlling_tty(dut_images, qemu):
    board = dut_images.amd64
    # -nographic leaves ^C to QEMU (it quits); a stdio chardev with signal=off passes it on.
    console = ["-display", "none", "-chardev", "stdio,id=console,signal=off", "-serial", "chardev:console"]
    child = qemu(amd64_argv(board, console, board.command_line + " hostname=qemu01"))
    child.expect_exact(PROMPT)
    assert shell(child, "tty") == ["/dev/ttyS0"]
    assert shell(child, "hostname") == ["qemu01"]
    child.sendline("sleep 300")
    child.expect_exact("sleep 300", timeout=10)
    time.sleep(0.5)
    child.sendcontrol("c")
    child.expect_exact(PROMPT, timeout=5)
    # The shell respawns when it exits, like a getty.
    child.sendline("exit")
    child.expect_exact(PROMPT, timeout=10)
    assert shell(child, "echo alive") == ["alive"]


@pytest.mark.qemu
def test_arm64_boots_through_uboot_tftp(dut_images, qemu):
    board = dut_images.arm64
    addr = board.addresses
    argv = [
        "qemu-system-aarch64", "-machine", "virt", "-cpu", "cortex-a57", "-m", "512", "-nographic",
        "-bios", str(board.uboot), "-monitor", "none",
        "-netdev", f"user,id=net0,tftp={board.directory}", "-device", "virtio-net-device,netdev=net0",
    ]  # fmt: skip
    # The documented session of the manifest, placeholders filled in as LAVA does.
    session = dut_images.manifest["arches"]["arm64"]["u_boot"]
    commands = []
    for command in session["commands"]:
        for key, value in {**addr, "BOOTARGS": board.command_line}.items():
            command = command.replace("{" + key + "}", value)
        commands.append(command)
    bootloader_prompt = session["bootloader_prompt"] + " "
    start = time.monotonic()
    child = qemu(argv)
    child.expect_exact(session["interrupt_prompt"])
    child.send(" ")
    child.expect_exact(bootloader_prompt)
    for command in commands[:-1]:
        child.sendline(command)
        child.expect_exact(bootloader_prompt, timeout=30)
        if command.startswith("tftp "):
            size = (board.directory / command.split()[2].rstrip(";")).stat().st_size
            assert f"Bytes transferred = {size} " in child.before, child.before
    assert commands[-1] == "booti 0x40400000 0x44000000:${initrd_size} 0x40000000"
    child.sendline(commands[-1])
    child.expect_exact(session["boot_message"])
    child.expect(r"Linux version [0-9]")
    child.expect_exact(PROMPT)
    print(f"arm64: shell prompt {time.monotonic() - start:.2f} s after QEMU started (U-Boot + TFTP)")
    assert shell(child, "uname -m") == ["aarch64"]
    modules = [line.split()[0] for line in shell(child, "lsmod")]
    assert {"virtio_mmio", "virtio_net"} <= set(modules)
    assert "inet addr:10.0.2.15" in " ".join(shell(child, "ifconfig eth0"))
