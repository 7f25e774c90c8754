"""LAVA's XML-RPC API at /RPC2 over HTTP (waitress on loopback), on SQLite and PostgreSQL: shapes,
authentication, faults, and the same answers as the REST API (one service layer, two front doors)."""

from __future__ import annotations

import base64
import datetime
import http.client
import logging
import xmlrpc.client

import pytest
import yaml
import zmq
from support.master import job_text

from master import jobs
from master.client import Client
from master.db import connection
from master.scheduler import Scheduler
from master.server import MasterServer
from master.xmlrpc import METHODS
from results.log import LogRecord
from results.record import JOB_LEVEL, Result


@pytest.fixture
def server(lab):
    # no scheduler thread: queued jobs stay Submitted until a test runs a scheduling pass
    master = MasterServer("127.0.0.1", 0, threads=4, scheduler=False, publish_site=False).start()
    try:
        yield master
    finally:
        master.stop()


@pytest.fixture
def rpc(server, lab):
    """ServerProxy factory: rpc("alice") with alice's token, rpc() anonymous, rpc("alice", "x") a bad token."""
    proxies = []

    def make(name: str | None = None, token: str | None = None) -> xmlrpc.client.ServerProxy:
        auth = f"{name}:{token or lab.tokens[name]}@" if name else ""
        proxy = xmlrpc.client.ServerProxy(f"http://{auth}{server.host}:{server.port}/RPC2", allow_none=True)
        proxies.append(proxy)
        return proxy

    yield make
    for proxy in proxies:
        proxy("close")()


def fault(call, code: int) -> str:
    with pytest.raises(xmlrpc.client.Fault) as info:
        call()
    assert info.value.faultCode == code, info.value.faultString
    return info.value.faultString


def test_system_methods_and_auth(rpc, lab, caplog) -> None:
    assert rpc().system.version()
    assert rpc().system.whoami() is None
    assert rpc("alice").system.whoami() == "alice"
    assert rpc().system.api_version() == 2
    methods = rpc().system.listMethods()
    for name in ("scheduler.jobs.submit", "scheduler.jobs.logs", "scheduler.workers.set_env",
                 "results.get_testjob_results_yaml", "system.get_master_certificate", "scheduler.tags.list"):
        assert name in methods
    assert methods == sorted(METHODS)
    assert "start=0, end=None" in rpc().system.methodHelp("scheduler.jobs.logs")
    assert rpc().system.methodSignature("scheduler.jobs.logs") == "scheduler.jobs.logs(job_id, start=0, end=None)"
    with caplog.at_level(logging.WARNING, logger="pumice.xmlrpc"):
        # a wrong token is refused even on anonymous methods, and the server says so in its log
        message = fault(lambda: rpc("alice", "not-a-token").system.version(), 401)
        assert "invalid token for user 'alice'" in message
        message = fault(lambda: rpc("bob", lab.tokens["alice"]).system.whoami(), 401)
        assert "belongs to another user" in message
        message = fault(lambda: rpc("alice").scheduler.jobs.nothing(1), -32601)
        assert "no such method 'scheduler.jobs.nothing'" in message
        message = fault(lambda: rpc("alice").scheduler.jobs.show(), 400)
        assert "wrong arguments for scheduler.jobs.show" in message and "scheduler.jobs.show(job_id)" in message
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "XML-RPC system.version by anonymous: fault 401" in logged
    assert "XML-RPC scheduler.jobs.nothing by alice: fault -32601" in logged
    assert "XML-RPC scheduler.jobs.show by alice: fault 400" in logged


def test_malformed_requests(server) -> None:
    conn = http.client.HTTPConnection(server.host, server.port, timeout=10)
    conn.request("POST", "/RPC2", body=b"<not xml-rpc", headers={"Content-Type": "text/xml"})
    reply = conn.getresponse()
    assert reply.status == 200
    with pytest.raises(xmlrpc.client.Fault) as info:
        xmlrpc.client.loads(reply.read())
    assert info.value.faultCode == 400 and "not an XML-RPC call" in info.value.faultString
    body = xmlrpc.client.dumps((), "system.whoami").encode()
    bad = base64.b64encode(b"no-colon").decode()
    conn.request("POST", "/RPC2", body=body, headers={"Authorization": f"Basic {bad}"})
    with pytest.raises(xmlrpc.client.Fault) as info:
        xmlrpc.client.loads(conn.getresponse().read())
    assert info.value.faultCode == 401 and "user:token" in info.value.faultString
    conn.request("GET", "/RPC2")
    reply = conn.getresponse()
    assert reply.status == 200 and "scheduler.jobs.submit" in reply.read().decode()
    conn.close()


def test_jobs_like_lava(rpc, lab, server) -> None:
    alice, bob, admin = rpc("alice"), rpc("bob"), rpc("admin")
    job_id = alice.scheduler.jobs.submit(job_text("rpc job"))
    assert isinstance(job_id, int)
    assert "HTTP basic user:token" in fault(lambda: rpc().scheduler.jobs.submit(job_text()), 401)
    message = fault(lambda: alice.scheduler.jobs.submit(job_text().replace("method: qemu", "method: foo")), 400)
    assert message.startswith("invalid job definition: actions[1].boot.method (line")
    assert "unknown boot method 'foo'" in message
    assert alice.scheduler.jobs.validate(job_text()) == {}
    invalid = alice.scheduler.jobs.validate(job_text().replace("method: qemu", "method: foo"))
    assert invalid["path"] == "actions[1].boot.method" and "unknown boot method" in invalid["msg"]

    shown = alice.scheduler.jobs.show(str(job_id))
    assert isinstance(shown["submit_time"], xmlrpc.client.DateTime)
    assert shown["start_time"] is None and shown["end_time"] is None
    assert {k: shown[k] for k in ("id", "description", "submitter", "device_type", "state", "health",
                                  "visibility", "pipeline", "health_check", "tags")} == {
        "id": job_id, "description": "rpc job", "submitter": "alice", "device_type": "qemu",
        "state": "Submitted", "health": "Unknown", "visibility": "Public", "pipeline": True,
        "health_check": False, "tags": []}
    # one service layer: the REST API says the same
    rest = Client(server.url, lab.tokens["alice"]).job(job_id)
    assert rest["submit_time"].startswith(shown["submit_time"].value[:4])
    assert datetime.datetime.strptime(shown["submit_time"].value, "%Y%m%dT%H:%M:%S").isoformat() == \
        rest["submit_time"][:19]
    assert alice.scheduler.jobs.definition(job_id) == job_text("rpc job")
    fault(lambda: alice.scheduler.jobs.show(99999), 404)
    fault(lambda: alice.scheduler.jobs.show("abc"), 404)

    listed = alice.scheduler.jobs.list("SUBMITTED", None, 0, 10, 0, False)
    assert listed == [{"id": job_id, "description": "rpc job", "device_type": "qemu", "health": "Unknown",
                       "state": "Submitted", "submitter": "alice"}]
    assert alice.scheduler.jobs.list("FINISHED") == []
    assert "unknown job state 'bogus'" in fault(lambda: alice.scheduler.jobs.list("bogus"), 400)
    assert [j["id"] for j in alice.scheduler.jobs.queue(["qemu"], 0, 5)] == [job_id]
    assert alice.scheduler.jobs.queue(None)[0]["requested_device_type"] == "qemu"

    # someone else's job: not theirs to cancel
    assert "only its submitter or an admin" in fault(lambda: bob.scheduler.jobs.cancel(job_id), 403)
    new_id = alice.scheduler.jobs.resubmit(job_id)
    assert new_id == job_id + 1
    assert alice.scheduler.jobs.cancel(job_id) is True
    assert alice.scheduler.jobs.show(job_id)["health"] == "Canceled"
    assert admin.scheduler.jobs.cancel(new_id) is True
    assert "already finished" in fault(lambda: alice.scheduler.jobs.cancel(job_id), 409)
    assert alice.scheduler.jobs.logs(job_id) == [True, xmlrpc.client.Binary(b"[]")]


def test_logs_and_results_of_a_finished_job(rpc, lab) -> None:
    alice = rpc("alice")
    job_id = alice.scheduler.jobs.submit(job_text("finished"))
    # a scheduling pass, then what the broker does when an agent runs the job (the same service functions)
    with connection():
        assert Scheduler().loop_once()
        jobs.job_started(job_id)
        jobs.append_logs(job_id, [LogRecord(f"2024-01-01T10:00:0{n}.000000", "info", f"line {n}") for n in range(5)])
        jobs.append_results(job_id, [
            Result(job=str(job_id), level="3.1", suite="0_smoke", case="always-pass", result="pass"),
            Result(job=str(job_id), level="3.2", suite="0_smoke", case="boot-time", result="pass",
                   measurement=1.5, units="s"),
            Result(job=str(job_id), level=JOB_LEVEL, suite="lava", case="job", result="fail",
                   extra={"error_type": "Infrastructure", "error_msg": "power failed"})])
        jobs.job_finished(job_id, "Incomplete", error="power failed", error_type="Infrastructure")
    assert alice.scheduler.jobs.logs_count(job_id) == 5
    finished, data = alice.scheduler.jobs.logs(job_id, 1, 3)
    assert finished is True
    assert [r["msg"] for r in yaml.safe_load(data.data)] == ["line 1", "line 2"]
    assert len(yaml.safe_load(alice.scheduler.jobs.logs(job_id)[1].data)) == 5
    shown = alice.scheduler.jobs.show(job_id)
    assert (shown["health"], shown["error_type"], shown["error_msg"]) == ("Incomplete", "Infrastructure",
                                                                           "power failed")
    assert isinstance(shown["end_time"], xmlrpc.client.DateTime)
    verbose = alice.scheduler.jobs.list(None, "INCOMPLETE", 0, 5, 0, True)[0]
    assert verbose["error_type"] == "Infrastructure" and verbose["actual_device"] in ("qemu01", "qemu02")

    rows = yaml.safe_load(alice.results.get_testjob_results_yaml(job_id))
    assert [(r["suite"], r["name"], r["result"]) for r in rows] == [
        ("0_smoke", "always-pass", "pass"), ("0_smoke", "boot-time", "pass"), ("lava", "job", "fail")]
    # LAVA's export: every value text, measurements with 10 decimals
    assert rows[1]["measurement"] == "1.5000000000" and rows[1]["unit"] == "s" and rows[1]["job"] == str(job_id)
    suite = yaml.safe_load(alice.results.get_testsuite_results_yaml(job_id, "0_smoke"))
    assert [r["name"] for r in suite] == ["always-pass", "boot-time"]
    assert [r["name"] for r in yaml.safe_load(alice.results.get_testsuite_results_yaml(job_id, "0_smoke", 1, 1))] \
        == ["boot-time"]
    fault(lambda: alice.results.get_testsuite_results_yaml(job_id, "nothing"), 404)
    suites = yaml.safe_load(alice.results.get_testjob_suites_list_yaml(job_id))
    assert [(s["name"], s["pass"], s["fail"]) for s in suites] == [("0_smoke", 2, 0), ("lava", 0, 1)]
    case = yaml.safe_load(alice.results.get_testcase_results_yaml(job_id, "0_smoke", "boot-time"))
    assert len(case) == 1 and case[0]["result"] == "pass"


def test_lab_methods(rpc) -> None:
    admin, alice, anonymous = rpc("admin"), rpc("alice"), rpc()
    assert anonymous.scheduler.devices.list() == [
        {"hostname": f"qemu0{n}", "type": "qemu", "health": "Good", "state": "Idle", "current_job": None,
         "pipeline": True} for n in (1, 2)]
    shown = anonymous.scheduler.devices.show("qemu01")
    assert (shown["worker"], shown["has_device_dict"], shown["health_job"], shown["tags"]) == ("w1", True,
                                                                                                False, [])
    fault(lambda: anonymous.scheduler.devices.show("nope"), 404)
    dictionary = anonymous.scheduler.devices.get_dictionary("qemu01").data.decode()
    assert dictionary.startswith("{% extends 'qemu.jinja2' %}")
    rendered = yaml.safe_load(anonymous.scheduler.devices.get_dictionary("qemu01", True, "arch: amd64").data)
    assert "qemu" in rendered["actions"]["boot"]["methods"]
    fault(lambda: alice.scheduler.devices.set_dictionary("qemu01", dictionary), 403)
    assert admin.scheduler.devices.set_dictionary("qemu01", dictionary + "{% set memory = 1024 %}\n") is True
    assert "memory = 1024" in anonymous.scheduler.devices.get_dictionary("qemu01").data.decode()
    assert "extends exactly one" in fault(lambda: admin.scheduler.devices.set_dictionary("qemu01", "x"), 400)

    admin.scheduler.devices.update("qemu02", None, None, None, None, "MAINTENANCE", "in repair", None, "fan")
    shown = anonymous.scheduler.devices.show("qemu02")
    assert (shown["health"], shown["description"]) == ("Maintenance", "in repair")
    assert "unknown device health 'SICK'" in fault(
        lambda: admin.scheduler.devices.update("qemu02", None, None, None, None, "SICK"), 400)
    admin.scheduler.devices.tags.add("qemu02", "usb")
    assert admin.scheduler.devices.tags.list("qemu02") == ["usb"]
    assert anonymous.scheduler.tags.show("usb")["devices"] == ["qemu02"]
    admin.scheduler.tags.add("hdmi", "a screen")
    assert {"name": "hdmi", "description": "a screen"} in anonymous.scheduler.tags.list()
    admin.scheduler.devices.tags.delete("qemu02", "usb")
    admin.scheduler.tags.delete("hdmi")
    assert anonymous.scheduler.devices.tags.list("qemu02") == []
    admin.scheduler.devices.add("qemu03", "qemu", "w1", None, None, True, "RETIRED", "spare")
    assert [d["hostname"] for d in anonymous.scheduler.devices.list()] == ["qemu01", "qemu02"]
    assert [d["hostname"] for d in anonymous.scheduler.devices.list(True)][-1] == "qemu03"

    assert anonymous.scheduler.device_types.list() == [{"name": "qemu", "devices": 2, "installed": True,
                                                         "template": False}]
    assert anonymous.scheduler.device_types.show("qemu")["devices"] == ["qemu01", "qemu02", "qemu03"]
    template = anonymous.scheduler.device_types.get_template("qemu").data.decode()
    assert "{%" in template
    admin.scheduler.device_types.set_template("qemu", template + "\n{# site copy #}\n")
    assert anonymous.scheduler.device_types.get_template("qemu").data.decode().endswith("{# site copy #}\n")
    assert anonymous.scheduler.device_types.list()[0]["template"] is True
    admin.scheduler.device_types.set_template("qemu", "")
    assert anonymous.scheduler.device_types.get_template("qemu").data.decode() == template
    fault(lambda: anonymous.scheduler.device_types.get_template("nope"), 404)

    assert anonymous.scheduler.workers.list() == ["w1"]
    admin.scheduler.workers.add("w2", "second", True)
    assert anonymous.scheduler.workers.list() == ["w1"] and anonymous.scheduler.workers.list(True) == ["w1", "w2"]
    admin.scheduler.workers.update("w2", "second box", "ACTIVE", 2)
    shown = anonymous.scheduler.workers.show("w2")
    assert (shown["description"], shown["health"], shown["job_limit"], shown["last_ping"]) == (
        "second box", "Active", 2, xmlrpc.client.DateTime("19700101T00:00:00"))
    assert isinstance(anonymous.scheduler.workers.show("w1")["last_ping"], xmlrpc.client.DateTime)
    assert anonymous.scheduler.workers.show("w1")["devices"] == ["qemu01", "qemu02", "qemu03"]
    assert "worker 'w2' exists already" in fault(lambda: admin.scheduler.workers.add("w2"), 409)
    fault(lambda: alice.scheduler.workers.add("w3"), 403)
    fault(lambda: anonymous.scheduler.workers.add("w3"), 401)
    admin.scheduler.workers.set_env("w1", "overrides:\n  http_proxy: http://proxy:3128\n")
    assert anonymous.scheduler.workers.get_env("w1").data.decode() == "overrides:\n  http_proxy: http://proxy:3128\n"
    assert "must be a YAML mapping" in fault(lambda: admin.scheduler.workers.set_env("w1", "- a list"), 400)
    admin.scheduler.workers.set_config("w1", "tmp_dir: /tmp\n")
    assert anonymous.scheduler.workers.get_config("w1").data == b"tmp_dir: /tmp\n"
    assert "no certificate" in fault(lambda: admin.scheduler.workers.get_certificate("w1"), 404)
    fault(lambda: anonymous.system.get_master_certificate(), 404)
    # the same certificates service as REST: a key set here is the one the broker admits
    from master import certificates

    key = zmq.curve_keypair()[0].decode()
    assert admin.scheduler.workers.set_certificate("w1", f'curve\n    public-key = "{key}"\n') is True
    assert f'public-key = "{key}"' in admin.scheduler.workers.get_certificate("w1")
    with connection():
        assert certificates.worker_key("w1") == key
        master = certificates.load_master_keys()[0].decode()
    assert f'public-key = "{master}"' in anonymous.system.get_master_certificate()
    fault(lambda: alice.scheduler.workers.get_certificate("w1"), 403)
    assert "not a CURVE public key" in fault(lambda: admin.scheduler.workers.set_certificate("w1", "nope"), 400)
