"""The lab now: the model the site's lab-now page is rendered from (sitegen reads no master module).

:func:`lab_model` is :func:`~master.inventory.lab_snapshot` (device types, devices with their health
transitions and health checks, workers) plus the running jobs, the queued jobs with why each waits
(:func:`why_waiting`, a pure function over plain rows) and an "as of" time. Only public jobs are
named (the site has no login); the others are counted.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from typing import Any

from master.inventory import lab_snapshot
from master.models import Device, DeviceType, Job, JobTag, Tag, User, Worker, iso, utcnow
from master.states import DeviceHealth, DeviceState, JobState, WorkerHealth, WorkerState

#: queued jobs named on the page (the rest are counted)
QUEUED_SHOWN = 200
RUNNING_STATES = (JobState.SCHEDULING, JobState.SCHEDULED, JobState.RUNNING, JobState.CANCELING)


def _device_problem(device: Mapping[str, Any], workers: Mapping[str, Mapping[str, Any]],
                    checked: bool) -> str | None:
    """Why ``device`` cannot take a job now (None: it can, or will when it is free)."""
    health = device.get("health")
    if health in (DeviceHealth.BAD, DeviceHealth.MAINTENANCE, DeviceHealth.RETIRED):
        return health
    if checked and health in (DeviceHealth.UNKNOWN, DeviceHealth.LOOPING):
        return "health check pending"
    worker = workers.get(device.get("worker") or "")
    if worker is None:
        return "no worker"
    if worker.get("state") != WorkerState.ONLINE:
        return "worker offline"
    if worker.get("health") != WorkerHealth.ACTIVE:
        return f"worker {worker.get('health')}"
    return None


def why_waiting(job: Mapping[str, Any], devices: Iterable[Mapping[str, Any]],
                workers: Mapping[str, Mapping[str, Any]], checked_types: Iterable[str] = ()) -> str:
    """Why a queued job waits, in a lab engineer's words (pure: plain rows in, a sentence out).

    ``job``: device_type, tags, device (a health check's one device); ``devices``: hostname,
    device_type, health, state, worker, tags; ``workers``: by hostname, state and health.
    """
    device_type = job.get("device_type")
    tags = set(job.get("tags") or ())
    candidates = [d for d in devices if d.get("device_type") == device_type
                  and d.get("health") != DeviceHealth.RETIRED]
    if job.get("device"):
        candidates = [d for d in candidates if d.get("hostname") == job["device"]]
        if not candidates:
            return f"its device {job['device']} is retired or gone"
    if not candidates:
        return f"no device of type {device_type}"
    tagged = [d for d in candidates if tags <= set(d.get("tags") or ())]
    if not tagged:
        return f"no device of type {device_type} has the tags {', '.join(sorted(tags))}"
    checked = device_type in set(checked_types)
    problems = {d["hostname"]: _device_problem(d, workers, checked and not job.get("device")) for d in tagged}
    usable = [d for d in tagged if problems[d["hostname"]] is None]
    what = f"device {job['device']}" if job.get("device") else f"devices of type {device_type}" + (
        f" with tags {', '.join(sorted(tags))}" if tags else "")
    counts: dict[str, int] = defaultdict(int)
    for problem in problems.values():
        if problem is not None:
            counts[problem] += 1
    unusable = ", ".join(f"{n} {p}" for p, n in sorted(counts.items()))
    if not usable:
        return f"no usable {what}: {unusable}"
    if all(d.get("state") != DeviceState.IDLE for d in usable):
        return f"all {len(usable)} usable {what} are busy" + (f" (and {unusable})" if unusable else "")
    return "an idle device is free: the next scheduling pass takes it (or jobs of higher priority first)"


def _job_rows(query: Any) -> list[dict[str, Any]]:
    types = dict(DeviceType.select(DeviceType.id, DeviceType.name).tuples())
    rows = list(query.tuples())
    ids = [row[0] for row in rows]
    tags: dict[int, list[str]] = defaultdict(list)
    if ids:
        for job_id, name in (JobTag.select(JobTag.job, Tag.name).join(Tag)
                             .where(JobTag.job.in_(ids)).order_by(Tag.name).tuples()):
            tags[job_id].append(name)
    devices = dict(Device.select(Device.id, Device.hostname).tuples())
    workers = dict(Worker.select(Worker.id, Worker.hostname).tuples())
    users = dict(User.select(User.id, User.username).tuples())
    return [{
        "id": job_id, "name": name, "state": state, "priority": priority, "submit_time": iso(submit_time),
        "start_time": iso(start_time), "device_type": types.get(type_id), "tags": tags.get(job_id, []),
        "device": devices.get(actual) or devices.get(requested), "worker": workers.get(worker_id),
        "submitter": users.get(submitter), "health_check": bool(health_check),
    } for (job_id, name, state, priority, submit_time, start_time, type_id, actual, requested, worker_id,
           submitter, health_check) in rows]


def _jobs(states: Iterable[str], limit: int) -> tuple[list[dict[str, Any]], int]:
    """Public jobs in ``states`` (scheduling order, at most ``limit``) and how many others (private)."""
    condition = Job.state.in_(list(states))
    query = (Job.select(Job.id, Job.name, Job.state, Job.priority, Job.submit_time, Job.start_time,
                        Job.requested_device_type, Job.actual_device, Job.requested_device, Job.worker,
                        Job.submitter, Job.health_check)
             .where(condition & (Job.visibility == "public"))
             .order_by(Job.priority.desc(), Job.submit_time, Job.id).limit(limit))
    private = Job.select().where(condition & (Job.visibility != "public")).count()
    return _job_rows(query), private


def lab_model() -> dict[str, Any]:
    """The lab as the lab-now page shows it (plain data, JSON-able)."""
    model = lab_snapshot()
    running, running_private = _jobs(RUNNING_STATES, QUEUED_SHOWN)
    queued, queued_private = _jobs([JobState.SUBMITTED], QUEUED_SHOWN)
    queued_total = Job.select().where(Job.state == JobState.SUBMITTED).count()
    workers = {w["hostname"]: w for w in model["workers"]}
    checked = {t["name"] for t in model["device_types"] if t.get("health_check")}
    reasons: dict[tuple, str] = {}  # most queued jobs share a type and tags: one answer each
    for job in queued:
        key = (job["device_type"], tuple(job["tags"]), job["device"] if job["health_check"] else None)
        if key not in reasons:
            reasons[key] = why_waiting({"device_type": key[0], "tags": key[1], "device": key[2]},
                                       model["devices"], workers, checked)
        job["why"] = reasons[key]
    model.update(as_of=iso(utcnow()), running=running, running_private=running_private, queued=queued,
                 queued_total=queued_total, queued_private=queued_private)
    return model
