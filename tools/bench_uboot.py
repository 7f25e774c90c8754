"""Benchmark of the U-Boot path (issue 6): a LAVA-format U-Boot ramdisk job on the emulated arm64
board (power through board.py, console through ser2net + telnet, files by TFTP), side by side with
LAVA's ``lava-run`` on the same board and job when Debian's lava-dispatcher is installed (it also
needs tftpd-hpa's configuration and mkimage from u-boot-tools). Medians of several runs.

Overhead is the job's wall time minus the time the board itself takes: the same session typed by
hand over the same telnet (power-cycle, interrupt U-Boot, the same TFTP loads and boot command,
the same two test commands, answering busybox's cursor query as a terminal does, power off), timed
without any runner. Sessions and jobs are interleaved, so that a drift of the machine's speed weighs
on both alike.
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pexpect
import yaml

ROOT = Path(__file__).resolve().parent.parent
CORPUS = Path(os.environ.get("PUMICE_LAVA_CORPUS", ROOT.parent / "shared" / "lava-corpus"))
RUNS = int(os.environ.get("PUMICE_BENCH_RUNS", "5"))
#: the board's U-Boot addresses (also in its device type)
KERNEL_ADDR, RAMDISK_ADDR, DTB_ADDR = "0x40400000", "0x44000000", "0x40000000"
#: the emulated board as a LAVA device dictionary, for LAVA's own base-uboot template
LAVA_DICTIONARY = """\
{% extends 'base-uboot.jinja2' %}
{% set console_device = 'ttyAMA0' %}
{% set baud_rate = 115200 %}
{% set booti_kernel_addr = '0x40400000' %}
{% set booti_ramdisk_addr = '0x44000000' %}
{% set booti_dtb_addr = '0x40000000' %}
{% set uboot_mkimage_arch = 'arm64' %}
{% set bootloader_prompt = '=>' %}
"""


def images() -> Path:
    cache = Path(os.environ.get("PUMICE_CACHE", Path.home() / ".cache" / "pumice"))
    subprocess.run([sys.executable, str(ROOT / "tools" / "build_dut_images.py"), "--cache", str(cache),
                    "--arch", "arm64"], check=True, stdout=subprocess.DEVNULL)
    return cache / "dut" / "arm64"


def lava_tftp_root() -> Path | None:
    """LAVA's TFTP directory when lava-run can run a tftp deploy here, else None."""
    config = Path("/etc/default/tftpd-hpa")
    if not (shutil.which("lava-run") and shutil.which("in.tftpd") and shutil.which("mkimage")
            and config.exists() and os.geteuid() == 0):
        return None
    for line in config.read_text().splitlines():
        if line.startswith("TFTP_DIRECTORY="):
            return Path(line.split("=", 1)[1].strip().strip('"'))
    return None


def board_session(board, dut: Path, bootargs: str) -> float:
    """Seconds the board itself needs for the job's work, typed by hand over the same console."""
    from agent.actions.deploy.tftp import uimage_header
    from agent.connections.console import CURSOR_ROW

    folder = board.tftp_root / "bench-reference"
    folder.mkdir(exist_ok=True)
    shutil.copyfile(dut / "Image", folder / "Image")
    shutil.copyfile(dut / "virt.dtb", folder / "virt.dtb")
    ramdisk = (dut / "initramfs.cpio.gz").read_bytes()
    (folder / "ramdisk.uboot").write_bytes(uimage_header(ramdisk, "ramdisk", "arm64") + ramdisk)
    commands = ["setenv autoload no", "setenv initrd_high 0xffffffff", "setenv fdt_high 0xffffffff", "dhcp",
                "setenv serverip 10.0.2.2", f"tftp {KERNEL_ADDR} bench-reference/Image",
                f"tftp {RAMDISK_ADDR} bench-reference/ramdisk.uboot", "setenv initrd_size ${filesize}",
                f"tftp {DTB_ADDR} bench-reference/virt.dtb", f"setenv bootargs '{bootargs}'"]
    start = time.monotonic()
    child = pexpect.spawn("telnet", ["127.0.0.1", str(board.port)], encoding="utf-8", codec_errors="replace",
                          timeout=60)
    # no pexpect pauses (50 ms before each line sent, after each read, at close): they are not the
    # board's time, and the runner has none either
    child.delaybeforesend = child.delayafterread = None
    child.delayafterclose = child.delayafterterminate = child.ptyproc.delayafterclose = 0
    try:
        child.expect_exact("Escape character is")
        subprocess.run(board.command("reset").split(), check=True, capture_output=True)
        child.expect_exact("Hit any key to stop autoboot")
        child.sendline("")
        child.expect_exact("=> ")
        for command in commands:
            child.sendline(command)
            child.expect_exact("=> ")
        child.sendline(f"booti {KERNEL_ADDR} {RAMDISK_ADDR} {DTB_ADDR}")
        child.expect_exact("Starting kernel")
        child.expect(r"Linux version [0-9]")
        child.expect_exact("/ # ")
        for command in ['test "$(uname -m)" = aarch64', "test -d /"]:
            # busybox asks where the cursor is after its prompt and waits 20 ms for the answer a
            # terminal gives: give it, as the runner's console does (the column is the prompt's)
            child.send(f"\x1b[{CURSOR_ROW};5R{command}\n")
            child.expect_exact("/ # ")
    finally:
        child.close(force=True)
        board.power_off()
        shutil.rmtree(folder, ignore_errors=True)
    return time.monotonic() - start


def main() -> dict:
    sys.path.insert(0, str(ROOT / "tests"))
    from bench_agent import measure
    from boards import ramdisk_job, start_board

    from master.devicetypes import DeviceTypes

    dut = images()
    work = Path(tempfile.mkdtemp(prefix="pumice-bench-uboot-"))
    lava_root = lava_tftp_root()
    if lava_root is not None:
        lava_root.mkdir(parents=True, exist_ok=True)
    board = start_board(dut / "u-boot.bin", work / "board", tftp_root=lava_root)
    figures: dict = {}
    try:
        job = ramdisk_job(type("Images", (), {"kernel": dut / "Image", "ramdisk": dut / "initramfs.cpio.gz",
                                              "dtb": dut / "virt.dtb"}))
        (work / "job.yaml").write_text(job)
        device = board.device("telnet")
        (work / "device.yaml").write_text(yaml.safe_dump(device))
        (work / "dispatcher.yaml").write_text(yaml.safe_dump(board.dispatcher()))
        bootargs = next(line for line in device["actions"]["boot"]["methods"]["u-boot"]["ramdisk"]["commands"]
                        if line.startswith("setenv bootargs ")).split("'")[1]
        runners = {"pumice": [str(Path(sys.executable).parent / "pumice-run"), "--device", "device.yaml",
                              "--dispatcher", "dispatcher.yaml"]}
        if lava_root is not None and CORPUS.exists():
            text = LAVA_DICTIONARY + "\n".join(line for line in board.dictionary("telnet").splitlines()
                                              if "{% set" in line)
            lava_device = DeviceTypes(template_dirs=[CORPUS / "device-types"]).device_config(text)
            (work / "lava-device.yaml").write_text(yaml.safe_dump(lava_device))
            (work / "lava-dispatcher.yaml").write_text(yaml.safe_dump({"dispatcher_ip": "10.0.2.2"}))
            runners["lava-run"] = [shutil.which("lava-run"), "--device", "lava-device.yaml",
                                   "--dispatcher", "lava-dispatcher.yaml"]
        else:
            print("  (lava-run not measured: it needs lava-dispatcher, tftpd-hpa's configuration, mkimage "
                  "and root)")
        # interleaved (a session, then each runner's job, RUNS times): a drift of the machine's
        # speed weighs on the baseline as on the jobs
        sessions: list[float] = []
        walls: dict[str, list[float]] = {name: [] for name in runners}
        peaks: dict[str, list[int]] = {name: [] for name in runners}
        for run in range(RUNS):
            sessions.append(board_session(board, dut, bootargs))
            for name, base in runners.items():
                wall, peak, status = measure(base + ["--job-id", str(100 + run), "--output-dir",
                                                     f"out-{name}-{run}", "job.yaml"], work)
                if status != 0:
                    raise SystemExit(f"{name} failed the U-Boot benchmark job (exit {status}); see {work}")
                walls[name].append(wall)
                peaks[name].append(peak)
                board.power_off()
        figures["board session (s)"] = statistics.median(sessions)
        for name in runners:
            figures[f"{name}: job wall time (s)"] = statistics.median(walls[name])
            figures[f"{name}: job overhead (s)"] = statistics.median(walls[name]) - figures["board session (s)"]
            figures[f"{name}: peak RSS (MB)"] = statistics.median(peaks[name]) / 1024
    finally:
        board.stop()
    shutil.rmtree(work, ignore_errors=True)
    print(f"U-Boot ramdisk job on the arm64 board (medians of {RUNS} runs, interleaved; "
          "overhead = wall time - board session; at or below 0: nothing measurable over the hand-typed session)")
    for key, value in figures.items():
        print(f"  {key:38s} {value:8.3f}")
    return figures


if __name__ == "__main__":
    main()
