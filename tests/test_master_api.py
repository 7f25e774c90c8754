"""The whole REST API over HTTP (waitress on loopback), on SQLite and PostgreSQL."""

from __future__ import annotations

import http.client
import json
import os
import socket
import threading
import time

import pytest
import yaml
from support.master import corpus_file, job_text, stop_server

from agent.job import validate_job
from master import jobs, validation
from master.client import ApiError, Client
from master.db import connection, db, is_postgres
from master.models import Device
from master.server import MasterServer
from results.log import LogRecord
from results.record import JOB_LEVEL, Result


@pytest.fixture
def server(lab):
    master = MasterServer("127.0.0.1", 0, threads=8, scheduler_interval=3600, publish_site=False,
                          validators=2).start()
    try:
        # submissions are checked in the validator processes, not in the HTTP threads
        assert master.validators.wait_ready(30), "the validator processes did not start"
        yield master
    finally:
        stop_server(master)


@pytest.fixture
def clients(server, lab):
    made = {name: Client(server.url, token) for name, token in lab.tokens.items()}
    made["anonymous"] = Client(server.url)
    yield made
    for client in made.values():
        client.close()


def refused(call, status: int) -> ApiError:
    with pytest.raises(ApiError) as info:
        call()
    assert info.value.status == status, info.value.describe()
    return info.value


# ---- system and authentication ----


def test_version_whoami_and_tokens(clients, server) -> None:
    assert clients["anonymous"].call("GET", "/system/version/")["version"]
    assert clients["anonymous"].call("GET", "/system/whoami/") == {"user": None, "admin": False}
    assert clients["alice"].call("GET", "/system/whoami/") == {"user": "alice", "admin": False}
    assert clients["admin"].call("GET", "/system/whoami/") == {"user": "admin", "admin": True}
    bad = Client(server.url, "not-a-token")
    error = refused(lambda: bad.call("GET", "/jobs/"), 401)
    assert "invalid token" in error.message
    status, headers, _ = Client(server.url).request("GET", "/system/whoami/")
    assert status == 200 and headers["content-type"].startswith("application/json")
    # a malformed header is refused, not silently anonymous
    conn = http.client.HTTPConnection(server.host, server.port, timeout=10)
    conn.request("GET", "/api/v0.2/system/whoami/", headers={"Authorization": "Basic YWxpY2U6cHc="})
    reply = conn.getresponse()
    assert reply.status == 401
    assert "expected 'Authorization: Token <token>'" in json.loads(reply.read())["error"]
    conn.close()


def test_routes_are_a_table_of_module_level_handlers() -> None:
    import importlib

    from master import api, api_notify, rest  # noqa: F401  (every handler module joins the table)

    seen = [(path, method) for path, methods, _ in rest.ROUTES for method in methods]
    assert len(seen) == len(set(seen)), "a path and method routed twice"
    assert {("/jobs/", "POST"), ("/workers/<hostname>/certificate/", "DELETE"), ("/jobs/<job_id>/csv/", "GET"),
            ("/workers/<hostname>/env/", "PUT"), ("/remote-artifact-tokens/", "POST")} <= set(seen)
    for _, _, handler in rest.ROUTES:  # each handler importable on its own (a partial names its function)
        function = getattr(handler, "func", handler)
        assert getattr(importlib.import_module(function.__module__), function.__name__) is function


def test_defaults_live_in_the_service_layer(clients) -> None:
    admin = clients["admin"]
    # a form leaves fields empty: the service layer's defaults apply, as for a missing field
    status, _, body = admin.request("POST", "/devicetypes/", content_type="application/x-www-form-urlencoded",
                                    body="name=qemu&description=&health_frequency=&health_denominator=")
    made = json.loads(body)
    assert status == 409 and "exists already" in made["error"]  # the checks came after the defaults
    status, _, body = admin.request("POST", "/workers/", content_type="application/x-www-form-urlencoded",
                                    body="hostname=w7&description=&job_limit=")
    made = json.loads(body)
    assert status == 201 and (made["job_limit"], made["description"]) == (0, "")
    status, _, body = admin.request("POST", "/devices/", json_body={"hostname": "qemu-b-01", "device_type": "qemu",
                                                                     "health": None, "description": None})
    made = json.loads(body)
    assert status == 201 and (made["health"], made["description"]) == ("Unknown", "")


def test_unknown_endpoint_is_json(clients) -> None:
    error = refused(lambda: clients["anonymous"].call("GET", "/nothing/here/"), 404)
    assert "no such API endpoint" in error.message
    error = refused(lambda: clients["anonymous"].call("DELETE", "/jobs/"), 405)
    assert "not allowed" in error.message


# ---- submission ----


def test_submit_json_and_raw_yaml(clients, lab) -> None:
    ids = clients["alice"].submit(job_text("json body"))
    assert len(ids) == 1
    # curl --data-binary @job.yaml: a raw body labelled as a form
    status, _, body = clients["alice"].request(
        "POST", "/jobs/", body=job_text("raw body"), content_type="application/x-www-form-urlencoded"
    )
    assert status == 201, body
    second = json.loads(body)["job_ids"][0]
    assert second == ids[0] + 1
    job = clients["alice"].job(second)
    assert (
        job["name"] == "raw body"
        and job["submitter"] == "alice"
        and job["state"] in ("Submitted", "Scheduled")
    )
    assert lab.instance.store.read_file(second, "job.yaml") == job_text("raw body")
    refused(lambda: clients["anonymous"].submit(job_text()), 401)


@pytest.mark.parametrize(
    ("change", "path", "line", "message"),
    [
        (("method: qemu", "method: foo"), "actions[1].boot.method", 33, "unknown boot method 'foo'; known:"),
        (("minutes: 10            #", "minutes: -1 #"), "timeouts.job.minutes", 8, "at least 0"),
        (
            ("  action:\n    minutes: 1 ", "  action:\n    minutes: soon "),
            "timeouts.action.minutes",
            10,
            "int",
        ),
        (
            ("device_type: qemu", "device_type: qemu_foo"),
            "device_type",
            3,
            "unknown device type 'qemu_foo'; known: qemu",
        ),
        (("    - boot:\n", "    - boot: [\n"), "", 34, "invalid YAML"),
    ],
)
def test_corpus_job_faults_are_refused(clients, change, path, line, message) -> None:
    definition = corpus_file("sample-jobs/kvm.yaml")
    assert change[0] in definition
    error = refused(lambda: clients["alice"].submit(definition.replace(change[0], change[1], 1)), 400)
    assert error.message == "invalid job definition"
    fault = error.faults[0]
    assert (fault["path"], fault["line"]) == (path, line), error.describe()
    assert message in fault["message"]
    # the unchanged corpus job is accepted
    assert clients["alice"].submit(definition)


def test_scheduler_corpus_job_with_unknown_device_type(clients) -> None:
    error = refused(lambda: clients["alice"].submit(corpus_file("scheduler-sample-jobs/qemu-foo.yaml")), 400)
    assert error.faults[0]["path"] == "device_type"
    assert "unknown device type 'qemu_foo'" in error.faults[0]["message"]


def test_validate_endpoint(clients) -> None:
    assert clients["anonymous"].validate(job_text()) == {"valid": True, "faults": []}
    result = clients["anonymous"].validate(job_text().replace("method: qemu", "method: nope"))
    assert not result["valid"] and result["faults"][0]["path"] == "actions[1].boot.method"
    with connection():
        assert jobs.list_jobs(None)[0] == 0  # nothing was queued


def test_ten_megabyte_body_is_refused(clients) -> None:
    big = job_text() + "#" + "x" * (10 * 1024 * 1024) + "\n"
    error = refused(lambda: clients["alice"].submit(big), 413)
    assert "over the limit" in error.message


def test_concurrent_submissions(server, lab) -> None:
    ids: list[int] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def submit(worker: int) -> None:
        client = Client(server.url, lab.tokens["alice"])
        try:
            for n in range(15):
                got = client.submit(job_text(f"concurrent {worker}.{n}"))
                with lock:
                    ids.extend(got)
        except BaseException as exc:  # reported below
            errors.append(exc)
        finally:
            client.close()

    threads = [threading.Thread(target=submit, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not errors, errors
    assert sorted(ids) == list(range(min(ids), min(ids) + 60))
    client = Client(server.url)
    page = client.call("GET", "/jobs/", params={"limit": 100})
    assert page["count"] == 60
    names = {job["name"] for job in page["results"]}
    assert names == {f"concurrent {w}.{n}" for w in range(4) for n in range(15)}
    # the scheduler (woken by the submissions) gave both devices a job, each one job only
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        scheduled = client.call("GET", "/jobs/", params={"state": "Scheduled"})
        if scheduled["count"] == 2:
            break
        time.sleep(0.02)
    assert sorted(job["device"] for job in scheduled["results"]) == ["qemu01", "qemu02"]
    client.close()


def test_submission_is_scheduled_at_once(clients) -> None:
    start = time.monotonic()
    [job_id] = clients["alice"].submit(job_text())
    while time.monotonic() - start < 5:
        job = clients["alice"].job(job_id)
        if job["state"] == "Scheduled":
            break
        time.sleep(0.01)
    assert job["state"] == "Scheduled" and job["device"] in ("qemu01", "qemu02")
    assert time.monotonic() - start < 1.0


# ---- jobs: show, list, cancel, resubmit, logs, results ----


def wait_state(client: Client, job_id: int, state: str, timeout: float = 5.0) -> dict:
    deadline = time.monotonic() + timeout
    while (job := client.job(job_id))["state"] != state and time.monotonic() < deadline:
        time.sleep(0.01)
    return job


def test_cancel_permissions(clients) -> None:
    alice = clients["alice"]
    [running] = alice.submit(job_text("takes qemu01"))
    assert wait_state(alice, running, "Scheduled")["state"] == "Scheduled"
    error = refused(lambda: clients["bob"].cancel(running), 403)
    assert "belongs to alice" in error.message
    refused(lambda: clients["anonymous"].cancel(running), 401)
    # holding a device: Canceling until the agent confirms
    assert alice.cancel(running)["state"] == "Canceling"
    assert alice.cancel(running)["state"] == "Canceling"  # twice is harmless
    [second] = alice.submit(job_text("takes qemu02"))
    assert wait_state(alice, second, "Scheduled")["state"] == "Scheduled"
    [queued] = alice.submit(job_text("waits"))
    time.sleep(0.1)
    assert alice.job(queued)["state"] == "Submitted"
    record = clients["admin"].cancel(queued)  # admins may cancel anyone's job; queued: at once
    assert (record["state"], record["health"]) == ("Finished", "Canceled")
    assert record["failure_comment"] == "canceled by admin"
    error = refused(lambda: alice.cancel(queued), 409)
    assert "already finished" in error.message
    refused(lambda: alice.cancel(999999), 404)
    refused(lambda: alice.cancel("abc"), 404)


def test_visibility(clients) -> None:
    [private] = clients["alice"].submit(job_text("secret", visibility="personal"))
    [public] = clients["alice"].submit(job_text("open"))
    refused(lambda: clients["anonymous"].job(private), 404)
    refused(lambda: clients["bob"].job(private), 404)
    assert clients["alice"].job(private)["visibility"] == "personal"
    assert clients["admin"].job(private)["name"] == "secret"
    assert [j["id"] for j in clients["anonymous"].call("GET", "/jobs/")["results"]] == [public]
    assert [j["id"] for j in clients["alice"].call("GET", "/jobs/")["results"]] == [public, private]
    assert clients["anonymous"].call("GET", f"/jobs/{public}/definition/") == job_text("open")


def test_list_filters_and_paging(clients) -> None:
    for i in range(5):
        clients["alice"].submit(job_text(f"page {i}"))
    clients["bob"].submit(job_text("bob's"))
    page = clients["alice"].call("GET", "/jobs/", params={"limit": 2})
    assert page["count"] == 6 and len(page["results"]) == 2 and page["previous"] is None
    assert "offset=2" in page["next"]
    last = clients["alice"].call("GET", "/jobs/", params={"limit": 2, "offset": 4})
    assert last["next"] is None and [j["name"] for j in last["results"]] == ["page 1", "page 0"]
    mine = clients["alice"].call("GET", "/jobs/", params={"submitter": "bob"})
    assert [j["name"] for j in mine["results"]] == ["bob's"]
    oldest = clients["alice"].call("GET", "/jobs/", params={"ordering": "id", "limit": 1})
    assert oldest["results"][0]["name"] == "page 0"
    by_type = clients["alice"].call("GET", "/jobs/", params={"device_type": "qemu"})
    assert by_type["count"] == 6
    error = refused(lambda: clients["alice"].call("GET", "/jobs/", params={"state": "Sleeping"}), 400)
    assert "allowed: Submitted, Scheduling" in error.message
    refused(lambda: clients["alice"].call("GET", "/jobs/", params={"limit": "many"}), 400)


def test_resubmit(clients) -> None:
    [job_id] = clients["alice"].submit(job_text("again"))
    refused(lambda: clients["bob"].call("POST", f"/jobs/{job_id}/resubmit/"), 403)
    again = clients["alice"].call("POST", f"/jobs/{job_id}/resubmit/")
    assert again["job_ids"] == [job_id + 1]
    assert clients["alice"].job(job_id + 1)["name"] == "again"


def test_logs_and_results(clients) -> None:
    [job_id] = clients["alice"].submit(job_text("with results"))
    records = [
        LogRecord(f"2024-01-01T10:00:0{i}.000000", "info" if i % 2 else "target", f"line {i} <b>")
        for i in range(6)
    ]
    with connection():
        assert jobs.append_logs(job_id, records[:4]) == 4
        assert jobs.append_logs(job_id, [r.to_line() for r in records[4:]]) == 6
        jobs.append_results(
            job_id,
            [
                Result(
                    job=str(job_id),
                    level="3.1",
                    suite="0_smoke",
                    case="boot-time",
                    result="pass",
                    measurement=1.5,
                    units="s",
                ),
                Result(job=str(job_id), level="3.1", suite="0_smoke", case="always-fail", result="fail"),
                {"level": JOB_LEVEL, "suite": "lava", "case": "job", "result": "pass"},
            ],
        )
    text = clients["anonymous"].logs(job_id)
    assert [LogRecord.from_line(line) for line in text.splitlines()] == records
    assert [
        LogRecord.from_line(line).msg for line in clients["anonymous"].logs(job_id, 2, 4).splitlines()
    ] == ["line 2 <b>", "line 3 <b>"]
    assert clients["anonymous"].logs(job_id, 10) == ""

    bundle = yaml.safe_load(clients["anonymous"].results(job_id, "yaml"))
    assert bundle["job"] == str(job_id)
    junit = clients["anonymous"].results(job_id, "junit")
    assert "<testsuite" in junit and "always-fail" in junit
    assert clients["anonymous"].results(job_id, "tap13").startswith("TAP version 13")
    csv_text = clients["anonymous"].results(job_id, "csv")
    assert csv_text.splitlines()[0].startswith("job,level,suite")
    assert clients["anonymous"].call("GET", f"/jobs/{job_id}/junit/") == junit
    suites = clients["anonymous"].call("GET", f"/jobs/{job_id}/suites/")["results"]
    assert {s["name"]: (s["pass"], s["fail"]) for s in suites} == {"0_smoke": (1, 1), "lava": (1, 0)}
    tests = clients["anonymous"].call("GET", f"/jobs/{job_id}/tests/")["results"]
    assert tests[0]["measurement"] == 1.5
    error = refused(lambda: clients["anonymous"].results(job_id, "pdf"), 400)
    assert "allowed: yaml, junit, tap13, csv" in error.message


# ---- the lab: devices, device types, workers ----


def test_devices(clients) -> None:
    admin, alice = clients["admin"], clients["alice"]
    listing = alice.call("GET", "/devices/")
    assert [d["hostname"] for d in listing["results"]] == ["qemu01", "qemu02"]
    error = refused(
        lambda: alice.call("POST", "/devices/", json_body={"hostname": "qemu03", "device_type": "qemu"}), 403
    )
    assert "only admins may add devices" in error.message
    created = admin.call(
        "POST",
        "/devices/",
        json_body={"hostname": "qemu03", "device_type": "qemu", "worker": "w1", "tags": ["usb", "hdmi"]},
    )
    assert created["health"] == "Unknown" and created["tags"] == ["hdmi", "usb"]
    refused(
        lambda: admin.call("POST", "/devices/", json_body={"hostname": "qemu03", "device_type": "qemu"}), 409
    )
    error = refused(
        lambda: admin.call("POST", "/devices/", json_body={"hostname": "x", "device_type": "nope"}), 404
    )
    assert "unknown device type 'nope'; known: qemu" in error.message
    updated = admin.call("PATCH", "/devices/qemu03/", json_body={"health": "good", "tags": "usb"})
    assert updated["health"] == "Good" and updated["tags"] == ["usb"]
    error = refused(lambda: admin.call("PATCH", "/devices/qemu03/", json_body={"health": "fine"}), 400)
    assert "allowed: Good, Unknown, Looping, Bad, Maintenance, Retired" in error.message
    assert alice.call("GET", "/devices/", params={"tag": "usb"})["count"] == 1
    assert alice.call("GET", "/devices/qemu03/")["worker"] == "w1"
    refused(lambda: alice.call("GET", "/devices/nope/"), 404)

    # dictionaries: get, set, review (rendered)
    assert alice.call("GET", "/devices/qemu03/dictionary/")["dictionary"] == "{% extends 'qemu.jinja2' %}\n"
    dictionary = "{% extends 'qemu.jinja2' %}\n{% set memory = 2048 %}\n{% set no_kvm = True %}\n"
    admin.call("POST", "/devices/qemu03/dictionary/", json_body={"dictionary": dictionary})
    assert alice.call("GET", "/devices/qemu03/dictionary/")["dictionary"] == dictionary
    rendered = alice.call("GET", "/devices/qemu03/dictionary/", params={"render": "true"})["dictionary"]
    assert "2048" in rendered and isinstance(yaml.safe_load(rendered), dict)
    status, _, body = admin.request(
        "PUT",
        "/devices/qemu03/dictionary/",
        body=dictionary.replace("2048", "1024"),
        content_type="text/plain",
    )
    assert status == 200 and "1024" in body.decode()
    error = refused(
        lambda: admin.call(
            "POST",
            "/devices/qemu03/dictionary/",
            json_body={"dictionary": "{% extends 'nothing.jinja2' %}\n"},
        ),
        400,
    )
    assert "nothing.jinja2" in error.message
    refused(
        lambda: alice.call("POST", "/devices/qemu03/dictionary/", json_body={"dictionary": dictionary}), 403
    )


def test_device_types(clients) -> None:
    admin, alice = clients["admin"], clients["alice"]
    assert [t["name"] for t in alice.call("GET", "/devicetypes/")["results"]] == ["qemu"]
    error = refused(lambda: admin.call("POST", "/devicetypes/", json_body={"name": "mystery"}), 400)
    assert "no template mystery.jinja2" in error.message
    template = "{% extends 'qemu.jinja2' %}\n{% set memory = 4096 %}\n"
    created = admin.call(
        "POST",
        "/devicetypes/",
        json_body={"name": "bigqemu", "template": template, "description": "4 GB QEMU"},
    )
    assert created["template"] == "database" and created["devices"] == 0
    assert alice.call("GET", "/devicetypes/bigqemu/template/")["template"] == template
    assert "extends" in alice.call("GET", "/devicetypes/qemu/template/")["template"]
    error = refused(
        lambda: admin.call("POST", "/devicetypes/bigqemu/template/", json_body={"template": "{% if %}"}), 400
    )
    assert "does not render" in error.message
    refused(
        lambda: alice.call("POST", "/devicetypes/bigqemu/template/", json_body={"template": template}), 403
    )
    refused(lambda: admin.call("POST", "/devicetypes/", json_body={"name": "../etc"}), 400)
    # a health check is validated like a job
    error = refused(
        lambda: admin.call(
            "POST",
            "/devicetypes/qemu/health_check/",
            json_body={
                "health_check": job_text().replace("method: qemu", "method: bad")
            },
        ),
        400,
    )
    assert error.faults[0]["path"] == "actions[1].boot.method"
    admin.call("POST", "/devicetypes/qemu/health_check/", json_body={"health_check": job_text("hc")})
    assert alice.call("GET", "/devicetypes/qemu/health_check/")["health_check"] == job_text("hc")
    assert alice.call("GET", "/devicetypes/qemu/")["health_check"] is True
    changed = admin.call(
        "PATCH", "/devicetypes/qemu/", json_body={"health_frequency": 5, "health_denominator": "jobs"}
    )
    assert (changed["health_frequency"], changed["health_denominator"]) == (5, "jobs")


def test_workers(clients, lab) -> None:
    admin, alice = clients["admin"], clients["alice"]
    assert [w["hostname"] for w in alice.call("GET", "/workers/")["results"]] == ["w1"]
    added = admin.call(
        "POST", "/workers/", json_body={"hostname": "w2", "description": "rack 2", "disabled": True}
    )
    assert (added["health"], added["state"], added["description"]) == ("Retired", "Offline", "rack 2")
    refused(lambda: alice.call("POST", "/workers/", json_body={"hostname": "w3"}), 403)
    refused(lambda: admin.call("POST", "/workers/", json_body={"hostname": "w2"}), 409)
    updated = admin.call("PUT", "/workers/w2/", json_body={"health": "Active", "job_limit": 2})
    assert (updated["health"], updated["job_limit"]) == ("Active", 2)
    assert alice.call("GET", "/workers/w1/")["devices"] == ["qemu01", "qemu02"]
    env = "overrides:\n  http_proxy: http://proxy:3128\n"
    admin.call("PUT", "/workers/w2/env/", body=env, content_type="application/yaml")
    assert alice.call("GET", "/workers/w2/env/")["env"] == env
    error = refused(
        lambda: admin.call("PUT", "/workers/w2/env/", body="- a list\n", content_type="application/yaml"), 400
    )
    assert "must be a YAML mapping" in error.message
    admin.call("PUT", "/workers/w2/config/", json_body={"config": "dispatcher_ip: 10.0.0.1\n"})
    assert alice.call("GET", "/workers/w2/config/")["config"] == "dispatcher_ip: 10.0.0.1\n"
    lab_yaml = yaml.safe_load((lab.instance.store.root / "lab.yaml").read_text())
    assert [w["hostname"] for w in lab_yaml["workers"]] == ["w1", "w2"]
    assert [d["hostname"] for d in lab_yaml["devices"]] == ["qemu01", "qemu02"]


def test_finished_job_is_published_to_the_site(lab) -> None:
    master = MasterServer("127.0.0.1", 0, scheduler_interval=3600, publish_site=True).start()
    try:
        client = Client(master.url, lab.tokens["alice"])
        [job_id] = client.submit(job_text("published"))
        assert wait_state(client, job_id, "Scheduled")["state"] == "Scheduled"
        with connection():
            jobs.job_started(job_id)
            jobs.append_logs(job_id, [LogRecord("2024-01-01T10:00:00.000000", "target", "<script>x</script>")])
            jobs.append_results(job_id, [Result(job=str(job_id), level="3.1", suite="0_smoke", case="c1",
                                                result="pass")])
            jobs.job_finished(job_id, "Complete")
        page = lab.instance.site_dir / "jobs" / str(job_id) / "index.html"
        deadline = time.monotonic() + 10
        while not page.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert page.exists(), "sitegen did not publish the finished job"
        assert "published" in page.read_text()
        bundle = yaml.safe_load(lab.instance.store.read_file(job_id, "results.yaml"))
        assert bundle["job"] == str(job_id)
        assert lab.instance.store.read_meta(job_id)["health"] == "Complete"
        client.close()
    finally:
        stop_server(master)


# ---- the server's machinery: validator processes, connections, the HTTP loop ----


def test_validator_processes_find_what_validate_job_finds(lab) -> None:
    definition = job_text("pooled")
    with connection():
        dictionary = Device.get(Device.hostname == "qemu01").dictionary
        config = validation.device_config(dictionary, {"arch": "amd64"})
    texts = [definition, definition.replace("method: qemu", "method: nope"),
             definition.replace("minutes: 5", "minutes: -5"), definition.replace("    to: tmpfs", "    to: [")]
    pool = validation.ValidatorPool(2).start()
    try:
        assert pool.wait_ready(30) and len(pool.pids()) == 2
        for text in texts:
            got = [(f.path, f.line, f.message) for f in pool.validate(text, config)]
            assert got == [(f.path, f.line, f.message) for f in validate_job(text, config)]
        assert pool.validate(definition, config) == []
        # a bug (here limits that are no Limits) comes back with its traceback
        with pytest.raises(RuntimeError, match="(?s)in a validator process.*AttributeError"):
            pool.validate(definition, config, None)
        # a process that dies is replaced; the check that found it dead runs in the calling thread
        dead = pool.pids()[0]
        os.kill(dead, 9)
        for _ in range(3):
            assert pool.validate(texts[1], config)[0].path == "actions[1].boot.method"
        assert pool.wait_ready(30) and dead not in pool.pids() and len(pool.pids()) == 2
    finally:
        pool.stop()
    assert pool.pids() == [] and validation._pool is None
    # stopped: check_definition validates in the calling thread again
    with connection():
        assert validation.check_definition(definition).name == "pooled"


def test_the_master_judges_context_variables_as_lava_server_and_a_lab_may_add_its_own(lab) -> None:
    """lava-server allows LAVA's list of context variables plus a lab's extras; lava-run and
    pumice-run allow any (TuxLAVA's ``no_network``)."""
    definition = job_text("context").replace("  arch: amd64\n", "  arch: amd64\n  no_network: true\n", 1)
    with connection():
        dictionary = Device.get(Device.hostname == "qemu01").dictionary
    assert validate_job(definition, validation.device_config(dictionary, {"arch": "amd64"})) == []
    instance = validation.current()
    with connection(), pytest.raises(validation.Invalid) as refused:
        validation.check_definition(definition)
    (fault,) = refused.value.faults
    assert (fault.path, fault.line) == ("context.no_network", definition.splitlines().index("  no_network: true") + 1)
    assert "not a known context variable; a lab allows its own with `pumice-master serve --context-variable NAME`" \
        in fault.message
    instance.context_variables = ("no_network",)
    try:
        with connection():
            assert validation.check_definition(definition).context == {"arch": "amd64", "no_network": True}
    finally:
        instance.context_variables = ()


def test_a_thread_keeps_its_sqlite_connection(lab) -> None:
    """One connection per thread on SQLite (pragmas and schema read once); pooled on PostgreSQL."""
    seen: list[bool] = []

    def request() -> None:
        for _ in range(2):
            with connection():
                seen.append(db.connection() is not None)
            seen.append(db.is_closed())
        db.close()

    thread = threading.Thread(target=request)
    thread.start()
    thread.join(10)
    assert seen == [True, is_postgres(), True, is_postgres()]


def test_the_poll_loop_leaves_a_sending_channel_alone(server) -> None:
    """While a request thread holds a channel's output lock, the loop does not poll its socket (it
    would find it writable, fail to take the lock and spin)."""
    ours, theirs = socket.socketpair()
    loop = server._server
    channel = loop.channel_class(loop, ours, ("127.0.0.1", 0), loop.adj, map={})
    try:
        channel.total_outbufs_len = 10  # output waiting
        assert channel.writable()
        held, release = threading.Event(), threading.Event()

        def sender() -> None:
            with channel.outbuf_lock:
                held.set()
                release.wait(10)

        thread = threading.Thread(target=sender)
        thread.start()
        assert held.wait(10)
        assert not channel.writable()
        release.set()
        thread.join(10)
        assert channel.writable()
    finally:
        channel.total_outbufs_len = 0
        channel.close()
        theirs.close()
