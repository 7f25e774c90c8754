"""The agent daemon (agent/daemon.py + agent/transport.py) against a real in-process broker, with a
stand-in for pumice-run (no board): spool, log streaming, cancel, restarts, configuration."""

from __future__ import annotations

import argparse
import json
import os
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.broker import BrokerLab, db_wait, fake_runner, make_broker_lab, wait_for
from support.master import job_text

from agent import daemon as agent_daemon
from agent.config import AgentConfig, build_config
from agent.daemon import AgentDaemon
from agent.spool import job_environment
from agent.transport import CertificateError
from master import inventory, jobs
from master.broker import Broker
from master.db import connection
from master.instance import current
from master.models import Device, Job
from master.models import Worker as WorkerModel
from master.scheduler import Scheduler
from master.states import DeviceHealth, JobHealth, JobState
from master.users import SYSTEM
from results.logfile import LogFile
from results.record import results_in_lines


@pytest.fixture
def broker_lab(tmp_path: Path) -> Iterator[BrokerLab]:
    yield from make_broker_lab(tmp_path)



class Running:
    """An AgentDaemon looping in a thread (tests stop it like a crash, or cleanly)."""

    def __init__(self, worker: AgentDaemon) -> None:
        self.worker = worker
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while not self.stop.is_set():
            self.worker.loop_once(0.05)

    def crash(self) -> None:
        """Stop looping and drop the connection without a word (the spool stays as it is)."""
        self.stop.set()
        self.thread.join(5)
        self.worker.transport.close(bye=False)

    def close(self) -> None:
        if not self.stop.is_set():
            self.crash()
        for job in self.worker.jobs.values():
            if job.proc is not None and job.proc.poll() is None:
                job.proc.kill()
                job.proc.wait()


@pytest.fixture
def agent(broker_lab: BrokerLab, tmp_path: Path) -> Iterator:
    """Start a worker daemon w1 (spool in tmp_path) for the lab; returns a factory."""
    started: list[Running] = []

    def start(spool: Path | None = None, **options) -> Running:
        master_cert, worker_cert = broker_lab.key_files("w1", tmp_path / "keys")
        config = AgentConfig(master=broker_lab.endpoint, hostname="w1", spool=spool or tmp_path / "spool",
                             runner=fake_runner(tmp_path), heartbeat=0.5, master_cert=master_cert,
                             worker_cert=worker_cert, **options)
        running = Running(AgentDaemon(config))
        started.append(running)
        return running

    yield start
    for running in started:
        running.close()


def submit(bl: BrokerLab, spec: str, name: str = "fake") -> int:
    """Submit a job for the fake runner (which fetches nothing: the image is on no worker)."""
    with connection():
        [job_id] = jobs.submit_job(f"# {spec}\n" + job_text(name, images="images.example"), bl.lab.user("alice"))
    Scheduler().loop_once()
    return job_id


def job_of(job_id: int) -> Job:
    with connection():
        return Job.get_by_id(job_id)


def finished(job_id: int, timeout: float = 20) -> Job:
    db_wait(lambda: Job.get_by_id(job_id).state == JobState.FINISHED, timeout, f"job {job_id} to finish")
    return job_of(job_id)


def assert_same_log_and_results(job_id: int, spool: Path) -> list[str]:
    """The master's stored log equals the agent's output.yaml line for line; the database holds
    exactly the results of its results records."""
    local = LogFile(spool / "jobs" / str(job_id) / "output.yaml").read()
    with current().store.log(job_id) as logfile:
        stored = logfile.read()
    assert stored == local
    with connection():
        in_db = [(r.suite, r.case, r.result) for r in jobs.job_results(job_id, None)]
    assert in_db == [(r.suite, r.case, r.result) for r in results_in_lines(job_id, local)]
    return local


# ---- a job's life through the daemon ----

def test_job_runs_and_streams_everything(broker_lab: BrokerLab, agent, tmp_path: Path) -> None:
    with connection():
        inventory.set_worker_text(SYSTEM, "w1", "env", "overrides:\n  PUMICE_TEST_ENV: from-the-master\n")
        inventory.set_worker_text(SYSTEM, "w1", "config", "dispatcher_ip: 192.0.2.7\n")
    running = agent()
    job_id = submit(broker_lab, "lines=2500 delay=0")
    job = finished(job_id)
    assert (job.health, job.failure_comment) == (JobHealth.COMPLETE, None)
    local = assert_same_log_and_results(job_id, tmp_path / "spool")
    assert len(local) > 2500
    # the worker's env and config held by the master reached the job
    assert "PUMICE_TEST_ENV=from-the-master" in local[0]
    assert "dispatcher_ip" in local[0] and "192.0.2.7" in local[0]
    assert "device: " in local[1]
    assert current().store.read_file(job_id, "description.yaml") == "pipeline: []\n"
    state = json.loads((tmp_path / "spool" / "jobs" / str(job_id) / "state.json").read_text())
    wait_for(lambda: running.worker.jobs[job_id].status == "ended", what="END_OK")
    assert state["device"] in ("qemu01", "qemu02")


def test_failing_job_reports_its_error(broker_lab: BrokerLab, agent, tmp_path: Path) -> None:
    agent()
    job = finished(submit(broker_lab, "lines=5 exit=1"))
    assert job.health == JobHealth.INCOMPLETE
    assert job.failure_comment == "Job: fake failure"


def test_cancel_stops_the_runner(broker_lab: BrokerLab, agent, tmp_path: Path) -> None:
    agent()
    job_id = submit(broker_lab, "lines=2000 delay=0.02")
    db_wait(lambda: Job.get_by_id(job_id).state == JobState.RUNNING, what="the job to run")
    wait_for(lambda: len(current().store.log(job_id).read(0, 20)) >= 20, what="some log at the master")
    with connection():
        jobs.cancel_job(job_id, broker_lab.lab.user("alice"))
    job = finished(job_id)
    assert job.health == JobHealth.CANCELED
    local = assert_same_log_and_results(job_id, tmp_path / "spool")
    assert len(local) < 1000


def test_runner_killed_from_outside_is_an_infrastructure_error(broker_lab: BrokerLab, agent,
                                                               tmp_path: Path) -> None:
    """... and the daemon removes the scratch directories the runner had no time to remove."""
    scratch, tftp = tmp_path / "scratch", tmp_path / "tftp"
    scratch.mkdir(), tftp.mkdir()
    with connection():
        WorkerModel.update(config=f"tmp_dir: {scratch}\ntftp_root: {tftp}\n").where(
            WorkerModel.hostname == "w1").execute()
    running = agent()
    job_id = submit(broker_lab, "lines=2000 delay=0.02")
    wait_for(lambda: job_id in running.worker.jobs and running.worker.jobs[job_id].proc is not None,
             what="the runner")
    left = [scratch / f"pumice-{job_id}-a1b2", tftp / f"pumice-{job_id}-c3d4"]
    kept = [scratch / f"pumice-{job_id}0-e5f6", tftp / "other", scratch / "pumice-elsewhere"]
    for path in left + kept:
        (path / "ramdisk").mkdir(parents=True)
    (scratch / f"pumice-{job_id}-link").symlink_to(scratch / "pumice-elsewhere")
    os.kill(running.worker.jobs[job_id].proc.pid, signal.SIGKILL)
    job = finished(job_id)
    assert job.health == JobHealth.INCOMPLETE
    assert job.failure_comment == "Infrastructure: pumice-run was killed by signal SIGKILL"
    local = assert_same_log_and_results(job_id, tmp_path / "spool")
    assert local[-1].endswith('"msg": "Infrastructure error: pumice-run was killed by signal SIGKILL"}')
    assert not [path for path in left if path.exists()]
    assert all((path / "ramdisk").is_dir() for path in kept)
    assert (scratch / f"pumice-{job_id}-link").is_symlink()
    with connection():
        assert Device.get_by_id(job.actual_device_id).health == DeviceHealth.UNKNOWN


def test_restarted_daemon_ends_its_lost_job_and_runs_the_next(broker_lab: BrokerLab, agent,
                                                               tmp_path: Path) -> None:
    first = agent()
    job_id = submit(broker_lab, "lines=3000 delay=0.01")
    wait_for(lambda: len(current().store.log(job_id).read(0, 50)) >= 50, what="some log at the master")
    first.crash()
    # the daemon died: its runner is gone too (PDEATHSIG in real life; here we stop it)
    proc = first.worker.jobs[job_id].proc
    proc.send_signal(signal.SIGTERM)
    proc.wait(10)
    agent()
    job = finished(job_id)
    assert job.health == JobHealth.INCOMPLETE
    assert job.failure_comment.startswith(
        "Infrastructure: pumice-agent was restarted while the job ran on qemu0")
    local = assert_same_log_and_results(job_id, tmp_path / "spool")
    assert "Infrastructure error: pumice-agent was restarted" in local[-1]
    with connection():
        assert Device.get_by_id(job.actual_device_id).health == DeviceHealth.UNKNOWN
    # qemu has no health check: an Unknown device still takes the next job
    assert finished(submit(broker_lab, "lines=5")).health == JobHealth.COMPLETE


def test_master_restart_loses_and_doubles_nothing(broker_lab: BrokerLab, agent, tmp_path: Path) -> None:
    agent()
    job_id = submit(broker_lab, "lines=1500 delay=0.002")
    wait_for(lambda: len(current().store.log(job_id).read(0, 100)) >= 100, what="some log at the master")
    broker_lab.broker.stop()
    broker = Broker(broker_lab.endpoint, heartbeat=0.5).bind()
    broker_lab.broker = broker.start()
    job = finished(job_id, 30)
    assert job.health == JobHealth.COMPLETE
    assert len(assert_same_log_and_results(job_id, tmp_path / "spool")) > 1500


def test_logs_through_a_separate_logger_endpoint(broker_lab: BrokerLab, agent, tmp_path: Path) -> None:
    """LAVA's LOGGER_URL: LOG batches go to a second ROUTER, everything else to the first."""
    broker_lab.broker.stop()
    broker = Broker(broker_lab.endpoint, log_endpoint="tcp://127.0.0.1:*", heartbeat=0.5).bind()
    broker_lab.broker = broker.start()
    agent(logger=broker.bound[1])
    job_id = submit(broker_lab, "lines=1500")
    assert finished(job_id).health == JobHealth.COMPLETE
    assert len(assert_same_log_and_results(job_id, tmp_path / "spool")) > 1500
    assert broker.stats.log_lines > 1500


def test_cancel_of_a_job_that_never_started(broker_lab: BrokerLab, agent, tmp_path: Path) -> None:
    """Canceled while its worker was away: when the worker comes back, nothing runs."""
    job_id = submit(broker_lab, "lines=5")
    with connection():
        jobs.cancel_job(job_id, broker_lab.lab.user("alice"))
        assert Job.get_by_id(job_id).state == JobState.CANCELING
    running = agent()
    job = finished(job_id)
    assert job.health == JobHealth.CANCELED
    with connection():
        assert Device.get_by_id(job.actual_device_id).health == DeviceHealth.GOOD
    wait_for(lambda: job_id in running.worker.jobs, what="the agent to note the job")
    assert not (tmp_path / "spool" / "jobs" / str(job_id) / "output.yaml").exists()


def test_spool_keeps_only_the_latest_finished_jobs(broker_lab: BrokerLab, agent, tmp_path: Path) -> None:
    running = agent(keep_jobs=1)
    ids = []
    for _ in range(3):  # one after the other: no scheduler thread runs in these tests
        ids.append(submit(broker_lab, "lines=2"))
        finished(ids[-1])
    wait_for(lambda: sorted(p.name for p in (tmp_path / "spool" / "jobs").iterdir()) == [str(ids[-1])],
             what="old job directories pruned")
    assert set(running.worker.jobs) == {ids[-1]}


# ---- configuration ----

def test_job_environment_follows_lava_env_yaml() -> None:
    base = {"PATH": "/bin", "LANG": "C", "http_proxy": "old"}
    assert job_environment({}, base) == base
    spec = {"overrides": {"http_proxy": "http://p:3128", "N": 1}, "removes": ["LANG"]}
    assert job_environment(spec, base) == {"PATH": "/bin", "http_proxy": "http://p:3128", "N": "1"}
    assert job_environment({"purge": True, "overrides": {"A": "b"}}, base) == {"PATH": "/bin", "A": "b"}


def test_settings_come_from_cli_then_environment_then_file(tmp_path: Path) -> None:
    config = tmp_path / "agent.yaml"
    config.write_text("master: tcp://file:5556\nhostname: from-file\nspool: /srv/spool\ncancel_grace: 5\n")
    options = agent_daemon.parser().parse_args(["--config", str(config)])
    assert build_config(options, {}) == AgentConfig(master="tcp://file:5556", hostname="from-file",
                                                    spool=Path("/srv/spool"), cancel_grace=5.0)
    env = {"MASTER_URL": "tcp://env:5556", "LOGGER_URL": "tcp://env:5555", "PUMICE_HOSTNAME": "from-env"}
    got = build_config(options, env)
    assert (got.master, got.logger, got.hostname) == ("tcp://env:5556", "tcp://env:5555", "from-env")
    options = agent_daemon.parser().parse_args(["--config", str(config), "--master", "tcp://cli:5556"])
    assert build_config(options, env).master == "tcp://cli:5556"


@pytest.mark.parametrize(("text", "args", "error"), [
    ("hostname: x\n", [], "no master: give --master tcp://HOST:5556, set MASTER_URL"),
    ("master: tcp://m:5556\nmaster_url: x\n", [], "unknown setting(s) master_url; allowed: master, logger"),
    ("master: tcp://m:5556\nencrypt: maybe\n", [], "encrypt must be true or false, not 'maybe'"),
    ("master: tcp://m:5556\n", ["--join", "pj1.x.y"], "--join needs --url, the master's REST API"),
    ("master: tcp://m:5556\ninsecure_plain: yes\n", ["--encrypt"], "--insecure-plain contradicts --encrypt"),
    ("master: tcp://m:5556\nurl: http://m:8000\n", ["--join", "pj1.x.y", "--insecure-plain"],
     "--insecure-plain contradicts --join"),
    ("- master\n", [], "must be a YAML mapping"),
])
def test_bad_settings_say_what_is_wrong(tmp_path: Path, text: str, args: list[str], error: str) -> None:
    config = tmp_path / "agent.yaml"
    config.write_text(text)
    options = agent_daemon.parser().parse_args(["--config", str(config), *args])
    with pytest.raises(SystemExit) as info:
        build_config(options, {})
    assert error in str(info.value)


def test_create_certificate(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert agent_daemon.main(["create-certificate", "lab-box", "--directory", str(tmp_path / "keys")]) == 0
    public, secret = tmp_path / "keys" / "lab-box.key", tmp_path / "keys" / "lab-box.key_secret"
    assert "public-key" in public.read_text() and "secret-key" not in public.read_text()
    assert "secret-key" in secret.read_text() and secret.stat().st_mode & 0o777 == 0o600
    assert agent_daemon.main(["create-certificate", "lab-box", "--directory", str(tmp_path / "keys")]) == 1
    assert "exists already" in capsys.readouterr().err


def test_parser_has_the_issue_options() -> None:
    options = agent_daemon.parser().parse_args(
        ["--master", "tcp://m:5556", "--logger", "tcp://m:5555", "--hostname", "n", "--join", "T",
         "--url", "http://m:8000", "--master-cert", "master.key", "--worker-cert", "n.key_secret", "--spool", "/s"])
    assert isinstance(options, argparse.Namespace) and options.join == "T" and options.spool == "/s"
    # CURVE is the default: the old --encrypt is still accepted, and changes nothing
    config = build_config(agent_daemon.parser().parse_args(["--master", "tcp://m:5556", "--encrypt"]), {})
    assert not config.insecure_plain


def test_an_agent_without_keys_says_how_to_enrol(tmp_path: Path) -> None:
    config = AgentConfig(master="tcp://127.0.0.1:9", hostname="box3", spool=tmp_path / "spool")
    with pytest.raises(CertificateError) as info:
        AgentDaemon(config)
    message = str(info.value)
    assert f"no CURVE keys for worker box3 ({tmp_path / 'spool' / 'keys' / 'master.key'}" in message
    assert "'pumice-agent --join TOKEN --url http://MASTER:8000'" in message
    assert "'pumice-master workers add box3' or 'workers rotate box3'" in message
    assert agent_daemon.main(["--master", "tcp://127.0.0.1:9", "--hostname", "box3", "--spool",
                              str(tmp_path / "spool")]) == 1


# ---- the daemon's core, without a master ----

class RecordingTransport:
    """What the AgentDaemon needs of a Transport: always online, keeps what is sent."""

    online = True
    heartbeat = 1.0

    def __init__(self) -> None:
        self.sent: list = []

    def send(self, msg) -> bool:
        self.sent.append(msg)
        return True

    def poll(self, timeout: float) -> list:
        return []

    def close(self, bye: bool = True) -> None:
        pass


def spooled_job(spool: Path, job_id: int, records: list[dict], *, results_yaml: bool,
                **state: object) -> None:
    """A job left in the spool by a daemon that died while its runner (now gone) ran."""
    from results.log import LogRecord

    directory = spool / "jobs" / str(job_id)
    directory.mkdir(parents=True)
    logfile = LogFile(directory / "output.yaml")
    logfile.append([LogRecord("2024-01-01T00:00:00.000000", "results", msg) for msg in records])
    logfile.close()
    if results_yaml:
        (directory / "results.yaml").write_text("{}\n")
    state = {"job_id": job_id, "status": "running", "pid": 999999999, "pid_start": "1", "device": "qemu01",
             **state}
    (directory / "state.json").write_text(json.dumps(state))


@pytest.mark.parametrize(("record", "results_yaml", "state", "health", "error_type"), [
    # the runner had finished before the daemon died: its own outcome stands
    ({"result": "pass"}, True, {}, "Complete", None),
    ({"result": "fail", "error_type": "Job", "error_msg": "bad"}, True, {}, "Incomplete", "Job"),
    ({"result": "fail", "error_type": "Canceled", "error_msg": "c"}, True, {"cancel": True}, "Canceled",
     "Canceled"),
    # canceled by the daemon's death, or cut short: the job is lost
    ({"result": "fail", "error_type": "Canceled", "error_msg": "c"}, True, {}, "Incomplete",
     "Infrastructure"),
    ({"result": "pass"}, False, {}, "Incomplete", "Infrastructure"),
])
def test_restart_judges_a_runner_it_did_not_see_end(tmp_path: Path, record: dict, results_yaml: bool,
                                                     state: dict, health: str,
                                                     error_type: str | None) -> None:
    spooled_job(tmp_path / "spool", 7, [{"definition": "lava", "case": "job", **record}],
                results_yaml=results_yaml, **state)
    transport = RecordingTransport()
    config = AgentConfig(master="tcp://127.0.0.1:9", hostname="w1", spool=tmp_path / "spool")
    worker = AgentDaemon(config, transport)
    worker.loop_once(0)
    job = worker.jobs[7]
    assert (job.state["status"], job.state["health"], job.state["error_type"]) == \
        ("exited", health, error_type)
    assert [type(m).__name__ for m in transport.sent] == ["Log"]  # END waits for the acknowledgement
