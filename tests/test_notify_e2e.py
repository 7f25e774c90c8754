"""notify end to end: a real master and agent (processes), a QEMU job, a KernelCI-style receiver.

The receiver checks what KernelCI's LAVA callback handler reads: the bare token in Authorization,
the job data's status fields, ``results`` (suite -> YAML string of test cases) and ``log`` (the
output.yaml as a YAML string). The master is killed with SIGKILL between the job's end and the
delivery (it runs with ``--notify-hold`` first, so the callback is queued but not sent): the
callback arrives once the master is back.
"""

from __future__ import annotations

import json
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from support.broker import ProcessLab, running_process_lab, wait_for
from test_broker_e2e import board_files, smoke_job  # noqa: F401  (board_files is a fixture)
from test_notify import Receiver, receiving

pytestmark = pytest.mark.qemu

ALLOW = ("--notify-allow", "127.0.0.1")
_receiver = pytest.fixture(receiving, name="receiver")


@pytest.fixture
def nplab(tmp_path: Path, http_server) -> Iterator[ProcessLab]:
    for lab in running_process_lab(tmp_path, master_args=ALLOW):
        lab.allow(http_server.address)  # the board's files
        yield lab


def notified_job(lab: ProcessLab, files: dict[str, str], receiver: Receiver) -> Path:
    """The smoke job with KernelCI's notify block (POST, all, json, a token by name)."""
    path = smoke_job(lab.root, files)
    job = yaml.safe_load(path.read_text())
    job["notify"] = {"criteria": {"status": "finished"},
                     "callback": {"url": f"{receiver.url}/node/kernelci-node-1", "method": "POST",
                                  "dataset": "all", "token": "kernelci-callback", "content-type": "json"}}
    path.write_text(yaml.safe_dump(job, sort_keys=False))
    return path


def check_kernelci_payload(receiver: Receiver, job_id: int) -> dict:
    [request] = receiver.requests
    assert request.path == "/node/kernelci-node-1" and request.headers["Authorization"] == "kci-s3cret"
    data = json.loads(request.body)
    assert (data["id"], data["status"], data["status_string"], data["health_string"]) == (
        job_id, 2, "complete", "Complete")
    assert data["actual_device_id"] == "qemu01" and data["submitter_username"] == "admin"
    results = {suite: yaml.safe_load(text) for suite, text in data["results"].items()}
    cases = {case["name"]: case["result"] for case in results["0_smoke"]}
    assert cases["always-pass"] == "pass" and cases["always-fail"] == "fail"
    assert [case["result"] for case in results["lava"] if case["name"] == "job"] == ["pass"]
    log = yaml.safe_load(data["log"])
    assert any("Linux version" in str(record.get("msg")) for record in log if record["lvl"] == "target")
    return data


def test_a_finished_qemu_jobs_callback_arrives(nplab: ProcessLab, board_files, receiver) -> None:  # noqa: F811
    nplab.cli("remote-tokens", "add", "--user", "admin", "kernelci-callback", "kci-s3cret")
    nplab.start_agent()
    job_id = nplab.submit(notified_job(nplab, board_files, receiver))
    assert nplab.wait_job(job_id)["health"] == "Complete"
    receiver.wait(1, timeout=30)
    check_kernelci_payload(receiver, job_id)
    [record] = nplab.api("GET", f"/jobs/{job_id}/notifications/")["results"]
    assert (record["status"], record["attempts"], record["attempt_list"][0]["outcome"]) == (
        "delivered", 1, "HTTP 200")
    assert "kci-s3cret" not in json.dumps(record)


def test_kill_9_between_job_end_and_delivery_delivers_after_restart(nplab: ProcessLab, board_files,  # noqa: F811
                                                                     receiver) -> None:
    nplab.cli("remote-tokens", "add", "--user", "admin", "kernelci-callback", "kci-s3cret")
    nplab.stop_master()
    nplab.master_args = [*ALLOW, "--notify-hold"]  # the outbox fills, nothing is sent
    nplab.start_master()
    nplab.start_agent()
    job_id = nplab.submit(notified_job(nplab, board_files, receiver))
    assert nplab.wait_job(job_id)["health"] == "Complete"
    [record] = nplab.api("GET", f"/jobs/{job_id}/notifications/")["results"]
    assert (record["status"], record["attempts"]) == ("pending", 0)
    nplab.stop_master(signal.SIGKILL)
    assert receiver.requests == []
    nplab.master_args = list(ALLOW)
    nplab.start_master()
    receiver.wait(1, timeout=30)
    check_kernelci_payload(receiver, job_id)
    wait_for(lambda: nplab.api("GET", f"/jobs/{job_id}/notifications/")["results"][0]["status"] == "delivered",
             10, "the attempt to be recorded")
