"""START: what the broker sends an agent to run a Scheduled job, assembled in one place.

Everything comes from what submission already knew and stored (:func:`master.jobs.create_job`: the
definition, the job's ``context:`` and job timeout) and from the lab (the device YAML rendered from
the device's dictionary and its device-type template, the worker's env and dispatcher config).
"""

from __future__ import annotations

from typing import Any

import yaml

from agent.messages import Start
from master import inventory
from master.errors import Invalid
from master.instance import current
from master.models import Device, Job, Worker
from master.states import DEFAULT_JOB_TIMEOUT, JobState
from master.validation import own_context
from results import bounded


def start_message(job_id: int) -> Start | None:
    """START for a Scheduled job: the definition, the device YAML rendered with the job's context
    (and without it, for agent.qemu_policy), the worker's env and dispatcher config, the job
    timeout. None if the job is not Scheduled. Raises ServiceError when the lab's configuration
    cannot give it (a device that does not render, a worker configuration that is not YAML)."""
    job = Job.get_or_none(Job.id == job_id)
    if job is None or job.state != JobState.SCHEDULED or job.actual_device_id is None:
        return None
    device = Device.get_by_id(job.actual_device_id)
    worker = Worker.get_by_id(job.worker_id)
    context = job.context or None
    device_yaml = inventory.device_yaml(device.hostname, context)
    # the same without the job's context: what of it the job's context did not write (agent.qemu_policy)
    device_own = inventory.device_yaml(device.hostname, own_context(inventory.get_dictionary(device.hostname), context))
    config = _load_yaml(worker.config, f"worker {worker.hostname} config")
    return Start(job_id=job.id, definition=job.definition, device=device_yaml, device_own=device_own,
                 device_name=device.hostname, env=worker_env(worker.env), dispatcher=config,
                 timeout=job_timeout(job))


def job_timeout(job: Job) -> float:
    """The job's ``timeouts.job`` in seconds, as submission recorded it."""
    return job.timeout or DEFAULT_JOB_TIMEOUT


def worker_env(text: str | None) -> dict[str, Any]:
    """A worker's env (LAVA's env.yaml: ``purge``, ``removes``, ``overrides``) as START carries it;
    a plain mapping is taken as overrides."""
    data = _load_yaml(text, "worker env")
    if not data:
        return {}
    if set(data) <= {"purge", "removes", "overrides"}:
        return {"purge": bool(data.get("purge")), "removes": [str(n) for n in data.get("removes") or ()],
                "overrides": {str(k): v for k, v in (data.get("overrides") or {}).items()}}
    return {"purge": False, "removes": [], "overrides": {str(k): v for k, v in data.items()}}


def _load_yaml(text: str | None, what: str) -> dict:
    if not text:
        return {}
    try:
        data = bounded.load_data(text, current().limits)
    except yaml.YAMLError as exc:
        raise Invalid(f"{what} is not valid YAML: {exc}") from None
    return data if isinstance(data, dict) else {}
