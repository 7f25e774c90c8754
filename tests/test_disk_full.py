"""The master's data directory fills up (a small tmpfs, filled by a test) while jobs run: a real
master (``pumice-master serve --broker``) and agent (``pumice-agent``, with a stand-in for
pumice-run) over loopback, on SQLite and, with PUMICE_TEST_PG, PostgreSQL (then only the artifact
store is on the tmpfs).

What must hold: no log line lost or doubled (the stored log is byte-identical to the runner's
output.yaml once space returns), every result stored once, END and state changes recorded late
but recorded, submissions refused with a 507 that names the directory and its free space, and
the condition logged once a minute, not as a traceback per request."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import xmlrpc.client
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.broker import FakeAgent, ProcessLab, db_wait, fake_runner, make_broker_lab, wait_for
from support.master import job_text

from agent import messages as m
from master import jobs
from master.db import connection
from master.instance import current
from master.models import Job
from master.models import TestCase as CaseRow
from master.scheduler import Scheduler
from master.states import JobHealth, JobState
from results.logfile import LogFile
from results.record import results_in_lines

#: the fake runner fetches nothing: an address the file policy lets through
FAKE_IMAGES = "images.example"


#: the stand-in runner's job: this many log lines (a result every ten), this pause after each
LINES, DELAY = 20_000, 0.0004


def agent_with_fake_runner(runner: list[str]) -> list[str]:
    """``pumice-agent`` whose jobs run ``runner`` instead of pumice-run."""
    return [sys.executable, "-c",
            "import os, sys, agent.daemon as w\n"
            "build = w.build_config\n"
            "def with_runner(options, environ=os.environ):\n"
            "    config = build(options, environ)\n"
            f"    config.runner = {runner!r}\n"
            "    return config\n"
            "w.build_config = with_runner\n"
            "sys.exit(w.main(sys.argv[1:]))\n"]


def curl_submit(lab: ProcessLab, text: str) -> tuple[int, dict]:
    """POST a job with curl: (HTTP status, JSON body)."""
    path = lab.root / "refused-job.yaml"
    path.write_text(text)
    done = subprocess.run(["curl", "-sS", "-o", "-", "-w", "\n%{http_code}", "-H",
                           f"Authorization: Token {lab.token}", "--data-binary", f"@{path}",
                           f"{lab.url}/api/v0.2/jobs/"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    body, _, status = done.stdout.rpartition("\n")
    return int(status), json.loads(body)


def xmlrpc_submit(lab: ProcessLab, text: str) -> object:
    """``scheduler.jobs.submit`` over XML-RPC as lavacli sends it: the result, or the Fault."""
    proxy = xmlrpc.client.ServerProxy(f"http://admin:{lab.token}@{lab.url.split('//')[1]}/RPC2", allow_none=True)
    try:
        return proxy.scheduler.jobs.submit(text)
    except xmlrpc.client.Fault as fault:
        return fault


def stored_log(lab: ProcessLab, job_id: int) -> LogFile:
    return LogFile(lab.data / "store" / "jobs" / str(job_id) / "output.yaml")


def full_reports(lab: ProcessLab) -> list[str]:
    return [line for line in lab.master_log.read_text().splitlines() if "pumice.storage" in line]


@pytest.fixture
def full_lab(tmp_path: Path, tmpfs, database_url: str | None) -> Iterator[tuple[ProcessLab, object]]:
    """A ProcessLab whose data directory (SQLite: all of it; PostgreSQL: the artifact store) is a
    64 MB tmpfs, its master started; yields the lab and the tmpfs."""
    fs = tmpfs("data" if database_url is None else "data/store", 64 << 20)
    lab = ProcessLab(tmp_path, database=database_url)
    try:
        lab.start_master()
        yield lab, fs
    finally:
        lab.close()


def test_a_full_data_directory_mid_job_loses_and_doubles_no_log_line(full_lab, tmp_path: Path) -> None:
    lab, fs = full_lab
    agent = lab.start_agent("w1", python=agent_with_fake_runner(fake_runner(tmp_path)))
    job_id = lab.submit_text(f"# lines={LINES} delay={DELAY}\n" + job_text("a long log", images=FAKE_IMAGES))
    spool = lab.root / "spool-w1" / "jobs" / str(job_id)
    wait_for(lambda: stored_log(lab, job_id).count() > 2000, 60, "the log to stream in")

    filler = fs.fill()  # the disk is full: every write of the master fails from now on
    full_since = time.monotonic()
    assert fs.free() == 0
    stuck = stored_log(lab, job_id).count()
    # the runner goes on and the agent keeps its lines in the spool; the master stores none
    wait_for(lambda: LogFile(spool / "output.yaml").count() > stuck + 3000, 60, "the runner to go on")
    assert stored_log(lab, job_id).count() <= stuck + 1000  # at most the batch in flight when it filled

    # submissions are refused with a clear 507, REST and XML-RPC alike, nothing half created
    jobs_before = lab.api("GET", "/jobs/")["count"]
    for n in range(20):
        status, body = curl_submit(lab, job_text(f"refused {n}", images=FAKE_IMAGES))
        assert status == 507, body
        assert body["error"].startswith(f"the master's data directory is full: {fs.path} has 0 B free of "), body
        assert "the job submission was refused: try again once an admin has freed space" in body["error"]
    fault = xmlrpc_submit(lab, job_text("refused over XML-RPC", images=FAKE_IMAGES))
    assert isinstance(fault, xmlrpc.client.Fault) and fault.faultCode == 507, fault
    assert f"the master's data directory is full: {fs.path} has 0 B free" in fault.faultString
    assert lab.api("GET", "/jobs/")["count"] == jobs_before
    assert sorted(p.name for p in (lab.data / "store" / "jobs").iterdir()) == [str(job_id)]

    # the job ends on the worker while the master's disk is still full
    wait_for(lambda: json.loads((spool / "state.json").read_text())["status"] == "exited", 120,
             "the runner to finish")
    time.sleep(3)
    assert lab.job(job_id)["state"] == "Running"
    outage = time.monotonic() - full_since

    filler.unlink()  # space comes back
    job = lab.wait_job(job_id, 120)
    assert (job["health"], job["failure_comment"]) == ("Complete", None), lab.diagnosis(job_id)
    assert lab.api("GET", "/devices/qemu01/")["state"] == "Idle"
    assert lab.api("GET", "/devices/qemu01/")["health"] == "Good"

    # the stored log is the runner's, byte for byte: 0 lines lost, 0 doubled
    local_path, stored_path = spool / "output.yaml", lab.data / "store" / "jobs" / str(job_id) / "output.yaml"
    local, stored = LogFile(local_path).read(), stored_log(lab, job_id).read()
    lost, doubled = Counter(local) - Counter(stored), Counter(stored) - Counter(local)
    assert (sum(lost.values()), sum(doubled.values())) == (0, 0)
    assert len(local) > LINES and stored == local
    assert stored_path.read_bytes() == local_path.read_bytes()
    assert stored_path.with_suffix(".idx").read_bytes() == local_path.with_suffix(".idx").read_bytes()
    # every result once, the end published in the store
    tests = lab.api("GET", f"/jobs/{job_id}/tests/")["results"]
    assert [(r["suite"], r["case"]) for r in tests] == [(r.suite, r.case) for r in results_in_lines(job_id, local)]
    assert "state: Finished" in (stored_path.parent / "meta.yaml").read_text()
    assert (stored_path.parent / "results.yaml").exists()

    # logged once a minute with the count of the rest, not a traceback per failure
    log = lab.master_log.read_text()
    assert "Traceback" not in log, log[-5000:]
    reports = [line for line in full_reports(lab) if "is full" in line]
    assert 1 <= len(reports) <= 2 + int(outage // 60), reports
    recovered = [line for line in full_reports(lab) if "accepts writes again" in line]
    assert recovered, full_reports(lab)
    assert int(recovered[0].split("(")[1].split()[0]) >= 20, recovered  # the 21 refusals at least
    # the agent heard the master all along (no reconnection) and resent less and less often
    assert "resending less and less often" in lab.agent_log(agent)
    assert "reconnecting" not in lab.agent_log(agent)
    # and the master serves on: the next job runs
    after = lab.submit_text("# lines=10\n" + job_text("after", images=FAKE_IMAGES))
    assert lab.wait_job(after, 60)["health"] == "Complete"


def test_start_and_end_arriving_while_the_database_is_full_are_recorded_late(tmp_path: Path, tmpfs) -> None:
    fs = tmpfs("data", 64 << 20)
    lab = ProcessLab(tmp_path, plain=True)  # the fake agent speaks the protocol by hand, without CURVE
    agent = None
    try:
        lab.start_master()
        agent = FakeAgent(lab.broker_url, "w1")
        assert isinstance(agent.hello(), m.Welcome)
        job_id = lab.submit_text(job_text("acknowledged while full", images=FAKE_IMAGES))
        start = agent.recv(m.Start, timeout=30)
        assert start.job_id == job_id
        lines = [json.dumps({"dt": "2024-01-01T00:00:00", "lvl": "target", "msg": f"line {n}"}) for n in range(50)]
        lines = ["- " + line for line in lines]
        lines[20] = ('- {"dt": "2024-01-01T00:00:00", "lvl": "results", "msg": {"definition": "0_t", '
                     '"case": "c1", "result": "pass", "level": "3.1"}}')

        # the job's start and its first lines arrive while the disk is full: recorded late
        filler = fs.fill()
        agent.send(m.StartOk(job_id=job_id))
        agent.send(m.Log(job_id=job_id, seq=0, lines=lines[:30]))
        # answered (the agent hears the master) but not acknowledged: the master holds 0 lines
        assert [msg.lines for msg in agent.drain(3.0) if isinstance(msg, m.LogOk)] == [0]
        assert lab.job(job_id)["state"] == "Scheduled"
        filler.unlink()
        wait_for(lambda: lab.job(job_id)["state"] == "Running", 30, "the start to be recorded")
        agent.send(m.Log(job_id=job_id, seq=0, lines=lines[:30]))  # the agent's resend
        assert agent.recv(m.LogOk, timeout=10).lines == 30

        # its end arrives while the disk is full: END is acknowledged once it is recorded
        agent.send(m.Log(job_id=job_id, seq=30, lines=lines[30:]))
        assert agent.recv(m.LogOk, timeout=10).lines == 50
        filler = fs.fill()
        agent.send(m.End(job_id=job_id, health="Incomplete", lines=50, error_type="Infrastructure",
                         error_msg="the board did not boot"))
        assert not [msg for msg in agent.drain(4.0) if isinstance(msg, m.EndOk)]
        assert lab.job(job_id)["state"] == "Running"
        status, body = curl_submit(lab, job_text("refused", images=FAKE_IMAGES))
        assert status == 507 and "the master's data directory is full" in body["error"], body
        filler.unlink()
        assert agent.recv(m.EndOk, timeout=30).job_id == job_id
        job = lab.job(job_id)
        assert (job["state"], job["health"]) == ("Finished", "Incomplete"), job
        assert job["failure_comment"] == "Infrastructure: the board did not boot"
        device = lab.api("GET", "/devices/qemu01/")
        assert (device["state"], device["health"]) == ("Idle", "Unknown"), device  # an infrastructure error
        tests = lab.api("GET", f"/jobs/{job_id}/tests/")["results"]
        assert [(r["suite"], r["case"], r["result"]) for r in tests] == [("0_t", "c1", "pass")]
        assert stored_log(lab, job_id).read() == lines
        assert "Traceback" not in lab.master_log.read_text()
    finally:
        if agent is not None:
            agent.close()
        lab.close()


def test_results_the_database_refuses_wait_in_the_broker_and_are_stored_once(tmp_path: Path, tmpfs) -> None:
    database_disk = tmpfs("data", 16 << 20)
    tmpfs("data/store", 16 << 20)  # the logs have room, the database (data/pumice.db) has none
    broker_lab = make_broker_lab(tmp_path)
    bl = next(broker_lab)
    agent = bl.agent("w1")
    try:
        assert isinstance(agent.hello(), m.Welcome)
        with connection():
            [job_id] = jobs.submit_job(job_text("results refused", images=FAKE_IMAGES), bl.lab.user("alice"))
        Scheduler().loop_once()
        assert agent.recv(m.Start).job_id == job_id
        agent.send(m.StartOk(job_id=job_id))
        db_wait(lambda: Job.get_by_id(job_id).state == JobState.RUNNING, what="the job to run")
        lines = [f'- {{"dt": "2024-01-01T00:00:00", "lvl": "target", "msg": "line {n}"}}' for n in range(10)]
        for n in (3, 7):
            lines[n] = ('- {"dt": "2024-01-01T00:00:00", "lvl": "results", "msg": {"definition": "0_t", '
                        f'"case": "case-{n}", "result": "pass", "level": "3.1"}}}}')

        filler = database_disk.fill()
        agent.send(m.Log(job_id=job_id, seq=0, lines=lines))
        # the lines are stored, their results refused: answered, not acknowledged
        assert [msg.lines for msg in agent.drain(1.5) if isinstance(msg, m.LogOk)] == [0]
        with current().store.log(job_id) as logfile:
            assert logfile.read() == lines
        agent.send(m.End(job_id=job_id, health="Complete", lines=len(lines)))
        assert not [msg for msg in agent.drain(1.5) if isinstance(msg, m.EndOk)]
        filler.unlink()

        agent.send(m.Log(job_id=job_id, seq=0, lines=lines))  # the agent's resend
        assert agent.recv(m.LogOk).lines == len(lines)
        agent.send(m.End(job_id=job_id, health="Complete", lines=len(lines)))
        assert agent.recv(m.EndOk, timeout=10).job_id == job_id
        with connection():
            job = Job.get_by_id(job_id)
            cases = [case.name for case in CaseRow.select().where(CaseRow.job == job_id).order_by(CaseRow.id)]
        assert (job.state, job.health) == (JobState.FINISHED, JobHealth.COMPLETE)
        assert cases == ["case-3", "case-7"]
        with current().store.log(job_id) as logfile:
            assert logfile.read() == lines
    finally:
        agent.close()
        broker_lab.close()
