"""Jobs (service layer): submit, cancel, resubmit, list, show, logs, results; and what the agent reports.

Plain functions over the models, called by every front door (REST, LAVA XML-RPC, the CLI) and by
the ZeroMQ broker (``job_started``, ``append_logs``, ``append_results``, ``job_finished``). Legal
transitions and their consequences come from :mod:`master.states`. Every state change rewrites the
job's ``meta.yaml`` in the artifact store; events wake the scheduler and the broker after commit.
"""

from __future__ import annotations

import functools
import logging
import shutil
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from peewee import JOIN, PostgresqlDatabase

from agent.errors import Fault
from master import diskfull, events, notify
from master.db import db, is_postgres
from master.errors import Conflict, Forbidden, Invalid, NotFound, Unauthorized
from master.instance import current
from master.models import (
    Device,
    DeviceHealthChange,
    DeviceType,
    Job,
    JobTag,
    Tag,
    TestCase,
    TestSuite,
    User,
    Worker,
    iso,
    utcnow,
)
from master.states import (
    MAX_COUNT,
    DeviceState,
    JobHealth,
    JobState,
    cancel_target,
    check_choice,
    check_job_transition,
    finish_outcome,
    parse_count,
)
from master.validation import JobRequest, check_definition
from results.log import LogRecord
from results.record import Result
from results.redact import redact_definition
from results.store import META_FIELDS

log = logging.getLogger("pumice.jobs")

#: what ``list_jobs`` may filter on (query parameter -> column)
JOB_FILTERS = ("state", "health", "device_type", "device", "submitter", "health_check", "requested_device_type")
MAX_PAGE = 1000


# ---- visibility and permissions ----

def can_view(job: Job, user: User | None) -> bool:
    """Public jobs are for everyone; personal and group jobs for their submitter and admins."""
    if job.visibility == "public":
        return True
    return user is not None and (user.is_admin or job.submitter_id == user.id)


def can_manage(job: Job, user: User | None) -> bool:
    """The submitter and admins may cancel or resubmit a job."""
    return user is not None and (user.is_admin or job.submitter_id == user.id)


def get_job(job_id: int | str, user: User | None) -> Job:
    """The job ``job_id`` if ``user`` may see it (an invisible job is reported as missing)."""
    number = None
    if isinstance(job_id, int) and not isinstance(job_id, bool):
        number = job_id
    elif isinstance(job_id, str) and job_id.strip().isascii() and job_id.strip().isdigit() and len(job_id) <= 20:
        number = int(job_id)
    if number is None:
        raise NotFound(f"bad job id {str(job_id)[:40]!r}: a job id is a number")
    if not 0 < number <= MAX_COUNT:  # no such row, and no lookup a database column could not hold
        raise NotFound(f"no job {number}")
    job = Job.get_or_none(Job.id == number)
    if job is None or not can_view(job, user):
        raise NotFound(f"no job {number}")
    return job


# ---- records (API bodies and meta.yaml share one shape) ----

def job_records(job_ids: Sequence[int]) -> list[dict[str, Any]]:
    """The records of ``job_ids`` (in that order): the API's job body and the store's meta.yaml."""
    if not job_ids:
        return []
    submitter = User.alias("submitter_user")
    query = (Job.select(Job.id, Job.name, Job.priority, Job.visibility, Job.state, Job.health,
                        Job.submit_time, Job.start_time, Job.end_time, Job.failure_comment,
                        Job.health_check, Job.source, submitter.username.alias("submitter"),
                        DeviceType.name.alias("device_type"), Device.hostname.alias("device"),
                        Worker.hostname.alias("worker"))
             .join(submitter, on=(Job.submitter == submitter.id))
             .switch(Job).join(DeviceType, JOIN.LEFT_OUTER, on=(Job.requested_device_type == DeviceType.id))
             .switch(Job).join(Device, JOIN.LEFT_OUTER, on=(Job.actual_device == Device.id))
             .switch(Job).join(Worker, JOIN.LEFT_OUTER, on=(Job.worker == Worker.id))
             .where(Job.id.in_(list(job_ids))).dicts())
    rows = {row["id"]: row for row in query}
    tags: dict[int, list[str]] = {}
    for job_id, name in (JobTag.select(JobTag.job, Tag.name).join(Tag)
                         .where(JobTag.job.in_(list(job_ids))).order_by(Tag.name).tuples()):
        tags.setdefault(job_id, []).append(name)
    return [_record(rows[job_id], tags.get(job_id, [])) for job_id in job_ids if job_id in rows]


_RECORD_COLUMNS = ("id", "name", "priority", "visibility", "state", "health", "submit_time", "start_time",
                   "end_time", "failure_comment", "health_check", "source")


def _record(row: dict[str, Any], tags: list[str]) -> dict[str, Any]:
    """The job record from a row of :func:`job_records`' query (or the same fields from a new job)."""
    return {
        "id": row["id"], "name": row["name"], "description": row["name"],
        "submitter": row["submitter"], "device_type": row["device_type"], "device": row["device"],
        "worker": row["worker"], "tags": tags, "priority": row["priority"],
        "visibility": row["visibility"], "state": row["state"], "health": row["health"],
        "submit_time": iso(row["submit_time"]), "start_time": iso(row["start_time"]),
        "end_time": iso(row["end_time"]), "failure_comment": row["failure_comment"],
        "health_check": bool(row["health_check"]), "source": row["source"],
    }


#: meta.yaml writers read the database and write the files under this lock, after their commit:
#: whatever the interleaving of threads, the last write reflects the last committed state
_meta_lock = threading.Lock()


#: jobs whose meta.yaml could not be rewritten (a full store): rewritten with the next ones
_unwritten_meta: set[int] = set()


def write_meta(job_ids: Sequence[int]) -> None:
    """Rewrite ``meta.yaml`` of each job from the database (call after the change is committed),
    and of the jobs a failed call left behind."""
    with _meta_lock:
        wanted = list(dict.fromkeys([*job_ids, *sorted(_unwritten_meta)]))
        _unwritten_meta.update(wanted)
        for record in job_records(wanted):
            _write_record(record)
            _unwritten_meta.discard(record["id"])
        _unwritten_meta.difference_update(wanted)  # jobs deleted meanwhile


def _write_record(record: dict[str, Any]) -> None:
    current().store.write_meta(record["id"], {key: record[key] for key in META_FIELDS})


# ---- submission ----

def _tag_ids(names: Iterable[str]) -> list[int]:
    names = sorted(set(names))
    if not names:
        return []
    found = dict(Tag.select(Tag.name, Tag.id).where(Tag.name.in_(names)).tuples())
    for name in names:
        if name not in found:  # only reachable if a tag vanished since validation
            found[name] = Tag.create(name=name).id
    return [found[name] for name in names]


#: the columns a new job row gets, all given explicitly (no defaults computed by the ORM)
_INSERT_FIELDS = (Job.name, Job.definition, Job.submitter, Job.requested_device_type, Job.requested_device,
                  Job.priority, Job.visibility, Job.state, Job.health, Job.submit_time, Job.health_check,
                  Job.source, Job.local_urls, Job.context, Job.timeout)


@functools.lru_cache(maxsize=8)
def _insert_sql(database: Any) -> str:
    """The INSERT of one job row for ``database``: written once, not rebuilt by the ORM for every
    submission (building it cost a tenth of a submission)."""
    columns = ", ".join(f'"{field.column_name}"' for field in _INSERT_FIELDS)
    params = ", ".join([database.param] * len(_INSERT_FIELDS))
    returning = ' RETURNING "id"' if isinstance(database, PostgresqlDatabase) else ""
    return f'INSERT INTO "{Job._meta.table_name}" ({columns}) VALUES ({params}){returning}'


def _insert_job(**values: Any) -> Job:
    """Insert a job row with ``values`` (every field of :data:`_INSERT_FIELDS`); the Job, unread."""
    params = [field.db_value(values[field.name]) for field in _INSERT_FIELDS]
    cursor = db.execute_sql(_insert_sql(db.obj), params)
    job_id = cursor.fetchone()[0] if is_postgres() else cursor.lastrowid
    return Job(id=job_id, **values)


def create_job(request: JobRequest, submitter: User, *, health_check: bool = False,
               device: Device | None = None, store: bool = True) -> Job:
    """Insert one job (inside the caller's transaction) and, unless ``store`` is False, write its
    definition to the store (then the caller must, after its commit)."""
    job = _insert_job(name=request.name, definition=request.definition, submitter=submitter.id,
                      requested_device_type=request.device_type.id, requested_device=device.id if device else None,
                      priority=request.priority, visibility=request.visibility, state=JobState.SUBMITTED,
                      health=JobHealth.UNKNOWN, submit_time=utcnow(), health_check=health_check, source=None,
                      local_urls=request.local_urls or None, context=request.context or None,
                      timeout=request.timeout)
    tag_ids = _tag_ids(request.tags)
    if tag_ids:
        JobTag.insert_many([(job.id, tag_id) for tag_id in tag_ids], fields=[JobTag.job, JobTag.tag]).execute()
    notify.store_spec(job.id, request.notify)
    if store:
        current().store.write_definition(job.id, redact_definition(request.definition))
    return job


def submit_job(definition: str, user: User | None) -> list[int]:
    """Validate ``definition`` fully and queue it; returns the new job ids (one per job).

    Raises Invalid with every fault (YAML path, line, message), TooLarge, Unauthorized, or
    StorageFull (507) when the data directory or the database is full: then nothing of the job
    was recorded.
    """
    if user is None:
        raise Unauthorized("submitting a job needs a token: 'Authorization: Token <token>'")
    request = check_definition(definition)
    try:
        job = _create_with_files(request, user)
    except Exception as exc:
        if diskfull.is_full(exc):
            raise diskfull.refusal(exc, "the job submission") from None
        raise
    log.info("job %d submitted by %s for %s", job.id, user.username, request.device_type.name)
    events.publish("job_submitted", job_ids=[job.id])
    return [job.id]


def _create_with_files(request: JobRequest, user: User) -> Job:
    """Insert the job and write its definition and meta.yaml, all or nothing: the files are
    written before the commit (a job row is never without them), and removed when the submission
    fails (a full disk fails the file writes or the commit)."""
    store = current().store
    job: Job | None = None
    try:
        with db.atomic():
            job = create_job(request, user, store=False)
            store.write_definition(job.id, redact_definition(request.definition))
            # the record is known without reading it back (a submission is a hot path)
            row = {name: getattr(job, name) for name in _RECORD_COLUMNS}
            record = _record({**row, "submitter": user.username, "device_type": request.device_type.name,
                              "device": None, "worker": None}, request.tags)
            with _meta_lock:  # nobody else sees the job before the commit: no newer meta.yaml exists
                _write_record(record)
    except BaseException:
        if job is not None:
            _remove_uncommitted(job.id)
        raise
    return job


def _remove_uncommitted(job_id: int) -> None:
    """Remove the store files of a job whose row was rolled back. SQLite hands a rolled-back id
    out again: the files go only if no job holds the id, checked under the write lock."""
    try:
        with db.atomic():
            if not Job.select().where(Job.id == job_id).exists():
                shutil.rmtree(current().store.job_dir(job_id), ignore_errors=True)
    except Exception as exc:
        log.error("job %d was not created, but its files in %s could not be removed: %s", job_id,
                  current().store.job_dir(job_id), exc)


def validate_definition(definition: str) -> list[Fault]:
    """The faults of ``definition`` (empty: it would be accepted), without queuing anything."""
    try:
        check_definition(definition)
    except Invalid as exc:
        return exc.faults or [Fault("", exc.message)]
    return []


def resubmit_job(job_id: int | str, user: User | None) -> list[int]:
    """Submit the definition of job ``job_id`` again (validated against today's lab)."""
    job = get_job(job_id, user)
    if not can_manage(job, user):
        raise Forbidden(f"only {job.submitter.username} or an admin may resubmit job {job.id}")
    if job.health_check:
        raise Conflict(f"job {job.id} is a health check: the scheduler runs health checks itself")
    if job.source:
        raise Conflict(f"job {job.id} was imported from {job.source.get('url') or 'another instance'}: a "
                       "results bundle has no job definition to run again")
    return submit_job(job.definition, user)


def cancel_job(job_id: int | str, user: User | None) -> dict[str, Any]:
    """Cancel a job: a queued one at once (Finished/Canceled), one holding a device goes to
    Canceling until the agent confirms. Only the submitter and admins may. Returns the record."""
    job = get_job(job_id, user)
    if user is None:
        raise Unauthorized("canceling a job needs a token: 'Authorization: Token <token>'")
    if not can_manage(job, user):
        raise Forbidden(f"job {job.id} belongs to {job.submitter.username}: only its submitter or an "
                        "admin may cancel it")
    # The scheduler may claim the job between our read and our write: retry on a lost race.
    for _ in range(5):
        state, health = cancel_target(job.id, job.state)
        if state == job.state:
            break  # already Canceling
        fields: dict[Any, Any] = {Job.state: state, Job.health: health}
        if state == JobState.FINISHED:
            fields[Job.end_time] = utcnow()
            fields[Job.failure_comment] = f"canceled by {user.username}"
        with db.atomic():
            changed = Job.update(fields).where((Job.id == job.id) & (Job.state == job.state)).execute()
            if changed and state == JobState.FINISHED:
                notify.enqueue(job.id)
        if changed:
            log.info("job %d %s by %s", job.id, "canceled" if state == JobState.FINISHED else "canceling",
                     user.username)
            try:
                write_meta([job.id])
            finally:  # committed: the broker and the scheduler hear of it even if the store is full
                events.publish("job_finished" if state == JobState.FINISHED else "job_canceling",
                               job_ids=[job.id])
            break
        job = Job.get_by_id(job.id)
    else:
        raise Conflict(f"job {job.id} kept changing state; try again")
    return job_records([job.id])[0]


# ---- queries ----

def list_jobs(user: User | None, *, limit: int = 50, offset: int = 0, ordering: str = "-id",
              **filters: Any) -> tuple[int, list[dict[str, Any]]]:
    """``(count, records)`` of the jobs ``user`` may see, newest first by default.

    Filters: state, health, device_type, device, submitter, health_check. Ordering: ``id``,
    ``-id``, ``submit_time``, ``-submit_time``, ``priority``, ``-priority``.
    """
    query = Job.select(Job.id)
    if user is None:
        query = query.where(Job.visibility == "public")
    elif not user.is_admin:
        query = query.where((Job.visibility == "public") | (Job.submitter == user.id))
    for key, value in filters.items():
        if value is None or value == "":
            continue
        if key == "state":
            query = query.where(Job.state == check_choice("job state", value, JobState.ALL))
        elif key == "health":
            query = query.where(Job.health == check_choice("job health", value, JobHealth.ALL))
        elif key in ("device_type", "requested_device_type"):  # the second is LAVA's REST name
            query = query.where(Job.requested_device_type.in_(
                DeviceType.select(DeviceType.id).where(DeviceType.name == value)))
        elif key == "device":
            query = query.where(Job.actual_device.in_(Device.select(Device.id).where(Device.hostname == value)))
        elif key == "submitter":
            query = query.where(Job.submitter.in_(User.select(User.id).where(User.username == value)))
        elif key == "health_check":
            query = query.where(Job.health_check == (str(value).lower() in ("1", "true", "yes")))
        else:
            raise Invalid(f"unknown job filter {key!r}; allowed: {', '.join(JOB_FILTERS)}")
    orderings = {"id": Job.id, "submit_time": Job.submit_time, "priority": Job.priority}
    field = orderings.get(ordering.lstrip("-"))
    if field is None:
        raise Invalid(f"unknown ordering {ordering!r}; allowed: {', '.join(orderings)} (prefix - to reverse)")
    order = [field.desc() if ordering.startswith("-") else field.asc()]
    if field is not Job.id:
        order.append(Job.id.desc() if ordering.startswith("-") else Job.id.asc())
    # a negative limit or offset is taken as 0; one beyond what a database column holds is refused
    limit = max(0, min(parse_count("limit", limit, -MAX_COUNT), MAX_PAGE))
    offset = max(0, parse_count("offset", offset, -MAX_COUNT))
    count = query.count()
    ids = [row for (row,) in query.order_by(*order).limit(limit).offset(offset).tuples()]
    return count, job_records(ids)


def show_job(job_id: int | str, user: User | None) -> dict[str, Any]:
    return job_records([get_job(job_id, user).id])[0]


def job_definition(job_id: int | str, user: User | None) -> str:
    """The job's definition as it may be shown: its ``secrets:`` values redacted."""
    return redact_definition(get_job(job_id, user).definition)


def job_logs(job_id: int | str, user: User | None, start: int = 0, end: int | None = None) -> list[str]:
    """Lines ``start`` to ``end`` (0-based, end excluded) of the job's log, as LAVA output.yaml lines
    (without their newlines)."""
    job = get_job(job_id, user)
    path = current().store.job_dir(job.id) / "output.yaml"
    if not path.exists():
        return []
    with current().store.log(job.id) as logfile:
        return logfile.read(max(0, start), end)


def job_results(job_id: int | str, user: User | None) -> list[Result]:
    """Every result of the job, by level then insertion order."""
    job = get_job(job_id, user)
    return _results_of(job.id)


def _results_of(job_id: int) -> list[Result]:
    query = (TestCase.select(TestCase, TestSuite.name.alias("suite_name")).join(TestSuite)
             .where(TestCase.job == job_id).order_by(TestCase.id).objects())
    return [Result(job=str(job_id), level=case.level, suite=case.suite_name, case=case.name,
                   result=case.result, measurement=case.measurement, units=case.units, set=case.test_set,
                   duration=case.duration, extra=case.extra or {}) for case in query]


def job_suites(job_id: int | str, user: User | None) -> list[dict[str, Any]]:
    """The job's test suites with their pass/fail/skip/unknown counts."""
    job = get_job(job_id, user)
    suites: dict[str, dict[str, Any]] = {}
    for result in _results_of(job.id):
        entry = suites.setdefault(result.suite, {"name": result.suite, "pass": 0, "fail": 0, "skip": 0,
                                                 "unknown": 0})
        entry[result.result] += 1
    return list(suites.values())


# ---- what the agent reports (through the broker) ----

def job_started(job_id: int) -> bool:
    """The agent started the job: Scheduled -> Running, its device Reserved -> Running.

    Returns False (and changes nothing) when the job is not Scheduled any more: a resent START
    acknowledgement, or a job canceled meanwhile (it stays Canceling).
    """
    with db.atomic():
        job = Job.get_or_none(Job.id == job_id)
        if job is None:
            raise NotFound(f"no job {job_id}")
        if job.state != JobState.SCHEDULED:
            return False
        check_job_transition(job.id, job.state, JobState.RUNNING)
        changed = (Job.update(state=JobState.RUNNING, start_time=utcnow())
                   .where((Job.id == job_id) & (Job.state == JobState.SCHEDULED)).execute())
        if changed and job.actual_device_id:
            Device.update(state=DeviceState.RUNNING).where(Device.id == job.actual_device_id).execute()
        if changed:
            notify.enqueue(job_id)
    if changed:
        # an (empty) log from the start: the site links it when it publishes the running job, and
        # its live tail reads what the agent appends through that link
        with current().store.log(job_id) as logfile:
            logfile.append_lines([])
        write_meta([job_id])
        events.publish("job_started", job_ids=[job_id])
    return bool(changed)


def append_logs(job_id: int, lines: Iterable[LogRecord | str]) -> int:
    """Append log records (or already formatted output.yaml lines) to the job's log file.

    Returns the number of lines in the log afterwards. Deduplication of resent batches is the
    broker's job (batches carry sequence numbers).
    """
    records: list[LogRecord] = []
    raw: list[str] = []
    for line in lines:
        if isinstance(line, LogRecord):
            records.append(line)
        else:
            raw.append(line)
    with current().store.log(job_id) as logfile:
        if records:
            logfile.append(records)
        if raw:
            logfile.append_lines(raw)
        return logfile.count()


def append_results(job_id: int, results: Iterable[Result | dict]) -> int:
    """Record results of a running job (test cases keyed by job, level and name). Returns how many."""
    rows: list[Result] = [r if isinstance(r, Result) else Result.from_dict(r, job=str(job_id)) for r in results]
    if not rows:
        return 0
    with db.atomic():
        if not Job.select().where(Job.id == job_id).exists():
            raise NotFound(f"no job {job_id}")
        names = sorted({r.suite for r in rows})
        suites = dict(TestSuite.select(TestSuite.name, TestSuite.id)
                      .where((TestSuite.job == job_id) & TestSuite.name.in_(names)).tuples())
        for name in names:
            if name not in suites:
                suites[name] = TestSuite.create(job=job_id, name=name).id
        now = utcnow()
        TestCase.insert_many([
            {"suite": suites[r.suite], "job": job_id, "level": r.level or "", "name": r.case,
             "result": r.result, "measurement": r.measurement, "units": r.units, "test_set": r.set,
             "duration": r.duration, "extra": r.extra or None, "logged": now}
            for r in rows
        ]).execute()
    return len(rows)


@dataclass(frozen=True)
class JobEnd:
    """A job's end as recorded in the database (:func:`record_end`), for :func:`publish_end`."""

    job_id: int
    job_health: str
    health_check: bool
    error_type: str | None
    #: the job's device (None: it had none), its health before the job and after it (None: unchanged)
    device: str | None
    device_health_before: str | None
    device_health: str | None


def job_finished(job_id: int, health: str, error: str | None = None, error_type: str | None = None) -> bool:
    """The agent reports the end of a job: record its health and free its device
    (:func:`record_end`), then write its files and tell the others (:func:`publish_end`).

    Idempotent: an END resent for a finished job returns False and changes nothing.
    """
    end = record_end(job_id, health, error, error_type)
    if end is None:
        return False
    publish_end(end)
    return True


def record_end(job_id: int, health: str, error: str | None = None, error_type: str | None = None) -> JobEnd | None:
    """The database part of :func:`job_finished`, one transaction (None: the job was finished already).

    ``health`` is what the agent says (Complete, Incomplete, Canceled); a job that was Canceling ends
    Canceled. A health check sets its device's health; an infrastructure error (``error_type``
    Infrastructure/Configuration/Bug) puts a Good device to Unknown.
    """
    with db.atomic():
        query = Job.select().where(Job.id == job_id)
        if is_postgres():
            query = query.for_update()
        job = query.first()
        if job is None:
            raise NotFound(f"no job {job_id}")
        if job.state == JobState.FINISHED:
            return None
        check_job_transition(job.id, job.state, JobState.FINISHED)
        device = Device.get_or_none(Device.id == job.actual_device_id) if job.actual_device_id else None
        outcome = finish_outcome(job.state, health, health_check=job.health_check,
                                 device_health=device.health if device else "Unknown", error_type=error_type)
        comment = job.failure_comment
        if error:
            comment = f"{error_type}: {error}" if error_type and not error.startswith(error_type) else error
        Job.update(state=JobState.FINISHED, health=outcome.job_health, end_time=utcnow(),
                   failure_comment=comment).where(Job.id == job.id).execute()
        notify.enqueue(job.id)
        if device is not None:
            fields: dict[Any, Any] = {Device.state: DeviceState.IDLE, Device.current_job_id: None}
            if outcome.device_health:
                fields[Device.health] = outcome.device_health
                if outcome.device_health != device.health:
                    reason = (f"health check job {job.id}: {outcome.job_health}" if job.health_check
                              else f"job {job.id}: {error_type} error")
                    DeviceHealthChange.create(device=device.id, old=device.health, new=outcome.device_health,
                                              reason=reason, job_id=job.id)
            if job.health_check:
                fields[Device.last_health_check] = utcnow()
                fields[Device.jobs_since_check] = 0
            else:
                fields[Device.jobs_since_check] = Device.jobs_since_check + 1
            (Device.update(fields)
             .where((Device.id == device.id) & (Device.current_job_id == job.id)).execute())
    return JobEnd(job.id, outcome.job_health, bool(job.health_check), error_type,
                  device.hostname if device else None, device.health if device else None,
                  outcome.device_health)


def publish_end(end: JobEnd) -> None:
    """After :func:`record_end`'s commit: the job's meta.yaml and bundle, lab.yaml, the events.
    Safe to call again when it failed (a full store): it only rewrites files from the database."""
    write_meta([end.job_id])
    store = current().store
    _write_bundle(end.job_id)
    if end.device is not None:
        if end.device_health:
            log.warning("device %s health %s -> %s after job %d (%s)", end.device, end.device_health_before,
                        end.device_health, end.job_id, "health check" if end.health_check else end.error_type)
        from master.inventory import write_lab

        write_lab()
    log.info("job %d finished: %s", end.job_id, end.job_health)
    events.publish("job_finished", job_ids=[end.job_id], store=str(store.root))
    if end.device is not None:
        events.publish("device_freed", devices=[end.device])


def _bundle_text(job_id: int) -> str:
    """The job's bundle: the very text the site publishes as its ``results.yaml`` (same header and
    uuid), so a bundle downloaded from the API or from the site is recognised as one on upload."""
    from sitegen.bundles import site_base_url, site_bundle

    instance = current()
    (submit_time,) = Job.select(Job.submit_time).where(Job.id == job_id).tuples().get()
    return site_bundle(job_id, _results_of(job_id), {"submit_time": iso(submit_time)}, instance.name,
                       site_base_url(instance.name, instance.url))


def job_bundle(job_id: int | str, user: User | None) -> str:
    """The job's results bundle (YAML keyed by level, with a header naming this instance)."""
    return _bundle_text(get_job(job_id, user).id)


def _write_bundle(job_id: int) -> None:
    current().store.write_file(job_id, "results.yaml", _bundle_text(job_id))
