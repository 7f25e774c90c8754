"""The emulated arm64 lab board itself: power switch, serial cable, ser2net, and a U-Boot TFTP boot
typed by hand (no agent), through ser2net + telnet and through the serial adaptor directly."""

from __future__ import annotations

import shutil
import time

import pexpect
import pytest
import serial
from boards import wait_until

pytestmark = pytest.mark.qemu

PROMPT = "/ # "


def manual_boot(child, images, tftp_root, subdir: str = "manual") -> None:
    """Interrupt U-Boot, load the images by TFTP from ``tftp_root/subdir`` and boot to a shell."""
    target = tftp_root / subdir
    target.mkdir(exist_ok=True)
    for path in (images.kernel, images.ramdisk, images.dtb):
        shutil.copy(path, target / path.name)
    addr = images.addresses
    child.expect_exact("Hit any key to stop autoboot", timeout=30)
    child.send(" ")
    child.expect_exact("=> ", timeout=10)
    for command in [
        "setenv autoload no", "dhcp", "setenv serverip 10.0.2.2",
        f"tftp {addr['KERNEL_ADDR']} {subdir}/{images.kernel.name}",
        f"tftp {addr['RAMDISK_ADDR']} {subdir}/{images.ramdisk.name}", "setenv initrd_size ${filesize}",
        f"tftp {addr['DTB_ADDR']} {subdir}/{images.dtb.name}",
        f"setenv bootargs '{images.command_line}'",
    ]:  # fmt: skip
        child.sendline(command)
        child.expect_exact("=> ", timeout=30)
        assert "File not found" not in child.before, child.before
    child.sendline(f"booti {addr['KERNEL_ADDR']} {addr['RAMDISK_ADDR']}:${{initrd_size}} {addr['DTB_ADDR']}")
    child.expect_exact("Starting kernel", timeout=30)
    child.expect(r"Linux version [0-9]", timeout=30)
    child.expect_exact(PROMPT, timeout=60)


def test_power_switch(board):
    assert not board.powered()
    board_cmd = board.command("on").split()
    assert pexpect.run(" ".join(board_cmd), withexitstatus=True, timeout=30)[1] == 0
    assert board.powered()
    pid = board.qemu_pid()
    # an outlet that is already on stays on (the PDU does not cycle the board)
    assert pexpect.run(board.command("on"), timeout=30).strip().endswith(b"already on")
    assert board.qemu_pid() == pid
    pexpect.run(board.command("reset"), timeout=30)
    assert board.powered() and board.qemu_pid() != pid
    pexpect.run(board.command("off"), timeout=30)
    assert not board.powered()
    board.set_dead(True)
    assert pexpect.run(board.command("on"), withexitstatus=True, timeout=30)[1] == 0
    assert not board.powered()


def test_manual_tftp_boot_through_ser2net(board, dut_images):
    child = pexpect.spawn("telnet", ["127.0.0.1", str(board.port)], encoding="utf-8", codec_errors="replace",
                          timeout=30)
    try:
        child.expect_exact("Escape character is")
        start = time.monotonic()
        pexpect.run(board.command("on"), timeout=30)
        manual_boot(child, dut_images.arm64, board.tftp_root)
        print(f"shell prompt {time.monotonic() - start:.1f} s after power-on")
        child.sendline("uname -m")
        child.expect_exact("aarch64")
        child.expect_exact(PROMPT)
        assert board.status()["host_attached"]
    finally:
        child.close(force=True)
    board.power_off()
    assert not board.powered()


def test_manual_tftp_boot_through_pyserial(board, dut_images):
    from pexpect import fdpexpect

    port = serial.Serial(str(board.tty), 115200, timeout=0)
    child = fdpexpect.fdspawn(port.fileno(), encoding="utf-8", codec_errors="replace", timeout=30)
    try:
        pexpect.run(board.command("on"), timeout=30)
        manual_boot(child, dut_images.arm64, board.tftp_root)
        child.send("echo $((6*7))\n")
        child.expect_exact("42")
    finally:
        port.close()


def test_cable_faults(board):
    """A deaf cable drops what the host types; a mute one what the board prints; garble adds noise."""
    port = serial.Serial(str(board.tty), 115200, timeout=0)
    from pexpect import fdpexpect

    child = fdpexpect.fdspawn(port.fileno(), timeout=30)
    try:
        board.fault("garble", "100")
        child.expect(pexpect.TIMEOUT, timeout=0.5)
        assert len(child.before) == 100
        board.fault("deaf", "on")
        pexpect.run(board.command("on"), timeout=30)
        child.expect_exact(b"Hit any key to stop autoboot")
        child.send(b" ")  # lost: U-Boot goes on with its autoboot
        child.expect_exact(b"scanning bus for devices", timeout=30)
        board.fault("mute", "on")
        before = board.status()["from_board"]
        pexpect.run(board.command("reset"), timeout=30)
        # the board talks again (U-Boot's banner), nothing of it reaches the host
        wait_until(lambda: board.status()["from_board"] > before, 30, "the board to print more")
        assert child.expect([pexpect.TIMEOUT, b"U-Boot"], timeout=0.5) == 0
    finally:
        port.close()
