"""Bundles from other instances (service layer): an uploaded ``results.yaml`` becomes a finished job here.

The master's write path of a bundle upload (REST ``POST /api/v0.2/jobs/bundle/``, ``pumice upload``):
the job row and its results in the database, then the store's files through
:func:`results.imports.import_bundle` (which ``pumice-site import-bundle`` also uses on a bare store),
then the job's pages (:mod:`master.publish`). This instance's own bundles are written by
:func:`master.jobs.publish_end`.
"""

from __future__ import annotations

import logging
from typing import Any

from agent.errors import Fault
from master import jobs, publish
from master.db import db
from master.errors import Invalid, Unauthorized
from master.instance import current
from master.models import Job, User, utcnow
from master.states import JobHealth, JobState
from results.imports import BundleImportError, find_import, import_bundle, read_bundle

log = logging.getLogger("pumice.jobs")

_BUNDLE_HEALTH = {"complete": JobHealth.COMPLETE, "incomplete": JobHealth.INCOMPLETE,
                  "canceled": JobHealth.CANCELED}


def _upload_reply(job_id: int, created: bool) -> dict[str, Any]:
    (source,) = Job.select(Job.source).where(Job.id == job_id).tuples().get()
    return {"job": job_id, "created": created, "url": current().job_url(job_id), "source": source}


def upload_bundle(text: str, user: User | None) -> dict[str, Any]:
    """Import a results bundle downloaded from another instance (a job page's ``results.yaml``) as a
    finished job of this instance, with a new job id here, its results in the database and its
    ``source`` kept; then publish its pages.

    Returns ``{job, created, url, source}``: ``created`` is False when this bundle (by its uuid) was
    imported before, and ``job`` is then the job it became. Raises Invalid (message and line) for
    a text that is not a bundle, Unauthorized without a token.
    """
    if user is None:
        raise Unauthorized("uploading a bundle needs a token: 'Authorization: Token <token>'")

    def invalid(exc: BundleImportError) -> Invalid:
        line = getattr(exc.__cause__, "line", 0) or None
        return Invalid(f"invalid results bundle: {exc}", [Fault("", str(exc), line)])

    try:
        bundle, info = read_bundle(text)
    except BundleImportError as exc:
        raise invalid(exc) from None
    instance = current()
    existing = find_import(instance.store, info.uuid)
    if existing is not None:
        return _upload_reply(existing, False)
    source = {"instance": info.instance, "url": info.url, "job": info.job, "uuid": info.uuid}
    now = utcnow()
    with db.atomic() as transaction:
        job = Job.create(name=info.name[:200], definition="", submitter=user, state=JobState.FINISHED,
                         health=_BUNDLE_HEALTH.get(info.health, JobHealth.UNKNOWN), submit_time=now,
                         end_time=now, source=source)
        jobs.append_results(job.id, bundle.results)
        # last: its files (and the uuid marker) are written only once the rows are in place, and
        # a failure here rolls the rows back
        try:
            imported = import_bundle(instance.store, text, job_id=job.id, submitter=user.username)
        except BundleImportError as exc:
            raise invalid(exc) from None
        if not imported.created:  # a concurrent upload of the same bundle got there first
            transaction.rollback()
            return _upload_reply(imported.job_id, False)
    jobs.write_meta([job.id])  # the master's record (with source) replaces the importer's meta.yaml
    log.info("bundle %s from %s imported by %s as job %d", info.uuid, info.url or info.instance,
             user.username, job.id)
    publish.publish_pages(job.id)
    return _upload_reply(job.id, True)
