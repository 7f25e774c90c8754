"""Peewee models of the lab: device types, devices, workers, jobs, results, tags, users and tokens.

All bound to :data:`master.db.db` (a DatabaseProxy), so the same models serve SQLite and PostgreSQL.
States and healths are stored as the words of :mod:`master.states` (readable in SQL and in dumps).
Logs never go to the database: they live in the artifact store (:mod:`results.store`).
"""

from __future__ import annotations

import datetime as _dt
import json

from peewee import (
    AutoField,
    BooleanField,
    CharField,
    DateTimeField,
    FloatField,
    ForeignKeyField,
    IntegerField,
    Model,
    TextField,
)

from master.db import db
from master.states import DeviceHealth, DeviceState, JobHealth, JobState, WorkerHealth, WorkerState


def utcnow() -> _dt.datetime:
    """Now, in UTC, without tzinfo (what the database stores)."""
    return _dt.datetime.now(_dt.UTC).replace(tzinfo=None)


def iso(value: _dt.datetime | None) -> str | None:
    """A stored time as ISO 8601 UTC (``2024-05-01T10:00:00.123456Z``), None stays None."""
    if value is None:
        return None
    if isinstance(value, str):  # SQLite hands back text for raw queries
        value = _dt.datetime.fromisoformat(value)
    return value.isoformat(timespec="microseconds") + "Z"


class JSONField(TextField):
    """A small JSON document (extra fields of a test case) stored as text on every backend."""

    def db_value(self, value):
        return None if value is None else json.dumps(value, sort_keys=True)

    def python_value(self, value):
        return None if value is None else json.loads(value)


class BaseModel(Model):
    class Meta:
        database = db
        legacy_table_names = False


class User(BaseModel):
    """Someone who submits jobs (and, if admin, manages the lab). Authenticates with API tokens."""

    username = CharField(max_length=150, unique=True)
    email = CharField(max_length=254, default="")
    is_admin = BooleanField(default=False)
    created = DateTimeField(default=utcnow)

    class Meta:
        table_name = "users"


class Token(BaseModel):
    """An API token; only the SHA-256 of the secret is stored, never the token itself."""

    user = ForeignKeyField(User, backref="tokens", on_delete="CASCADE")
    digest = CharField(max_length=64, unique=True)
    description = CharField(max_length=200, default="")
    created = DateTimeField(default=utcnow)
    last_used = DateTimeField(null=True)

    class Meta:
        table_name = "tokens"


class Tag(BaseModel):
    """A device capability (``usb-stick``, ``hdmi``); a job's tags must all be on its device."""

    name = CharField(max_length=100, unique=True)
    description = TextField(default="")

    class Meta:
        table_name = "tags"


class DeviceType(BaseModel):
    """A kind of board; its template renders each device's dictionary to the device YAML.

    ``template`` holds a template stored through the API (it overrides the packaged file of the same
    name); ``health_check`` a job definition run on devices of this type when their health is
    Unknown/Looping or their check is due (every ``health_frequency`` hours or jobs).
    """

    name = CharField(max_length=100, unique=True)
    description = TextField(default="")
    template = TextField(null=True)
    health_check = TextField(null=True)
    health_frequency = IntegerField(default=24)
    health_denominator = CharField(max_length=10, default="hours")
    display = BooleanField(default=True)

    class Meta:
        table_name = "device_types"


class Worker(BaseModel):
    """A lab box running ``pumice-agent``; it owns devices and connects out to the master."""

    hostname = CharField(max_length=200, unique=True)
    description = TextField(default="")
    state = CharField(max_length=20, default=WorkerState.OFFLINE)
    health = CharField(max_length=20, default=WorkerHealth.ACTIVE)
    last_seen = DateTimeField(null=True)
    version = CharField(max_length=50, null=True)
    #: the worker's CURVE public key (Z85, 40 characters): the only key the broker admits for it
    public_key = TextField(null=True)
    #: YAML: environment for jobs on this worker (proxy settings: overrides, purge)
    env = TextField(null=True)
    #: YAML: the worker's dispatcher configuration
    config = TextField(null=True)
    #: at most this many jobs at once on the worker's devices (0: no limit)
    job_limit = IntegerField(default=0)

    class Meta:
        table_name = "workers"


class Device(BaseModel):
    """One board: its type, its worker, its tags, its dictionary, its state and health."""

    hostname = CharField(max_length=200, unique=True)
    device_type = ForeignKeyField(DeviceType, backref="devices")
    worker = ForeignKeyField(Worker, backref="devices", null=True, on_delete="SET NULL")
    description = TextField(default="")
    state = CharField(max_length=20, default=DeviceState.IDLE)
    health = CharField(max_length=20, default=DeviceHealth.UNKNOWN)
    #: the device dictionary (``{% extends 'TYPE.jinja2' %}`` + ``{% set %}``); None: the bare type
    dictionary = TextField(null=True)
    #: the job holding the device while Reserved/Running (a plain id: jobs also point at devices)
    current_job_id = IntegerField(null=True)
    #: when the last health check ended, and how many jobs ran since (for health_frequency)
    last_health_check = DateTimeField(null=True)
    jobs_since_check = IntegerField(default=0)

    # No index on state or current_job_id: changing them then stays a HOT update on PostgreSQL
    # (see master.migrations.DEVICES_FILLFACTOR), cheap when a pass reserves a thousand devices.
    class Meta:
        table_name = "devices"


class DeviceTag(BaseModel):
    device = ForeignKeyField(Device, backref="device_tags", on_delete="CASCADE", index=False)
    tag = ForeignKeyField(Tag, on_delete="CASCADE")

    class Meta:
        table_name = "device_tags"
        indexes = ((("device", "tag"), True),)


class Job(BaseModel):
    """A test job: its definition, what it asks for, where it ran and how it ended.

    ``id`` is the instance's sequence number (the job id in URLs, logs and bundles).
    """

    id = AutoField()
    name = CharField(max_length=200, default="")
    definition = TextField()
    # FK indexes that composite indexes below cover are left out: every index costs time when the
    # scheduler updates a thousand jobs at once
    submitter = ForeignKeyField(User, backref="jobs", index=False)
    requested_device_type = ForeignKeyField(DeviceType, backref="jobs", null=True)
    #: set for health checks: the one device the job must run on
    requested_device = ForeignKeyField(Device, null=True, backref="+", on_delete="SET NULL", index=False)
    priority = IntegerField(default=50)
    visibility = CharField(max_length=20, default="public")
    state = CharField(max_length=20, default=JobState.SUBMITTED)
    health = CharField(max_length=20, default=JobHealth.UNKNOWN)
    submit_time = DateTimeField(default=utcnow)
    start_time = DateTimeField(null=True)
    end_time = DateTimeField(null=True)
    actual_device = ForeignKeyField(Device, null=True, backref="+", on_delete="SET NULL", index=False)
    worker = ForeignKeyField(Worker, null=True, backref="+", on_delete="SET NULL", index=False)
    failure_comment = TextField(null=True)
    health_check = BooleanField(default=False)
    #: where an imported job comes from (``{instance, url, job, uuid}`` of an uploaded bundle); None
    #: for jobs that ran here. Kept in the database so every meta.yaml rewrite carries it through.
    source = JSONField(null=True)
    #: what the job reads from its worker itself (``[[kind, location], ...]``: file URLs, local git
    #: repositories, the worker's own addresses; see agent.policy); None for most jobs. The scheduler
    #: gives the job only to workers whose file policy allows all of it.
    local_urls = JSONField(null=True)
    #: the job's ``context:`` (what its device YAML is rendered with) and its job timeout in seconds,
    #: kept at submission so that START is assembled without parsing the definition again
    context = JSONField(null=True)
    timeout = FloatField(null=True)

    class Meta:
        table_name = "jobs"
        indexes = (
            (("submitter", "state"), False),
            (("actual_device", "state"), False),
        )


#: the queue in scheduling order (priority, submit time, id): a scheduling pass reads the first
#: page of it without sorting the whole queue; also finds the active jobs by state
JOB_QUEUE_INDEX = Job.index(Job.state, Job.priority.desc(), Job.submit_time, Job.id, name="jobs_queue")
Job.add_index(JOB_QUEUE_INDEX)


class JobTag(BaseModel):
    job = ForeignKeyField(Job, backref="job_tags", on_delete="CASCADE", index=False)
    tag = ForeignKeyField(Tag, on_delete="CASCADE")

    class Meta:
        table_name = "job_tags"
        indexes = ((("job", "tag"), True),)


class TestSuite(BaseModel):
    """The results of one test definition run (``0_smoke-tests``) or the ``lava`` suite of a job."""

    job = ForeignKeyField(Job, backref="suites", on_delete="CASCADE", index=False)
    name = CharField(max_length=200)

    class Meta:
        table_name = "test_suites"
        indexes = ((("job", "name"), True),)


class TestCase(BaseModel):
    """One result, identified by its job, its level (pipeline position) and its name."""

    suite = ForeignKeyField(TestSuite, backref="cases", on_delete="CASCADE")
    job = ForeignKeyField(Job, backref="+", on_delete="CASCADE", index=False)
    level = CharField(max_length=50, default="")
    name = CharField(max_length=200)
    result = CharField(max_length=10)
    measurement = FloatField(null=True)
    units = CharField(max_length=100, null=True)
    test_set = CharField(max_length=200, null=True)
    duration = FloatField(null=True)
    extra = JSONField(null=True)
    logged = DateTimeField(default=utcnow)

    class Meta:
        table_name = "test_cases"
        indexes = ((("job", "level", "name"), False),)


class JoinToken(BaseModel):
    """A one-time token that lets a worker register its CURVE key (``pumice-agent --join``).

    Only the SHA-256 of the token is kept; ``used`` is set when it enrolled a key (a second use is
    refused, and said to be one)."""

    worker = ForeignKeyField(Worker, backref="join_tokens", on_delete="CASCADE")
    digest = CharField(max_length=64, unique=True)
    created = DateTimeField(default=utcnow)
    expires = DateTimeField()
    used = DateTimeField(null=True)

    class Meta:
        table_name = "join_tokens"


class MasterKey(BaseModel):
    """The public half of the master's CURVE key pair (its secret stays in a file of the broker's
    host): every process that issues join tokens or serves the key reads it here."""

    public_key = CharField(max_length=40)
    created = DateTimeField(default=utcnow)

    class Meta:
        table_name = "master_keys"


class DeviceHealthChange(BaseModel):
    """One change of a device's health, for its page: when, from what to what, and why (an admin,
    a health check job, a job's infrastructure error)."""

    device = ForeignKeyField(Device, backref="health_changes", on_delete="CASCADE")
    time = DateTimeField(default=utcnow)
    old = CharField(max_length=20)
    new = CharField(max_length=20)
    reason = CharField(max_length=200, default="")
    job_id = IntegerField(null=True)

    class Meta:
        table_name = "device_health_changes"


class SchemaVersion(BaseModel):
    """One row per applied migration (see :mod:`master.migrations`)."""

    version = IntegerField(primary_key=True)
    name = CharField(max_length=200)
    applied = DateTimeField(default=utcnow)

    class Meta:
        table_name = "schema_version"


#: every table, in creation order (referenced before referencing)
MODELS: tuple[type[BaseModel], ...] = (
    User, Token, Tag, DeviceType, Worker, Device, DeviceTag, Job, JobTag, TestSuite, TestCase, JoinToken,
    MasterKey, DeviceHealthChange,
)


# ---- notifications (issue 17): created by migration 7, not by step 1 (see master.migrations) ----

class RemoteToken(BaseModel):
    """A user's named token for other services (LAVA's remote artifact tokens): a job's
    ``notify: callback: token: NAME`` sends the value of the submitter's token NAME. The value itself
    is kept (it is sent, so it cannot be a digest) and shown only to its owner."""

    user = ForeignKeyField(User, backref="remote_tokens", on_delete="CASCADE")
    name = CharField(max_length=200)
    token = TextField()
    created = DateTimeField(default=utcnow)

    class Meta:
        table_name = "remote_tokens"
        indexes = ((("user", "name"), True),)


class JobNotify(BaseModel):
    """A job's ``notify:`` block as checked at submission (JSON); only jobs that have one get a row."""

    job = ForeignKeyField(Job, primary_key=True, backref="+", on_delete="CASCADE")
    spec = JSONField()

    class Meta:
        table_name = "job_notify"


class Notification(BaseModel):
    """One callback or email to deliver (the outbox): written in the transaction of the job's state
    change that triggers it, delivered by :class:`master.outbox.Outbox` with retries.

    ``snapshot`` is the job as it was at that change (state, health, times, failure comment), so a
    callback for Running that is delivered late still says Running. ``target`` is the callback URL
    (after LAVA's ``{FIELD}`` substitution) or the email address; the token and headers are never
    stored here: they are looked up when sending.
    """

    job = ForeignKeyField(Job, backref="+", on_delete="CASCADE")
    #: callback or email
    kind = CharField(max_length=10)
    #: which callback (position in ``callbacks``) or recipient of the notify block
    position = IntegerField(default=0)
    #: the job state/health that triggered it: Running, Complete, Incomplete, Canceled
    trigger = CharField(max_length=20)
    snapshot = JSONField()
    target = TextField()
    #: pending, delivered, failed
    status = CharField(max_length=10, default="pending")
    attempts = IntegerField(default=0)
    #: pending: when the next attempt is due; a sender holds the row while ``leased``
    next_attempt = DateTimeField(default=utcnow)
    leased = BooleanField(default=False)
    created = DateTimeField(default=utcnow)
    finished = DateTimeField(null=True)
    last_error = TextField(null=True)

    class Meta:
        table_name = "notifications"
        indexes = ((("status", "next_attempt"), False), (("job",), False))


class NotificationAttempt(BaseModel):
    """One try at delivering a notification: when, how long, what came back (never what was sent)."""

    notification = ForeignKeyField(Notification, backref="attempt_rows", on_delete="CASCADE")
    number = IntegerField()
    started = DateTimeField(default=utcnow)
    duration = FloatField(default=0.0)
    ok = BooleanField(default=False)
    #: ``HTTP 200``, ``timeout after 5 s``, ``refused: ...``, ``sent``
    outcome = TextField()

    class Meta:
        table_name = "notification_attempts"


#: the tables of migration 7
NOTIFY_MODELS: tuple[type[BaseModel], ...] = (RemoteToken, JobNotify, Notification, NotificationAttempt)
