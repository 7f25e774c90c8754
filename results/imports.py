"""Importing a results bundle downloaded from a Pumice site into an artifact store, as a new job.

Importing writes a new job into an :class:`~results.store.ArtifactStore` with a fresh id (the caller's, or
the store's next free one) and keeps the link to the source in ``meta.yaml``'s ``source`` field. Imports
are remembered in ``STORE/imports/<uuid>.yaml`` (the job id it became), created exclusively so two
concurrent uploads of one bundle cannot both create a job.

The store-level half only: ``pumice-site import-bundle`` calls it on a store of its own; the master's
upload (:mod:`master.bundles`) creates the database row first and passes its id.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import logging
import os
import time
import uuid as _uuid
from dataclasses import dataclass
from pathlib import Path

import yaml

from results.bundle import Bundle, dump_bundle, load_bundle
from results.store import ArtifactStore, write_atomic

log = logging.getLogger("pumice.results")


class BundleImportError(ValueError):
    """A bundle that cannot be imported; the message says what was wrong and where."""



@dataclass(frozen=True)
class BundleInfo:
    """What an instance must know about an uploaded bundle before it creates a job for it."""

    uuid: str
    instance: str
    url: str
    job: str
    health: str
    name: str


@dataclass(frozen=True)
class ImportedJob:
    """The outcome of :func:`import_bundle`: the job id in the target store, and whether it is new."""

    job_id: int
    created: bool
    meta: dict


def read_bundle(text: str) -> tuple[Bundle, BundleInfo]:
    """Parse an uploaded bundle and say where it comes from; raises :class:`BundleImportError`."""
    try:
        bundle = load_bundle(text)
    except Exception as exc:  # the loader's message names the line
        raise BundleImportError(f"not a results bundle: {exc}") from exc
    header = bundle.header
    if header is None or not getattr(header, "uuid", None):
        raise BundleImportError(
            "bundle has no source uuid: download it from a Pumice site (jobs/<id>/results.yaml), "
            "whose header names the instance, the job URL and a uuid"
        )
    try:
        uuid = str(_uuid.UUID(str(header.uuid)))
    except ValueError as exc:
        raise BundleImportError(f"bundle source uuid {header.uuid!r} is not a UUID") from exc
    health = bundle_health(bundle.results)
    source_job = str(bundle.job)
    name = f"{header.instance or 'unknown instance'} job {source_job}"
    return bundle, BundleInfo(
        uuid=uuid,
        instance=str(header.instance or ""),
        url=str(header.url or ""),
        job=source_job,
        health=health,
        name=name,
    )


def bundle_health(results: list) -> str:
    """Complete/Incomplete/Canceled/Unknown from the final ``lava``/``job`` result, the way LAVA decides."""
    for result in results:
        if result.suite == "lava" and result.case == "job":
            if str((result.extra or {}).get("error_type", "")).lower() == "canceled":
                return "canceled"
            return {"pass": "complete", "fail": "incomplete"}.get(result.result, "unknown")
    return "unknown"


def _imports_dir(store: ArtifactStore) -> Path:
    return store.root / "imports"


def find_import(store: ArtifactStore, uuid: str) -> int | None:
    """The job id a bundle with ``uuid`` became in ``store``, if it was imported already."""
    path = _imports_dir(store) / f"{uuid}.yaml"
    if not path.exists():
        return None
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}  # empty while being imported
    return int(data["job"]) if isinstance(data, dict) and "job" in data else None


def _next_job_dir(store: ArtifactStore) -> int:
    """Claim the next free job id by creating its directory (mkdir is atomic: no two callers get one id)."""
    candidate = max(store.job_ids(), default=0) + 1
    while True:
        path = store.job_dir(candidate)
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            path.mkdir()
            return candidate
        except FileExistsError:
            candidate += 1


def import_bundle(
    store: ArtifactStore | str | os.PathLike,
    text: str,
    *,
    job_id: int | None = None,
    submitter: str | None = None,
    name: str | None = None,
    dedup: bool = True,
) -> ImportedJob:
    """Import a downloaded bundle into ``store`` as a new finished job that links back to its source.

    ``job_id`` is the id the caller allocated (the master passes its database row's id); without it the
    store's next free id is used. The results get the new job id; the source instance, URL, job and
    uuid go in ``meta.yaml``'s ``source``. With ``dedup`` (the default) a bundle already imported
    returns the existing job with ``created=False`` instead of making a second copy.
    """
    if not isinstance(store, ArtifactStore):
        store = ArtifactStore(store)
    bundle, info = read_bundle(text)
    imports = _imports_dir(store)
    imports.mkdir(parents=True, exist_ok=True)
    marker = imports / f"{info.uuid}.yaml"
    if dedup:
        existing = find_import(store, info.uuid)
        if existing is not None:
            log.info("bundle %s already imported as job %d", info.uuid, existing)
            return ImportedJob(existing, False, store.read_meta(existing))
    if job_id is not None and (store.job_dir(job_id) / "results.yaml").exists():
        raise BundleImportError(f"job {job_id} already has results in {store.root}: pick a new id")
    if dedup:
        try:  # claim the bundle before taking a job id: a losing concurrent upload takes nothing
            fd = os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return _wait_for_import(store, info.uuid)
        os.close(fd)
    try:
        job_id = _import_as(store, bundle, info, job_id, submitter, name)
    except BaseException:
        if dedup:
            marker.unlink(missing_ok=True)
        raise
    if dedup:
        write_atomic(marker, yaml.safe_dump({"job": int(job_id), "source": info.url}))
    log.info("imported bundle %s (%s) as job %d", info.uuid, info.url, job_id)
    return ImportedJob(int(job_id), True, store.read_meta(job_id))


def _wait_for_import(store: ArtifactStore, uuid: str, timeout: float = 10.0) -> ImportedJob:
    """Another upload of the same bundle is importing it: wait for its job rather than make a second."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        existing = find_import(store, uuid)
        if existing is not None:
            return ImportedJob(existing, False, store.read_meta(existing))
        time.sleep(0.02)
    raise BundleImportError(
        f"bundle {uuid} is being imported by another upload that has not finished in {timeout:.0f} s; retry later"
    )


def _import_as(
    store: ArtifactStore, bundle: Bundle, info: BundleInfo, job_id: int | None, submitter: str | None, name: str | None
) -> int:
    """Write the job (results and meta) under ``job_id`` or the store's next free id; return the id."""
    if job_id is None:
        job_id = _next_job_dir(store)
    results = [dataclasses.replace(r, job=str(job_id)) for r in bundle.results]
    now = _dt.datetime.now(_dt.UTC).replace(tzinfo=None).isoformat(timespec="seconds")
    meta = {
        "id": int(job_id),
        "name": name or info.name,
        "description": f"imported from {info.url or info.instance}",
        "submitter": submitter,
        "state": "finished",
        "health": info.health,
        "submit_time": now,
        "end_time": now,
        "visibility": "public",
        "source": {"instance": info.instance, "url": info.url, "job": info.job, "uuid": info.uuid},
    }
    # keep the source header in the stored bundle: the store records where these results came from
    store.write_file(job_id, "results.yaml", dump_bundle(str(job_id), results, bundle.header))
    store.write_meta(job_id, meta)
    return int(job_id)
