"""Realistic artifact stores for tests, benchmarks and demos of the site.

Jobs look like what the master stores after a LAVA-style run: meta.yaml, job.yaml, a pipeline
description, an output.yaml log of dispatcher ``info``/``debug`` lines, ``target`` console lines (kernel
boot, a shell, LAVA signals), ``input`` lines and ``results`` lines, and a results bundle with per-action
``lava`` results, test cases with measurements, and the final ``lava``/``job`` result. With ``nasty``,
user- and board-supplied text carries ``<script>``, quotes, control characters and binary bytes, so pages
can be checked for escaping.

Everything goes through the real record API (``results``) and the real store, and is deterministic for
a given seed (golden files depend on it).
"""

from __future__ import annotations

import datetime as _dt
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import yaml

from results.bundle import BundleHeader, dump_bundle
from results.log import LogRecord
from results.logfile import LogFile
from results.record import Result, action_result, job_result
from results.store import ArtifactStore

EPOCH = _dt.datetime(2023, 1, 10, 10, 0, 0)
NASTY_TEXT = '<script>alert("pwned")</script> & "quotes" \'single\' \x00\x07\x1b[31mred\x1b[0m \x7f\x85 \ufffe'
# a console also sends broken UTF-16 (lone surrogates): only logs can carry it, a decoded job file cannot
NASTY_CONSOLE = NASTY_TEXT + " \ud800"
NASTY_CASE = "<script>alert(1)</script>"
# URLs from users that must never become links (as links they would run script in the reader's browser,
# or lead off the site unannounced), and one that must: only http(s) URLs are links. Their script renames
# the page and opens a dialog, which the browser tests watch for while they click every one of them.
HOSTILE_URLS = {
    "javascript": "javascript:alert(document.title='pwned')",
    "spaced": " \tJaVaScRiPt:alert(document.title='pwned')",
    "tabbed": "java\tscript:alert(document.title='pwned')",
    "data": "data:text/html,<script>alert(document.title='pwned')</script>",
    "vbscript": "vbscript:msgbox('pwned')",
    "protocol-relative": "//evil.example/pwned",
}
SAFE_URL = "https://ci.example.org/builds/42?log=full&step=2"

LAB = {
    "devices": [
        {
            "hostname": "qemu-01",
            "device_type": "qemu",
            "worker": "worker-a",
            "state": "Idle",
            "health": "Good",
            "tags": ["kvm"],
        },
        {
            "hostname": "qemu-02",
            "device_type": "qemu",
            "worker": "worker-a",
            "state": "Running",
            "health": "Good",
            "tags": [],
        },
        {
            "hostname": "bbb-01",
            "device_type": "beaglebone-black",
            "worker": "worker-b",
            "state": "Idle",
            "health": "Bad",
            "tags": ["usb"],
            "description": HOSTILE_URLS["protocol-relative"],
        },
    ],
    "device_types": [
        {"name": "qemu", "description": "QEMU x86_64 under TCG"},
        {"name": "beaglebone-black", "description": "BeagleBone Black (AM335x), U-Boot over TFTP"},
    ],
    "workers": [
        {"hostname": "worker-a", "state": "Online", "health": "Active", "version": "0.1.0"},
        {
            "hostname": "worker-b",
            "state": "Online",
            "health": "Active",
            "version": "0.1.0",
            "description": "https://wiki.example.org/lab/worker-b",
        },
    ],
}

# (level, name, description, timeout s, children) per device type: the shape LAVA's description has
PIPELINES = {
    "qemu": [
        (
            "1",
            "deployimages",
            "deploy images using guestfs",
            600,
            [
                (
                    "1.1",
                    "download-retry",
                    "download with retry",
                    600,
                    [("1.1.1", "http-download", "use http to download the file", 600, [])],
                ),
                (
                    "1.2",
                    "lava-overlay",
                    "add lava scripts during deployment for test shell use",
                    600,
                    [
                        ("1.2.1", "test-definition", "load test definitions into image", 600, []),
                        ("1.2.2", "compress-overlay", "Create a lava overlay tarball", 600, []),
                    ],
                ),
                ("1.3", "apply-overlay-guest", "prepare a qcow2 drive containing the overlay", 600, []),
            ],
        ),
        (
            "2",
            "boot-image-retry",
            "boot image with retry",
            300,
            [
                ("2.1", "boot-qemu-image", "boot image using QEMU command line", 300, []),
                ("2.2", "auto-login-action", "automatically login after boot using job parameters", 120, []),
                ("2.3", "expect-shell-connection", "Wait for a shell", 120, []),
                ("2.4", "export-device-env", "Exports environment variables to the device", 120, []),
            ],
        ),
        (
            "3",
            "lava-test-retry",
            "Retry support for Lava Test Shell",
            600,
            [("3.1", "lava-test-shell", "Executing lava-test-runner", 600, [])],
        ),
        (
            "4",
            "finalize",
            "finish the process and cleanup",
            30,
            [("4.1", "power-off", "discontinue power to device", 10, [])],
        ),
    ],
    "beaglebone-black": [
        (
            "1",
            "tftp-deploy",
            "download files and deploy using tftp",
            300,
            [
                (
                    "1.1",
                    "download-retry",
                    "download with retry",
                    300,
                    [("1.1.1", "http-download", "use http to download the file", 300, [])],
                ),
                (
                    "1.2",
                    "prepare-tftp-overlay",
                    "extract ramdisk or nfsrootfs in preparation for lava overlay",
                    300,
                    [
                        ("1.2.1", "lava-overlay", "add lava scripts during deployment for test shell use", 300, []),
                        ("1.2.2", "compress-ramdisk", "recreate a ramdisk with the overlay applied.", 300, []),
                    ],
                ),
                ("1.3", "deploy-device-env", "deploy device environment", 300, []),
            ],
        ),
        (
            "2",
            "uboot-action",
            "interactive uboot action",
            180,
            [
                ("2.1", "uboot-from-media", "uboot commands from media", 180, []),
                ("2.2", "bootloader-overlay", "substitute job data into bootloader command list", 180, []),
                ("2.3", "connect-device", "use the configured command to connect serial to the device", 180, []),
                (
                    "2.4",
                    "uboot-commands",
                    "interactive uboot commands action",
                    180,
                    [
                        ("2.4.1", "reset-device", "reboot or power-cycle the device", 30, []),
                        ("2.4.2", "bootloader-interrupt", "interrupt bootloader", 30, []),
                        ("2.4.3", "bootloader-commands", "send commands to bootloader", 180, []),
                        ("2.4.4", "auto-login-action", "automatically login after boot", 120, []),
                    ],
                ),
            ],
        ),
        (
            "3",
            "lava-test-retry",
            "Retry support for Lava Test Shell",
            600,
            [("3.1", "lava-test-shell", "Executing lava-test-runner", 600, [])],
        ),
        (
            "4",
            "finalize",
            "finish the process and cleanup",
            30,
            [("4.1", "power-off", "discontinue power to device", 10, [])],
        ),
    ],
}

SMOKE_CASES = (
    "linux-posix-pwd",
    "linux-posix-uname",
    "linux-posix-vmstat",
    "linux-posix-ifconfig",
    "linux-posix-lscpu",
    "linux-posix-lsb_release",
    "linux-posix-ls",
    "linux-posix-date",
)
BENCH_CASES = (
    ("dhrystone", "DMIPS"),
    ("memcpy-bandwidth", "MB/s"),
    ("boot-time", "s"),
    ("ctx-switch", "us"),
    ("fork-latency", "us"),
)


@dataclass
class JobSpec:
    """What one generated job looks like."""

    job_id: int
    device_type: str = "qemu"
    device: str = "qemu-01"
    worker: str = "worker-a"
    outcome: str = "complete"  # complete, incomplete, canceled, running
    cases: int = 20
    log_lines: int = 300
    nasty: bool = False
    visibility: str = "public"


def _walk(actions: list, out: list) -> list:
    for level, name, description, timeout, children in actions:
        out.append((level, name, description, timeout))
        _walk(children, out)
    return out


def description_of(device_type: str) -> list:
    """The pipeline description (LAVA's nested shape) of a generated job on ``device_type``."""

    def node(level: str, name: str, description: str, timeout: int, children: list) -> dict:
        data = {
            "class": f"actions.{name.replace('-', '_')}",
            "description": description,
            "level": level,
            "name": name,
            "summary": name.replace("-", " "),
            "timeout": timeout,
        }
        if children:
            data["pipeline"] = [node(*child) for child in children]
        return data

    return [node(*action) for action in PIPELINES[device_type]]


def _definition(spec: JobSpec, name: str) -> str:
    data = {
        "job_name": name,
        "device_type": spec.device_type,
        "priority": "medium",
        "visibility": spec.visibility,
        "timeouts": {"job": {"minutes": 30}, "action": {"minutes": 5}},
        "metadata": {
            "build": f"v6.1-rc{spec.job_id % 8}",
            "branch": "mainline",
            "note": NASTY_TEXT if spec.nasty else "nightly run",
            **({"build-url": SAFE_URL, "homepage": HOSTILE_URLS["spaced"], "tracker": HOSTILE_URLS["data"]}
               if spec.nasty else {}),
        },
        "actions": [
            {"deploy": {"to": "tmpfs", "images": {"rootfs": {"url": "http://127.0.0.1/rootfs.img"}}}},
            {"boot": {"method": "qemu", "media": "tmpfs", "prompts": ["/ # "]}},
            {"test": {"definitions": [{"from": "inline", "name": "smoke-tests", "path": "inline/smoke.yaml"}]}},
        ],
    }
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)


class _Clock:
    """Deterministic timestamps: each tick moves a few milliseconds."""

    def __init__(self, start: _dt.datetime, rng: random.Random) -> None:
        self.now = start
        self.rng = rng

    def tick(self, most_ms: int = 40) -> str:
        self.now += _dt.timedelta(microseconds=self.rng.randint(50, most_ms * 1000))
        return self.now.isoformat(timespec="microseconds")


def _results_and_log(spec: JobSpec, rng: random.Random, start: _dt.datetime) -> tuple[list, list, _dt.datetime]:
    """The job's results and log records, in the order a run produces them."""
    job = str(spec.job_id)
    clock = _Clock(start, rng)
    records: list[LogRecord] = []
    results: list[Result] = []
    actions = _walk(PIPELINES[spec.device_type], [])
    budget = max(spec.log_lines, len(actions) * 4 + spec.cases * 3 + 10)
    filler = budget - (len(actions) * 3 + spec.cases * 2 + 6)

    def add(lvl: str, msg: object, most_ms: int = 40) -> None:
        records.append(LogRecord(clock.tick(most_ms), lvl, msg))

    add("info", f"lava-dispatcher, installed at version: 2023.01 (pumice job {job})")
    add("info", "start: 0 validate")
    add("info", "validate duration: 0.02")
    test_level = next(level for level, name, *_ in actions if name == "lava-test-shell")
    fail_at = None
    if spec.outcome == "incomplete":
        fail_at = rng.choice([level for level, *_ in actions if level.startswith("2.")])
    stop = spec.outcome in ("running", "canceled")
    per_action = max(0, filler // max(1, len(actions)))

    def run(level: str, name: str, timeout: int, children: list) -> bool:
        """One action as LAVA logs it: start, its own lines, its sub-actions, end, result. True if it failed."""
        begun = clock.now
        add("info", f"start: {level} {name} (timeout {_dt.timedelta(seconds=timeout)}) [common]")
        if level == test_level:
            _test_shell(spec, rng, add, results, job, level, per_action)
        else:
            for n in range(per_action):
                if level.startswith("2.") and n % 3:
                    line = f"[{n * 0.0123:12.6f}] " + rng.choice(_BOOT_LINES)
                    if spec.nasty and n == 4:
                        line = "serial noise: " + NASTY_CONSOLE
                    add("target", line, 5)
                elif level.startswith("2.") and n % 7 == 0:
                    add("input", rng.choice(("setenv autoload no", "dhcp", "bootz 0x82000000 - 0x88000000", "root")))
                else:
                    add("debug", f"{name}: {rng.choice(_DEBUG_LINES)}")
        failed = level == fail_at
        if failed:
            add("error", f"{name} timed out after {timeout} seconds")
        for child_level, child_name, _description, child_timeout, grandchildren in children:
            if run(child_level, child_name, child_timeout, grandchildren):
                failed = True
                break
            if stop and child_level.startswith("2."):
                break
        duration = max(0.01, (clock.now - begun).total_seconds())
        add("info", f"end: {level} {name} (duration {_dt.timedelta(seconds=round(duration))}) [common]")
        extra = {}
        if spec.nasty and name == "http-download":  # a job definition's image URL
            extra = {"url": HOSTILE_URLS["vbscript"]}
        elif spec.nasty and name == "test-definition":
            extra = {"repository": HOSTILE_URLS["tabbed"], "path": "<b>smoke</b>.yaml"}
        result = action_result(
            job, level, name, "fail" if failed else "pass", duration, timeout, namespace="common", **extra
        )
        results.append(result)
        add(
            "results",
            {
                "case": name,
                "definition": "lava",
                "duration": f"{duration:.2f}",
                "extra": extra,
                "level": level,
                "namespace": "common",
                "result": result.result,
            },
        )
        return failed

    for level, name, _description, timeout, children in PIPELINES[spec.device_type]:
        if run(level, name, timeout, children) or (stop and level == "2"):
            break
    if spec.outcome == "running":
        return results, records, clock.now
    if spec.outcome == "canceled":
        add("error", "Canceled: the job was canceled by its submitter")
        final = job_result(job, "fail", "Canceled", "Canceled by user")
    elif spec.outcome == "incomplete":
        final = job_result(
            job, "fail", "InfrastructureError", f"{spec.device}: bootloader-interrupt timed out after 30 seconds"
        )
    else:
        final = job_result(job, "pass")
    results.insert(0, final)
    add(
        "results",
        {
            "case": "job",
            "definition": "lava",
            "result": final.result,
            **({"error_type": final.extra["error_type"]} if final.extra else {}),
        },
    )
    add("info", "Root tmp directory removed at /var/lib/lava/dispatcher/tmp/" + job)
    return results, records, clock.now


def _test_shell(spec: JobSpec, rng: random.Random, add, results: list, job: str, level: str, filler: int) -> None:
    suites = ("0_smoke-tests", "1_benchmarks")
    per_case_noise = max(0, filler // max(1, spec.cases))
    case_no = 0
    for index, suite in enumerate(suites):
        count = spec.cases // 2 if index == 0 else spec.cases - spec.cases // 2
        add("target", f"<LAVA_SIGNAL_STARTRUN {suite} {job}_1.{level}.{index}>")
        for n in range(count):
            case_no += 1
            for _ in range(per_case_noise):
                add("target", rng.choice(_SHELL_LINES), 3)
            measurement = units = None
            if suite == "0_smoke-tests":
                case = SMOKE_CASES[n % len(SMOKE_CASES)] + (f"-{n // len(SMOKE_CASES)}" if n >= 8 else "")
                if spec.nasty and n == 1:
                    case = NASTY_CASE
                result = "fail" if rng.random() < 0.06 else ("skip" if rng.random() < 0.03 else "pass")
                set_name = "basic" if n < 4 else None
            else:
                name, units = BENCH_CASES[n % len(BENCH_CASES)]
                case = name + (f"-{n // len(BENCH_CASES)}" if n >= len(BENCH_CASES) else "")
                measurement = round(rng.gauss(100 + 10 * (n % 5), 4), 3)
                result = "pass"
                set_name = None
            signal = f"<LAVA_SIGNAL_TESTCASE TEST_CASE_ID={case} RESULT={result}"
            if measurement is not None:
                signal += f" MEASUREMENT={measurement} UNITS={units}"
            add("target", signal + ">")
            extra = {}
            if spec.nasty and index == 0 and n in (1, 2):  # lava-test-reference: hostile, then safe
                extra = {"reference": HOSTILE_URLS["javascript"] if n == 1 else SAFE_URL}
            results.append(
                Result(
                    job=job,
                    level=level,
                    suite=suite,
                    case=case,
                    result=result,
                    measurement=measurement,
                    units=units,
                    set=set_name,
                    extra=extra,
                )
            )
            msg = {"case": case, "definition": suite, "result": result}
            if measurement is not None:
                msg.update(measurement=measurement, units=units)
            if extra:
                msg["extra"] = extra
            add("results", msg)
        add("target", f"<LAVA_SIGNAL_ENDRUN {suite} {job}_1.{level}.{index}>")
    add("target", "<LAVA_TEST_RUNNER EXIT>")


_BOOT_LINES = (
    "Linux version 6.1.0-13-amd64 (debian-kernel@lists.debian.org) (gcc-12 (Debian 12.2.0-14) 12.2.0)",
    "Command line: console=ttyS0,115200 root=/dev/ram0 ip=dhcp",
    "x86/fpu: x87 FPU will use FXSAVE",
    "Memory: 1001344K/1048056K available (14336K kernel code, 2396K rwdata)",
    "smp: Bringing up secondary CPUs ...",
    "Freeing unused kernel image (initmem) memory: 2768K",
    "Run /init as init process",
    "e1000 0000:00:03.0 eth0: (PCI:33MHz:32-bit) 52:54:00:12:34:56",
    "EXT4-fs (vda): mounted filesystem with ordered data mode. Quota mode: none.",
    "random: crng init done",
)
_DEBUG_LINES = (
    "downloading http://127.0.0.1:8000/images/rootfs.cpio.gz",
    "connecting to NBD server",
    "Using /var/lib/lava/dispatcher/tmp as temporary directory",
    "Calling: 'nice' 'mkimage' '-A' 'arm' '-T' 'ramdisk' '-C' 'none' '-d'",
    "Parsed boot commands: setenv autoload no; dhcp; tftp 0x82000000 zImage",
    "Setting prompt string to ['=> ', '/ # ']",
    "Sending with 10 millisecond of delay",
    "md5sum of downloaded content: 3e9ef4e4a1f2b03f8d1ad3e0a1c1b6d2",
)
_SHELL_LINES = (
    "/ # ",
    "+ pwd",
    "/lava-1/0/tests/0_smoke-tests",
    "+ uname -a",
    "Linux qemu 6.1.0-13-amd64 #1 SMP PREEMPT_DYNAMIC Debian 6.1.55-1 x86_64 GNU/Linux",
    "procs -----------memory---------- ---swap-- -----io---- -system-- ------cpu-----",
    " 1  0      0 912344   8112  52360    0    0    12     0   45   67  1  2 97  0  0",
)


def make_job(store: ArtifactStore, spec: JobSpec, seed: int = 0, name: str | None = None) -> None:
    """Write one job (definition, meta, description, log, results) into ``store``."""
    rng = random.Random(seed * 100003 + spec.job_id)
    name = name or f"{spec.device_type} smoke #{spec.job_id}"
    if spec.nasty:
        name = f'nasty <script>alert("job")</script> & "{spec.job_id}"'
    submit = EPOCH + _dt.timedelta(minutes=7 * spec.job_id)
    start = submit + _dt.timedelta(seconds=rng.randint(1, 90))
    results, records, end = _results_and_log(spec, rng, start)
    store.write_definition(spec.job_id, _definition(spec, name))
    store.write_file(spec.job_id, "description.yaml", yaml.safe_dump(description_of(spec.device_type), sort_keys=False))
    with store.log(spec.job_id) as log:
        log.append(records)
    if spec.outcome != "running":
        store.write_file(spec.job_id, "results.yaml", dump_bundle(str(spec.job_id), results))
    finished = spec.outcome != "running"
    health = {"complete": "Complete", "incomplete": "Incomplete", "canceled": "Canceled"}.get(spec.outcome, "Unknown")
    failure = {
        "incomplete": "InfrastructureError: bootloader-interrupt timed out after 30 seconds",
        "canceled": "Canceled by user",
    }.get(spec.outcome)
    store.write_meta(
        spec.job_id,
        {
            "id": spec.job_id,
            "name": name,
            "description": NASTY_TEXT if spec.nasty else None,
            "submitter": '"><img src=x onerror=alert(1)>' if spec.nasty else "alice",
            "device_type": spec.device_type,
            "device": spec.device,
            "worker": spec.worker,
            "tags": ["kvm"] if spec.device_type == "qemu" else [],
            "priority": 50,
            "visibility": spec.visibility,
            "state": "Finished" if finished else "Running",
            "health": health,
            "submit_time": submit.isoformat(),
            "start_time": start.isoformat(),
            "end_time": end.replace(microsecond=0).isoformat() if finished else None,
            "failure_comment": failure,
            "health_check": spec.job_id % 10 == 0,
            "source": None,
        },
    )


def default_specs(
    count: int, cases: int = 20, log_lines: int = 300, nasty: bool = True, first_id: int = 1
) -> list[JobSpec]:
    """A mix of jobs: mostly complete, some incomplete/canceled, one running, one private, one nasty."""
    devices = [
        ("qemu", "qemu-01", "worker-a"),
        ("qemu", "qemu-02", "worker-a"),
        ("beaglebone-black", "bbb-01", "worker-b"),
    ]
    specs = []
    for n in range(count):
        job_id = first_id + n
        device_type, device, worker = devices[n % len(devices)]
        outcome = "complete"
        if n % 9 == 4:
            outcome = "incomplete"
        elif n % 13 == 7:
            outcome = "canceled"
        if count > 3 and n == count - 1:
            outcome = "running"
        specs.append(
            JobSpec(
                job_id,
                device_type,
                device,
                worker,
                outcome,
                cases,
                log_lines,
                nasty=nasty and n == 1,
                visibility="personal" if count > 5 and n == 5 else "public",
            )
        )
    return specs


def make_store(
    root: str | os.PathLike,
    count: int = 8,
    *,
    cases: int = 20,
    log_lines: int = 300,
    nasty: bool = True,
    seed: int = 0,
    variants: int = 0,
    first_id: int = 1,
) -> ArtifactStore:
    """A store of ``count`` generated jobs plus lab.yaml.

    With ``variants`` > 0 only that many distinct logs are generated and the other jobs reuse them (a
    copy of output.yaml and its index): the site does the same work, the fixture is built much faster;
    the jobs then have that many names, as a lab runs the same job definitions again and again.
    """
    store = ArtifactStore(root)
    store.write_lab(LAB)
    specs = default_specs(count, cases, log_lines, nasty, first_id)
    for index, spec in enumerate(specs):
        name = f"{spec.device_type} smoke #{first_id + index % variants}" if variants else None
        if variants and index >= variants and spec.outcome != "running":
            source = specs[index % variants]
            if source.outcome == spec.outcome and source.device_type == spec.device_type:
                make_job_like(store, spec, source, seed, name)
                continue
        make_job(store, spec, seed, name)
    return store


def make_job_like(store: ArtifactStore, spec: JobSpec, source: JobSpec, seed: int = 0, name: str | None = None) -> None:
    """Like :func:`make_job`, but the log is a copy of an already generated job's log (fast)."""
    rng = random.Random(seed * 100003 + spec.job_id)
    results, _records, _end = _results_and_log(
        JobSpec(
            spec.job_id,
            spec.device_type,
            spec.device,
            spec.worker,
            spec.outcome,
            spec.cases,
            0,
            spec.nasty,
            spec.visibility,
        ),
        rng,
        EPOCH,
    )
    target = store.job_dir(spec.job_id)
    target.mkdir(parents=True, exist_ok=True)
    for name in ("output.yaml", "output.idx"):
        shutil.copyfile(store.job_dir(source.job_id) / name, target / name)
    store.write_definition(spec.job_id, store.read_file(source.job_id, "job.yaml") or "")
    store.write_file(spec.job_id, "description.yaml", store.read_file(source.job_id, "description.yaml") or "")
    if spec.outcome != "running":
        store.write_file(spec.job_id, "results.yaml", dump_bundle(str(spec.job_id), results))
    meta = store.read_meta(source.job_id)
    offset = _dt.timedelta(minutes=7 * (spec.job_id - source.job_id))
    for key in ("submit_time", "start_time", "end_time"):
        if meta.get(key):
            meta[key] = (_dt.datetime.fromisoformat(str(meta[key])) + offset).isoformat()
    meta.update(
        id=spec.job_id,
        name=name or f"{spec.device_type} smoke #{spec.job_id}",
        device=spec.device,
        worker=spec.worker,
        health_check=spec.job_id % 10 == 0,
        visibility=spec.visibility,
    )
    store.write_meta(spec.job_id, meta)


def append_log(path: Path, records: list[LogRecord]) -> int:
    """Append records to a job log (used by tests that grow a running job's log)."""
    with LogFile(path) as log:
        return log.append(records)


def hostile_bundle(source_url: str = HOSTILE_URLS["javascript"], safe_url: str = SAFE_URL) -> str:
    """A bundle as an attacker would upload it: its source URL is ``source_url`` and its test references
    are every one of :data:`HOSTILE_URLS`, plus one reference to ``safe_url`` that must stay a link."""
    header = BundleHeader("evil <b>lab</b>", source_url, "0b5e55ed-0000-4000-8000-00000000a11c")
    results = [job_result("1", "pass")]
    for name, url in [*HOSTILE_URLS.items(), ("safe", safe_url)]:
        results.append(
            Result(
                job="1", level="3.1", suite="0_references", case=f"ref-{name}", result="pass", extra={"reference": url}
            )
        )
    return dump_bundle("1", results, header)


def make_lab_model(devices: int = 200, workers: int = 20, running: int = 50, queued: int = 200) -> dict:
    """A lab-now model of the shape the master hands :func:`sitegen.publish_lab` (for benches and
    tests that need a big lab without a master): every tenth device Bad or Maintenance, one worker
    offline, transitions on the unhealthy devices."""
    healths = ["Good"] * 8 + ["Bad", "Maintenance"]
    stamp = "2024-05-01T10:00:00.000000Z"
    lab_workers = [{"hostname": f"worker-{w:02d}", "state": "Offline" if w == 0 else "Online", "health": "Active",
                    "last_seen": stamp, "version": "0.1.0"} for w in range(workers)]
    lab_devices = []
    for d in range(devices):
        health = healths[d % len(healths)]
        lab_devices.append({
            "hostname": f"board-{d:03d}", "device_type": f"type-{d % 10}", "worker": f"worker-{d % workers:02d}",
            "state": "Running" if d < running else "Idle", "health": health, "tags": ["usb"] if d % 3 else [],
            "transitions": [] if health == "Good" else [
                {"time": stamp, "old": "Good", "new": health, "reason": "set by admin", "job": None}],
            "health_checks": [],
        })

    def job(n: int, state: str) -> dict:
        return {"id": n, "name": f"job {n}", "state": state, "priority": 50, "submit_time": stamp,
                "start_time": stamp if state == "Running" else None, "device_type": f"type-{n % 10}",
                "tags": ["usb"] if n % 2 else [], "device": f"board-{n % devices:03d}" if state == "Running" else None,
                "worker": f"worker-{n % workers:02d}" if state == "Running" else None, "submitter": "alice",
                "health_check": False, "why": f"all usable devices of type type-{n % 10} are busy"}

    return {
        "as_of": stamp, "instance": "bench.example.org",
        "device_types": [{"name": f"type-{t}", "health_check": False} for t in range(10)],
        "devices": lab_devices, "workers": lab_workers,
        "running": [job(n, "Running") for n in range(1, running + 1)], "running_private": 0,
        "queued": [job(n, "Submitted") for n in range(running + 1, running + queued + 1)],
        "queued_total": queued, "queued_private": 0,
    }
