"""Shared helpers of the broker and worker tests (no tests here).

- ``FakeAgent``: a raw DEALER that speaks :mod:`agent.messages` by hand, to drive the broker
  message by message (and to misbehave: wrong versions, gaps, duplicates).
- ``make_broker_lab``: the master's test lab (:func:`support.master.build_lab`) with a broker
  running in a thread on a free loopback port, authenticating workers with CURVE as a master does
  by default: ``BrokerLab.curve(hostname)`` gives a registered worker a key of its own (an
  unregistered name gets a key nobody knows), and ``BrokerLab.agent()`` connects with it.
- ``wait_for``: poll a condition with a timeout (every wait in these tests has one).
- ``FAKE_RUNNER``: a stand-in for ``pumice-run`` that writes an ``output.yaml`` like the real one
  (records and results through ``results.logfile.LogFile``) without a board.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
import zmq
from conftest import allowing

from agent.messages import PROTOCOL_VERSION, Hello, Message, Ping, Pong, Welcome, decode, encode
from agent.transport import CurveKeys, write_certificate
from master import certificates
from master.broker import Broker
from master.db import close_database, connection
from master.models import Worker
from master.users import SYSTEM
from support.master import build_lab, job_text

ROOT = Path(__file__).resolve().parents[2]


def wait_for(condition: Callable[[], Any], timeout: float = 10.0, what: str = "the condition",
             interval: float = 0.02) -> Any:
    """Poll ``condition`` until it returns something true; fail the test after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def db_wait(condition: Callable[[], Any], timeout: float = 10.0, what: str = "the database") -> Any:
    """``wait_for`` with a database connection around each poll."""

    def check() -> Any:
        with connection():
            return condition()

    return wait_for(check, timeout, what)


class FakeAgent:
    """A DEALER with a worker's identity, speaking the protocol by hand."""

    def __init__(self, endpoint: str, hostname: str = "w1", context: zmq.Context | None = None,
                 curve: Any = None) -> None:
        self.context = context or zmq.Context.instance()
        self.hostname = hostname
        self.socket = self.context.socket(zmq.DEALER)
        self.socket.linger = 0
        self.socket.sndtimeo = 2000
        self.socket.identity = hostname.encode()
        if curve is not None:
            curve.apply(self.socket)
        self.socket.connect(endpoint)
        self.welcomed = False

    def send(self, msg: Message) -> bool:
        """Send ``msg``; False when it cannot go within 2 s (no connection: a refused handshake)."""
        try:
            self.socket.send_multipart(encode(msg))
        except zmq.Again:
            return False
        return True

    def send_frames(self, frames: list[bytes]) -> None:
        self.socket.send_multipart(frames)

    def recv(self, kind: type[Message] | None = None, timeout: float = 5.0) -> Message:
        """The next message (of type ``kind``: others are skipped; PONG is always skipped unless
        asked for); fails after ``timeout`` s. A welcomed agent sends PING while it waits."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                pytest.fail(f"{self.hostname}: no {kind.__name__ if kind else 'message'} within {timeout} s")
            if not self.socket.poll(int(min(left, 0.2) * 1000)):
                if self.welcomed:
                    self.send(Ping())
                continue
            msg = decode(self.socket.recv_multipart())
            if isinstance(msg, Welcome):
                self.welcomed = True
            if kind is None and isinstance(msg, Pong):
                continue
            if kind is None or isinstance(msg, kind):
                return msg

    def drain(self, timeout: float = 0.2) -> list[Message]:
        """Every message that arrives within ``timeout`` s."""
        out = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.welcomed:
                self.send(Ping())
            if self.socket.poll(200):
                out.append(decode(self.socket.recv_multipart()))
        return out

    def hello(self, jobs: list[int] | None = None) -> Message:
        self.send(Hello(hostname=self.hostname, protocol=PROTOCOL_VERSION, version="0.1.0", jobs=jobs or []))
        return self.recv()

    def close(self) -> None:
        self.socket.close(linger=0)


@dataclass
class BrokerLab:
    lab: Any
    broker: Broker
    endpoint: str
    #: each worker's (public, secret) CURVE keys
    keys: dict[str, tuple[bytes, bytes]] = field(default_factory=dict)

    def curve(self, hostname: str = "w1") -> CurveKeys:
        """The keys an agent of ``hostname`` connects with: registered for it when it is a worker."""
        if hostname not in self.keys:
            public, secret = zmq.curve_keypair()
            with connection():
                if Worker.get_or_none(Worker.hostname == hostname) is not None:
                    certificates.set_worker_key(SYSTEM, hostname, public.decode())
            self.keys[hostname] = (public, secret)
        with connection():
            master = certificates.master_public_key()
        assert master, "the broker records the master's key when it binds"
        return CurveKeys(master.encode(), *self.keys[hostname])

    def key_files(self, hostname: str, directory: Path) -> tuple[str, str]:
        """``(master_cert, worker_cert)`` files of ``hostname``'s keys, for an AgentConfig."""
        keys = self.curve(hostname)
        directory.mkdir(parents=True, exist_ok=True)
        write_certificate(directory / "master.key", keys.master_public)
        write_certificate(directory / f"{hostname}.key_secret", keys.public, keys.secret)
        return str(directory / "master.key"), str(directory / f"{hostname}.key_secret")

    def agent(self, hostname: str = "w1", *, endpoint: str | None = None, plain: bool = False,
              **kwargs: Any) -> FakeAgent:
        """A FakeAgent with ``hostname``'s keys (``plain``: none, as an agent --insecure-plain)."""
        curve = kwargs.pop("curve", None) or (None if plain else self.curve(hostname))
        return FakeAgent(endpoint or self.endpoint, hostname, curve=curve, **kwargs)


def make_broker_lab(tmp_path: Path, database_url: str | None = None, *, plain: bool = False
                    ) -> Iterator[BrokerLab]:
    """For a ``broker_lab`` fixture: a master lab (SQLite, or PostgreSQL at ``database_url``;
    worker w1 online, devices qemu01/qemu02 Good) with a broker thread on a free loopback port
    (heartbeat 0.5 s), CURVE unless ``plain`` (``--insecure-plain``)."""
    lab = build_lab(tmp_path / "data", database_url)
    broker = Broker("tcp://127.0.0.1:*", heartbeat=0.5, encrypt=not plain).bind()
    broker.start()
    bl = BrokerLab(lab, broker, broker.bound[0])
    try:
        yield bl
    finally:
        bl.broker.stop()  # a test may have replaced it (a master restart)
        broker.stop()
        close_database()


def timed_job(seconds: int, name: str = "timed job") -> str:
    """The test lab's job with a job timeout of ``seconds``."""
    text = job_text(name)
    assert "  job:\n    minutes: 5\n" in text
    return text.replace("  job:\n    minutes: 5\n", f"  job:\n    seconds: {seconds}\n")


#: a stand-in for pumice-run: ``fake-runner --device D --output-dir O --job-id N --dispatcher C JOB``;
#: behaviour from the job file's first line: ``# lines=N delay=S exit=E``; SIGTERM -> Canceled (2)
FAKE_RUNNER = '''
import json, os, signal, sys, time
sys.path.insert(0, {root!r})
from results.log import LogRecord, now_dt
from results.logfile import LogFile
args = sys.argv[1:]
out = args[args.index("--output-dir") + 1]
job_id = args[args.index("--job-id") + 1]
spec = dict(item.split("=") for item in open(args[-1]).readline().lstrip("# ").split())
log = LogFile(os.path.join(out, "output.yaml"))
def add(lvl, msg):
    log.append([LogRecord(now_dt(), lvl, msg)])
canceled = []
def on_term(signum, frame):
    canceled.append(signum)
signal.signal(signal.SIGTERM, on_term)
add("info", "fake runner: env PUMICE_TEST_ENV=" + os.environ.get("PUMICE_TEST_ENV", "-")
    + " config=" + open(args[args.index("--dispatcher") + 1]).read().replace(chr(10), " "))
add("info", "device: " + open(args[args.index("--device") + 1]).read().splitlines()[0])
for n in range(int(spec.get("lines", 10))):
    if canceled:
        break
    add("target", "line %d" % n)
    if n % 10 == 9:
        add("results", {{"definition": "0_fake", "case": "case-%d" % n, "result": "pass", "level": "3.1"}})
    time.sleep(float(spec.get("delay", 0)))
if canceled:
    add("results", {{"definition": "lava", "case": "job", "result": "fail", "error_type": "Canceled",
                     "error_msg": "The job was canceled"}})
    sys.exit(2)
code = int(spec.get("exit", 0))
extra = {{}} if code == 0 else {{"error_type": "Job", "error_msg": "fake failure"}}
add("results", dict({{"definition": "lava", "case": "job", "result": "fail" if code else "pass"}}, **extra))
open(os.path.join(out, "description.yaml"), "w").write("pipeline: []\\n")
sys.exit(code)
'''


def fake_runner(tmp_path: Path) -> list[str]:
    """The command line of the fake runner (written into ``tmp_path``)."""
    path = tmp_path / "fake_runner.py"
    path.write_text(FAKE_RUNNER.format(root=str(ROOT)))
    return [sys.executable, str(path)]


# ---- real processes: a master with its broker and agents, on loopback ----


def free_port() -> int:
    """A TCP port nobody listens on right now (loopback)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def master_cli(env: dict[str, str], *args: str) -> str:
    """``pumice-master ARGS`` as a process with ``env``: its standard output (it must succeed)."""
    import subprocess

    done = subprocess.run([sys.executable, "-m", "master.cli", *args], env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, f"pumice-master {' '.join(args)}: {done.stderr}"
    return done.stdout


def add_qemu_lab(cli: Callable[..., str]) -> None:
    """Through ``cli`` (pumice-master's commands): device type qemu, worker w1, device qemu01 (Good)
    from ``tests/data/qemu-amd64.jinja2``."""
    cli("device-types", "add", "qemu")
    cli("workers", "add", "w1", "--no-token")
    cli("devices", "add", "qemu01", "--type", "qemu", "--worker", "w1", "--health", "Good",
        "--dictionary", str(ROOT / "tests" / "data" / "qemu-amd64.jinja2"))


class ProcessLab:
    """A master (``serve --broker``) and agents as separate processes, driven over HTTP and curl.

    Its lab: device type qemu, worker w1 (its dispatcher config puts job scratch files under
    ``root``), device qemu01 (Good) from ``tests/data/qemu-amd64.jinja2``, an admin token. The
    database is SQLite in ``root/data``, or the PostgreSQL URL ``database``.
    Workers are authenticated (CURVE) unless ``plain``: an agent started without keys in its spool
    enrols first, with a join token from ``pumice-master workers rotate`` (``--join``).
    """

    def __init__(self, root: Path, *, plain: bool = False, heartbeat: float = 1.0,
                 database: str | None = None, master_args: tuple[str, ...] = ()) -> None:
        import os

        self.root = root
        #: more options of ``pumice-master serve`` (a test may change them between restarts)
        self.master_args = list(master_args)
        self.data = root / "data"
        self.plain = plain
        self.heartbeat = heartbeat
        self.http_port, self.broker_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.http_port}"
        self.broker_url = f"tcp://127.0.0.1:{self.broker_port}"
        self.env = {**os.environ, "PUMICE_DATA": str(self.data), "PYTHONUNBUFFERED": "1"}
        self.env.pop("PUMICE_DATABASE", None)
        if database:  # PostgreSQL (else SQLite in the data directory)
            self.env["PUMICE_DATABASE"] = database
        self.master: Any = None
        self.agents: list[Any] = []
        self.master_log = root / "master.log"
        add_qemu_lab(self.cli)
        self.token = self.cli("tokens", "create", "--user", "admin", "--admin").strip()
        (root / "work").mkdir()

    def cli(self, *args: str) -> str:
        return master_cli(self.env, *args)

    def start_master(self) -> None:
        import subprocess

        command = [sys.executable, "-m", "master.cli", "serve", "--http", f"127.0.0.1:{self.http_port}",
                   "--broker", f"tcp://127.0.0.1:{self.broker_port}", "--heartbeat", str(self.heartbeat)]
        if self.plain:
            command.append("--insecure-plain")
        command += self.master_args
        with open(self.master_log, "a") as log:
            self.master = subprocess.Popen(command, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_for(lambda: self._up(), 30, "the master's API")
        except BaseException:  # a master that never came up is not left running
            self.master.kill()
            self.master.wait()
            raise
        if not getattr(self, "_configured", False):
            self._configured = True
            self.allow()

    def allow(self, *addresses: str, worker: str = "w1") -> None:
        """``worker``'s dispatcher configuration: job scratch files under ``root``, and a file policy that
        lets jobs reach ``addresses`` of the worker (the tests' loopback servers, ``127.0.0.1:PORT``)."""
        config = allowing(addresses=addresses, tmp_dir=str(self.root / "work"))
        self.api("PUT", f"/workers/{worker}/config/", yaml.safe_dump(config))

    def _up(self) -> bool:
        import urllib.error
        import urllib.request

        assert self.master.poll() is None, f"the master exited: {self.master_log.read_text()[-3000:]}"
        try:
            with urllib.request.urlopen(f"{self.url}/api/v0.2/system/version/", timeout=2):
                return True
        except (urllib.error.URLError, OSError):
            return False

    def stop_master(self, signum: int = 15) -> None:
        if self.master is not None and self.master.poll() is None:
            self.master.send_signal(signum)
            self.master.wait(30)

    def join_token(self, hostname: str = "w1", *args: str) -> str:
        """A new join token for the worker (``pumice-master workers rotate``)."""
        import re

        printed = self.cli("workers", "rotate", hostname, *args)
        found = re.search(r"^join token: (\S+)$", printed, re.MULTILINE)
        assert found, printed
        return found.group(1)

    def start_agent(self, hostname: str = "w1", *extra: str, python: list[str] | None = None,
                    spool: Path | None = None, enrol: bool = True) -> Any:
        """``pumice-agent`` (or ``python`` + its arguments: a patched agent) as a process; in
        CURVE mode it enrols first (``--join``) when its spool holds no keys and ``enrol`` is set."""
        import subprocess

        index = len(self.agents)
        spool = spool or self.root / f"spool-{hostname}"
        if self.plain:
            extra = ("--insecure-plain", *extra)
        elif enrol and not (spool / "keys" / f"{hostname}.key_secret").exists() and "--join" not in extra:
            extra = ("--join", self.join_token(hostname), "--url", self.url, *extra)
        args = ["--master", self.broker_url, "--hostname", hostname, "--spool", str(spool), *extra]
        command = (python or [sys.executable, "-m", "agent.daemon"]) + args
        log_path = self.root / f"agent-{index}-{hostname}.log"
        with open(log_path, "a") as log:
            proc = subprocess.Popen(command, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        proc.log_path = log_path
        self.agents.append(proc)
        return proc

    def agent_log(self, proc: Any) -> str:
        return proc.log_path.read_text()

    def api(self, method: str, path: str, body: str | bytes | None = None,
            token: str | None = "admin") -> Any:
        import json
        import urllib.request

        data = body.encode() if isinstance(body, str) else body
        request = urllib.request.Request(f"{self.url}/api/v0.2{path}", data=data, method=method)
        if token:
            request.add_header("Authorization", f"Token {self.token if token == 'admin' else token}")
        with urllib.request.urlopen(request, timeout=30) as response:
            text = response.read().decode()
        return json.loads(text) if response.headers.get_content_type() == "application/json" else text

    def submit(self, job_file: Path) -> int:
        """Submit with curl, as a user would."""
        import json
        import subprocess

        done = subprocess.run(["curl", "-sS", "-H", f"Authorization: Token {self.token}", "--data-binary",
                               f"@{job_file}", f"{self.url}/api/v0.2/jobs/"], capture_output=True, text=True,
                              timeout=60)
        assert done.returncode == 0, done.stderr
        reply = json.loads(done.stdout)
        assert "job_ids" in reply, reply
        return reply["job_ids"][0]

    def submit_text(self, text: str) -> int:
        path = self.root / f"submitted-{len(list(self.root.glob('submitted-*')))}.yaml"
        path.write_text(text)
        return self.submit(path)

    def job(self, job_id: int) -> dict:
        return self.api("GET", f"/jobs/{job_id}/")

    def wait_job(self, job_id: int, timeout: float = 240) -> dict:
        def done() -> dict | None:
            record = self.job(job_id)
            return record if record["state"] == "Finished" else None

        try:
            return wait_for(done, timeout, f"job {job_id} to finish", interval=0.5)
        except pytest.fail.Exception:
            pass
        pytest.fail(f"timed out after {timeout} s waiting for job {job_id} to finish\n{self.diagnosis(job_id)}")

    def diagnosis(self, job_id: int) -> str:
        """What a failed test needs: the job's record, the tails of the master's and the agents'
        logs, and what each agent's spool holds of the job."""
        parts = []
        try:
            parts.append(f"job record: {self.job(job_id)}")
        except Exception as exc:  # the master may be what failed
            parts.append(f"job record: unavailable ({exc!r})")
        logs = [self.master_log, *(proc.log_path for proc in self.agents)]
        logs += sorted(self.root.glob(f"spool-*/jobs/{job_id}/state.json"))
        logs += sorted(self.root.glob(f"spool-*/jobs/{job_id}/runner.log"))
        for path in logs:
            text = path.read_text(errors="replace") if path.exists() else "(missing)"
            parts.append(f"--- {path.relative_to(self.root)} (tail)\n{text[-3000:]}")
        return "\n".join(parts)

    def log_lines(self, job_id: int) -> list[str]:
        return self.api("GET", f"/jobs/{job_id}/logs/").splitlines()

    def close(self) -> None:
        for proc in [*self.agents, self.master]:
            if proc is not None and proc.poll() is None:
                proc.terminate()
        for proc in [*self.agents, self.master]:
            if proc is not None:
                try:
                    proc.wait(30)
                except Exception:
                    proc.kill()
                    proc.wait(10)


def running_process_lab(root: Path, **options: Any) -> Iterator[ProcessLab]:
    """For a ``plab`` fixture: a ProcessLab with its master started, closed after the test."""
    lab = ProcessLab(root, **options)
    try:
        lab.start_master()
        yield lab
    finally:
        lab.close()
