"""Master benchmarks (``make bench`` calls :func:`main`).

1. A scheduling pass for 10,000 queued jobs over 1,000 idle devices (50 workers, 4 device types,
   some tags), on SQLite and, when ``PUMICE_TEST_PG`` or ``--pg URL`` is given, PostgreSQL:
   load + assign + claim (the transaction that assigns 1,000 jobs), then publishing the claimed
   jobs' meta.yaml files, reported apart. Also a pass with every device busy (the common case).
2. Validated submissions per second over HTTP (waitress) with 4 concurrent clients, each
   submission fully validated (schema + the agent's pipeline against the rendered device).
3. Refusing a 1 KB alias bomb ("billion laughs" in a job's ``context:``): the time of the request
   and the peak memory growth of the master's whole process tree (its validator processes
   included) while it is answered, against a real ``pumice-master serve``.

Targets (the issues): a pass under 100 ms; over 300 submissions/s; an alias bomb refused in
under 50 ms with under 5 MB of growth.
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from urllib.parse import quote

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from master.db import close_database, db, is_postgres  # noqa: E402
from master.instance import open_instance  # noqa: E402
from master.labnow import lab_model  # noqa: E402
from master.models import Device, DeviceTag, DeviceType, Job, JobTag, Tag, User, Worker  # noqa: E402
from master.scheduler import Scheduler  # noqa: E402
from master.states import DeviceState, JobHealth, JobState, WorkerState  # noqa: E402
from master.validation import default_validators  # noqa: E402

TYPES = ("qemu", "beaglebone-black", "bcm2711-rpi-4-b", "qemu-arm64-uboot")
QEMU_DICTIONARY = "{% extends 'qemu.jinja2' %}\n{% set arch = 'amd64' %}\n{% set no_kvm = True %}\n"
JOB = """device_type: qemu
job_name: bench {n}
timeouts:
  job:
    minutes: 10
  action:
    minutes: 2
visibility: public
priority: {priority}
context:
  arch: amd64
actions:
- deploy:
    to: tmpfs
    images:
      kernel:
        url: http://images.example/bzImage
        image_arg: -kernel {{kernel}} -append "console=ttyS0"
      ramdisk:
        url: http://images.example/rootfs.cpio.gz
        image_arg: -initrd {{ramdisk}}
- boot:
    method: qemu
    media: tmpfs
    prompts: ['/ # ']
- test:
    timeout:
      minutes: 2
    definitions:
    - repository:
        metadata:
          format: Lava-Test Test Definition 1.0
          name: smoke
        run:
          steps:
          - lava-test-case pass --shell true
      from: inline
      name: smoke
      path: inline/smoke.yaml
"""


#: the PostgreSQL server the benchmark uses when none is named, if it answers (as in CI)
LOCAL_PG = "postgresql://postgres@127.0.0.1:5432/test"


def _answers(url: str) -> bool:
    import psycopg2

    try:
        psycopg2.connect(url, connect_timeout=2).close()
    except psycopg2.OperationalError:
        return False
    return True


def _pg_schema_url(base: str) -> tuple[str, str]:
    import psycopg2

    schema = f"pumice_bench_{uuid.uuid4().hex[:10]}"
    conn = psycopg2.connect(base)
    conn.autocommit = True
    conn.cursor().execute(f"CREATE SCHEMA {schema}")
    conn.close()
    sep = "&" if "?" in base else "?"
    return f"{base}{sep}options={quote(f'-csearch_path={schema}')}", schema


def _pg_drop(base: str, schema: str) -> None:
    import psycopg2

    conn = psycopg2.connect(base)
    conn.autocommit = True
    conn.cursor().execute(f"DROP SCHEMA {schema} CASCADE")
    conn.close()


def populate(jobs: int = 10_000, devices: int = 1_000, workers: int = 50) -> None:
    """Bulk-insert a lab and a queue (through the models, in a few statements)."""
    with db.atomic():
        user = User.create(username="bench")
        type_ids = [DeviceType.create(name=name).id for name in TYPES]
        worker_ids = [Worker.create(hostname=f"worker{i:02d}", state=WorkerState.ONLINE).id for i in range(workers)]
        tag_ids = [Tag.create(name=name).id for name in ("usb", "hdmi", "sata")]
        Device.insert_many([
            {"hostname": f"dev{i:04d}", "device_type": type_ids[i % len(TYPES)], "worker": worker_ids[i % workers],
             "health": "Good", "dictionary": QEMU_DICTIONARY if i % len(TYPES) == 0 else None}
            for i in range(devices)]).execute()
        device_ids = [d for (d,) in Device.select(Device.id).order_by(Device.id).tuples()]
        DeviceTag.insert_many([(device_ids[i], tag_ids[i % 3]) for i in range(0, devices, 5)],
                              fields=[DeviceTag.device, DeviceTag.tag]).execute()
        start = dt.datetime(2024, 1, 1)
        rows = [{"name": f"bench {i}", "definition": "bench", "submitter": user.id,
                 "requested_device_type": type_ids[i % len(TYPES)], "priority": (i % 3) * 50,
                 "submit_time": start + dt.timedelta(seconds=i)} for i in range(jobs)]
        for chunk in range(0, jobs, 1000):
            Job.insert_many(rows[chunk:chunk + 1000]).execute()
        job_ids = [j for (j,) in Job.select(Job.id).order_by(Job.id).tuples()]
        JobTag.insert_many([(job_ids[i], tag_ids[i % 3]) for i in range(0, jobs, 20)],
                           fields=[JobTag.job, JobTag.tag]).execute()
    if is_postgres():
        # the planner statistics autovacuum keeps in a lab's database; without them the planner
        # takes a table just filled with ten thousand jobs for a tiny one (Pumice never runs
        # ANALYZE on SQLite, so neither does the benchmark)
        db.execute_sql("ANALYZE")


def reset() -> None:
    """Put the jobs and devices a pass claimed back in the queue (only those: rewriting every row
    would leave ten thousand dead row versions per round for the next pass to wade through)."""
    with db.atomic():
        (Job.update(state=JobState.SUBMITTED, health=JobHealth.UNKNOWN, actual_device=None, worker=None)
         .where(Job.state != JobState.SUBMITTED).execute())
        Device.update(state=DeviceState.IDLE, current_job_id=None).where(Device.state != DeviceState.IDLE).execute()


def bench_pass(database: str | None, rounds: int = 5) -> dict[str, float]:
    """Median timings (ms) of a scheduling pass over 10,000 jobs and 1,000 devices."""
    with tempfile.TemporaryDirectory() as data:
        open_instance(data, database)
        populate()
        scheduler = Scheduler()
        figures: dict[str, list[float]] = {name: [] for name in ("pass", "load", "assign", "claim", "publish", "busy",
                                                                 "lab")}
        for _ in range(rounds):
            reset()
            claimed = scheduler.loop_once()
            assert len(claimed) == 1000, f"{len(claimed)} claimed"
            stats = scheduler.stats
            for name, seconds in (("pass", stats.load + stats.assign + stats.claim), ("load", stats.load),
                                  ("assign", stats.assign), ("claim", stats.claim), ("publish", stats.publish)):
                figures[name].append(seconds * 1000)
            start = time.perf_counter()
            assert scheduler.loop_once() == []
            figures["busy"].append((time.perf_counter() - start) * 1000)
            start = time.perf_counter()
            lab_model()  # what the lab-now page is made of: 1,000 running, 9,000 queued
            figures["lab"].append((time.perf_counter() - start) * 1000)
        close_database()
    return {name: statistics.median(values) for name, values in figures.items()}


def _client(url: str, token: str, index: int, count: int) -> int:
    """One benchmark client (a process of its own): submit ``count`` jobs once told to go."""
    from master.client import Client

    client = Client(url, token)
    client.submit(JOB.format(n=f"warmup {index}", priority="low"))
    print("ready", flush=True)
    sys.stdin.readline()
    for n in range(count):
        client.submit(JOB.format(n=f"{index}.{n}", priority=("low", "medium", "high")[n % 3]))
    client.close()
    return 0


def _cpu_seconds(pids: list[int]) -> float:
    """CPU time (user + system) of other processes so far, from /proc (0 where there is none)."""
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def bench_submissions(clients: int = 4, per_client: int = 150, threads: int = 8,
                      validators: int | None = None) -> tuple[float, float]:
    """Validated submissions per second over HTTP from ``clients`` concurrent client processes, and
    the master's CPU time per submission in ms (what the rate is bound by on a busy machine), its
    validator processes included."""
    from master import inventory
    from master.server import MasterServer
    from master.users import SYSTEM, create_token

    with tempfile.TemporaryDirectory() as data:
        open_instance(data)
        inventory.add_device_type(SYSTEM, "qemu")
        inventory.add_worker(SYSTEM, "w1")
        for i in range(4):
            inventory.add_device(SYSTEM, f"qemu{i:02d}", "qemu", worker="w1", health="Good", dictionary=QEMU_DICTIONARY)
        inventory.worker_seen("w1", "bench")
        token = create_token("bench")
        server = MasterServer("127.0.0.1", 0, threads=threads, publish_site=False, validators=validators).start()
        try:
            # the token goes in the environment: one starting with '-' would read as an option
            procs = [subprocess.Popen([sys.executable, __file__, "--client", server.url, str(i), str(per_client)],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                      env={**os.environ, "PUMICE_BENCH_TOKEN": token})
                     for i in range(clients)]
            for proc in procs:
                assert proc.stdout.readline().strip() == "ready"
            pids = []
            if server.validators is not None:
                assert server.validators.wait_ready(), "the validator processes did not start"
                pids = server.validators.pids()
            start = time.perf_counter()
            cpu = time.process_time() + _cpu_seconds(pids)
            for proc in procs:
                proc.stdin.write("go\n")
                proc.stdin.flush()
            for proc in procs:
                if proc.wait(timeout=600) != 0:
                    raise RuntimeError("a benchmark client failed")
            elapsed = time.perf_counter() - start
            cpu = time.process_time() + _cpu_seconds(pids) - cpu
        finally:
            server.stop()
            close_database()
    return clients * per_client / elapsed, cpu * 1000 / (clients * per_client)


def bench_alias_bomb(rounds: int = 20) -> dict[str, float]:
    """Median time (ms) and peak memory growth of the master's process tree (kB, median and
    largest) to refuse a 1 KB alias bomb, over ``rounds`` submissions to a real master process;
    and the bomb's size in bytes."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from support.hostile import MasterProcess, bomb_job
    from support.master import job_text

    text = bomb_job("context")
    seconds, growth = [], []
    with tempfile.TemporaryDirectory() as root:
        master = MasterProcess(Path(root)).start()
        try:
            for n in range(3):  # the lab cached, the validator processes warm
                assert master.submit(job_text(f"warm-up {n}"), measure=False).status == 201
            for _ in range(rounds):
                answer = master.submit(text)
                assert answer.status == 400 and "limit max_nodes" in answer.text, answer.text
                seconds.append(answer.seconds)
                growth.append(answer.growth_kb)
            assert master.serves()
        finally:
            master.stop()
    return {"ms": statistics.median(seconds) * 1000, "kb": statistics.median(growth), "max_kb": max(growth),
            "size": len(text)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pg", default=os.environ.get("PUMICE_TEST_PG"),
                        help=f"PostgreSQL URL (default: PUMICE_TEST_PG, else {LOCAL_PG} when it answers)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--skip-pass", action="store_true", help="only the submissions over HTTP")
    parser.add_argument("--skip-http", action="store_true")
    parser.add_argument("--skip-bomb", action="store_true", help="no alias-bomb figure")
    parser.add_argument("--http-rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=8, help="waitress threads of the master")
    parser.add_argument("--validators", type=int, help="validator processes of the master (default: its own)")
    parser.add_argument("--client", nargs=3, help=argparse.SUPPRESS)
    # called as main() by tools/bench.py: take no options from that script's command line
    args = parser.parse_args([] if argv is None else argv)
    if args.client:
        url, index, count = args.client
        return _client(url, os.environ["PUMICE_BENCH_TOKEN"], int(index), int(count))
    logging.basicConfig(level=logging.WARNING)
    # waitress warns on every request that waits for a thread: under a benchmark's load that is
    # thousands of lines, and their cost would be measured too
    logging.getLogger("waitress.queue").setLevel(logging.ERROR)

    backends: list[tuple[str, str | None]] = [] if args.skip_pass else [("sqlite", None)]
    if backends:
        print("master: scheduling pass, 10,000 queued jobs over 1,000 idle devices (median of "
              f"{args.rounds}; target < 100 ms)")
    pg = args.pg or (LOCAL_PG if _answers(LOCAL_PG) else None)
    if pg and backends:
        backends.append(("postgresql", pg))
    elif backends:
        print(f"  postgresql: skipped (no server at {LOCAL_PG}: set PUMICE_TEST_PG or --pg URL)")
    for name, base in backends:
        schema = None
        url = None
        if base:
            url, schema = _pg_schema_url(base)
        try:
            r = bench_pass(url, args.rounds)
        finally:
            if schema:
                _pg_drop(base, schema)
        print(f"  {name:<10}: pass {r['pass']:6.1f} ms (load {r['load']:.1f}, assign {r['assign']:.1f}, "
              f"claim 1,000 {r['claim']:.1f}); meta.yaml of the 1,000 jobs + lab.yaml {r['publish']:.1f} ms; "
              f"pass with every device busy {r['busy']:.1f} ms; the lab-now model (1,000 running, 9,000 "
              f"queued) {r['lab']:.1f} ms; load average {os.getloadavg()[0]:.1f}")
    if not args.skip_http:
        runs = [bench_submissions(threads=args.threads, validators=args.validators)
                for _ in range(args.http_rounds)]
        rate = statistics.median(r[0] for r in runs)
        cpu = statistics.median(r[1] for r in runs)
        validators = default_validators() if args.validators is None else args.validators
        print(f"master: validated submissions over HTTP, 4 clients: {rate:.0f}/s, median of {len(runs)} "
              f"(target > 300/s); the master's CPU per submission {cpu:.2f} ms (its {validators} validator "
              f"processes included); load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    if not args.skip_bomb:
        r = bench_alias_bomb()
        print(f"master: refusing a {r['size']}-byte alias bomb: {r['ms']:.1f} ms, peak RSS growth of the master's "
              f"process tree {r['kb']:.0f} kB (largest {r['max_kb']:.0f} kB), median of 20 (targets < 50 ms, "
              "< 5 MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
