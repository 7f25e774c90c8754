"""``lavacli`` (from PyPI, a real subprocess with its own HOME) against a live master at /RPC2: the
master (``pumice-master serve`` with its broker) and ``pumice-agent`` run as processes, and the job
runs for real on the QEMU x86_64 DUT. Every command's output is checked, not only its status."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from conftest import allowing

from agent import __version__

DATA = Path(__file__).parent / "data"
BIN = Path(sys.executable).parent
LAVACLI = BIN / "lavacli"
pytestmark = [pytest.mark.qemu, pytest.mark.timeout(900)]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class LiveLab:
    url: str
    data: Path
    home: Path
    master_log: Path
    tokens: dict[str, str]
    job_file: Path
    dictionary: str

    def lavacli(self, *args: str, ok: bool = True, identity: str | None = None,
                timeout: float = 60) -> subprocess.CompletedProcess:
        """Run lavacli with the lab's HOME (its ~/.config/lavacli.yaml); ok: must exit 0."""
        env = {k: v for k, v in os.environ.items() if k != "XDG_CONFIG_HOME"}
        env.update(HOME=str(self.home), NO_COLOR="1")
        env.pop("FORCE_COLOR", None)
        argv = [str(LAVACLI)] + (["-i", identity] if identity else []) + list(args)
        done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout)
        if ok:
            assert done.returncode == 0, f"lavacli {' '.join(args)}: {done.returncode}\n{done.stdout}\n{done.stderr}"
        else:
            assert done.returncode != 0, f"lavacli {' '.join(args)} should fail:\n{done.stdout}"
        return done


def _master_cli(data: Path, *args: str) -> str:
    done = subprocess.run([str(BIN / "pumice-master"), "--data", str(data), *args], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, f"pumice-master {' '.join(args)}: {done.stderr}"
    return done.stdout.strip()


def _wait(what: str, condition, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if condition():
                return
        except OSError:
            pass
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        time.sleep(0.2)


@pytest.fixture(scope="module")
def live(dut_images, http_server, tmp_path_factory) -> Iterator[LiveLab]:
    if not LAVACLI.exists():
        pytest.fail(f"lavacli is not installed in {BIN}: pip install -e '.[dev]' (it is in the dev extra)")
    root = tmp_path_factory.mktemp("lavacli")
    data, spool, home = root / "master", root / "agent", root / "home"
    home.mkdir()
    dictionary = (DATA / "qemu-amd64.jinja2").read_text()
    _master_cli(data, "db", "migrate")
    added = _master_cli(data, "workers", "add", "w1", "--description", "the lab box")
    join_token = next(line.split()[-1] for line in added.splitlines() if line.startswith("join token: "))
    _master_cli(data, "device-types", "add", "qemu")
    _master_cli(data, "devices", "add", "qemu01", "--type", "qemu", "--worker", "w1", "--health", "Good",
                "--dictionary", str(DATA / "qemu-amd64.jinja2"))
    tokens = {"admin": _master_cli(data, "tokens", "create", "--user", "admin", "--admin").split()[-1],
              "alice": _master_cli(data, "tokens", "create", "--user", "alice").split()[-1]}

    for name, source in (("vmlinuz", dut_images.amd64.kernel), ("initramfs.cpio.gz", dut_images.amd64.ramdisk)):
        shutil.copyfile(source, http_server.root / name)
    job = (DATA / "smoke-job.yaml").read_text()
    job = job.replace("@KERNEL_URL@", http_server.url("vmlinuz"))
    job = job.replace("@RAMDISK_URL@", http_server.url("initramfs.cpio.gz"))
    job = job.replace("@KERNEL_SHA256@", hashlib.sha256((http_server.root / "vmlinuz").read_bytes()).hexdigest())
    job_file = root / "job.yaml"
    job_file.write_text(job)

    http_port, broker_port = free_port(), free_port()
    url = f"http://127.0.0.1:{http_port}"
    master_log = root / "master.log"
    processes = [subprocess.Popen(
        [sys.executable, "-m", "master.cli", "--data", str(data), "serve", "--http", f"127.0.0.1:{http_port}",
         "--broker", f"tcp://127.0.0.1:{broker_port}", "--scheduler-interval", "2"],
        stdout=master_log.open("w"), stderr=subprocess.STDOUT)]  # noqa: SIM115
    try:
        _wait("the master", lambda: socket.create_connection(("127.0.0.1", http_port), 1).close() or True, 30)
        processes.append(subprocess.Popen(
            [str(BIN / "pumice-agent"), "--master", f"tcp://127.0.0.1:{broker_port}", "--hostname", "w1",
             "--spool", str(spool), "--join", join_token, "--url", url],
            stdout=(root / "agent.log").open("w"), stderr=subprocess.STDOUT))  # noqa: SIM115
        lab = LiveLab(url, data, home, master_log, tokens, job_file, dictionary)
        yield lab
    finally:
        for process in reversed(processes):
            process.terminate()
        for process in processes:
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)


@pytest.fixture(scope="module")
def job_id(live: LiveLab, http_server) -> int:
    """The smoke job, submitted with lavacli and run to its end on the QEMU DUT."""
    live.lavacli("identities", "add", "--uri", f"{live.url}/RPC2", "--username", "admin", "--token",
                 live.tokens["admin"], "default")
    # the worker's file policy lets the job download the board's files from this machine
    config = live.home / "dispatcher.yaml"
    config.write_text(yaml.safe_dump(allowing(addresses=[http_server.address])))
    live.lavacli("workers", "config", "set", "w1", str(config))
    # the worker must be online before the job can run (lavacli shows the state)
    _wait("worker w1 online", lambda: "state       : Online" in live.lavacli("workers", "show", "w1").stdout, 60)
    out = live.lavacli("jobs", "submit", str(live.job_file)).stdout
    assert out.strip().isdigit(), out
    number = int(out)
    waited = live.lavacli("jobs", "wait", str(number), "--polling", "1", "--timeout", "600", timeout=660)
    assert "Running" in waited.stdout, waited.stdout
    return number


def test_identities_and_system(live: LiveLab, job_id: int) -> None:
    config = yaml.safe_load((live.home / ".config" / "lavacli.yaml").read_text())
    assert config["default"] == {"uri": f"{live.url}/RPC2", "username": "admin", "token": live.tokens["admin"]}
    assert "* default" in live.lavacli("identities", "list").stdout
    assert live.lavacli("system", "version").stdout.strip() == __version__
    assert live.lavacli("system", "whoami").stdout.strip() == "admin"
    methods = live.lavacli("system", "methods", "list").stdout.split()
    assert "scheduler.jobs.submit" in methods and "scheduler.workers.get_env" in methods


def test_jobs_show_logs_definition_results(live: LiveLab, job_id: int) -> None:
    plain = live.lavacli("jobs", "show", str(job_id)).stdout
    for line in (f"id          : {job_id}", "description : pumice smoke test", "submitter   : admin",
                 "device-type : qemu", "device      : qemu01", "state       : Finished",
                 "Health      : Complete", "visibility  : Public"):
        assert line in plain, plain
    shown = json.loads(live.lavacli("jobs", "show", str(job_id), "--json").stdout)
    assert (shown["id"], shown["state"], shown["health"], shown["device"]) == (job_id, "Finished", "Complete",
                                                                               "qemu01")
    assert shown["submit_time"] <= shown["start_time"] <= shown["end_time"]  # XML-RPC dateTime values
    assert shown["error_type"] is None
    assert yaml.safe_load(live.lavacli("jobs", "show", str(job_id), "--yaml").stdout) == shown

    logs = live.lavacli("jobs", "logs", str(job_id)).stdout
    assert "lava-test-case always-pass" in logs or "always-pass" in logs
    assert "Linux version" in logs  # the DUT's console
    raw = yaml.safe_load(live.lavacli("jobs", "logs", str(job_id), "--raw", "--start", "2", "--end", "7").stdout)
    assert len(raw) == 5 and all({"dt", "lvl", "msg"} <= set(record) for record in raw)
    assert live.lavacli("jobs", "definition", str(job_id)).stdout == live.job_file.read_text() + "\n"

    results = live.lavacli("results", str(job_id)).stdout
    for line in ("* 0_smoke.always-pass [pass]", "* 0_smoke.always-fail [fail]", "* 0_smoke.boot-time [pass]",
                 "* 1_parsed.case-one [pass]", "* 1_parsed.case-two [fail]", "* lava.job [pass]"):
        assert line in results, results
    suite = yaml.safe_load(live.lavacli("results", str(job_id), "0_smoke", "--yaml").stdout)
    measured = next(r for r in suite if r["name"] == "boot-time")
    assert (measured["measurement"], measured["unit"]) == ("1.5000000000", "s")  # as LAVA exports it
    assert live.lavacli("results", str(job_id), "0_smoke", "always-fail").stdout.strip() == "fail"


def test_cancel_and_device_update(live: LiveLab, job_id: int) -> None:
    # the board under maintenance: a new job stays queued until it is canceled
    live.lavacli("devices", "update", "qemu01", "--health", "MAINTENANCE")
    assert "health      : Maintenance" in live.lavacli("devices", "show", "qemu01").stdout
    queued = int(live.lavacli("jobs", "submit", str(live.job_file)).stdout)
    assert f"* {queued}: Submitted,Unknown [admin] (pumice smoke test) - qemu" in live.lavacli(
        "jobs", "list").stdout
    assert live.lavacli("jobs", "cancel", str(queued)).stdout == ""
    live.lavacli("jobs", "wait", str(queued), "--polling", "1", "--timeout", "60")
    assert "Health      : Canceled" in live.lavacli("jobs", "show", str(queued)).stdout
    live.lavacli("devices", "update", "qemu01", "--health", "GOOD")
    assert "health      : Good" in live.lavacli("devices", "show", "qemu01").stdout


def test_devices_and_device_types(live: LiveLab, job_id: int, tmp_path: Path) -> None:
    assert "* qemu01 (qemu): Idle,Good" in live.lavacli("devices", "list").stdout
    shown = live.lavacli("devices", "show", "qemu01").stdout
    for line in ("name        : qemu01", "device-type : qemu", "worker      : w1", "device-dict : True",
                 "current job : None", "tags        : []"):
        assert line in shown, shown
    assert live.lavacli("devices", "dict", "get", "qemu01").stdout == live.dictionary.rstrip("\n") + "\n"
    changed = tmp_path / "qemu01.jinja2"
    changed.write_text(live.dictionary + "{% set memory = 768 %}\n")
    live.lavacli("devices", "dict", "set", "qemu01", str(changed))
    assert "{% set memory = 768 %}" in live.lavacli("devices", "dict", "get", "qemu01").stdout
    rendered = yaml.safe_load(live.lavacli("devices", "dict", "get", "qemu01", "--render").stdout)
    assert "qemu" in rendered["actions"]["boot"]["methods"]
    changed.write_text(live.dictionary)
    live.lavacli("devices", "dict", "set", "qemu01", str(changed))

    assert "* qemu (1)" in live.lavacli("device-types", "list").stdout
    template = live.lavacli("device-types", "template", "get", "qemu").stdout
    assert "{% extends" in template or "{% block" in template
    site = tmp_path / "qemu.jinja2"
    site.write_text(template + "{# this lab's copy #}\n")
    live.lavacli("device-types", "template", "set", "qemu", str(site))
    assert live.lavacli("device-types", "template", "get", "qemu").stdout.endswith("{# this lab's copy #}\n")
    live.lavacli("device-types", "template", "delete", "qemu")
    assert live.lavacli("device-types", "template", "get", "qemu").stdout == template


def test_workers(live: LiveLab, job_id: int, tmp_path: Path) -> None:
    assert live.lavacli("workers", "list").stdout == "Workers:\n* w1\n"
    shown = live.lavacli("workers", "show", "w1").stdout
    for line in ("hostname    : w1", "description : the lab box", "state       : Online", "health      : Active",
                 "devices     : qemu01", "job limit   : 0", f"version     : {__version__}"):
        assert line in shown, shown
    live.lavacli("workers", "add", "w2", "--description", "spare box")
    live.lavacli("workers", "update", "w2", "--health", "MAINTENANCE", "--job-limit", "3")
    shown = live.lavacli("workers", "show", "w2").stdout
    for line in ("description : spare box", "state       : Offline", "health      : Maintenance",
                 "job limit   : 3", "last ping   : 19700101T00:00:00"):
        assert line in shown, shown
    shown = json.loads(live.lavacli("workers", "show", "w2", "--json").stdout)
    assert (shown["hostname"], shown["last_ping"]) == ("w2", "19700101T00:00:00")
    assert live.lavacli("workers", "list").stdout == "Workers:\n* w1\n* w2\n"
    env = tmp_path / "env.yaml"
    env.write_text("overrides:\n  http_proxy: http://proxy.lab:3128\n")
    live.lavacli("workers", "env", "set", "w2", str(env))
    assert live.lavacli("workers", "env", "get", "w2").stdout == env.read_text()


def test_errors_are_clear_and_harmless(live: LiveLab, job_id: int, tmp_path: Path) -> None:
    live.lavacli("identities", "add", "--uri", f"{live.url}/RPC2", "--username", "admin", "--token", "wrong",
                 "typo")
    done = live.lavacli("system", "version", identity="typo", ok=False)
    assert "Unable to connect: <Fault 401: \"invalid token for user 'admin'" in done.stderr, done.stderr
    live.lavacli("identities", "add", "--uri", f"{live.url}/RPC2", "--username", "alice", "--token",
                 live.tokens["alice"], "alice")
    done = live.lavacli("workers", "add", "w9", identity="alice", ok=False)
    assert "Unable to call 'workers.add': <Fault 403: 'only admins may add workers" in done.stderr, done.stderr
    done = live.lavacli("jobs", "config", str(job_id), "--dest", str(tmp_path), ok=False)
    assert "<Fault -32601: \"no such method 'scheduler.jobs.configuration'" in done.stderr, done.stderr
    done = live.lavacli("jobs", "show", "not-a-number", ok=False)
    assert "<Fault 404: \"bad job id 'not-a-number': a job id is a number\">" in done.stderr, done.stderr
    done = live.lavacli("devices", "show", "nope", ok=False)
    assert "<Fault 404: \"no device 'nope'\">" in done.stderr, done.stderr
    broken = tmp_path / "broken.yaml"
    broken.write_text(live.job_file.read_text().replace("method: qemu", "method: foo"))
    done = live.lavacli("jobs", "submit", str(broken), ok=False)
    expected = f"Unable to submit {broken}: <Fault 400: \"invalid job definition: actions[1].boot.method (line"
    assert expected in done.stderr, done.stderr
    assert "unknown boot method 'foo'" in done.stderr
    assert "key: actions[1].boot.method" in live.lavacli("jobs", "validate", str(broken), ok=False).stdout
    done = live.lavacli("devices", "dict", "set", "qemu01", str(broken), ok=False)
    assert "Unable to call 'devices.dict': <Fault 400: \"device dictionary of qemu01 is not valid" in done.stderr, \
        done.stderr

    # the server logged each refusal; nothing else changed
    log = live.master_log.read_text()
    for line in ("XML-RPC system.version by anonymous: fault 401: invalid token for user 'admin'",
                 "XML-RPC scheduler.workers.add by alice: fault 403",
                 "XML-RPC scheduler.jobs.configuration by admin: fault -32601",
                 "XML-RPC scheduler.jobs.show by admin: fault 404",
                 "XML-RPC scheduler.jobs.submit by admin: fault 400"):
        assert line in log, line
    assert live.lavacli("system", "whoami").stdout.strip() == "admin"
    assert "w9" not in live.lavacli("workers", "list").stdout
    assert "Health      : Complete" in live.lavacli("jobs", "show", str(job_id)).stdout
    assert live.lavacli("devices", "dict", "get", "qemu01").stdout == live.dictionary.rstrip("\n") + "\n"
