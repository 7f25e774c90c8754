"""Benchmarks of the broker and the agent daemon (issue 4), all on loopback with real processes:

- submission-to-running latency: an idle device, a connected ``pumice-agent``; from the client's
  POST of the job to the job's start time (the agent acknowledged START and its ``pumice-run``
  runs). LAVA's workers poll, which makes this up to tens of seconds; the target is < 100 ms.
- log throughput: 100 simulated agents (DEALER sockets in one process, each with its CURVE key, as
  every agent is authenticated by default) stream job logs into one master; records/s into the
  artifact store (results included, 0.5% of the lines), with a check that every line and every
  result arrived once (target > 100,000 records/s, zero loss).
- the agent daemon's idle RSS (target < 25 MB).

``PUMICE_BENCH_RUNS`` sets the number of latency samples (default 20).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import zmq

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from agent.messages import (  # noqa: E402 - after the path setup
    PROTOCOL,
    PROTOCOL_VERSION,
    End,
    EndOk,
    Hello,
    LogOk,
    Ping,
    Start,
    StartOk,
    decode,
    encode,
)

RUNS = int(os.environ.get("PUMICE_BENCH_RUNS", "20"))
AGENTS = 100
LINES_PER_AGENT = 10_000
BATCH = 1000
WINDOW = 4
RESULT_EVERY = 200  # 0.5% of the lines are results

MINI_JOB = """device_type: qemu
job_name: latency probe
visibility: public
timeouts:
  job:
    minutes: 2
context:
  arch: amd64
actions:
- deploy:
    to: tmpfs
    images:
      kernel:
        url: {url}
        image_arg: -kernel {{kernel}}
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Master:
    """``pumice-master serve --broker`` in a data directory, as a process."""

    def __init__(self, data: Path, heartbeat: float = 5.0) -> None:
        self.data = data
        self.http, self.broker = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.http}"
        self.endpoint = f"tcp://127.0.0.1:{self.broker}"
        self.env = {**os.environ, "PUMICE_DATA": str(data)}
        self.env.pop("PUMICE_DATABASE", None)
        self.log = open(data.parent / "master.log", "a")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "master.cli", "serve", "--http", f"127.0.0.1:{self.http}",
             "--broker", self.endpoint, "--heartbeat", str(heartbeat)],
            env=self.env, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{self.url}/api/v0.2/system/version/", timeout=2):
                    break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the master did not start; see {self.log.name}") from None
                time.sleep(0.1)

    def api(self, method: str, path: str, body: bytes | None = None, token: str | None = None) -> dict:
        request = urllib.request.Request(f"{self.url}/api/v0.2{path}", data=body, method=method)
        if token:
            request.add_header("Authorization", f"Token {token}")
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read())

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)
        self.log.close()


def cli(env: dict, *args: str) -> str:
    return subprocess.run([sys.executable, "-m", "master.cli", *args], env=env, check=True,
                          capture_output=True, text=True).stdout


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_idle(pid: int, timeout: float = 10.0) -> bool:
    """Until the process uses (almost) no CPU for 0.3 s (True), or ``timeout`` (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        before = cpu_seconds(pid)
        time.sleep(0.3)
        if cpu_seconds(pid) - before < 0.03:
            return True
    return False


def parse_time(text: str) -> float:
    return dt.datetime.fromisoformat(text.rstrip("Z")).replace(tzinfo=dt.UTC).timestamp()


# ---- latency and idle RSS ----

def latency_and_rss(work: Path) -> None:
    data = work / "latency" / "data"
    data.mkdir(parents=True)
    env = {**os.environ, "PUMICE_DATA": str(data)}
    env.pop("PUMICE_DATABASE", None)
    cli(env, "device-types", "add", "qemu")
    added = cli(env, "workers", "add", "bench-worker")
    join_token = next(line.split()[-1] for line in added.splitlines() if line.startswith("join token: "))
    cli(env, "devices", "add", "qemu01", "--type", "qemu", "--worker", "bench-worker", "--health", "Good",
        "--dictionary", str(ROOT / "tests" / "data" / "qemu-amd64.jinja2"))
    token = cli(env, "tokens", "create", "--user", "bench", "--admin").strip()
    master = Master(data)
    agent_log = open(work / "latency" / "agent.log", "w")  # noqa: SIM115
    command = [sys.executable, "-m", "agent.daemon", "--master", master.endpoint, "--hostname", "bench-worker",
               "--spool", str(work / "latency" / "spool")]
    # enrolled once (its keys in the spool), then started as a service starts it, without --join
    enrol = subprocess.Popen([*command, "--join", join_token, "--url", master.url], stdout=agent_log,
                             stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 30
    while master.api("GET", "/workers/bench-worker/")["state"] != "Online":
        if enrol.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the agent did not enrol; see {agent_log.name}")
        time.sleep(0.05)
    enrol.terminate()
    enrol.wait(30)
    agent = subprocess.Popen(command, stdout=agent_log, stderr=subprocess.STDOUT)
    try:
        payload = work / "latency" / "kernel.bin"
        payload.write_bytes(b"\0" * 1024)
        job = MINI_JOB.format(url=payload.as_uri()).encode()
        # the worker's file policy lets the job read the payload's directory, nothing else of it
        policy = f"allowed_file_dirs: ['{payload.parent}']\n".encode()
        master.api("PUT", "/workers/bench-worker/config/", policy, token)
        deadline = time.monotonic() + 30
        while master.api("GET", "/workers/bench-worker/")["state"] != "Online":
            if time.monotonic() > deadline:
                raise RuntimeError("the agent never came online")
            time.sleep(0.05)
        time.sleep(3)  # idle, connected
        idle_rss = rss_kb(agent.pid)
        samples, server_side = [], []
        for _ in range(RUNS):
            wait_idle(master.proc.pid)  # the last job's pages are published: an idle lab
            posted = time.time()
            job_id = master.api("POST", "/jobs/", job, token)["job_ids"][0]
            while True:
                record = master.api("GET", f"/jobs/{job_id}/")
                if record["state"] == "Finished":
                    break
                time.sleep(0.02)
            if record["health"] != "Complete":
                raise RuntimeError(f"latency probe job {job_id} ended {record['health']}: "
                                   f"{record['failure_comment']}")
            start = parse_time(record["start_time"])
            samples.append((start - posted) * 1000)
            server_side.append((start - parse_time(record["submit_time"])) * 1000)
        print(f"  submission-to-running latency (client POST -> job Running, {RUNS} jobs, idle device, "
              f"connected agent): median {statistics.median(samples):.1f} ms, max {max(samples):.1f} ms "
              "(target < 100 ms; LAVA polls: up to tens of seconds)")
        print("    of which submit_time -> start_time in the master: median "
              f"{statistics.median(server_side):.1f} ms")
        print(f"  agent daemon idle RSS: {idle_rss / 1024:.1f} MB (target < 25 MB); after {RUNS} jobs: "
              f"{rss_kb(agent.pid) / 1024:.1f} MB")
    finally:
        agent.terminate()
        agent.wait(30)
        agent_log.close()
        master.stop()


# ---- throughput ----

def prepare_throughput_lab(data: Path) -> tuple[bytes, list[tuple[bytes, bytes]]]:
    """AGENTS workers, each with a device, a Scheduled job and a registered CURVE key (set up
    in-process: fast); returns the master's public key and the workers' key pairs."""
    from master import certificates, inventory, jobs
    from master.db import close_database
    from master.instance import open_instance
    from master.scheduler import Scheduler
    from master.users import SYSTEM, get_or_create_user

    open_instance(data)
    inventory.add_device_type(SYSTEM, "qemu")
    dictionary = (ROOT / "tests" / "data" / "qemu-amd64.jinja2").read_text()
    master_public, _ = certificates.load_master_keys()
    keys = [zmq.curve_keypair() for _ in range(AGENTS)]
    for n in range(AGENTS):
        inventory.add_worker(SYSTEM, f"sim-{n:03d}")
        certificates.set_worker_key(SYSTEM, f"sim-{n:03d}", keys[n][0].decode())
        inventory.add_device(SYSTEM, f"dev-{n:03d}", "qemu", worker=f"sim-{n:03d}", health="Good",
                               dictionary=dictionary)
        inventory.worker_seen(f"sim-{n:03d}", "0.1.0")
    user = get_or_create_user("bench")
    for _ in range(AGENTS):
        jobs.submit_job(MINI_JOB.format(url="http://images.example/kernel"), user)  # simulated: never fetched
    Scheduler().loop_once()
    close_database()
    return master_public, keys


def batch_lines() -> list[str]:
    """One batch of log lines as a board's job writes them (0.5% results records)."""
    from results.log import LogRecord

    lines = []
    for n in range(BATCH):
        if n % RESULT_EVERY == RESULT_EVERY - 1:
            msg: object = {"definition": "0_bench", "case": f"case-{n}", "result": "pass", "level": "3.1"}
            lines.append(LogRecord("2024-05-01T10:00:00.000000", "results", msg).to_line().rstrip("\n"))
        else:
            lines.append(LogRecord("2024-05-01T10:00:00.000000", "target",
                                   f"[   12.345678] console line {n} of the simulated board: ok").to_line()
                         .rstrip("\n"))
    return lines


def simulate(endpoint: str, master_public: bytes, keys: list[tuple[bytes, bytes]], agents_count: int = AGENTS,
             lines_per_agent: int = LINES_PER_AGENT, ready: Callable[[], bool] | None = None
             ) -> tuple[float, float]:
    """Agents sim-000... each say HELLO, take their START and stream ``lines_per_agent`` lines in
    batches (a window of WINDOW unacknowledged batches) once every job runs and ``ready()`` says
    the master has settled (steady state); once every line is acknowledged, all send
    END. Returns the seconds from the first LOG to the last acknowledgement, and from the ENDs to
    the last END_OK (a job's end publishes its pages: it is measured apart from log streaming)."""
    body_lines = json.dumps(batch_lines(), separators=(",", ":")).encode()
    header = [PROTOCOL, str(PROTOCOL_VERSION).encode(), b"LOG"]
    context = zmq.Context()
    poller = zmq.Poller()
    agents = {}
    for n in range(agents_count):
        sock = context.socket(zmq.DEALER)
        sock.linger = 0
        sock.identity = f"sim-{n:03d}".encode()
        sock.sndhwm = sock.rcvhwm = 100000
        sock.curve_serverkey = master_public
        sock.curve_publickey, sock.curve_secretkey = keys[n]
        sock.connect(endpoint)
        poller.register(sock, zmq.POLLIN)
        agents[sock] = {"name": f"sim-{n:03d}", "job": None, "sent": 0, "acked": 0, "done": False}
        hello = Hello(hostname=f"sim-{n:03d}", protocol=PROTOCOL_VERSION, version="0.1.0")
        sock.send_multipart(encode(hello))
    started = 0
    first = last = 0.0
    deadline = time.monotonic() + 600
    try:
        while sum(a["done"] for a in agents.values()) < agents_count:
            if time.monotonic() > deadline:
                raise RuntimeError("throughput run did not finish in 10 minutes")
            for sock, _ in poller.poll(1000):
                agent = agents[sock]
                while sock.poll(0):
                    msg = decode(sock.recv_multipart())
                    if isinstance(msg, Start):
                        if agent["job"] is None:
                            agent["job"] = msg.job_id
                            started += 1
                        sock.send_multipart(encode(StartOk(job_id=msg.job_id)))
                    elif isinstance(msg, LogOk):
                        if msg.rewind:
                            raise RuntimeError(f"{agent['name']}: the master saw a gap")
                        agent["acked"] = max(agent["acked"], msg.lines)
                    elif isinstance(msg, EndOk):
                        agent["done"] = True
            if not last and all(a["acked"] >= lines_per_agent for a in agents.values()):
                last = time.monotonic()
                for sock, agent in agents.items():
                    sock.send_multipart(encode(End(job_id=agent["job"], health="Complete",
                                                   lines=lines_per_agent)))
            if started < agents_count:
                continue
            if not first:
                while ready is not None and not ready():
                    if time.monotonic() > deadline:
                        raise RuntimeError("the master did not settle in 10 minutes")
                    for sock in agents:  # answer heartbeats while the master settles
                        while sock.poll(0):
                            sock.recv_multipart()
                        sock.send_multipart(encode(Ping()))
                    time.sleep(0.2)
                first = time.monotonic()
            for sock, agent in agents.items():
                while agent["sent"] < lines_per_agent and agent["sent"] - agent["acked"] < WINDOW * BATCH:
                    body = b'{"job_id":%d,"seq":%d,"lines":%s}' % (agent["job"], agent["sent"], body_lines)
                    sock.send_multipart([*header, body], copy=False)
                    agent["sent"] += BATCH
    finally:
        for sock in agents:
            sock.close(linger=0)
        context.term()
    return last - first, time.monotonic() - last


def throughput(work: Path) -> None:
    data = work / "throughput" / "data"
    data.mkdir(parents=True)
    master_public, keys = prepare_throughput_lab(data)
    master = Master(data)
    try:
        def settled() -> bool:
            # every job Running (the workers' connections are all recorded) and the master idle
            # (the pages of 100 job starts are published): the steady state of a lab
            if master.api("GET", "/jobs/?state=Running&limit=1")["count"] != AGENTS:
                return False
            # briefly: the simulated agents answer heartbeats in between (on a loaded machine
            # the master may stay busy for longer than its workers' liveness)
            return wait_idle(master.proc.pid, 1.0)

        elapsed, ends = simulate(master.endpoint, master_public, keys, ready=settled)
    finally:
        master.stop()
    lines = batch_lines()
    total = AGENTS * LINES_PER_AGENT
    # zero loss: every store file holds exactly the lines sent, every result is in the database
    lost = 0
    from master.db import close_database, connection
    from master.instance import open_instance
    from master.models import Job, TestCase
    from results.logfile import LogFile

    open_instance(data)
    with connection():
        job_ids = [j for (j,) in Job.select(Job.id).tuples()]
        results = TestCase.select().count()
        healths = {h for (h,) in Job.select(Job.health).tuples()}
    for job_id in job_ids:
        logfile = LogFile(data / "store" / "jobs" / str(job_id) / "output.yaml")
        stored = logfile.read()
        logfile.close()
        expected = lines * (LINES_PER_AGENT // BATCH)
        lost += abs(len(expected) - len(stored)) + sum(a != b for a, b in zip(expected, stored, strict=False))
    close_database()
    expected_results = AGENTS * (LINES_PER_AGENT // RESULT_EVERY)
    print(f"  log throughput into one master from {AGENTS} simulated agents (CURVE): {total / elapsed:,.0f} "
          "records/s "
          f"({total:,} records, {results:,} of them results, in {elapsed:.2f} s; target > 100,000 records/s)")
    print(f"    loss: {lost} lines missing or different, {expected_results - results} results missing "
          f"(zero loss: {'yes' if lost == 0 and results == expected_results else 'NO'})")
    print(f"    then {AGENTS} ENDs recorded (jobs {'/'.join(sorted(healths))}, pages published) in "
          f"{ends:.2f} s")


def main() -> None:
    keep = os.environ.get("PUMICE_BENCH_DIR")  # keep the logs and data there
    with tempfile.TemporaryDirectory(prefix="pumice-bench-broker-", dir=keep) as tmp:
        work = Path(tmp)
        latency_and_rss(work)
        throughput(work)
        if keep:
            os.rename(work, Path(keep) / f"broker-{time.strftime('%Y%m%d-%H%M%S')}")
            work.mkdir()


if __name__ == "__main__":
    main()
