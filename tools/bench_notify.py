"""Notification benchmarks (``make bench`` calls :func:`main`; ``tools/bench.py notify`` alone).

1. Callback latency from a job's end: the time from the agent's END being recorded
   (``jobs.job_finished``) to the callback's arrival at a receiver on loopback (POST, json, the
   minimal dataset), through the outbox's thread and sender pool. Target (issue 17): median < 1 s.
2. Callbacks per second a master sustains with a slow receiver (every request takes 0.5 s): 200 jobs
   end at once, the time until every callback arrived. Meanwhile the log of another job is
   appended and a scheduling pass runs: their times with deliveries in flight against idle show
   that delivery never blocks log ingestion or the scheduler.

Everything runs in this process, on SQLite in a temporary data directory (the receiver is a
threaded HTTP server on 127.0.0.1, allowed with the setting an admin would use).
"""

from __future__ import annotations

import logging
import statistics
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench_master import JOB, QEMU_DICTIONARY  # noqa: E402  (the same small QEMU job and device)

from master import (
    inventory,  # noqa: E402
    jobs,  # noqa: E402
)
from master.db import close_database, connection  # noqa: E402
from master.instance import open_instance  # noqa: E402
from master.notify import NotifySettings, configure  # noqa: E402
from master.outbox import Outbox  # noqa: E402
from master.scheduler import Scheduler  # noqa: E402
from master.urlpolicy import AddressPolicy, parse_networks  # noqa: E402
from master.users import SYSTEM, create_token, get_user  # noqa: E402
from results.log import LogRecord  # noqa: E402


class Receiver:
    """Records the arrival time of each callback; each answer takes ``delay`` seconds."""

    def __init__(self, delay: float = 0.0) -> None:
        self.delay = delay
        self.arrivals: dict[int, float] = {}
        self.lock = threading.Lock()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: object) -> None:
                pass

            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                length = int(self.headers.get("Content-Length") or 0)
                arrived = time.monotonic()
                job_id = int(self.path.rsplit("/", 1)[-1])
                self.rfile.read(length)
                with owner.lock:
                    owner.arrivals.setdefault(job_id, arrived)
                if owner.delay:
                    time.sleep(owner.delay)
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def wait(self, count: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while len(self.arrivals) < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(self.arrivals)} of {count} callbacks arrived in {timeout} s")
            time.sleep(0.005)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def setup_lab(root: Path, devices: int) -> None:
    open_instance(root / "data", name="bench")
    inventory.add_device_type(SYSTEM, "qemu")
    inventory.add_worker(SYSTEM, "w1")
    for n in range(devices):
        inventory.add_device(SYSTEM, f"qemu{n:03d}", "qemu", worker="w1", health="Good", dictionary=QEMU_DICTIONARY)
    inventory.worker_seen("w1", "bench")
    create_token("alice")


def start_jobs(count: int, receiver: Receiver) -> list[int]:
    """``count`` jobs with a callback to ``receiver``, scheduled and Running."""
    alice = get_user("alice")
    notify = {"notify": {"criteria": {"status": "finished"},
                         "callback": {"url": f"{receiver.url}/job/{{ID}}", "method": "POST",
                                      "content-type": "json"}}}
    ids = []
    for n in range(count):
        ids += jobs.submit_job(JOB.format(n=n, priority="medium") + yaml.safe_dump(notify), alice)
    Scheduler().loop_once()
    for job_id in ids:
        jobs.job_started(job_id)
    return ids


def bench_latency(rounds: int = 30) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        setup_lab(Path(tmp), devices=rounds)
        configure(NotifySettings(policy=AddressPolicy(allow=parse_networks(["127.0.0.1"]))))
        receiver = Receiver()
        outbox = Outbox().start()
        try:
            with connection():
                ids = start_jobs(rounds, receiver)
            latencies = []
            for job_id in ids:
                with connection():
                    started = time.monotonic()
                    jobs.job_finished(job_id, "Complete")
                receiver.wait(len(latencies) + 1, 30)
                latencies.append(receiver.arrivals[job_id] - started)
                time.sleep(0.02)
        finally:
            outbox.stop()
            receiver.close()
            close_database()
    latencies.sort()
    return {"median": statistics.median(latencies) * 1000, "p95": latencies[int(len(latencies) * 0.95) - 1] * 1000,
            "max": latencies[-1] * 1000}


def bench_slow_receiver(count: int = 200, delay: float = 0.5, senders: int = 8) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        setup_lab(Path(tmp), devices=count + 1)
        configure(NotifySettings(policy=AddressPolicy(allow=parse_networks(["127.0.0.1"])), senders=senders,
                                 timeout=10))
        receiver = Receiver(delay)
        outbox = Outbox().start()
        try:
            with connection():
                ids = start_jobs(count + 1, receiver)
                logged = ids.pop()  # a job whose log keeps arriving meanwhile
                lines = [LogRecord("2024-01-01T10:00:00.000000", "target", f"line {n}") for n in range(100)]
                idle_log = _time(lambda: jobs.append_logs(logged, lines))
                idle_pass = _time(lambda: Scheduler().loop_once())
                started = time.monotonic()
                for job_id in ids:
                    jobs.job_finished(job_id, "Complete")
                ended = time.monotonic()
                time.sleep(0.2)  # deliveries are in flight now
                busy_log = _time(lambda: jobs.append_logs(logged, lines))
                busy_pass = _time(lambda: Scheduler().loop_once())
            receiver.wait(count, 120)
            total = max(receiver.arrivals[i] for i in ids) - started
        finally:
            outbox.stop()
            receiver.close()
            close_database()
    return {"rate": count / total, "total": total, "finish_ms": (ended - started) * 1000 / count,
            "idle_log": idle_log, "busy_log": busy_log, "idle_pass": idle_pass, "busy_pass": busy_pass,
            "ceiling": senders / delay}


def _time(call) -> float:
    runs = []
    for _ in range(5):
        started = time.perf_counter()
        call()
        runs.append((time.perf_counter() - started) * 1000)
    return statistics.median(runs)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.ERROR)
    r = bench_latency()
    print(f"notify: callback latency from the job's end: median {r['median']:.1f} ms, p95 {r['p95']:.1f} ms, "
          f"max {r['max']:.1f} ms (30 jobs; target median < 1000 ms)", flush=True)
    s = bench_slow_receiver()
    print(f"notify: slow receiver (0.5 s an answer), 200 jobs ending at once: {s['rate']:.1f} callbacks/s "
          f"(all in {s['total']:.1f} s; 8 senders allow {s['ceiling']:.0f}/s), recording an END "
          f"{s['finish_ms']:.1f} ms", flush=True)
    print(f"notify: meanwhile appending 100 log lines {s['busy_log']:.1f} ms (idle {s['idle_log']:.1f} ms), "
          f"a scheduling pass {s['busy_pass']:.1f} ms (idle {s['idle_pass']:.1f} ms)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
