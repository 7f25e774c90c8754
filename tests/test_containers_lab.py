"""Pumice itself in containers: the master (API, scheduler, broker; nginx serving the site) and a lab
box's agent, each from its image and compose file in deploy/containers/, run with podman-compose.
A job runs through the containerised agent on the emulated arm64 board outside the containers,
reached as a real lab box reaches one: its console through ser2net and telnet on the host, its power
through a network PDU, its TFTP root a directory of the host.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from boards import RAMDISK_JOB, free_port
from boards.pdu import PduServer
from conftest import ROOT, allowing

DEPLOY = ROOT / "deploy" / "containers"
PDU_PY = ROOT / "tests" / "boards" / "pdu.py"
#: podman-compose from the dev extras (Debian 12's 1.0.3 cannot run network_mode: host)
PODMAN_COMPOSE = str(Path(sys.executable).parent / "podman-compose")


def podman_names(prefix: str) -> list[str]:
    done = subprocess.run(["podman", "ps", "--all", "--format", "{{.Names}}"], capture_output=True, text=True,
                          timeout=60, check=True)
    return [name for name in done.stdout.split() if name.startswith(prefix)]


class Compose:
    """One podman-compose project (a unique name: tests run side by side) of a compose file."""

    def __init__(self, file: Path, env: dict[str, str], log: Path) -> None:
        self.file = file
        self.project = f"pumicetest{os.getpid()}{secrets.token_hex(3)}"
        self.env = {**os.environ, **env}
        self.log = log

    def __call__(self, *args: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
        done = subprocess.run([PODMAN_COMPOSE, "-p", self.project, "-f", str(self.file), *args], env=self.env,
                              capture_output=True, text=True, timeout=timeout, cwd=self.file.parent)
        with self.log.open("a") as log:
            log.write(f"$ podman-compose {' '.join(args)}\n{done.stdout}{done.stderr}\n")
        if check:
            assert done.returncode == 0, f"podman-compose {' '.join(args)}: {done.stdout}{done.stderr}"
        return done

    def container(self, service: str) -> str:
        return f"{self.project}_{service}_1"

    def exec(self, service: str, *command: str, input: str | None = None) -> str:
        done = subprocess.run(["podman", "exec", "-i", self.container(service), *command], input=input,
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, f"{' '.join(command)}: {done.stdout}{done.stderr}"
        return done.stdout

    def logs(self, service: str) -> str:
        done = subprocess.run(["podman", "logs", self.container(service)], capture_output=True, text=True,
                              timeout=60)
        return (done.stdout + done.stderr)[-4000:]

    def down(self) -> None:
        """Stop and remove the project's containers, volumes and network (podman-compose leaves the
        network behind)."""
        self("down", "--volumes", "-t", "5", check=False)
        subprocess.run(["podman", "network", "rm", "--force", f"{self.project}_default"], capture_output=True,
                       timeout=60)

    def leftovers(self) -> list[str]:
        """The project's containers, volumes and networks that still exist."""
        found = podman_names(self.project)
        for kind in ("volume", "network"):
            done = subprocess.run(["podman", kind, "ls", "--format", "{{.Name}}"], capture_output=True, text=True,
                                  timeout=60, check=True)
            found += [f"{kind} {name}" for name in done.stdout.split() if name.startswith(self.project)]
        return found


def wait_http(url: str, timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except (urllib.error.URLError, OSError) as exc:
            if time.monotonic() > end:
                raise TimeoutError(f"timed out after {timeout} s waiting for {what}: {exc}") from None
            time.sleep(0.3)


@pytest.fixture
def pdu(board) -> Iterator[str]:
    """The board's network PDU on the host: ``127.0.0.1:PORT``."""
    server = PduServer(0, board.directory)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@pytest.fixture
def master(pumice_container_images, tmp_path) -> Iterator[tuple[Compose, dict]]:
    """compose.master.yaml up: the API, the broker and the site on ephemeral ports of 127.0.0.1."""
    ports = {"http": free_port(), "broker": free_port(), "site": free_port()}
    compose = Compose(DEPLOY / "compose.master.yaml",
                      {"PUMICE_HTTP_PUBLISH": f"127.0.0.1:{ports['http']}",
                       "PUMICE_BROKER_PUBLISH": f"127.0.0.1:{ports['broker']}",
                       "PUMICE_SITE_PUBLISH": f"127.0.0.1:{ports['site']}"}, tmp_path / "compose-master.log")
    try:
        compose("up", "-d")
        wait_http(f"http://127.0.0.1:{ports['http']}/api/v0.2/system/version/", 60, "the master's API")
        yield compose, ports
    finally:
        compose.down()
    assert compose.leftovers() == []


def api(ports: dict, token: str, method: str, path: str, body: str | None = None) -> dict | str:
    request = urllib.request.Request(f"http://127.0.0.1:{ports['http']}/api/v0.2{path}", method=method,
                                     data=body.encode() if body is not None else None)
    request.add_header("Authorization", f"Token {token}")
    with urllib.request.urlopen(request, timeout=30) as response:
        text = response.read().decode()
        return json.loads(text) if response.headers.get_content_type() == "application/json" else text


def test_compose_files_are_valid_against_the_compose_specification():
    """docker-compose validates against its copy of the compose specification's JSON schema."""
    for files in (["compose.lab-box.yaml", "compose.lab-box.devices.yaml"], ["compose.master.yaml"]):
        args = [arg for name in files for arg in ("-f", str(DEPLOY / name))]
        done = subprocess.run(["docker-compose", *args, "config", "--quiet"], capture_output=True, text=True,
                              timeout=60)
        assert done.returncode == 0, done.stderr


def test_agent_image_holds_no_emulator_and_stays_small(pumice_container_images):
    agent = pumice_container_images["images"]["agent"]
    done = subprocess.run(["podman", "run", "--rm", "--entrypoint", "sh", agent["name"], "-c",
                           "ls /usr/bin | grep -c '^qemu-system' || true; git --version; telnet -h 2>&1 | head -1"],
                          capture_output=True, text=True, timeout=120)
    assert done.stdout.splitlines()[0] == "0", done.stdout
    assert "git version" in done.stdout
    # git and its libraries are 35 MB of it (perl is removed): 172.6 MB measured, 137 MB without git
    assert agent["size"] < 185e6, f"the agent image grew: {agent['size'] / 1e6:.1f} MB"


def test_a_job_runs_through_the_containerised_agent_on_a_board_outside(master, board, pdu, dut_images,
                                                                       http_server, tmp_path):
    compose, ports = master
    token = compose.exec("master", "pumice-master", "tokens", "create", "--user", "admin", "--admin").strip()
    compose.exec("master", "pumice-master", "device-types", "add", "qemu-arm64-uboot")
    printed = compose.exec("master", "pumice-master", "workers", "add", "box1")
    join = next(line.split(": ", 1)[1] for line in printed.splitlines() if line.startswith("join token: "))
    dictionary = "\n".join([
        "{% extends 'qemu-arm64-uboot.jinja2' %}",
        f"{{% set connection_command = 'telnet 127.0.0.1 {board.port}' %}}",
        f"{{% set power_on_command = 'python3 /opt/lab/pdu.py {pdu} on' %}}",
        f"{{% set power_off_command = 'python3 /opt/lab/pdu.py {pdu} off' %}}",
        f"{{% set hard_reset_command = 'python3 /opt/lab/pdu.py {pdu} reset' %}}", ""])
    compose.exec("master", "sh", "-c", "cat > /tmp/arm64-01.jinja2", input=dictionary)
    compose.exec("master", "pumice-master", "devices", "add", "arm64-01", "--type", "qemu-arm64-uboot",
                 "--worker", "box1", "--health", "Good", "--dictionary", "/tmp/arm64-01.jinja2")
    # the worker's dispatcher configuration: the board's TFTP root; jobs may fetch from the test's server
    config = allowing(addresses=[http_server.address], tftp_root=str(board.tftp_root), dispatcher_ip="10.0.2.2")
    api(ports, token, "PUT", "/workers/box1/config/", yaml.safe_dump(config))

    images = http_server.root / "arm64"
    images.mkdir(exist_ok=True)
    for path in (dut_images.arm64.kernel, dut_images.arm64.ramdisk, dut_images.arm64.dtb):
        shutil.copy(path, images / path.name)
    lab_tools = tmp_path / "lab-tools"
    lab_tools.mkdir()
    shutil.copy(PDU_PY, lab_tools / "pdu.py")

    agent = Compose(DEPLOY / "compose.lab-box.yaml",
                    {"MASTER_URL": f"tcp://127.0.0.1:{ports['broker']}", "PUMICE_HOSTNAME": "box1",
                     "PUMICE_URL": f"http://127.0.0.1:{ports['http']}", "PUMICE_JOIN_TOKEN": join,
                     "PUMICE_TFTP_ROOT": str(board.tftp_root), "PUMICE_LAB_TOOLS": str(lab_tools)},
                    tmp_path / "compose-agent.log")
    try:
        agent("up", "-d")
        job = RAMDISK_JOB
        for key, path in (("@KERNEL@", dut_images.arm64.kernel), ("@RAMDISK@", dut_images.arm64.ramdisk),
                          ("@DTB@", dut_images.arm64.dtb)):
            job = job.replace(key, http_server.url(f"arm64/{path.name}"))
        job_id = api(ports, token, "POST", "/jobs/", job)["job_ids"][0]
        end = time.monotonic() + 240
        while (record := api(ports, token, "GET", f"/jobs/{job_id}/"))["state"] != "Finished":
            assert time.monotonic() < end, (f"job {job_id} did not finish: {record}\nagent:\n{agent.logs('agent')}"
                                            f"\nmaster:\n{compose.logs('master')}")
            time.sleep(1)
        log = api(ports, token, "GET", f"/jobs/{job_id}/logs/")
        assert record["health"] == "Complete", f"{record}\n{log[-4000:]}\nagent:\n{agent.logs('agent')}"
        (tmp_path / "job-output.yaml").write_text(log)
        # power went through the network PDU, from inside the agent's container
        assert f"hard_reset: python3 /opt/lab/pdu.py {pdu} reset" in log
        assert f"PDU {pdu}: reset: ok" in log and f"PDU {pdu}: off: ok" in log
        results = api(ports, token, "GET", f"/jobs/{job_id}/results/")
        assert "arch" in str(results) and "pass" in str(results)
        # the site container serves the published job
        wait_http(f"http://127.0.0.1:{ports['site']}/jobs/{job_id}/", 30, "the job's page on the site")
        assert not board.powered()
        assert not list(board.tftp_root.glob(f"pumice-{job_id}-*"))
    finally:
        agent.down()
    assert agent.leftovers() == []
