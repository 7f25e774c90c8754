"""What KernelCI, SQUAD and Mesa CI read from a LAVA server, against a live master (in-process,
over loopback): the event stream (ZeroMQ PUB, lava-publisher's frames), the older XML-RPC
scheduler methods, KernelCI's REST shapes and the plain log URL.
"""

from __future__ import annotations

import datetime as _dt
import json
import time
import urllib.error
import urllib.request
import xmlrpc.client
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml
import zmq
from support.master import build_lab, job_text, stop_server

from master import jobs
from master.db import close_database, connection
from master.scheduler import Scheduler
from master.server import MasterServer
from results.log import LogRecord
from results.record import Result


class Live:
    def __init__(self, lab, server: MasterServer) -> None:
        self.lab = lab
        self.server = server
        self.url = server.url

    def rpc(self, who: str = "alice") -> xmlrpc.client.ServerProxy:
        return xmlrpc.client.ServerProxy(f"http://{who}:{self.lab.tokens[who]}@127.0.0.1:{self.server.port}/RPC2",
                                         use_builtin_types=True, allow_none=True)

    def rest(self, method: str, path: str, body: bytes | None = None, who: str | None = "alice",
             content_type: str = "application/json") -> tuple[int, str]:
        request = urllib.request.Request(self.url + path, data=body, method=method)
        if who:
            request.add_header("Authorization", f"Token {self.lab.tokens[who]}")
        request.add_header("Content-Type", content_type)
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    def run(self, job_id: int, health: str = "Complete") -> None:
        """Play the scheduler and the agent for ``job_id`` (in this process)."""
        with connection():
            Scheduler().loop_once()
            jobs.job_started(job_id)
            jobs.append_logs(job_id, [LogRecord("2024-01-01T10:00:00.000000", "target", "console says hi")])
            jobs.append_results(job_id, [Result(job=str(job_id), level="3.1", suite="0_smoke", case="uname",
                                                result="pass"),
                                         Result(job=str(job_id), level="3.1", suite="0_smoke", case="boot-time",
                                                result="pass", measurement=2.5, units="s"),
                                         Result(job=str(job_id), level="0", suite="lava", case="job",
                                                result="pass")])
            jobs.job_finished(job_id, health)


@contextmanager
def live_master(tmp_path: Path, database_url: str | None) -> Iterator[Live]:
    """The test lab served by a master in this process (API, XML-RPC, the event stream on a free
    loopback port); no scheduler, no sender: tests play those parts."""
    lab = build_lab(tmp_path / "data", database_url)
    server = MasterServer("127.0.0.1", 0, scheduler=False, publish_site=False, validators=0, notify=False,
                          event_socket="tcp://127.0.0.1:*").start()
    try:
        yield Live(lab, server)
    finally:
        stop_server(server)
        close_database()


@pytest.fixture
def live(tmp_path: Path, database_url: str | None) -> Iterator[Live]:
    with live_master(tmp_path, database_url) as master:
        yield master


# ---- the event stream ----

def receive(sub: zmq.Socket, topic: str, until, timeout: float = 10) -> list[tuple[list[str], dict]]:
    """Messages of ``topic`` until ``until(data)`` is true for one."""
    got = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not sub.poll(200):
            continue
        frames = [f.decode() for f in sub.recv_multipart()]
        if frames[0] != topic:
            continue
        data = json.loads(frames[4])
        got.append((frames, data))
        if until(data):
            return got
    pytest.fail(f"timed out waiting for {topic}; got {[d for _, d in got]}")


def test_events_are_lava_publishers_frames_on_their_own_socket(live: Live) -> None:
    endpoint = live.rpc().scheduler.get_publisher_event_socket()
    assert endpoint.startswith("tcp://127.0.0.1:") and endpoint != "tcp://127.0.0.1:*"
    context = zmq.Context.instance()
    sub = context.socket(zmq.SUB)
    sub.setsockopt_string(zmq.SUBSCRIBE, "")
    sub.connect(endpoint)
    time.sleep(0.3)  # a SUB misses what is published before it has joined
    try:
        text = job_text("evented") + "secrets:\n  KEY: never-on-the-wire\n"
        job_id = live.rpc().scheduler.submit_job(text)
        live.run(job_id)
        job_messages = receive(sub, "org.lavasoftware.testjob", lambda d: d["state"] == "Finished")
    finally:
        sub.close(0)
    states = [data["state"] for _, data in job_messages if data["job"] == job_id]
    assert states == ["Submitted", "Scheduled", "Running", "Finished"]
    frames, finished = job_messages[-1]
    assert len(frames) == 5 and frames[3] == "alice"
    _dt.datetime.fromisoformat(frames[2])  # LAVA's utcnow().isoformat()
    assert (finished["health"], finished["description"], finished["submitter"], finished["health_check"]) == (
        "Complete", "evented", "alice", False)
    assert finished["device_type"] == "qemu" and finished["device"] in ("qemu01", "qemu02")
    assert finished["worker"] == "w1" and finished["end_time"].endswith("+00:00")
    assert set(finished) == {"health", "state", "job", "description", "priority", "submit_time", "submitter",
                             "health_check", "device", "worker", "device_type", "start_time", "end_time"}
    assert all("never-on-the-wire" not in frame for frames, _ in job_messages for frame in frames)


def test_device_and_worker_events(live: Live) -> None:
    from master import inventory

    sub = zmq.Context.instance().socket(zmq.SUB)
    sub.setsockopt_string(zmq.SUBSCRIBE, "org.lavasoftware.")
    sub.connect(live.rpc().scheduler.get_publisher_event_socket())
    time.sleep(0.3)
    try:
        job_id = live.rpc().scheduler.submit_job(job_text("device events"))
        live.run(job_id)
        devices = receive(sub, "org.lavasoftware.device", lambda d: d["state"] == "Idle")
        with connection():
            inventory.worker_offline("w1")
        [(frames, worker)] = receive(sub, "org.lavasoftware.worker", lambda d: True)
    finally:
        sub.close(0)
    assert [d["state"] for _, d in devices] == ["Reserved", "Running", "Idle"]
    assert devices[0][1]["job"] == job_id and "job" not in devices[-1][1]
    assert set(devices[0][1]) == {"health", "state", "device", "device_type", "worker", "job"}
    assert devices[0][0][3] == "lavaserver"
    assert worker == {"hostname": "w1", "health": "Active", "state": "Offline"} and frames[3] == "lavaserver"


# ---- XML-RPC: SQUAD's and Mesa's calls ----

def test_squads_xmlrpc_calls(live: Live) -> None:
    rpc = live.rpc()
    text = job_text("squad job") + "metadata:\n  build-url: https://ci.example/1\nsecrets:\n  K: hidden-value\n"
    job_id = rpc.scheduler.submit_job(text)
    details = rpc.scheduler.job_details(job_id)
    assert (details["status"], details["is_pipeline"], details["multinode_definition"]) == ("Submitted", True, "")
    live.run(job_id, "Incomplete")
    details = rpc.scheduler.job_details(job_id)
    assert details["status"] == "Incomplete" and details["id"] == job_id
    assert isinstance(details["start_time"], _dt.datetime) and isinstance(details["end_time"], _dt.datetime)
    definition = yaml.safe_load(details["definition"])
    assert definition["metadata"] == {"build-url": "https://ci.example/1"} and definition["job_name"] == "squad job"
    assert "hidden-value" not in details["definition"] and "hidden-value" not in rpc.scheduler.jobs.definition(job_id)
    suites = yaml.safe_load(rpc.results.get_testjob_suites_list_yaml(job_id))
    assert {s["name"] for s in suites} == {"0_smoke", "lava"}
    page = yaml.safe_load(rpc.results.get_testsuite_results_yaml(job_id, "0_smoke", 1, 1))
    assert [r["name"] for r in page] == ["boot-time"] and float(page[0]["measurement"]) == 2.5
    assert rpc.scheduler.job_state(job_id) == {"job_id": job_id, "job_state": "Finished"}
    assert rpc.scheduler.job_health(job_id) == {"job_id": job_id, "job_health": "Incomplete"}
    new_id = rpc.scheduler.resubmit_job(job_id)
    assert new_id == job_id + 1 and rpc.scheduler.cancel_job(new_id) is True
    assert rpc.scheduler.job_details(new_id)["status"] == "Canceled"


def test_mesas_six_calls(live: Live) -> None:
    rpc = live.rpc()
    assert rpc.scheduler.jobs.validate(job_text("mesa"), True) == {}
    job_id = rpc.scheduler.jobs.submit(job_text("mesa"))
    live.run(job_id)
    shown = rpc.scheduler.jobs.show(job_id)
    assert shown["state"] == "Finished" and shown["device"] in ("qemu01", "qemu02")
    assert isinstance(shown["start_time"], _dt.datetime) and isinstance(shown["submit_time"], _dt.datetime)
    assert rpc.scheduler.job_state(job_id)["job_state"] == "Finished"
    finished, data = rpc.scheduler.jobs.logs(job_id, 0)
    assert finished is True and yaml.safe_load(data)[0]["msg"] == "console says hi"
    second = rpc.scheduler.jobs.submit(job_text("mesa canceled"))
    assert rpc.scheduler.jobs.cancel(second) is True


def test_the_plain_log_url_takes_user_and_token(live: Live) -> None:
    job_id = live.rpc().scheduler.submit_job(job_text("logged", visibility="personal"))
    live.run(job_id)
    token = live.lab.tokens["alice"]
    status, body = live.rest("GET", f"/scheduler/job/{job_id}/log_file/plain?user=alice&token={token}", who=None)
    assert status == 200 and yaml.safe_load(body)[0]["msg"] == "console says hi"
    assert live.rest("GET", f"/scheduler/job/{job_id}/log_file/plain?user=bob&token={token}", who=None)[0] == 401
    assert live.rest("GET", f"/scheduler/job/{job_id}/log_file/plain", who=None)[0] == 404  # personal job


# ---- KernelCI's REST shapes ----

def test_kernelcis_rest_calls(live: Live) -> None:
    status, body = live.rest("POST", "/api/v0.2/jobs/?format=json&limit=256",
                             json.dumps({"definition": job_text("kernelci")}).encode())
    assert status == 201
    [job_id] = json.loads(body)["job_ids"]
    status, body = live.rest("POST", "/api/v0.2/jobs/", json.dumps({"definition": job_text().replace(
        "device_type: qemu", "device_type: beaglebone-black")}).encode())
    assert status == 400 and "unknown device type 'beaglebone-black'" in body
    status, body = live.rest("POST", "/api/v0.2/jobs/", json.dumps({"definition": job_text().replace(
        "device_type: qemu\n", "")}).encode())
    assert status == 400 and "device_type" in body
    live.rpc().scheduler.submit_job(job_text("second"))
    status, body = live.rest("GET", "/api/v0.2/jobs/?state=Submitted&requested_device_type=qemu&limit=1&offset=0")
    page = json.loads(body)
    assert page["count"] == 2 and len(page["results"]) == 1 and page["previous"] is None and "offset=1" in page["next"]
    assert json.loads(live.rest("GET", "/api/v0.2/jobs/?state=Submitted&requested_device_type=other")[1])["count"] == 0
    status, body = live.rest("GET", f"/api/v0.2/jobs/{job_id}?format=json")  # no slash: redirected as DRF does
    assert status == 200 and json.loads(body)["state"] == "Submitted"
    devices = json.loads(live.rest("GET", "/api/v0.2/devices/?device_type=qemu&format=json&limit=256")[1])
    assert sorted((d["hostname"], d["health"]) for d in devices["results"]) == [("qemu01", "Good"),
                                                                                ("qemu02", "Good")]
    status, body = live.rest("GET", "/api/v0.2/system/version/", who=None)
    assert status == 200 and json.loads(body)["version"]

