"""The event stream: LAVA's job, device and worker events as lava-publisher sends them, on a ZeroMQ PUB.

``pumice-master serve --event-socket tcp://*:5500`` binds a PUB socket of its own (apart from the
broker's ROUTER); ``scheduler.get_publisher_event_socket`` tells clients where it is, as LAVA does,
and SQUAD's LAVA listener subscribes there. Each message is LAVA's five frames::

    [topic, uuid, datetime, username, json]

- ``org.lavasoftware.testjob`` (username: the submitter) at each job state change: health, state,
  job, description, priority, submit_time, submitter, health_check, and when known device, worker,
  device_type, start_time, end_time (MultiNode will add sub_id);
- ``org.lavasoftware.device`` (username ``lavaserver``): health, state, device, device_type, worker,
  and job while one holds the device;
- ``org.lavasoftware.worker`` (username ``lavaserver``): hostname, health, state.

The socket is read-only and unauthenticated (no CURVE), like LAVA's: it carries no secrets (no
definition, no token, no log), only the names and states anyone may read on the job and device
pages. Publishing never blocks the master: the service layer's events are queued (bounded; the
oldest are dropped when no one drains them), read from the database and sent by one thread that
owns the socket; a subscriber too slow to keep up loses messages (ZeroMQ PUB semantics).
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import queue
import threading
import uuid
from typing import Any

import zmq
from peewee import JOIN

from master import events
from master.db import connection
from master.jobs import job_records
from master.models import Device, DeviceType, Job, Worker
from master.states import DeviceState, JobHealth, JobState

log = logging.getLogger("pumice.publisher")

TOPIC = "org.lavasoftware"
#: the username of device and worker events (LAVA's)
SERVER_USER = "lavaserver"
#: events waiting to be published at most (then the oldest are dropped)
MAX_QUEUED = 100_000

JOB_EVENTS = ("job_submitted", "job_scheduled", "job_started", "job_canceling", "job_finished")
DEVICE_EVENTS = ("job_scheduled", "job_started", "device_freed", "device_changed")
WORKER_EVENTS = ("worker_online", "worker_offline", "worker_changed")


def _aware(value: _dt.datetime | str | None) -> str | None:
    """A stored UTC time as LAVA's aware ``isoformat()`` (``2024-05-01T10:00:00.123456+00:00``)."""
    if value is None:
        return None
    if isinstance(value, str):
        value = _dt.datetime.fromisoformat(value.rstrip("Z"))
    return value.replace(tzinfo=_dt.UTC).isoformat()


#: the job state each service-layer event announces (job_finished: whatever the row says)
JOB_EVENT_STATES = {"job_submitted": JobState.SUBMITTED, "job_scheduled": JobState.SCHEDULED,
                    "job_started": JobState.RUNNING, "job_canceling": JobState.CANCELING}
#: the device state each announces
DEVICE_EVENT_STATES = {"job_scheduled": DeviceState.RESERVED, "job_started": DeviceState.RUNNING,
                       "device_freed": DeviceState.IDLE}


def job_events(job_ids: list[int], state: str | None = None) -> list[tuple[str, str, dict[str, Any]]]:
    """``(topic, username, data)`` of each job's testjob event, from the database.

    The row is read when the event is published, maybe after the job moved on: ``state`` (the state
    the event announces) puts it back as it was then. The state machine says what that was: the
    health is Unknown until Finished, the start time is set on Running, the device on Scheduled.
    """
    out = []
    for row in job_records(sorted(set(job_ids))):
        if state is not None and state != row["state"]:
            row = {**row, "state": state, "health": JobHealth.UNKNOWN, "end_time": None}
            if state in (JobState.SUBMITTED, JobState.SCHEDULING, JobState.SCHEDULED):
                row["start_time"] = None
            if state in (JobState.SUBMITTED, JobState.SCHEDULING):
                row["device"] = row["worker"] = None
        data: dict[str, Any] = {
            "health": row["health"], "state": row["state"], "job": row["id"], "description": row["name"],
            "priority": row["priority"], "submit_time": _aware(row["submit_time"]),
            "submitter": row["submitter"], "health_check": bool(row["health_check"]),
        }
        if row["device"]:
            data["device"] = row["device"]
            if row["worker"]:
                data["worker"] = row["worker"]
        if row["device_type"]:
            data["device_type"] = row["device_type"]
        if row["start_time"]:
            data["start_time"] = _aware(row["start_time"])
        if row["end_time"]:
            data["end_time"] = _aware(row["end_time"])
        out.append((f"{TOPIC}.testjob", row["submitter"], data))
    return out


def device_events(hostnames: list[str], state: str | None = None,
                  jobs: dict[str, int] | None = None) -> list[tuple[str, str, dict[str, Any]]]:
    """Each device's event; ``state`` and ``jobs`` (hostname -> job) as the event announced them
    (the row may have moved on since)."""
    rows = (Device.select(Device.hostname, Device.state, Device.health, Device.current_job_id,
                          DeviceType.name.alias("device_type"), Worker.hostname.alias("worker"))
            .join(DeviceType).switch(Device).join(Worker, JOIN.LEFT_OUTER)
            .where(Device.hostname.in_(hostnames)).order_by(Device.hostname).dicts())
    out = []
    for row in rows:
        data: dict[str, Any] = {"health": row["health"], "state": state or row["state"],
                                "device": row["hostname"], "device_type": row["device_type"], "worker": row["worker"]}
        job = row["current_job_id"] if jobs is None else jobs.get(row["hostname"])
        if job and data["state"] != DeviceState.IDLE:
            data["job"] = job
        out.append((f"{TOPIC}.device", SERVER_USER, data))
    return out


def worker_events(hostnames: list[str]) -> list[tuple[str, str, dict[str, Any]]]:
    return [(f"{TOPIC}.worker", SERVER_USER, {"hostname": hostname, "health": health, "state": state})
            for hostname, health, state in Worker.select(Worker.hostname, Worker.health, Worker.state)
            .where(Worker.hostname.in_(hostnames)).order_by(Worker.hostname).tuples()]


def messages_for(event: str, data: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    """The LAVA events one service-layer event makes (read from the database now)."""
    out = []
    if event in JOB_EVENTS and data.get("job_ids"):
        out += job_events(list(data["job_ids"]), JOB_EVENT_STATES.get(event))
    if event in DEVICE_EVENTS:
        jobs: dict[str, int] | None = None
        if data.get("assignments"):
            jobs = {device: job for job, device in data["assignments"]}
        elif event == "job_started" and data.get("job_ids"):
            jobs = {h: j for h, j in Device.select(Device.hostname, Job.id)
                    .join(Job, on=(Job.actual_device == Device.id)).where(Job.id.in_(list(data["job_ids"]))).tuples()}
        devices = list(data.get("devices") or jobs or [])
        if devices:
            out += device_events(devices, DEVICE_EVENT_STATES.get(event), jobs)
    if event in WORKER_EVENTS and data.get("workers"):
        out += worker_events(list(data["workers"]))
    return out


def frames(topic: str, username: str, data: dict[str, Any]) -> list[bytes]:
    """lava-publisher's five frames."""
    now = _dt.datetime.now(_dt.UTC).replace(tzinfo=None).isoformat()
    return [topic.encode(), str(uuid.uuid1()).encode(), now.encode(), username.encode(),
            json.dumps(data).encode()]


class EventPublisher:
    """Binds ``endpoint`` (PUB) and publishes LAVA's events of the service layer's events."""

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self.bound: str | None = None
        self._queue: queue.Queue[tuple[str, dict[str, Any]] | None] = queue.Queue(MAX_QUEUED)
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: Exception | None = None
        self.sent = 0

    def on_event(self, event: str, data: dict[str, Any]) -> None:
        if event not in JOB_EVENTS + DEVICE_EVENTS + WORKER_EVENTS:
            return
        try:
            self._queue.put_nowait((event, data))
        except queue.Full:  # nobody drains: drop the oldest, never block the caller
            try:
                self._queue.get_nowait()
                self._queue.put_nowait((event, data))
            except (queue.Empty, queue.Full):
                pass

    def start(self) -> EventPublisher:
        self._thread = threading.Thread(target=self._run, name="pumice-events", daemon=True)
        self._thread.start()
        self._ready.wait(10)
        if self._error is not None:
            raise self._error
        events.subscribe(self.on_event)
        log.info("event stream (lava-publisher's format, no secrets) on %s", self.bound)
        return self

    def _run(self) -> None:
        context = zmq.Context.instance()
        sock = context.socket(zmq.PUB)
        sock.setsockopt(zmq.SNDHWM, 10000)
        sock.setsockopt(zmq.LINGER, 0)
        try:
            sock.bind(self.endpoint)
            self.bound = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        except zmq.ZMQError as exc:
            self._error = OSError(f"cannot bind the event socket {self.endpoint}: {exc}")
            sock.close()
            self._ready.set()
            return
        self._ready.set()
        try:
            while (item := self._queue.get()) is not None:
                try:
                    with connection():
                        built = messages_for(*item)
                except Exception:
                    log.exception("event %s not published", item[0])
                    continue
                for topic, username, data in built:
                    try:
                        sock.send_multipart(frames(topic, username, data), zmq.DONTWAIT)
                        self.sent += 1
                    except zmq.Again:  # every subscriber is full: PUB drops
                        pass
        finally:
            sock.close()

    def stop(self) -> None:
        events.unsubscribe(self.on_event)
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(10)
