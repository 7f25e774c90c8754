"""Benchmarks of the runner (issue 2): job overhead, peak RSS and --validate time, side by side
with LAVA's ``lava-run`` when Debian's lava-dispatcher is installed. Medians of several runs.

The job is the smoke job of the tests (kernel and gzip'd ramdisk over http, the overlay in the
ramdisk, two inline test definitions) on the QEMU x86_64 board.

Overhead is the job's wall time minus the board's boot-to-prompt time in that job: from the
runner's log, the time between the same two events for both runners, QEMU started (the record of
its command line, logged as QEMU is spawned) and the shell prompt ``/ # `` recognized. Everything
else is overhead: the runner's start, validation, downloads, overlay, the test run on the board
(under TCG each fork on the board costs milliseconds), stopping QEMU, writing the results,
exiting. Taking each job's own boot spares the figure the boot's variance (tenths of a second
under load), which is larger than the overhead itself.

For reference, the same boot without any runner is timed too (the bare boot: QEMU spawned with
the device's options, the job's kernel, command line and ramdisk as published, until the prompt),
as is each runner's boot in the job: a runner that slows the board down, or boots something
faster, shows there (lava-run boots the ramdisk gzip'd again after adding its overlay, pumice-run
boots it uncompressed, sparing the emulated board ~0.05 s of unpacking). Bare boots and jobs
alternate (boot, pumice, lava-run, boot, ...), so that a shared machine's load weighs on all alike.

Peak RSS is the runner process's own high-water mark (VmHWM, not QEMU's). ``--validate`` time is
the wall time of ``RUNNER --validate`` on the same job and device, start to exit.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pexpect
import yaml

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "tests" / "data"
CORPUS = Path(os.environ.get("PUMICE_LAVA_CORPUS", ROOT.parent / "shared" / "lava-corpus"))
RUNS = int(os.environ.get("PUMICE_BENCH_RUNS", "5"))
#: the kernel command line of the smoke job (its kernel image_arg), for the bare boot
CMDLINE = "console=ttyS0,115200 loglevel=6"
#: the board's shell prompt, the end of boot-to-prompt for the bare boot and both runners
PROMPT = "/ # "
TARGETS = "targets: overhead < 0.3 s, RSS < 30 MB, validate < 0.08 s"
#: each runner's log messages for the two ends of the boot in a job: QEMU spawned, prompt recognized
BOOT_EVENTS = {
    "pumice": (re.compile(r"boot command: "), re.compile(r"the board is at a shell prompt$")),
    "lava-run": (re.compile(r"Boot command: "), re.compile(r"Matched prompt #\d+: / # $")),
}


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


def measure(command: list[str], cwd: Path, stderr: Path | None = None) -> tuple[float, int, int]:
    """Wall time (s), peak RSS of the process itself (kB, VmHWM) and exit status; its standard
    error goes to the file ``stderr`` if given.

    The wall time ends when the process does (wait), not at the next RSS sample: the samples,
    every 10 ms, are taken by a thread. VmHWM only grows, so the last sample holds the peak unless
    it was reached in the process's last 10 ms.
    """
    with open(stderr, "wb") if stderr else contextlib.nullcontext(subprocess.DEVNULL) as err:
        start = time.monotonic()
        proc = subprocess.Popen(command, cwd=cwd, stdout=subprocess.DEVNULL, stderr=err)
    peak = 0
    status = Path(f"/proc/{proc.pid}/status")
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.wait(0.01):
            try:
                for line in status.read_text().splitlines():
                    if line.startswith("VmHWM:"):
                        peak = max(peak, int(line.split()[1]))
            except (OSError, ValueError):  # gone, or a zombie without memory
                pass

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    returncode = proc.wait()
    wall = time.monotonic() - start
    done.set()
    sampler.join()
    return wall, peak, returncode


def boot_in_job(log: Path, runner: str) -> float:
    """Seconds between the runner's records of QEMU spawned and of the prompt recognized, in its log
    (output.yaml lines ``- {...}``, or lava-run's standard error, one ``{...}`` a line)."""
    spawned_re, prompt_re = BOOT_EVENTS[runner]
    spawned = None
    for line in log.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line.removeprefix("- "))
        except ValueError:
            continue
        msg = record.get("msg") if isinstance(record, dict) else None
        if not isinstance(msg, str):
            continue
        if spawned is None and spawned_re.match(msg):
            spawned = datetime.fromisoformat(record["dt"])
        elif spawned is not None and prompt_re.match(msg):
            return (datetime.fromisoformat(record["dt"]) - spawned).total_seconds()
    raise SystemExit(f"{log}: no QEMU start and prompt records of {runner} found")


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
        child.expect_exact(PROMPT)
        return time.monotonic() - start
    finally:
        child.terminate(force=True)


def prepare(work: Path, url: str, www: Path) -> tuple[dict, dict[str, list[str]]]:
    """Write the job and device files into ``work``; return the device and each runner's command."""
    from master.devicetypes import DeviceTypes

    dictionary = (DATA / "qemu-amd64.jinja2").read_text()
    device = DeviceTypes().device_config(dictionary, context={"arch": "amd64"})
    (work / "device.yaml").write_text(yaml.safe_dump(device))
    job = (DATA / "smoke-job.yaml").read_text()
    job = job.replace("@KERNEL_URL@", f"{url}/vmlinuz").replace("@RAMDISK_URL@", f"{url}/initramfs.cpio.gz")
    job = job.replace("@KERNEL_SHA256@", hashlib.sha256((www / "vmlinuz").read_bytes()).hexdigest())
    # the ramdisk gzip'd, as published (each runner decides what it boots: see the docstring)
    job = job.replace("        format: cpio.newc\n", "        format: cpio.newc\n        compression: gz\n")
    (work / "job.yaml").write_text(job)
    # the worker's file policy lets the job download from the loopback server, nothing else of it
    (work / "dispatcher.yaml").write_text(yaml.safe_dump({"allowed_local_addresses": [url.split("//", 1)[1]]}))
    runners = {"pumice": [str(Path(sys.executable).parent / "pumice-run"), "--device", "device.yaml",
                          "--dispatcher", "dispatcher.yaml"]}
    lava = shutil.which("lava-run")
    if lava and os.geteuid() == 0:
        lava_device = DeviceTypes(template_dirs=[CORPUS / "device-types"]).device_config(
            dictionary, context={"arch": "amd64"}) if CORPUS.exists() else device
        (work / "lava-device.yaml").write_text(yaml.safe_dump(lava_device))
        runners["lava-run"] = [lava, "--device", "lava-device.yaml"]
    return device, runners


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog="How each figure is measured: the docstring of "
                                            "tools/bench_agent.py; the output sums it up.")
    parser.add_argument("--runs", type=int, default=RUNS,
                         help=f"jobs per runner, bare boots likewise (default {RUNS}, PUMICE_BENCH_RUNS)")
    parser.add_argument("--validations", type=int, default=None,
                         help="--validate runs per runner (default: twice --runs)")
    parser.add_argument("--no-lava", action="store_true", help="measure pumice-run only")
    args = parser.parse_args(argv)
    runs, validations = args.runs, args.validations or 2 * args.runs

    dut = images()
    work = Path(tempfile.mkdtemp(prefix="pumice-bench-"))
    www = work / "www"
    www.mkdir()
    for name in ("vmlinuz", "initramfs.cpio.gz"):
        shutil.copyfile(dut / name, www / name)
    server, url = serve(www)
    load = os.getloadavg()[0]
    try:
        device, runners = prepare(work, url, www)
        if args.no_lava:
            runners = {"pumice": runners["pumice"]}
        bare: list[float] = []
        walls: dict[str, list[float]] = {name: [] for name in runners}
        boots: dict[str, list[float]] = {name: [] for name in runners}
        peaks: dict[str, list[int]] = {name: [] for name in runners}
        for run in range(runs):
            bare.append(boot_to_prompt(device, www / "vmlinuz", www / "initramfs.cpio.gz", CMDLINE))
            for name, base in runners.items():
                out = work / f"out-{name}-{run}"
                # pumice-run writes its log to output.yaml, lava-run to its standard error
                log = out / "output.yaml" if name == "pumice" else work / f"stderr-{name}-{run}"
                wall, peak, status = measure(base + ["--job-id", str(100 + run), "--output-dir", str(out),
                                                     "job.yaml"], work, stderr=None if name == "pumice" else log)
                if status != 0:
                    raise SystemExit(f"{name} failed the benchmark job (exit {status}); see {work}")
                walls[name].append(wall)
                boots[name].append(boot_in_job(log, name))
                peaks[name].append(peak)
        validate: dict[str, list[float]] = {name: [] for name in runners}
        for _ in range(validations):
            for name, base in runners.items():
                validate[name].append(measure(base + ["--job-id", "1", "--validate", "job.yaml"], work)[0])
    finally:
        server.shutdown()
    shutil.rmtree(work, ignore_errors=True)

    figures: dict = {"bare boot-to-prompt (s)": statistics.median(bare)}
    for name in runners:
        figures[f"{name}: job wall time (s)"] = statistics.median(walls[name])
        figures[f"{name}: boot-to-prompt in the job (s)"] = statistics.median(boots[name])
        overheads = [wall - boot for wall, boot in zip(walls[name], boots[name], strict=True)]
        figures[f"{name}: job overhead (s)"] = statistics.median(overheads)
        figures[f"{name}: peak RSS (MB)"] = statistics.median(peaks[name]) / 1024
        figures[f"{name}: --validate (s)"] = statistics.median(validate[name])
    print(f"runner (medians of {runs} jobs and {validations} validations; {TARGETS}; "
          f"load average {load:.2f} before, {os.getloadavg()[0]:.2f} after)")
    print("  overhead = job wall time - boot-to-prompt in the job (from the runner's log: QEMU spawned ->")
    print(f"  prompt {PROMPT!r} recognized); bare boot: the job's kernel and gzip'd ramdisk, no runner")
    for key, value in figures.items():
        print(f"  {key:42s} {value:8.3f}")
    return figures


if __name__ == "__main__":
    main()
