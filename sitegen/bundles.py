"""Bundles on the site: the downloadable ``results.yaml`` of a job.

A published bundle names its source (this instance, the job's URL) and carries a UUID. The UUID is
derived from the instance, the job id and its submit time, so downloading the same job twice gives the
same bundle, and uploading it twice to another instance gives one job there, not two (importing one:
:mod:`results.imports`).
"""

from __future__ import annotations

import uuid as _uuid

from results.bundle import BundleHeader, dump_bundle

_NAMESPACE = _uuid.UUID("6b1f8f7e-0b8e-4f64-9f3e-2f5d0c1e7a10")  # Pumice's own UUID namespace


def site_base_url(instance: str, base_url: str = "") -> str:
    """The site's public URL: ``base_url`` as configured, else ``http://<instance>/``."""
    return base_url or f"http://{instance}/"


def job_url(base_url: str, job_id: int | str) -> str:
    """The public URL of a job's page on the site at ``base_url``."""
    return f"{base_url.rstrip('/')}/jobs/{int(job_id)}/"


def bundle_uuid(instance: str, job_id: int | str, submit_time: object = None) -> str:
    """The UUID of a job's published bundle: stable for one job of one instance, distinct across them."""
    return str(_uuid.uuid5(_NAMESPACE, f"{instance}|{int(job_id)}|{submit_time or ''}"))


def site_bundle(job_id: int, results: list, meta: dict, instance: str, base_url: str) -> str:
    """The bundle text published next to the job page, with this instance as its source."""
    header = BundleHeader(
        instance=instance, url=job_url(base_url, job_id), uuid=bundle_uuid(instance, job_id, meta.get("submit_time"))
    )
    return dump_bundle(str(job_id), list(results), header)

