"""Benchmarks of the runner (issue 2): job overhead, peak RSS and --validate time, side by side
with LAVA's ``lava-run`` when Debian's lava-dispatcher is installed. Medians of several runs.

Overhead is the job's wall time minus the board's boot-to-prompt time, measured by booting the
same kernel and ramdisk with the same QEMU command line straight under pexpect.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pexpect
import yaml

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "tests" / "data"
CORPUS = Path(os.environ.get("PUMICE_LAVA_CORPUS", ROOT.parent / "shared" / "lava-corpus"))
RUNS = int(os.environ.get("PUMICE_BENCH_RUNS", "5"))


class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


def serve(directory: Path) -> tuple[ThreadingHTTPServer, str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(_Quiet, directory=str(directory)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


def images() -> Path:
    cache = Path(os.environ.get("PUMICE_CACHE", Path.home() / ".cache" / "pumice"))
    subprocess.run([sys.executable, str(ROOT / "tools" / "build_dut_images.py"), "--cache", str(cache),
                    "--arch", "amd64"], check=True, stdout=subprocess.DEVNULL)
    return cache / "dut" / "amd64"


def measure(command: list[str], cwd: Path) -> tuple[float, int, int]:
    """Wall time (s), peak RSS of the process itself (kB, VmHWM) and exit status."""
    start = time.monotonic()
    proc = subprocess.Popen(command, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    peak = 0
    status = Path(f"/proc/{proc.pid}/status")
    while proc.poll() is None:
        try:
            for line in status.read_text().splitlines():
                if line.startswith("VmHWM:"):
                    peak = max(peak, int(line.split()[1]))
        except (OSError, ValueError):
            pass
        time.sleep(0.01)
    return time.monotonic() - start, peak, proc.returncode


def boot_to_prompt(device: dict, kernel: Path, ramdisk: Path, cmdline: str) -> float:
    """Seconds from starting QEMU to the board's shell prompt, without any runner."""
    params = device["actions"]["boot"]["methods"]["qemu"]["parameters"]
    argv = [params["command"]]
    for option in params.get("options") or []:
        argv += option.split()
    argv += ["-kernel", str(kernel), "-initrd", str(ramdisk), "-append", cmdline]
    start = time.monotonic()
    child = pexpect.spawn(argv[0], argv[1:], encoding="utf-8", codec_errors="replace", timeout=60)
    try:
        child.expect("/ # ")
        return time.monotonic() - start
    finally:
        child.terminate(force=True)


def main() -> dict:
    from master.devicetypes import DeviceTypes

    dut = images()
    work = Path(tempfile.mkdtemp(prefix="pumice-bench-"))
    www = work / "www"
    www.mkdir()
    for name in ("vmlinuz", "initramfs.cpio.gz"):
        shutil.copyfile(dut / name, www / name)
    server, url = serve(www)
    dictionary = (DATA / "qemu-amd64.jinja2").read_text()
    device = DeviceTypes().device_config(dictionary, context={"arch": "amd64"})
    (work / "device.yaml").write_text(yaml.safe_dump(device))
    job = (DATA / "smoke-job.yaml").read_text()
    job = job.replace("@KERNEL_URL@", f"{url}/vmlinuz").replace("@RAMDISK_URL@", f"{url}/initramfs.cpio.gz")
    job = job.replace("@KERNEL_SHA256@", hashlib.sha256((www / "vmlinuz").read_bytes()).hexdigest())
    # compressed ramdisk, as both runners unpack it before appending the overlay
    job = job.replace("        format: cpio.newc\n", "        format: cpio.newc\n        compression: gz\n")
    (work / "job.yaml").write_text(job)
    cmdline = "console=ttyS0,115200 loglevel=6"
    figures: dict = {}
    try:
        boots = [boot_to_prompt(device, www / "vmlinuz", www / "initramfs.cpio.gz", cmdline) for _ in range(RUNS)]
        figures["boot-to-prompt (s)"] = statistics.median(boots)
        runners = {"pumice": [str(Path(sys.executable).parent / "pumice-run"), "--device", "device.yaml"]}
        lava = shutil.which("lava-run")
        if lava and os.geteuid() == 0:
            lava_device = DeviceTypes(template_dirs=[CORPUS / "device-types"]).device_config(
                dictionary, context={"arch": "amd64"}) if CORPUS.exists() else device
            (work / "lava-device.yaml").write_text(yaml.safe_dump(lava_device))
            runners["lava-run"] = [lava, "--device", "lava-device.yaml"]
        for name, base in runners.items():
            walls, peaks = [], []
            for run in range(RUNS):
                wall, peak, status = measure(base + ["--job-id", str(100 + run), "--output-dir",
                                                     f"out-{name}-{run}", "job.yaml"], work)
                if status != 0:
                    raise SystemExit(f"{name} failed the benchmark job (exit {status}); see {work}")
                walls.append(wall)
                peaks.append(peak)
            validations = [measure(base + ["--job-id", "1", "--validate", "job.yaml"], work)[0]
                           for _ in range(RUNS * 2)]
            figures[f"{name}: job wall time (s)"] = statistics.median(walls)
            figures[f"{name}: job overhead (s)"] = statistics.median(walls) - figures["boot-to-prompt (s)"]
            figures[f"{name}: peak RSS (MB)"] = statistics.median(peaks) / 1024
            figures[f"{name}: --validate (s)"] = statistics.median(validations)
    finally:
        server.shutdown()
    shutil.rmtree(work, ignore_errors=True)
    print(f"runner (medians of {RUNS} runs; targets: overhead < 0.3 s, RSS < 30 MB, validate < 0.08 s)")
    for key, value in figures.items():
        print(f"  {key:38s} {value:8.3f}")
    return figures


if __name__ == "__main__":
    main()
