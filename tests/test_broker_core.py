"""The broker in-process (a thread, real ROUTER on loopback, SQLite) against hand-driven agents."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from conftest import allowing
from support.broker import BrokerLab, db_wait, make_broker_lab, timed_job, wait_for
from support.master import LOCAL_IMAGES, job_text

from agent import messages as m
from master import inventory, jobs
from master.broker import Broker
from master.db import connection
from master.instance import current
from master.models import Device, Job, Worker
from master.models import TestCase as CaseRow
from master.scheduler import Scheduler
from master.states import DeviceHealth, JobHealth, JobState, WorkerState
from master.users import SYSTEM
from results.log import LogRecord


@pytest.fixture
def broker_lab(tmp_path: Path, database_url: str | None) -> Iterator[BrokerLab]:
    """The broker against SQLite and, with PUMICE_TEST_PG, PostgreSQL."""
    yield from make_broker_lab(tmp_path, database_url)



def line(n: int, lvl: str = "target", msg: object = None) -> str:
    return LogRecord(f"2024-01-01T00:00:{n % 60:02d}.000000", lvl, msg if msg is not None else f"line {n}") \
        .to_line().rstrip("\n")


def result_line(n: int, case: str, result: str = "pass") -> str:
    return line(n, "results", {"definition": "0_smoke", "case": case, "result": result, "level": "3.1"})


def submit_and_schedule(bl: BrokerLab, text: str | None = None) -> int:
    with connection():
        [job_id] = jobs.submit_job(text or job_text("broker test"), bl.lab.user("alice"))
    Scheduler().loop_once()
    return job_id


def started(bl: BrokerLab, agent, text: str | None = None) -> tuple[int, m.Start]:
    """HELLO, a scheduled job, its START acknowledged: the job is Running."""
    assert isinstance(agent.hello(), m.Welcome)
    job_id = submit_and_schedule(bl, text)
    start = agent.recv(m.Start)
    assert start.job_id == job_id
    agent.send(m.StartOk(job_id=job_id))
    db_wait(lambda: Job.get_by_id(job_id).state == JobState.RUNNING, what="the job to run")
    return job_id, start


def stored_lines(job_id: int) -> list[str]:
    with current().store.log(job_id) as logfile:
        return logfile.read()


# ---- connection ----

def test_hello_welcome_and_worker_online(broker_lab: BrokerLab) -> None:
    with connection():
        inventory.worker_offline("w1")
    agent = broker_lab.agent()
    welcome = agent.hello()
    assert welcome == m.Welcome(protocol=m.PROTOCOL_VERSION, version="0.1.0", heartbeat=0.5)
    db_wait(lambda: Worker.get(Worker.hostname == "w1").state == WorkerState.ONLINE, what="w1 online")
    with connection():
        assert Worker.get(Worker.hostname == "w1").version == "0.1.0"
    agent.send(m.Ping())
    assert isinstance(agent.recv(m.Pong), m.Pong)
    agent.close()


def test_unregistered_worker_is_refused_and_logged(broker_lab: BrokerLab,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    """With authentication (the default), a stranger's key is refused in the handshake: it
    receives nothing at all; the master logs why."""
    caplog.set_level(logging.INFO, "pumice.broker")
    agent = broker_lab.agent("intruder")
    agent.send(m.Hello(hostname="intruder", protocol=m.PROTOCOL_VERSION, version="0.1.0", jobs=[]))
    assert agent.drain(1.0) == []
    public = broker_lab.keys["intruder"][0].decode()
    wait_for(lambda: f"unknown CURVE key {public} (registered for no worker" in caplog.text, what="the refusal")
    agent.close()


def test_unregistered_worker_is_refused_in_plain_mode(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """--insecure-plain: the HELLO of an unregistered hostname is answered REFUSED with the reason."""
    caplog.set_level(logging.INFO, "pumice.broker")
    lab = make_broker_lab(tmp_path, plain=True)
    bl = next(lab)
    try:
        assert "the broker runs WITHOUT worker authentication (--insecure-plain)" in caplog.text
        agent = bl.agent("intruder", plain=True)
        refused = agent.hello()
        assert isinstance(refused, m.Refused) and refused.code == "unknown-worker"
        assert "worker intruder is not registered on this master" in refused.reason
        assert "pumice-master workers add intruder" in refused.reason
        assert "refused worker intruder: worker intruder is not registered" in caplog.text
        agent.close()
        agent = bl.agent("w1", plain=True)
        assert isinstance(agent.hello(), m.Welcome)
        wait_for(lambda: "worker w1 connected WITHOUT authentication" in caplog.text, what="the warning")
        agent.close()
    finally:
        lab.close()


def test_wrong_protocol_version_is_refused_and_logged(broker_lab: BrokerLab,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    agent = broker_lab.agent()
    frames = m.encode(m.Hello(hostname="w1", protocol=2, version="9.0", jobs=[]))
    frames[1] = b"2"
    agent.send_frames(frames)
    refused = agent.recv()
    assert isinstance(refused, m.Refused) and refused.code == "protocol"
    assert "the master speaks pumice protocol 1" in refused.reason and "w1 speaks 2" in refused.reason
    assert "refused worker w1: protocol version mismatch" in caplog.text
    # and nothing else is accepted from it
    agent.send(m.Ping())
    assert isinstance(agent.recv(), m.HelloRequired)
    agent.close()


def test_messages_before_hello_ask_for_hello(broker_lab: BrokerLab) -> None:
    agent = broker_lab.agent()
    agent.send(m.Log(job_id=1, seq=0, lines=["x"]))
    assert isinstance(agent.recv(), m.HelloRequired)
    agent.close()


def test_silent_worker_goes_offline_and_bye_at_once(broker_lab: BrokerLab) -> None:
    agent = broker_lab.agent()
    agent.hello()
    db_wait(lambda: Worker.get(Worker.hostname == "w1").state == WorkerState.OFFLINE, timeout=5,
            what="w1 offline after 3 silent heartbeats")
    agent.hello()
    db_wait(lambda: Worker.get(Worker.hostname == "w1").state == WorkerState.ONLINE, what="w1 online again")
    agent.send(m.Bye())
    db_wait(lambda: Worker.get(Worker.hostname == "w1").state == WorkerState.OFFLINE, timeout=1,
            what="w1 offline after BYE")
    agent.close()


# ---- a job's life ----

def test_start_carries_device_env_and_config(broker_lab: BrokerLab) -> None:
    with connection():
        inventory.set_worker_text(SYSTEM, "w1", "env", "overrides:\n  http_proxy: http://proxy:3128\n")
        config = allowing(addresses=[LOCAL_IMAGES], dispatcher_ip="192.0.2.1")
        inventory.set_worker_text(SYSTEM, "w1", "config", yaml.safe_dump(config))
    agent = broker_lab.agent()
    job_id, start = started(broker_lab, agent)
    assert start.env == {"purge": False, "removes": [], "overrides": {"http_proxy": "http://proxy:3128"}}
    assert start.dispatcher == config  # the file policy goes with it: the agent applies it too
    assert start.timeout == 300
    with connection():
        device = Device.get_by_id(Job.get_by_id(job_id).actual_device_id)
        assert start.device_name == device.hostname
        assert device.state == "Running"
    device_config = yaml.safe_load(start.device)
    assert "qemu" in device_config["actions"]["boot"]["methods"]
    assert yaml.safe_load(start.definition)["job_name"] == "broker test"
    agent.close()


def test_start_is_resent_until_acknowledged_and_deduplicated(broker_lab: BrokerLab) -> None:
    agent = broker_lab.agent()
    agent.hello()
    job_id = submit_and_schedule(broker_lab)
    first = agent.recv(m.Start)
    again = agent.recv(m.Start, timeout=3)  # no START_OK yet: resent after a heartbeat
    assert first == again
    agent.send(m.StartOk(job_id=job_id))
    agent.send(m.StartOk(job_id=job_id))
    db_wait(lambda: Job.get_by_id(job_id).state == JobState.RUNNING)
    assert not [msg for msg in agent.drain(1.2) if isinstance(msg, m.Start)]
    agent.close()


def test_start_waits_for_an_offline_worker(broker_lab: BrokerLab) -> None:
    agent = broker_lab.agent()
    agent.hello()
    with connection():
        [job_id] = jobs.submit_job(job_text(), broker_lab.lab.user("alice"))
    agent.close()
    # the agent goes away after scheduling: the START reaches its next connection
    Scheduler().loop_once()
    time.sleep(0.3)
    agent = broker_lab.agent()
    agent.hello()
    assert agent.recv(m.Start).job_id == job_id
    agent.close()


def test_logs_results_and_end(broker_lab: BrokerLab) -> None:
    agent = broker_lab.agent()
    job_id, _ = started(broker_lab, agent)
    batch1 = [line(0), line(1, "info", "start: 1 deploy"), result_line(2, "c1")]
    batch2 = [line(3), result_line(4, "c2", "fail"), line(5)]
    agent.send(m.Log(job_id=job_id, seq=0, lines=batch1))
    assert agent.recv(m.LogOk) == m.LogOk(job_id=job_id, lines=3)
    # live: the API reads the log while the job runs
    with connection():
        assert jobs.job_logs(job_id, None) == batch1
        assert [r.case for r in jobs.job_results(job_id, None)] == ["c1"]
    # a resent batch (its ack was lost) is not doubled; an overlapping one adds only its tail
    agent.send(m.Log(job_id=job_id, seq=0, lines=batch1))
    assert agent.recv(m.LogOk) == m.LogOk(job_id=job_id, lines=3)
    agent.send(m.Log(job_id=job_id, seq=2, lines=batch1[2:] + batch2))
    assert agent.recv(m.LogOk) == m.LogOk(job_id=job_id, lines=6)
    # a gap is answered with rewind
    agent.send(m.Log(job_id=job_id, seq=10, lines=[line(10)]))
    assert agent.recv(m.LogOk) == m.LogOk(job_id=job_id, lines=6, rewind=True)
    # END before the master has every line: rewind, no end
    agent.send(m.End(job_id=job_id, health="Complete", lines=7))
    assert agent.recv(m.LogOk) == m.LogOk(job_id=job_id, lines=6, rewind=True)
    with connection():
        assert Job.get_by_id(job_id).state == JobState.RUNNING
    agent.send(m.Log(job_id=job_id, seq=6, lines=[line(6)]))
    agent.recv(m.LogOk)
    agent.send(m.End(job_id=job_id, health="Complete", lines=7, description="pipeline: []\n"))
    assert agent.recv(m.EndOk) == m.EndOk(job_id=job_id)
    with connection():
        job = Job.get_by_id(job_id)
        assert (job.state, job.health) == (JobState.FINISHED, JobHealth.COMPLETE)
        results = [(r.case, r.result) for r in jobs.job_results(job_id, None)]
        assert results == [("c1", "pass"), ("c2", "fail")]
        assert Device.get_by_id(job.actual_device_id).state == "Idle"
    assert stored_lines(job_id) == batch1 + batch2 + [line(6)]
    assert current().store.read_file(job_id, "description.yaml") == "pipeline: []\n"
    assert "c2" in current().store.read_file(job_id, "results.yaml")
    # END resent (END_OK lost): acknowledged again, nothing changes
    agent.send(m.End(job_id=job_id, health="Incomplete", lines=7))
    assert agent.recv(m.EndOk) == m.EndOk(job_id=job_id)
    with connection():
        assert Job.get_by_id(job_id).health == JobHealth.COMPLETE
    agent.close()


def test_infrastructure_error_puts_the_device_to_unknown(broker_lab: BrokerLab) -> None:
    agent = broker_lab.agent()
    job_id, _ = started(broker_lab, agent)
    agent.send(m.End(job_id=job_id, health="Incomplete", lines=0, error_type="Infrastructure",
                     error_msg="the runner was lost"))
    agent.recv(m.EndOk)
    with connection():
        job = Job.get_by_id(job_id)
        assert job.health == JobHealth.INCOMPLETE
        assert job.failure_comment == "Infrastructure: the runner was lost"
        assert Device.get_by_id(job.actual_device_id).health == DeviceHealth.UNKNOWN
    agent.close()


def test_another_workers_job_is_not_touched(broker_lab: BrokerLab, caplog: pytest.LogCaptureFixture) -> None:
    agent = broker_lab.agent()
    job_id, _ = started(broker_lab, agent)
    with connection():
        inventory.add_worker(SYSTEM, "w2")
    other = broker_lab.agent("w2")
    other.hello()
    other.send(m.Log(job_id=job_id, seq=0, lines=["- {}"]))
    assert other.recv(m.LogOk).lines == 1  # acknowledged so that it stops, but not stored
    other.send(m.End(job_id=job_id, health="Complete", lines=1))
    other.recv(m.EndOk)
    assert stored_lines(job_id) == []
    with connection():
        assert Job.get_by_id(job_id).state == JobState.RUNNING
    assert f"worker w2 sent the log of job {job_id}, which is w1's" in caplog.text
    agent.close()
    other.close()


def test_cancel_is_sent_and_resent_until_the_end(broker_lab: BrokerLab) -> None:
    agent = broker_lab.agent()
    job_id, _ = started(broker_lab, agent)
    with connection():
        jobs.cancel_job(job_id, broker_lab.lab.user("alice"))
    assert agent.recv(m.Cancel) == m.Cancel(job_id=job_id)
    assert agent.recv(m.Cancel, timeout=3) == m.Cancel(job_id=job_id)
    agent.send(m.End(job_id=job_id, health="Canceled", lines=0, error_type="Canceled", error_msg="canceled"))
    agent.recv(m.EndOk)
    with connection():
        assert Job.get_by_id(job_id).health == JobHealth.CANCELED
    assert not [msg for msg in agent.drain(1.5) if isinstance(msg, m.Cancel)]
    agent.close()


def test_reconnect_asks_status_and_a_lost_job_ends_incomplete(broker_lab: BrokerLab) -> None:
    agent = broker_lab.agent()
    job_id, _ = started(broker_lab, agent)
    agent.close()
    agent = broker_lab.agent()
    agent.send(m.Hello(hostname="w1", protocol=m.PROTOCOL_VERSION, version="0.1.0", jobs=[]))
    agent.recv(m.Welcome)
    assert agent.recv(m.Status) == m.Status(job_ids=[job_id])
    agent.send(m.StatusReply(jobs=[{"job_id": job_id, "state": m.JOB_UNKNOWN, "lines": 0}]))
    db_wait(lambda: Job.get_by_id(job_id).state == JobState.FINISHED, what="the lost job to end")
    with connection():
        job = Job.get_by_id(job_id)
        assert job.health == JobHealth.INCOMPLETE
        assert f"worker w1 no longer knows job {job_id}" in job.failure_comment
        assert job.failure_comment.startswith("Infrastructure: ")
    agent.close()


def test_worker_away_past_the_job_timeout_ends_the_job(broker_lab: BrokerLab) -> None:
    agent = broker_lab.agent()
    job_id, _ = started(broker_lab, agent, timed_job(2))
    agent.close()  # silent from now on
    db_wait(lambda: Job.get_by_id(job_id).state == JobState.FINISHED, timeout=10,
            what="the job of the absent worker to end")
    with connection():
        job = Job.get_by_id(job_id)
        assert job.health == JobHealth.INCOMPLETE
        assert "worker w1 has been away for" in job.failure_comment
        assert "longer than the job timeout (2 s)" in job.failure_comment
        assert Device.get_by_id(job.actual_device_id).health == DeviceHealth.UNKNOWN
        assert Worker.get(Worker.hostname == "w1").state == WorkerState.OFFLINE


# ---- the master restarts ----

def test_restarted_broker_recovers_results_and_resends_start(broker_lab: BrokerLab) -> None:
    agent = broker_lab.agent()
    job_id, _ = started(broker_lab, agent)
    agent.send(m.Log(job_id=job_id, seq=0, lines=[line(0), result_line(1, "c1")]))
    agent.recv(m.LogOk)
    # the master dies between a log append and its results insert (simulated: append by hand)
    with current().store.log(job_id) as logfile:
        logfile.append_lines([result_line(2, "c2"), line(3)])
    broker_lab.broker.stop()
    broker = Broker(broker_lab.endpoint, heartbeat=0.5).bind()
    broker.start()
    broker_lab.broker = broker
    try:
        agent.send(m.Log(job_id=job_id, seq=2, lines=[line(99)]))
        assert isinstance(agent.recv(), m.HelloRequired)
        agent.send(m.Hello(hostname="w1", protocol=m.PROTOCOL_VERSION, version="0.1.0", jobs=[job_id]))
        agent.recv(m.Welcome)
        assert agent.recv(m.Status) == m.Status(job_ids=[job_id])
        # the agent resends from its last ack (2): the master has 4 lines already
        agent.send(m.Log(job_id=job_id, seq=2, lines=[result_line(2, "c2"), line(3), result_line(4, "c3")]))
        assert agent.recv(m.LogOk).lines == 5
        with connection():
            cases = [c for (c,) in CaseRow.select(CaseRow.name).where(CaseRow.job == job_id)
                     .order_by(CaseRow.id).tuples()]
        assert cases == ["c1", "c2", "c3"]
    finally:
        agent.close()


def test_loop_once_steps_the_broker(broker_lab: BrokerLab) -> None:
    """A broker driven step by step (no thread): what tests of a daemon's core look like."""
    broker = Broker("tcp://127.0.0.1:*", heartbeat=5).bind()
    broker.recover()
    try:
        agent = broker_lab.agent()
        agent.close()
        agent = broker_lab.agent(endpoint=broker.bound[0])
        agent.send(m.Hello(hostname="w1", protocol=m.PROTOCOL_VERSION, version="0.1.0"))
        wait_for(lambda: broker.loop_once(0.1), what="the HELLO")
        assert isinstance(agent.recv(), m.Welcome)
        assert broker.sessions["w1"].version == "0.1.0"
        agent.close()
    finally:
        broker.stop()
