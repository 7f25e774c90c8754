"""The U-Boot board through the whole lab: the master (REST API, scheduler, ZeroMQ broker, on
SQLite) and a real ``pumice-agent`` daemon on loopback run LAVA-format U-Boot jobs on the emulated
arm64 board, through ser2net + telnet and through the serial adaptor opened with pyserial; a board
that fails leaves the device usable for the next job.

The master runs in this process (``MasterServer`` and ``Broker``, as ``pumice-master serve`` runs
them); the agent is its own process and runs each job with ``pumice-run``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from boards import ramdisk_job

pytestmark = pytest.mark.qemu

BIN = Path(sys.executable).parent
WORKER = "lab-worker"
DEVICE = "arm64-01"


@dataclass
class Lab:
    """A running master and agent, and the REST API to drive them."""

    url: str
    token: str

    def api(self, path: str, body: bytes | None = None, text: bool = False):
        request = urllib.request.Request(f"{self.url}/api/v0.2/{path}", data=body,
                                         headers={"Authorization": f"Token {self.token}"})
        with urllib.request.urlopen(request, timeout=30) as response:
            payload = response.read()
        return payload.decode() if text else json.loads(payload)

    def run(self, job: str, timeout: float = 180) -> dict:
        """Submit ``job`` over the REST API and wait for it to finish; its record."""
        job_id = self.api("jobs/", job.encode())["job_ids"][0]
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            shown = self.api(f"jobs/{job_id}/")
            if shown["state"] == "Finished":
                return shown
            time.sleep(0.3)
        pytest.fail(f"job {job_id} did not finish within {timeout} s: {self.api(f'jobs/{job_id}/')}")


def wait_until(check, timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            if check():
                return
        except (OSError, urllib.error.URLError):
            pass
        time.sleep(0.2)
    pytest.fail(f"timed out after {timeout} s waiting for {what}")


def set_dictionary(text: str) -> None:
    from master import inventory
    from master.db import connection
    from master.users import SYSTEM

    with connection():
        inventory.set_dictionary(SYSTEM, DEVICE, text)


@pytest.fixture(scope="module")
def lab(arm64_board, tmp_path_factory) -> Iterator[Lab]:
    from master import inventory
    from master.broker import Broker
    from master.certificates import issue_join_token
    from master.db import close_database, connection
    from master.instance import open_instance
    from master.server import MasterServer
    from master.users import SYSTEM, create_token

    root = tmp_path_factory.mktemp("lab")
    open_instance(root / "master", name="uboot-lab", url=f"file://{root / 'master' / 'site'}")
    with connection():
        inventory.add_device_type(SYSTEM, "qemu-arm64-uboot", description="QEMU arm64 with U-Boot")
        inventory.add_worker(SYSTEM, WORKER, description="the agent of the U-Boot tests")
        inventory.add_device(SYSTEM, DEVICE, "qemu-arm64-uboot", worker=WORKER,
                               dictionary=arm64_board.dictionary("telnet"))
        # the worker's dispatcher configuration: its TFTP root is the one the board's QEMU serves
        inventory.set_worker_text(SYSTEM, WORKER, "config", yaml.safe_dump(arm64_board.dispatcher()))
        token = create_token("admin", admin=True)
    broker = Broker("tcp://127.0.0.1:*", heartbeat=0.5).bind().start()
    server = MasterServer(port=0, scheduler_interval=2.0, publish_site=False).start()
    with connection():
        join_token = issue_join_token(SYSTEM, WORKER)["token"]
    logs = root / "agent.log"
    # the agent enrols (its key registered with a join token) and connects with CURVE
    agent = subprocess.Popen([str(BIN / "pumice-agent"), "--master", broker.bound[0], "--hostname", WORKER,
                              "--spool", str(root / "spool"), "--join", join_token, "--url", server.url],
                             stdout=logs.open("w"), stderr=subprocess.STDOUT)  # noqa: SIM115
    lab = Lab(server.url, token)
    try:
        wait_until(lambda: lab.api(f"workers/{WORKER}/")["state"].lower() == "online", 30, "the worker")
        yield lab
    finally:
        agent.terminate()
        try:
            agent.wait(20)
        except subprocess.TimeoutExpired:
            agent.kill()
            agent.wait()
        server.stop()
        broker.stop()
        close_database()


def test_ramdisk_jobs_through_master_and_agent(lab, board, dut_images, tmp_path):
    shown = lab.run(ramdisk_job(dut_images.arm64))
    assert shown["health"] == "Complete", shown
    assert shown["device"] == DEVICE
    assert not board.powered()
    csv = lab.api(f"jobs/{shown['id']}/csv/", text=True)
    assert ",0_smoke,,arch,pass," in csv and ",0_smoke,,overlay,pass," in csv, csv

    # the same board reached through its serial adaptor directly (pyserial on the worker)
    set_dictionary(board.dictionary("serial"))
    shown = lab.run(ramdisk_job(dut_images.arm64))
    assert shown["health"] == "Complete", shown
    assert not board.powered()

    # a board that never powers on: Incomplete, the device still takes the next job
    board.set_dead(True)
    short = ramdisk_job(dut_images.arm64, **{"bootloader-interrupt: {seconds: 40}":
                                             "bootloader-interrupt: {seconds: 8}"})
    shown = lab.run(short)
    assert shown["health"] == "Incomplete", shown
    assert shown["failure_comment"].startswith("Infrastructure: bootloader-interrupt timed out after "
                                               "00:00:08 (waiting for the interrupt prompt"), shown
    assert not board.powered()
    assert lab.api(f"devices/{DEVICE}/")["health"] == "Unknown"  # an Infrastructure error: suspect
    board.set_dead(False)
    shown = lab.run(ramdisk_job(dut_images.arm64))
    assert shown["health"] == "Complete", shown
