"""The scheduler: a pure ``assign()`` over queued jobs and idle devices, and a thin loop that claims.

``assign(queued_jobs, idle_devices, workers, health_check_types)`` has no I/O. It runs health checks
first (devices whose health is Unknown or Looping, or whose check is due, on types that have one),
then gives each job, by priority, submit time and id, the idle device of its type that carries all
its tags (the one with the fewest extra tags, to keep special devices for jobs that need them), on a
worker that is online, Active and under its job limit. Jobs run on Good devices, or on Unknown ones
of a type without a health check.

:class:`Scheduler` loads that state in a few queries, calls ``assign()`` and claims the result with
conditional UPDATEs in one transaction: rows are locked with ``FOR UPDATE SKIP LOCKED`` on
PostgreSQL (two schedulers never wait on each other, never assign one device twice); on SQLite the
transaction holds the write lock (BEGIN IMMEDIATE). It runs when an event wakes it (a submission, a
freed device, a worker coming online) and on a slow timer as a safety net. A full database fails
a pass without claiming anything: it is tried again every second; claims committed while the store
is full wait for space to write their files, then go to the broker.
"""

from __future__ import annotations

import datetime as _dt
import functools
import json
import logging
import math
import threading
import time
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import yaml
from peewee import fn

from agent.policy import Access, FilePolicy
from master import diskfull, events
from master.db import connection, db, is_postgres
from master.instance import current
from master.models import Device, DeviceTag, DeviceType, Job, JobTag, Tag, Worker, utcnow
from master.states import DeviceHealth, DeviceState, JobState, WorkerHealth, WorkerState
from master.validation import worker_policy
from results import bounded

log = logging.getLogger("pumice.scheduler")

#: events after which a scheduling pass may find something new to do
WAKE_EVENTS = frozenset({"job_submitted", "device_freed", "device_changed", "worker_online",
                         "worker_changed", "lab_changed", "job_finished"})


class QueuedJob(NamedTuple):
    """A job waiting for a device. ``submit_time`` only needs to compare with other jobs' times.

    (NamedTuples, not dataclasses: a pass builds ten thousand of them and tuples are cheap.)
    """

    id: int
    device_type: str
    priority: int
    submit_time: Any
    tags: frozenset[str] = frozenset()
    #: the one device the job must run on (health checks)
    device: str | None = None
    health_check: bool = False
    #: what the job reads from its worker itself (agent.policy.Access): its worker's file policy
    #: must allow all of it
    local_urls: tuple[Access, ...] = ()


class IdleDevice(NamedTuple):
    """A device in state Idle whose health allows work (Good, Unknown or Looping)."""

    hostname: str
    device_type: str
    health: str
    worker: str | None
    tags: frozenset[str] = frozenset()
    #: its periodic health check is due (see :func:`check_due`)
    check_due: bool = False


@dataclass(frozen=True, slots=True)
class WorkerSlot:
    """A worker as the scheduler sees it: usable, and how many more jobs it may take."""

    hostname: str
    online: bool
    active: bool
    #: at most this many jobs at once (0: no limit)
    limit: int = 0
    #: jobs holding its devices now
    busy: int = 0
    #: its file policy (from its dispatcher configuration): what of itself a job may read
    policy: FilePolicy = FilePolicy()

    def capacity(self) -> float:
        if not (self.online and self.active):
            return 0
        return math.inf if self.limit <= 0 else max(0, self.limit - self.busy)


@dataclass(frozen=True, slots=True)
class Assignment:
    """Run ``job_id`` on ``device``; ``job_id`` None means: create the device type's health check."""

    device: str
    job_id: int | None
    health_check: bool = False


def check_due(last_check: _dt.datetime | None, jobs_since: int, frequency: int, denominator: str,
              now: _dt.datetime) -> bool:
    """Whether a device's periodic health check is due: never run, or older than ``frequency``
    hours, or ``frequency`` jobs ran since (``denominator`` hours or jobs)."""
    if last_check is None:
        return True
    if denominator == "jobs":
        return jobs_since >= frequency
    return now - last_check >= _dt.timedelta(hours=frequency)


def assign(queued_jobs: Iterable[QueuedJob], idle_devices: Iterable[IdleDevice],
           workers: Mapping[str, WorkerSlot], health_check_types: frozenset[str] | set[str] = frozenset(),
           ) -> list[Assignment]:
    """Which queued job runs on which idle device now (pure: no I/O, no clock).

    Health checks come first; a queued health check bound to a device is reused rather than a new
    one created. Each device and each unit of worker capacity is used at most once. A job that reads
    from its worker itself (``local_urls``) goes only to a worker whose file policy allows it.
    """
    capacity = {name: slot.capacity() for name, slot in workers.items()}
    queued = sorted(queued_jobs, key=lambda j: (-j.priority, j.submit_time, j.id))
    pending_checks = {job.device: job.id for job in queued if job.health_check and job.device}
    assignments: list[Assignment] = []
    pools: dict[str, list[IdleDevice]] = defaultdict(list)
    for device in sorted(idle_devices, key=lambda d: (len(d.tags), d.hostname)):
        if capacity.get(device.worker or "", 0) <= 0:
            continue
        checked_type = device.device_type in health_check_types
        if checked_type and (device.health in (DeviceHealth.UNKNOWN, DeviceHealth.LOOPING) or device.check_due):
            assignments.append(Assignment(device.hostname, pending_checks.get(device.hostname), True))
            capacity[device.worker or ""] -= 1
        elif device.health == DeviceHealth.GOOD or (device.health == DeviceHealth.UNKNOWN and not checked_type):
            pools[device.device_type].append(device)
    remaining = sum(len(pool) for pool in pools.values())

    @functools.cache
    def allows(local_urls: tuple[Access, ...], worker: str) -> bool:
        return workers[worker].policy.allows_all(local_urls)

    for job in queued:
        if remaining == 0:
            break
        if job.health_check:
            continue  # health checks run only through the branch above
        pool = pools.get(job.device_type)
        if not pool:
            continue
        for index, device in enumerate(pool):
            if capacity[device.worker or ""] <= 0:
                continue
            if job.device is not None and device.hostname != job.device:
                continue
            if job.local_urls and not allows(job.local_urls, device.worker or ""):
                continue
            if job.tags <= device.tags:
                assignments.append(Assignment(device.hostname, job.id))
                capacity[device.worker or ""] -= 1
                del pool[index]
                remaining -= 1
                break
    return assignments


# ---- loading the state (a few queries, raw rows: a pass over 10,000 jobs must stay fast) ----

def _as_datetime(value: Any) -> _dt.datetime | None:
    if value is None or isinstance(value, _dt.datetime):
        return value
    return _dt.datetime.fromisoformat(str(value))


def _skip_locked(query):
    """``FOR UPDATE SKIP LOCKED`` on PostgreSQL; SQLite serialises writers instead."""
    if not is_postgres():
        return query
    try:
        return query.for_update(skip_locked=True)
    except TypeError:  # peewee 3
        return query.for_update("FOR UPDATE SKIP LOCKED")


def load_workers() -> dict[str, WorkerSlot]:
    busy = dict(db.execute(Device.select(Device.worker, fn.COUNT(Device.id))
                           .where(Device.state != DeviceState.IDLE).group_by(Device.worker)).fetchall())
    rows = db.execute(Worker.select(Worker.id, Worker.hostname, Worker.state, Worker.health,
                                    Worker.job_limit, Worker.config)).fetchall()
    return {hostname: WorkerSlot(hostname, state == WorkerState.ONLINE, health == WorkerHealth.ACTIVE,
                                 limit or 0, busy.get(worker_id, 0), worker_policy(config))
            for worker_id, hostname, state, health, limit, config in rows}


def load_health_check_types() -> dict[str, tuple[int, str]]:
    """Device types with a health check: name -> (frequency, denominator)."""
    query = (DeviceType.select(DeviceType.name, DeviceType.health_frequency, DeviceType.health_denominator)
             .where(DeviceType.health_check.is_null(False) & (DeviceType.health_check != "")))
    return {name: (freq, deno) for name, freq, deno in db.execute(query).fetchall()}


def load_idle_devices(health_checks: Mapping[str, tuple[int, str]], now: _dt.datetime) -> list[IdleDevice]:
    query = (Device.select(Device.id, Device.hostname, DeviceType.name, Device.health, Worker.hostname,
                           Device.last_health_check, Device.jobs_since_check)
             .join(DeviceType).switch(Device).join(Worker)
             .where((Device.state == DeviceState.IDLE) & Device.health.in_(DeviceHealth.CHECKABLE)))
    rows = db.execute(query).fetchall()
    if not rows:
        return []
    tags: dict[int, set[str]] = defaultdict(set)
    tag_query = (DeviceTag.select(DeviceTag.device, Tag.name).join(Tag).join_from(DeviceTag, Device)
                 .where((Device.state == DeviceState.IDLE) & Device.health.in_(DeviceHealth.CHECKABLE)))
    for device_id, name in db.execute(tag_query).fetchall():
        tags[device_id].add(name)
    devices = []
    for device_id, hostname, type_name, health, worker, last_check, jobs_since in rows:
        due = False
        if type_name in health_checks:
            frequency, denominator = health_checks[type_name]
            due = check_due(_as_datetime(last_check), jobs_since or 0, frequency, denominator, now)
        devices.append(IdleDevice(hostname, type_name, health, worker, frozenset(tags.get(device_id, ())), due))
    return devices


def load_queued_jobs(device_types: Iterable[str], limit: int | None = None, offset: int = 0) -> list[QueuedJob]:
    """Queued jobs for the given device types (only types with an idle device matter in a pass),
    in scheduling order (priority, submit time, id): ``limit``/``offset`` page through the queue."""
    type_names = dict(db.execute(DeviceType.select(DeviceType.id, DeviceType.name)
                                 .where(DeviceType.name.in_(sorted(set(device_types))))).fetchall())
    if not type_names:
        return []
    # one flat query on the jobs table, read in the order of its queue index (no sort of the whole
    # queue, and a page stops early): names are mapped in Python, not joined
    condition = (Job.state == JobState.SUBMITTED) & Job.requested_device_type.in_(list(type_names))
    def page(*columns: Any):
        query = Job.select(*columns).where(condition).order_by(Job.priority.desc(), Job.submit_time, Job.id)
        return query if limit is None else query.limit(limit).offset(offset)

    rows = db.execute(page(Job.id, Job.requested_device_type, Job.priority, Job.submit_time,
                           Job.requested_device, Job.health_check, Job.local_urls)).fetchall()
    tags: dict[int, set[str]] = defaultdict(set)
    if rows:
        # the page's ids as a subquery: building an IN list of thousands of parameters costs more
        # than the query itself
        tag_query = JobTag.select(JobTag.job, Tag.name).join(Tag).where(JobTag.job.in_(page(Job.id)))
        for job_id, name in db.execute(tag_query).fetchall():
            tags[job_id].add(name)
    bound = {device_id for *_, device_id, _, _ in rows if device_id is not None}
    hostnames = dict(db.execute(Device.select(Device.id, Device.hostname)
                                .where(Device.id.in_(sorted(bound)))).fetchall()) if bound else {}
    empty: frozenset[str] = frozenset()
    return [QueuedJob(job_id, type_names[type_id], priority, submit_time,
                      frozenset(tags[job_id]) if job_id in tags else empty,
                      hostnames.get(device_id) if device_id is not None else None, bool(health_check),
                      tuple(Access(kind, location) for kind, location in json.loads(local)) if local else ())
            for job_id, type_id, priority, submit_time, device_id, health_check, local in rows]


# ---- claiming ----

def _chunks(items: Sequence, size: int) -> Iterable[Sequence]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _claim_rows(table: str, columns: str, rows: Sequence[tuple], join: str, free: str, set_sql: str,
                returning: str) -> list[tuple]:
    """Update the rows of ``table`` that ``rows`` name and that are free, in one statement::

        WITH v(columns) AS (VALUES rows...),
             free AS (SELECT table.id, v.* FROM table JOIN v ON join WHERE free [FOR UPDATE SKIP LOCKED])
        UPDATE table SET set_sql FROM free WHERE table.id = free.id RETURNING returning

    On PostgreSQL the rows another scheduler holds are left out (``SKIP LOCKED``) instead of waited
    for, and a row changed since the pass loaded it is checked again against ``free`` before it is
    locked; SQLite serialises writers instead. ``set_sql`` may name ``free``'s columns (``v``'s, by
    name); ``returning`` only the table's (SQLite's rule for UPDATE FROM)."""
    # integers are written into the statement (they need no quoting, and binding thousands of
    # parameters costs more than running the statement); anything else is a parameter
    values = ", ".join(["(" + ", ".join([str(value) if type(value) is int else db.param for value in row]) + ")"
                        for row in rows])
    lock = f" FOR UPDATE OF {table} SKIP LOCKED" if is_postgres() else ""
    sql = (f"WITH v({columns}) AS (VALUES {values}), "
           f"free AS (SELECT {table}.id AS id, v.* FROM {table} JOIN v ON {join} WHERE {free}{lock}) "
           f"UPDATE {table} SET {set_sql} FROM free WHERE {table}.id = free.id RETURNING {returning}")
    return db.execute_sql(sql, [value for row in rows for value in row if type(value) is not int]).fetchall()


def _create_health_check(device_id: int, hostname: str) -> int:
    """A health-check job for the device (inside the claiming transaction)."""
    from master.jobs import create_job
    from master.users import HEALTH_USER, get_or_create_user
    from master.validation import JobRequest

    device = Device.select(Device.id, Device.device_type).where(Device.id == device_id).get()
    dtype = DeviceType.get_by_id(device.device_type_id)
    definition = dtype.health_check or ""
    try:
        data = bounded.load_data(definition, current().limits)
        name = (data.get("job_name") if isinstance(data, dict) else None) or f"{dtype.name} health check"
    except yaml.YAMLError:
        name = f"{dtype.name} health check"
    request = JobRequest(definition=definition, name=str(name), device_type=dtype, priority=100)
    job = create_job(request, get_or_create_user(HEALTH_USER), health_check=True, device=device)
    log.info("health check job %d created for %s", job.id, hostname)
    return job.id


def claim(assignments: Sequence[Assignment]) -> list[tuple[int, str]]:
    """Apply assignments with conditional UPDATEs in one transaction; returns (job id, device)
    for each claim that succeeded. A device or job taken meanwhile (another scheduler, a cancel)
    is skipped, never assigned twice.

    Devices are claimed first (Idle -> Reserved, on a worker), then their jobs (Submitted ->
    Scheduled); a device whose job was lost meanwhile goes back to Idle in the same transaction.
    Two statements for a thousand assignments: a pass that assigns them all stays fast.
    """
    if not assignments:
        return []
    devices, jobs = Device._meta.table_name, Job._meta.table_name
    healths = ", ".join(f"'{health}'" for health in DeviceHealth.CHECKABLE)
    idle = (f"{devices}.state = '{DeviceState.IDLE}' AND {devices}.health IN ({healths}) "
            f"AND {devices}.worker_id IS NOT NULL")
    claimed: list[tuple[int, str]] = []
    with db.atomic():
        # a health check is created only on a device this transaction holds
        checks = [a.device for a in assignments if a.job_id is None]
        created: dict[str, int] = {}
        taken: set[str] = set()
        if checks:
            query = (Device.select(Device.id, Device.hostname)
                     .where(Device.hostname.in_(checks) & (Device.state == DeviceState.IDLE)
                            & Device.worker.is_null(False)))
            created = {hostname: _create_health_check(device_id, hostname)
                       for device_id, hostname in db.execute(_skip_locked(query)).fetchall()}
        wanted: dict[int, str] = {}  # job id -> device: each job and each device once
        for a in assignments:
            job_id = created.get(a.device) if a.job_id is None else a.job_id
            if job_id is not None and job_id not in wanted and a.device not in taken:
                wanted[job_id] = a.device
                taken.add(a.device)
        for chunk in _chunks(list(wanted.items()), 1000):
            reserved = {job_id: (device_id, worker_id) for device_id, worker_id, job_id in _claim_rows(
                devices, "job, hostname", chunk, f"{devices}.hostname = v.hostname", idle,
                f"state = '{DeviceState.RESERVED}', current_job_id = free.job",
                f"{devices}.id, {devices}.worker_id, {devices}.current_job_id")}
            if not reserved:
                continue
            won = {job_id for (job_id,) in _claim_rows(
                jobs, "job, device, worker", [(job_id, *ids) for job_id, ids in reserved.items()],
                f"{jobs}.id = v.job", f"{jobs}.state = '{JobState.SUBMITTED}'",
                f"state = '{JobState.SCHEDULED}', actual_device_id = free.device, worker_id = free.worker",
                f"{jobs}.id")}
            lost = [device_id for job_id, (device_id, _) in reserved.items() if job_id not in won]
            if lost:  # the job was canceled or taken meanwhile: its device is free again
                (Device.update(state=DeviceState.IDLE, current_job_id=None)
                 .where(Device.id.in_(lost)).execute())
            claimed += [(job_id, device) for job_id, device in chunk if job_id in won]
    return claimed


# ---- the loop ----

@dataclass
class PassStats:
    """Timings of the last scheduling pass (seconds), for logs and benchmarks."""

    load: float = 0.0
    assign: float = 0.0
    claim: float = 0.0
    publish: float = 0.0
    queued: int = 0
    idle: int = 0
    assigned: int = 0

    @property
    def total(self) -> float:
        return self.load + self.assign + self.claim + self.publish


class Scheduler:
    """Runs scheduling passes: on events (``wake()``) and at least every ``interval`` seconds."""

    def __init__(self, interval: float = 20.0, min_gap: float = 0.02) -> None:
        self.interval = interval
        #: a burst of submissions coalesces into passes at most this often
        self.min_gap = min_gap
        self.stats = PassStats()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def wake(self) -> None:
        self._wake.set()

    def on_event(self, event: str, data: dict[str, Any]) -> None:
        if event in WAKE_EVENTS:
            self._wake.set()

    def loop_once(self, now: _dt.datetime | None = None) -> list[tuple[int, str]]:
        """One pass: load, assign, claim, publish. Returns the (job id, device) claimed."""
        now = now or utcnow()
        stats = PassStats()
        started = time.perf_counter()
        with connection():
            health_checks = load_health_check_types()
            idle = load_idle_devices(health_checks, now)
            if not idle:  # the common case under load: every device is busy
                stats.load = time.perf_counter() - started
                self.stats = stats
                return []
            workers = load_workers()
            usable = [d for d in idle if workers.get(d.worker or "") and workers[d.worker or ""].capacity() > 0]
            stats.load = time.perf_counter() - started
            # Page through the queue in scheduling order until every usable device has a job: a
            # long queue with a few free devices costs a page, not the whole queue. assign() is
            # greedy in that order, so adding later jobs never changes earlier assignments. The
            # first page holds two jobs per device (jobs whose tags or type find no free device
            # leave room for others); each further page is twice the last.
            types = {d.device_type for d in usable}
            queued: list[QueuedJob] = []
            assignments: list[Assignment] = []
            page, offset = max(100, 2 * len(usable)), 0
            while usable:
                mark = time.perf_counter()
                batch = load_queued_jobs(types, limit=page, offset=offset)
                queued += batch
                stats.load += time.perf_counter() - mark
                mark = time.perf_counter()
                assignments = assign(queued, usable, workers, frozenset(health_checks))
                stats.assign += time.perf_counter() - mark
                if len(batch) < page or len(assignments) >= len(usable):
                    break
                offset += page
                page *= 2
            stats.queued, stats.idle = len(queued), len(usable)
            mark = time.perf_counter()
            claimed = claim(assignments) if assignments else []
            stats.claim = time.perf_counter() - mark
            if len(claimed) < len(assignments):
                self._wake.set()  # something was taken meanwhile: look again soon
            mark = time.perf_counter()
            if claimed:
                # committed: the files wait for space if the store is full, then the broker hears of it
                diskfull.retry(self._write_files, [job_id for job_id, _ in claimed],
                               what=f"recording {len(claimed)} scheduled job(s)", stop=self._stop)
            stats.publish = time.perf_counter() - mark
        stats.assigned = len(claimed)
        self.stats = stats
        if claimed:
            log.info("scheduled %d job(s) in %.1f ms: %s", len(claimed), stats.total * 1000,
                     ", ".join(f"{job}->{device}" for job, device in claimed[:10]))
            events.publish("job_scheduled", assignments=claimed, job_ids=[job for job, _ in claimed])
        return claimed

    @staticmethod
    def _write_files(job_ids: list[int]) -> None:
        from master.inventory import write_lab
        from master.jobs import write_meta

        write_meta(job_ids)
        write_lab()

    def run(self) -> None:
        """Loop until :meth:`stop`: a pass on each wake-up or every ``interval`` seconds."""
        events.subscribe(self.on_event)
        try:
            while not self._stop.is_set():
                self._wake.wait(self.interval)
                if self._stop.is_set():
                    break
                self._wake.clear()
                try:
                    self.loop_once()
                except Exception as exc:
                    if diskfull.is_storage_error(exc):  # nothing was claimed: try again in a second
                        diskfull.report(exc, "scheduling pass")
                        self._wake.set()
                    else:
                        log.exception("scheduling pass failed; retrying on the next event or timer")
                    self._stop.wait(1.0)
                self._stop.wait(self.min_gap)
        finally:
            events.unsubscribe(self.on_event)

    def start(self) -> threading.Thread:
        """Run the loop in a daemon thread (a first pass happens at once)."""
        self._stop.clear()
        self._wake.set()
        self._thread = threading.Thread(target=self.run, name="pumice-scheduler", daemon=True)
        self._thread.start()
        return self._thread

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
