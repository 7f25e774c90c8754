"""U-Boot ramdisk jobs on the emulated arm64 board with ``pumice-run``: through ser2net + telnet and
through the serial adaptor opened with pyserial; kernel types, U-Boot headers and modules."""

from __future__ import annotations

import io
import tarfile

import pytest
from boards import processes, ramdisk_job, run_job

from agent.actions.deploy.tftp import UIMAGE_MAGIC, uimage_header

pytestmark = pytest.mark.qemu


def assert_clean(board, run) -> None:
    """After any job: the board is off, its TFTP directory gone, no console client left."""
    assert not board.powered(), "the board was left powered on"
    assert list(board.tftp_root.iterdir()) == [], "the job's TFTP directory was left behind"
    assert processes("telnet", str(board.port)) == []
    assert board.status()["host_attached"] is False, "the serial adaptor was left open"


def test_ramdisk_job_through_ser2net(board, dut_images, tmp_path):
    run = run_job(board, ramdisk_job(dut_images.arm64), tmp_path)
    assert run.returncode == 0, run.explain()
    results = run.results()
    assert results[("0_smoke", "arch")].result == "pass"
    assert results[("0_smoke", "overlay")].result == "pass"
    lava = {(r.case, r.level): r.result for r in results.values() if r.suite == "lava"}
    for case, level in [("tftp-deploy", "1"), ("apply-overlay-tftp", "1.4.5"), ("uboot-action", "2"),
                        ("connect-device", "2.3"), ("pdu-reboot", "2.4.1.1"),
                        ("bootloader-interrupt", "2.4.2"), ("bootloader-commands", "2.4.3"),
                        ("auto-login-action", "2.4.4"), ("power-off", "4.1")]:
        assert lava[(case, level)] == "pass", (case, level)
    messages = [r.msg for r in run.log if r.lvl == "info"]
    assert "- booti 0x40400000 0x44000000 0x40000000" in messages
    assert any(m.startswith("- tftp 0x44000000 pumice-1-") and m.endswith("/ramdisk/initramfs.cpio.gz.uboot")
               for m in messages), messages
    targets = run.targets()
    assert any("Bytes transferred = " in t for t in targets)
    assert "Starting kernel ..." in targets
    inputs = [r.msg for r in run.log if r.lvl == "input"]
    assert inputs[0] == "\n"  # the interrupt: the device's (empty) interrupt_char, then newline
    print(f"job through ser2net: {run.duration:.1f} s")
    assert_clean(board, run)


def test_ramdisk_job_through_pyserial_with_header_and_modules(board, dut_images, tmp_path):
    """The adaptor opened directly; a ramdisk that comes with a U-Boot header (removed for the
    overlay, put back for booti), and a modules tarball appended to the ramdisk."""
    images = dut_images.arm64
    data = images.ramdisk.read_bytes()
    wrapped = tmp_path / "initramfs.cpio.gz.uboot"
    wrapped.write_bytes(uimage_header(data, "ramdisk", "arm64") + data)
    modules = tmp_path / "modules.tar.gz"
    with tarfile.open(modules, "w:gz") as tar:
        marker = b"pumice modules\n"
        info = tarfile.TarInfo("lib/modules/pumice-test/marker")
        info.size = len(marker)
        tar.addfile(info, io.BytesIO(marker))
    job = ramdisk_job(images, **{
        "ramdisk: {url: '@RAMDISK@', compression: gz}":
            f"ramdisk: {{url: '{wrapped.as_uri()}', compression: gz, header: u-boot}}\n"
            f"    modules: {{url: '{modules.as_uri()}', compression: gz}}",
        "          - lava-test-case overlay": "          - lava-test-case modules --shell grep -q pumice "
                                              "/lib/modules/pumice-test/marker\n"
                                              "          - lava-test-case overlay",
    })  # fmt: skip
    run = run_job(board, job, tmp_path, connection="serial", dispatcher=board.dispatcher(tmp_path))
    assert run.returncode == 0, run.explain()
    results = run.results()
    for case in ("arch", "overlay", "modules"):
        assert results[("0_smoke", case)].result == "pass", case
    assert results[("lava", "extract-modules")].result == "pass"
    assert any(str(r.msg).startswith("ramdisk: U-Boot header removed") for r in run.log)
    infos = [r.msg for r in run.log if r.lvl == "info"]
    assert any(m.startswith("connect-device: connecting to the device using 'serial://") for m in infos)
    print(f"job through pyserial: {run.duration:.1f} s")
    assert_clean(board, run)


def test_kernel_converted_to_uimage_when_the_device_has_no_booti(board, dut_images, tmp_path):
    """LAVA's kernel type rule: an ``image`` kernel on a device with only bootm load addresses is
    wrapped in a U-Boot header and booted with bootm."""
    extra = "\n".join([
        "{% set booti_kernel_addr = '' %}",
        "{% set bootm_kernel_addr = '0x40400000' %}",
        "{% set bootm_ramdisk_addr = '0x44000000' %}",
        "{% set bootm_dtb_addr = '0x40000000' %}",
    ])  # fmt: skip
    device = board.device("telnet", extra)
    assert "booti" not in device["parameters"] and "bootm" in device["parameters"]
    run = run_job(board, ramdisk_job(dut_images.arm64), tmp_path, device=device)
    assert run.returncode == 0, run.explain()
    infos = [r.msg for r in run.log if r.lvl == "info"]
    assert "- bootm 0x40400000 0x44000000 0x40000000" in infos
    assert any("converted to a uImage (load 0x40400000, entry 0x40400000)" in m for m in infos)
    assert any(m.startswith("- tftp 0x40400000 pumice-1-") and m.endswith("/kernel/uImage") for m in infos)
    assert any("Image Name:   Image" in t for t in run.targets())  # U-Boot read our header
    assert run.results()[("0_smoke", "arch")].result == "pass"
    assert UIMAGE_MAGIC == 0x27051956
    assert_clean(board, run)


BOOTLOADER_JOB = """\
device_type: qemu-arm64-uboot
job_name: stop at the U-Boot prompt
timeouts: {job: {minutes: 2}}
visibility: public
actions:
- boot:
    method: bootloader
    bootloader: u-boot
    commands: ['version', 'setenv pumice yes', 'printenv pumice']
    prompts: ['=>']
"""


def test_boot_method_bootloader_stops_at_the_prompt(board, tmp_path):
    run = run_job(board, BOOTLOADER_JOB, tmp_path)
    assert run.returncode == 0, run.explain()
    targets = run.targets()
    assert any(t.startswith("U-Boot 2023.01") for t in targets)
    assert "pumice=yes" in targets
    levels = {(r.case, r.level) for r in run.results().values() if r.suite == "lava"}
    assert {("boot-bootloader-retry", "1"), ("bootloader-overlay", "1.1"), ("boot-bootloader", "1.2"),
            ("connect-device", "1.2.1"), ("pdu-reboot", "1.2.2.1"),
            ("bootloader-commands", "1.2.4")} <= levels
    assert not board.powered()
