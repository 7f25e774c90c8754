"""The scheduler: the pure assign(), and loop_once()/claim() against SQLite and PostgreSQL."""

from __future__ import annotations

import datetime as dt
import threading
import time
from collections import Counter

import pytest
from support.master import build_lab, job_text

from master import events, inventory, jobs
from master.db import close_database, connection, db, is_postgres
from master.errors import Invalid
from master.migrations import DEVICES_FILLFACTOR, LATEST, MIGRATIONS, current_version, migrate
from master.models import Device, DeviceTag, DeviceType, Job, JobTag, SchemaVersion, Tag, Worker, utcnow
from master.scheduler import (
    Assignment,
    IdleDevice,
    QueuedJob,
    Scheduler,
    WorkerSlot,
    assign,
    check_due,
    claim,
    load_health_check_types,
    load_idle_devices,
    load_queued_jobs,
    load_workers,
)
from master.start import start_message
from master.states import DeviceHealth, DeviceState, JobHealth, JobState, WorkerState
from master.users import SYSTEM

T0 = dt.datetime(2024, 1, 1, 12, 0, 0)
ONLINE = {"w1": WorkerSlot("w1", True, True), "w2": WorkerSlot("w2", True, True)}


def q(
    job_id: int,
    device_type: str = "qemu",
    priority: int = 50,
    minute: int = 0,
    tags: tuple = (),
    device: str | None = None,
    health_check: bool = False,
) -> QueuedJob:
    return QueuedJob(
        job_id,
        device_type,
        priority,
        T0 + dt.timedelta(minutes=minute),
        frozenset(tags),
        device,
        health_check,
    )


def d(
    hostname: str,
    device_type: str = "qemu",
    health: str = "Good",
    worker: str = "w1",
    tags: tuple = (),
    due: bool = False,
) -> IdleDevice:
    return IdleDevice(hostname, device_type, health, worker, frozenset(tags), due)


# ---- assign(): pure ----


def test_priority_then_submit_time_then_id() -> None:
    queued = [
        q(1, priority=50, minute=0),
        q(2, priority=100, minute=5),
        q(3, priority=50, minute=0),
        q(4, priority=50, minute=-1),
    ]
    result = assign(queued, [d("a"), d("b")], ONLINE)
    assert [a.job_id for a in result] == [2, 4]


def test_device_type_and_tags() -> None:
    queued = [q(1, tags=("usb",)), q(2, device_type="bbb"), q(3)]
    devices = [d("plain"), d("usb", tags=("usb", "hdmi")), d("bbb1", device_type="bbb")]
    result = {a.job_id: a.device for a in assign(queued, devices, ONLINE)}
    assert result == {1: "usb", 2: "bbb1", 3: "plain"}


def test_untagged_job_takes_the_least_tagged_device() -> None:
    result = assign([q(1)], [d("a", tags=("usb", "hdmi")), d("b", tags=("usb",)), d("c")], ONLINE)
    assert result == [Assignment("c", 1)]


def test_tags_no_match_leaves_job_queued() -> None:
    assert assign([q(1, tags=("hdmi",))], [d("a", tags=("usb",))], ONLINE) == []


def test_health_and_worker_state() -> None:
    workers = {
        "w1": WorkerSlot("w1", True, True),
        "off": WorkerSlot("off", False, True),
        "maint": WorkerSlot("maint", True, False),
    }
    devices = [
        d("bad", health="Bad"),
        d("offline", worker="off"),
        d("maint", worker="maint"),
        d("nowhere", worker="unknown"),
        d("good"),
    ]
    assert assign([q(1), q(2)], devices, workers) == [Assignment("good", 1)]


def test_unknown_device_runs_jobs_only_without_health_check() -> None:
    assert assign([q(1)], [d("a", health="Unknown")], ONLINE) == [Assignment("a", 1)]
    # with a health check, the check runs first and the job waits
    assert assign([q(1)], [d("a", health="Unknown")], ONLINE, {"qemu"}) == [Assignment("a", None, True)]


def test_health_checks_first_looping_and_due() -> None:
    devices = [
        d("loop", health="Looping"),
        d("due", due=True),
        d("fresh"),
        d("other", device_type="bbb", health="Unknown"),
    ]
    result = assign([q(1), q(2)], devices, ONLINE, {"qemu"})
    assert Assignment("loop", None, True) in result
    assert Assignment("due", None, True) in result
    assert Assignment("fresh", 1) in result
    assert len(result) == 3  # bbb has no health check, no bbb job queued


def test_queued_health_check_is_reused() -> None:
    result = assign(
        [q(7, device="a", health_check=True, priority=100)], [d("a", health="Unknown")], ONLINE, {"qemu"}
    )
    assert result == [Assignment("a", 7, True)]


def test_per_worker_job_limit() -> None:
    workers = {
        "w1": WorkerSlot("w1", True, True, limit=2, busy=1),
        "w2": WorkerSlot("w2", True, True, limit=1),
    }
    devices = [d("a"), d("b"), d("c", worker="w2"), d("d", worker="w2")]
    result = assign([q(i) for i in range(1, 6)], devices, workers)
    assert Counter(dev.startswith(("a", "b")) for dev in (a.device for a in result)) == {True: 1, False: 1}
    assert len(result) == 2


def test_check_due() -> None:
    now = T0
    assert check_due(None, 0, 24, "hours", now)
    assert not check_due(now - dt.timedelta(hours=23), 0, 24, "hours", now)
    assert check_due(now - dt.timedelta(hours=24), 0, 24, "hours", now)
    assert check_due(now, 10, 10, "jobs", now)
    assert not check_due(now, 9, 10, "jobs", now)


def test_assign_10000_jobs_1000_devices() -> None:
    """At the scale of ``make bench``: every device gets exactly one job, the highest ranked ones
    (priority, then submit time, then id), each job on a device that has its tags."""
    queued = [
        q(i, priority=i % 3 * 50, minute=i % 100, tags=("usb",) if i % 10 == 0 else ()) for i in range(10_000)
    ]
    devices = [
        d(f"dev{i:04d}", worker=f"w{i % 50}", tags=("usb",) if i % 4 == 0 else ()) for i in range(1000)
    ]
    workers = {f"w{i}": WorkerSlot(f"w{i}", True, True) for i in range(50)}
    result = assign(reversed(queued), devices, workers)
    assert sorted(a.device for a in result) == sorted(dev.hostname for dev in devices)  # each exactly once
    assert len({a.job_id for a in result}) == 1000
    # 250 usb devices are enough for the usb jobs among the first 1,000: those are exactly the jobs run
    ranked = sorted(queued, key=lambda job: (-job.priority, job.submit_time, job.id))
    assert {a.job_id for a in result} == {job.id for job in ranked[:1000]}
    tags = {dev.hostname: dev.tags for dev in devices}
    assert all(queued[a.job_id].tags <= tags[a.device] for a in result)
    # an untagged job takes an untagged device while there is one
    untagged_on_usb = sum(1 for a in result if not queued[a.job_id].tags and tags[a.device])
    usb_jobs = sum(1 for a in result if queued[a.job_id].tags)
    assert untagged_on_usb == 250 - usb_jobs


# ---- against the database ----


@pytest.fixture
def admin(lab):
    return lab.user("admin")


def _state(job_id: int) -> tuple[str, str, str | None]:
    job = Job.get_by_id(job_id)
    return job.state, job.health, job.actual_device.hostname if job.actual_device_id else None


def test_loop_once_claims_and_frees(lab) -> None:
    alice = lab.user("alice")
    ids = [jobs.submit_job(job_text(f"job {i}"), alice)[0] for i in range(3)]
    scheduler = Scheduler()
    claimed = scheduler.loop_once()
    assert sorted(job for job, _ in claimed) == ids[:2]
    assert {dev for _, dev in claimed} == {"qemu01", "qemu02"}
    assert _state(ids[2]) == (JobState.SUBMITTED, JobHealth.UNKNOWN, None)
    meta = lab.instance.store.read_meta(ids[0])
    assert meta["state"] == "Scheduled" and meta["device"] in ("qemu01", "qemu02") and meta["worker"] == "w1"
    assert scheduler.loop_once() == []  # nothing free

    first, device = claimed[0]
    assert jobs.job_started(first) is True
    assert jobs.job_started(first) is False  # a resent START ack changes nothing
    assert Device.get(Device.hostname == device).state == DeviceState.RUNNING
    assert jobs.job_finished(first, "Complete") is True
    assert jobs.job_finished(first, "Complete") is False
    assert _state(first) == (JobState.FINISHED, JobHealth.COMPLETE, device)
    assert scheduler.loop_once() == [(ids[2], device)]


def test_start_is_assembled_from_what_submission_stored(lab) -> None:
    alice = lab.user("alice")
    inventory.set_worker_text(SYSTEM, "w1", "env", "overrides:\n  http_proxy: http://proxy:3128\n")
    job_id = jobs.submit_job(job_text(), alice)[0]
    assert start_message(job_id) is None  # not Scheduled yet
    row = Job.get_by_id(job_id)
    assert (row.context, row.timeout) == ({"arch": "amd64"}, 300.0)
    [(_, device)] = Scheduler().loop_once()
    start = start_message(job_id)
    assert (start.job_id, start.device_name) == (job_id, device)
    assert start.definition == job_text()
    assert start.timeout == 300.0
    assert "qemu-system-x86_64" in start.device  # rendered with the job's context (arch: amd64)
    assert start.env["overrides"] == {"http_proxy": "http://proxy:3128"}


def test_infrastructure_error_then_health_check(lab) -> None:
    inventory.set_health_check(SYSTEM, "qemu", job_text("qemu health check"))
    # both devices are Good but never checked: their checks are due first
    scheduler = Scheduler()
    checks = scheduler.loop_once()
    assert len(checks) == 2
    for job_id, _ in checks:
        job = Job.get_by_id(job_id)
        assert job.health_check and job.submitter.username == "pumice-health" and job.priority == 100
        jobs.job_started(job_id)
        jobs.job_finished(job_id, "Complete")
    assert {d.health for d in Device.select()} == {DeviceHealth.GOOD}
    assert Device.get(Device.hostname == "qemu01").last_health_check is not None

    alice = lab.user("alice")
    job_id = jobs.submit_job(job_text(), alice)[0]
    [(claimed, device)] = scheduler.loop_once()
    assert claimed == job_id
    jobs.job_started(job_id)
    jobs.job_finished(job_id, "Incomplete", "tftp server unreachable", "Infrastructure")
    assert Device.get(Device.hostname == device).health == DeviceHealth.UNKNOWN
    assert Job.get_by_id(job_id).failure_comment == "Infrastructure: tftp server unreachable"

    # the Unknown device runs a health check before anything else; a failing one makes it Bad
    jobs.submit_job(job_text(), alice)
    claims = scheduler.loop_once()
    check = [j for j, dev in claims if dev == device]
    assert len(check) == 1 and Job.get_by_id(check[0]).health_check
    jobs.job_started(check[0])
    jobs.job_finished(check[0], "Incomplete", "no prompt", "Job")
    assert Device.get(Device.hostname == device).health == DeviceHealth.BAD


def test_cancel_running_waits_for_agent(lab) -> None:
    alice, bob = lab.user("alice"), lab.user("bob")
    job_id = jobs.submit_job(job_text(), alice)[0]
    Scheduler().loop_once()
    jobs.job_started(job_id)
    received = []
    events.subscribe(listener := lambda event, data: received.append((event, data)))
    try:
        record = jobs.cancel_job(job_id, alice)
    finally:
        events.unsubscribe(listener)
    assert record["state"] == "Canceling"
    assert ("job_canceling", {"job_ids": [job_id]}) in received
    jobs.job_finished(job_id, "Incomplete", "canceled", "Canceled")
    assert _state(job_id)[:2] == (JobState.FINISHED, JobHealth.CANCELED)
    assert Device.get(Device.hostname == _state(job_id)[2]).state == DeviceState.IDLE
    del bob


def test_scheduler_thread_wakes_on_submission(lab) -> None:
    alice = lab.user("alice")
    scheduler = Scheduler(interval=3600)  # the timer never fires during the test
    scheduler.start()
    try:
        time.sleep(0.2)  # the first pass runs at start
        with connection():
            start = time.monotonic()
            job_id = jobs.submit_job(job_text(), alice)[0]
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            with connection():
                if Job.get_by_id(job_id).state == JobState.SCHEDULED:
                    break
            time.sleep(0.005)
        elapsed = time.monotonic() - start
        with connection():
            assert Job.get_by_id(job_id).state == JobState.SCHEDULED
        assert elapsed < 1.0, f"submission to assignment took {elapsed:.2f} s"
    finally:
        scheduler.stop()


@pytest.mark.parametrize("backend_devices", [1, 8])
def test_two_schedulers_race_without_double_assignment(tmp_path, database_url, backend_devices) -> None:
    lab = build_lab(tmp_path / "data", database_url, devices=backend_devices)
    alice = lab.user("alice")
    for i in range(20):
        jobs.submit_job(job_text(f"race {i}"), alice)
    close_database()
    barrier = threading.Barrier(4)
    results: list[list[tuple[int, str]]] = []
    errors: list[BaseException] = []

    def run() -> None:
        scheduler = Scheduler()
        try:
            barrier.wait(5)
            results.append(scheduler.loop_once())
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert not errors, errors
    claimed = [pair for result in results for pair in result]
    with connection():
        active = list(Job.select().where(Job.state == JobState.SCHEDULED))
        devices = list(Device.select())
    assert len(claimed) == len(active) == backend_devices
    assert len({dev for _, dev in claimed}) == backend_devices  # no device twice
    assert len({job for job, _ in claimed}) == backend_devices  # no job twice
    assert {dev.current_job_id for dev in devices} == {job.id for job in active}
    assert all(dev.state == DeviceState.RESERVED for dev in devices)


def test_job_limit_and_offline_worker(lab) -> None:
    alice = lab.user("alice")
    inventory.update_worker(SYSTEM, "w1", job_limit=1)
    for _ in range(3):
        jobs.submit_job(job_text(), alice)
    scheduler = Scheduler()
    assert len(scheduler.loop_once()) == 1
    inventory.update_worker(SYSTEM, "w1", job_limit=0)
    inventory.worker_offline("w1")
    assert scheduler.loop_once() == []
    inventory.worker_seen("w1", "0.1.0")
    assert len(scheduler.loop_once()) == 1


def test_retired_and_maintenance_devices_get_no_jobs(lab) -> None:
    alice = lab.user("alice")
    inventory.update_device(SYSTEM, "qemu01", health="Retired")
    inventory.update_device(SYSTEM, "qemu02", health="Retired")
    with pytest.raises(Invalid, match="invalid job definition") as refused:
        jobs.submit_job(job_text(), alice)
    assert "device type 'qemu' is unavailable" in refused.value.faults[0].message
    # a device in Maintenance still accepts submissions, but runs nothing
    inventory.update_device(SYSTEM, "qemu01", health="Maintenance")
    job_id = jobs.submit_job(job_text(), alice)[0]
    assert Scheduler().loop_once() == []
    inventory.update_device(SYSTEM, "qemu02", health="Good")
    assert Scheduler().loop_once() == [(job_id, "qemu02")]


def test_claim_skips_what_was_taken_meanwhile(lab) -> None:
    """Between the load and the claim a job is canceled and a device taken: neither is assigned,
    the canceled job's device stays Idle and the job that lost its device stays queued."""
    alice = lab.user("alice")
    first, second, third = (jobs.submit_job(job_text(f"job {i}"), alice)[0] for i in range(3))
    with connection():
        Job.update(state=JobState.FINISHED, health=JobHealth.CANCELED).where(Job.id == first).execute()
        Device.update(state=DeviceState.RESERVED).where(Device.hostname == "qemu02").execute()
        assert claim([Assignment("qemu01", first), Assignment("qemu02", second)]) == []
        assert Device.get(Device.hostname == "qemu01").state == DeviceState.IDLE
        assert Device.get(Device.hostname == "qemu01").current_job_id is None
        assert _state(second) == (JobState.SUBMITTED, JobHealth.UNKNOWN, None)
        Device.update(state=DeviceState.IDLE).where(Device.hostname == "qemu02").execute()
        # a job offered two devices, a device offered two jobs: each is assigned once
        assert claim([Assignment("qemu01", third), Assignment("qemu02", third)]) == [(third, "qemu01")]
        assert Device.get(Device.hostname == "qemu02").state == DeviceState.IDLE
        assert claim([Assignment("qemu02", second), Assignment("qemu02", first)]) == [(second, "qemu02")]
        assert claim([Assignment("qemu01", second)]) == []  # Reserved by now
        assert [(d.hostname, d.state, d.current_job_id) for d in Device.select().order_by(Device.hostname)] == [
            ("qemu01", DeviceState.RESERVED, third), ("qemu02", DeviceState.RESERVED, second)]


def test_a_pass_over_a_large_lab_claims_what_assign_chose(lab) -> None:
    """1,200 devices (more than one claiming statement takes), 3,000 queued jobs, tags and a
    worker limit: the pass claims exactly what assign() picks from the whole queue and the lab's
    rows agree with each other (each device holds the job that points at it, and only one)."""
    alice = lab.user("alice")
    with connection():
        type_id = DeviceType.get(DeviceType.name == "qemu").id
        usb = Tag.create(name="usb").id
        worker_ids = [Worker.create(hostname=f"lw{i}", state=WorkerState.ONLINE,
                                    job_limit=40 if i == 0 else 0).id for i in range(12)]
        Device.insert_many([{"hostname": f"big{i:04d}", "device_type": type_id, "worker": worker_ids[i % 12],
                             "health": DeviceHealth.GOOD} for i in range(1200)]).execute()
        big = dict(Device.select(Device.hostname, Device.id).where(Device.hostname.startswith("big")).tuples())
        DeviceTag.insert_many([(big[f"big{i:04d}"], usb) for i in range(0, 1200, 4)],
                              fields=[DeviceTag.device, DeviceTag.tag]).execute()
        Job.insert_many([{"name": f"big {i}", "definition": "big", "submitter": alice.id,
                          "requested_device_type": type_id, "priority": (i * 7) % 3 * 50,
                          "submit_time": T0 + dt.timedelta(seconds=(i * 13) % 3000)} for i in range(3000)]).execute()
        job_ids = [job for (job,) in Job.select(Job.id).order_by(Job.id).tuples()]
        JobTag.insert_many([(job_ids[i], usb) for i in range(0, 3000, 10)], fields=[JobTag.job, JobTag.tag]).execute()
        health_checks = load_health_check_types()
        expected = assign(load_queued_jobs({"qemu"}), load_idle_devices(health_checks, utcnow()), load_workers(),
                          frozenset(health_checks))
    assert len(expected) == 2 + 11 * 100 + 40  # every device that may work has a job
    claimed = Scheduler().loop_once()
    assert sorted(claimed) == sorted((a.job_id, a.device) for a in expected)
    with connection():
        scheduled = dict(Job.select(Job.id, Job.actual_device).where(Job.state == JobState.SCHEDULED).tuples())
        reserved = dict(Device.select(Device.id, Device.current_job_id)
                        .where(Device.state == DeviceState.RESERVED).tuples())
        workers = dict(Job.select(Job.id, Job.worker).where(Job.state == JobState.SCHEDULED).tuples())
        owners = dict(Device.select(Device.id, Device.worker).tuples())
    assert len(scheduled) == len(reserved) == len(claimed)
    assert {device: job for job, device in scheduled.items()} == reserved
    assert all(workers[job] == owners[device] for job, device in scheduled.items())
    assert sum(1 for device in reserved if owners[device] == worker_ids[0]) == 40  # its job limit


def test_migration_keeps_what_start_needs_for_the_jobs_still_to_run(tmp_path, database_url) -> None:
    """A database of the previous release (no jobs.context, jobs.timeout) is upgraded: the queued
    jobs get them from their definitions, once; START never parses a definition again."""
    lab = build_lab(tmp_path / "data", database_url)
    alice = lab.user("alice")
    with connection():
        queued = jobs.submit_job(job_text(), alice)[0]
        done = jobs.submit_job(job_text(), alice)[0]
        Job.update(state=JobState.FINISHED).where(Job.id == done).execute()
        Job.update(context=None, timeout=None).execute()
        database = db.obj
        for column in ("context", "timeout"):
            database.execute_sql(f'ALTER TABLE "jobs" DROP COLUMN "{column}"')
        SchemaVersion.delete().where(SchemaVersion.version >= 6).execute()
        assert migrate()[0] == (6, MIGRATIONS[5][1])
        rows = {row.id: (row.context, row.timeout) for row in Job.select()}
        assert rows == {queued: ({"arch": "amd64"}, 300.0), done: (None, None)}
    assert migrate() == []


def test_migration_to_the_queue_index(tmp_path, database_url) -> None:
    """A database of the previous release (the old queue index, no fillfactor) is upgraded."""
    build_lab(tmp_path / "data", database_url)
    with connection():
        database = db.obj
        database.execute_sql('DROP INDEX "jobs_queue"')
        database.execute_sql(
            'CREATE INDEX "jobs_state_priority_submit_time" ON "jobs" ("state", "priority", "submit_time")'
        )
        if is_postgres():
            database.execute_sql("ALTER TABLE devices RESET (fillfactor)")
        SchemaVersion.delete().where(SchemaVersion.version >= 3).execute()
        assert migrate() == [(number, name) for number, name, _ in MIGRATIONS[2:]]
        assert current_version() == LATEST
        indexes = {index.name for index in database.get_indexes("jobs")}
        assert "jobs_queue" in indexes and "jobs_state_priority_submit_time" not in indexes
        if is_postgres():
            [(options,)] = database.execute_sql("SELECT reloptions FROM pg_class WHERE oid = 'devices'::regclass")
            assert f"fillfactor={DEVICES_FILLFACTOR}" in options
        else:  # the queue is read in index order, not sorted
            plan = database.execute_sql("EXPLAIN QUERY PLAN SELECT id FROM jobs WHERE state = 'Submitted' "
                                        "ORDER BY priority DESC, submit_time, id LIMIT 10").fetchall()
            assert "jobs_queue" in str(plan) and "TEMP B-TREE" not in str(plan)
    assert migrate() == []
