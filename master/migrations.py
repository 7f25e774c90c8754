"""Schema migrations: an ordered list of steps, each applied once and recorded in ``schema_version``.

A new release that changes the schema appends a step (using ``playhouse.migrate`` operations for
columns) and never edits an old one. ``pumice-master db migrate`` applies what is pending;
``pumice-master serve`` does too, so a fresh data directory just works.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import yaml
from peewee import Database, Field, PostgresqlDatabase
from playhouse.migrate import SchemaMigrator
from playhouse.migrate import migrate as migrate_columns

from agent.timeout import parse_duration
from master.db import db
from master.models import (
    JOB_QUEUE_INDEX,
    MODELS,
    NOTIFY_MODELS,
    Device,
    DeviceHealthChange,
    Job,
    JoinToken,
    MasterKey,
    SchemaVersion,
)
from master.states import DEFAULT_JOB_TIMEOUT, JobState

log = logging.getLogger("pumice.migrations")


def _initial(database: Database) -> None:
    database.create_tables(MODELS)


def _add_job_column(database: Database, field: Field) -> None:
    # A database created by this release already has the column (step 1 creates today's tables).
    if field.column_name in {column.name for column in database.get_columns(Job._meta.table_name)}:
        return
    migrator = SchemaMigrator.from_database(database)
    migrate_columns(migrator.add_column(Job._meta.table_name, field.column_name, field))


def _job_source(database: Database) -> None:
    _add_job_column(database, Job.source)


def _job_local_urls(database: Database) -> None:
    _add_job_column(database, Job.local_urls)


#: PostgreSQL: room left on each page of the devices table, so that changing a device's state is a
#: HOT update (the new row version stays on its page, no index is touched): a scheduling pass
#: reserves a thousand devices at once. Rows already stored move to such pages as they are updated.
DEVICES_FILLFACTOR = 50


def _scheduling_order(database: Database) -> None:
    # the index it replaces (state, priority, submit_time) could not give the queue's order
    # (priority descending, then submit time): every pass sorted the whole queue
    database.execute_sql(f'DROP INDEX IF EXISTS "{Job._meta.table_name}_state_priority_submit_time"')
    database.execute(JOB_QUEUE_INDEX.safe(True))
    if isinstance(database, PostgresqlDatabase):
        database.execute_sql(f'ALTER TABLE "{Device._meta.table_name}" SET (fillfactor = {DEVICES_FILLFACTOR})')


def _worker_enrolment(database: Database) -> None:
    # workers' keys were files of DATA/certificates/workers (and a copy in workers.public_key): the
    # database is now the one place, which the broker imports the files into at its next start
    database.create_tables([JoinToken, MasterKey])


def _start_fields(definition: str) -> tuple[dict | None, float]:
    """The context and job timeout of a definition stored before release 6 kept them (a job that
    validated has both; anything else gets LAVA's default job timeout)."""
    try:
        data = yaml.safe_load(definition) or {}
        context = data.get("context") if isinstance(data.get("context"), dict) else None
        return context, parse_duration(data["timeouts"]["job"], "timeouts.job")
    except Exception:
        return None, DEFAULT_JOB_TIMEOUT


def _job_start_fields(database: Database) -> None:
    _add_job_column(database, Job.context)
    _add_job_column(database, Job.timeout)
    # the jobs still to run get them from their definition, once
    rows = (Job.select(Job.id, Job.definition)
            .where(Job.state.not_in([JobState.FINISHED]) & Job.timeout.is_null()).tuples())
    for job_id, definition in list(rows):
        context, timeout = _start_fields(definition)
        Job.update(context=context, timeout=timeout).where(Job.id == job_id).execute()


def _notifications(database: Database) -> None:
    # new tables only
    database.create_tables(NOTIFY_MODELS, safe=True)


def _device_health_changes(database: Database) -> None:
    database.create_tables([DeviceHealthChange], safe=True)


#: (version, name, step); versions are consecutive from 1
MIGRATIONS: list[tuple[int, str, Callable[[Database], None]]] = [
    (1, "initial schema", _initial),
    (2, "jobs.source: where an imported job comes from", _job_source),
    (3, "jobs_queue: the queue index in scheduling order; devices updated in place", _scheduling_order),
    (4, "jobs.local_urls: what a job reads from its worker itself (the file policy)", _job_local_urls),
    (5, "join_tokens, master_keys: worker enrolment with one-time join tokens", _worker_enrolment),
    (6, "jobs.context, jobs.timeout: what START needs, kept at submission", _job_start_fields),
    (7, "notifications: job_notify, the notifications outbox and its attempts, remote_tokens", _notifications),
    (8, "device_health_changes: each device's health transitions, for its page", _device_health_changes),
]

LATEST = MIGRATIONS[-1][0]


def current_version() -> int:
    """The schema version of the bound database (0: empty)."""
    if not db.table_exists(SchemaVersion._meta.table_name):
        return 0
    last = SchemaVersion.select(SchemaVersion.version).order_by(SchemaVersion.version.desc()).first()
    return last.version if last else 0


def pending() -> list[tuple[int, str]]:
    """The migrations not applied yet, as (version, name)."""
    version = current_version()
    return [(number, name) for number, name, _ in MIGRATIONS if number > version]


def migrate() -> list[tuple[int, str]]:
    """Apply every pending migration, each in its own transaction; return what was applied."""
    db.create_tables([SchemaVersion])
    applied = []
    for number, name, step in MIGRATIONS:
        if number <= current_version():
            continue
        with db.atomic():
            step(db.obj)
            SchemaVersion.create(version=number, name=name)
        log.info("schema migration %d applied: %s", number, name)
        applied.append((number, name))
    return applied
