"""A job's data as LAVA sends it in a callback (lava_scheduler_app's ``create_job_data``), key for key.

The minimal dataset: ``id``, the legacy ``status`` (0 submitted, 1 running, 2 complete, 3 incomplete,
4 canceled, 5 canceling) and ``status_string``, LAVA's integer ``state``/``health`` with their
``*_string`` names, ``submit_time``/``start_time``/``end_time`` as Python prints a UTC datetime
(``2024-05-01 10:00:00.123456+00:00``, ``None`` when unset), ``submitter_username``,
``failure_comment``, ``priority``, ``description``, ``actual_device_id`` (the device's hostname),
``definition`` (its ``secrets:`` redacted), ``metadata`` (the job's ``metadata:`` as a list of
one-key mappings) and ``health_check``. ``dataset: logs`` adds ``log``, the whole output.yaml as one
string; ``results`` adds ``results``, suite name -> a YAML string of its test cases (LAVA's export:
name, job, suite, result, measurement, unit, level, url, id, logged, log_start_line, log_end_line,
metadata; the ``lava`` suite's ``job`` case carries ``error_type`` and ``error_msg`` in metadata).

Two deliberate differences from 2023.01: the callback's token is not repeated in the body (LAVA
itself stopped in 2024.05: receivers get it in the header), and a log over the master's cap
(``--notify-max-log``) is cut at a line boundary, so it still parses, with ``log_truncated``
saying how much was sent. ``health_check`` is in LAVA's data from 2025.02.

MultiNode (later) adds ``sub_id``: :func:`job_data` takes the row, so a sub-job is one more call.
"""

from __future__ import annotations

import datetime as _dt
from typing import Any

import yaml

from master.instance import current
from master.models import Device, Job, TestCase, TestSuite, User
from master.states import JobHealth, JobState
from results.redact import redact_definition

#: LAVA's integer job states and healths (TestJob.STATE_* / HEALTH_*)
STATE_NUMBERS = {state: n for n, state in enumerate(
    (JobState.SUBMITTED, JobState.SCHEDULING, JobState.SCHEDULED, JobState.RUNNING, JobState.CANCELING,
     JobState.FINISHED))}
HEALTH_NUMBERS = {health: n for n, health in enumerate(
    (JobHealth.UNKNOWN, JobHealth.COMPLETE, JobHealth.INCOMPLETE, JobHealth.CANCELED))}
LEGACY_NAMES = ("Submitted", "Running", "Complete", "Incomplete", "Canceled", "Canceling")


def legacy_status(state: str, health: str) -> int:
    """LAVA's legacy status number of a job in ``state`` with ``health``."""
    if state in (JobState.SUBMITTED, JobState.SCHEDULING, JobState.SCHEDULED):
        return 0
    if state == JobState.RUNNING:
        return 1
    if state == JobState.CANCELING:
        return 5
    if health == JobHealth.COMPLETE:
        return 2
    if health in (JobHealth.UNKNOWN, JobHealth.INCOMPLETE):
        return 3
    return 4


def lava_time(value: _dt.datetime | str | None) -> str:
    """A stored UTC time as ``str()`` of LAVA's aware datetime; ``'None'`` when unset."""
    if value is None:
        return "None"
    if isinstance(value, str):
        value = _dt.datetime.fromisoformat(value.rstrip("Z"))
    return str(value.replace(tzinfo=_dt.UTC))


def job_metadata(definition: str) -> list[dict[str, str]]:
    """The job's ``metadata:`` as LAVA lists it: one ``{name: value}`` per entry, values as text."""
    if "metadata" not in definition:
        return []
    try:
        data = yaml.safe_load(definition)
    except yaml.YAMLError:
        return []
    metadata = data.get("metadata") if isinstance(data, dict) else None
    if not isinstance(metadata, dict):
        return []
    return [{str(key): "" if value is None else str(value)} for key, value in metadata.items()]


def url_fields(job: Job) -> dict[str, Any]:
    """What LAVA substitutes for ``{NAME}`` in a callback URL: the job's fields (lower-case names)."""
    return {"id": job.id, "status": legacy_status(job.state, job.health),
            "status_string": LEGACY_NAMES[legacy_status(job.state, job.health)].lower(),
            "state": STATE_NUMBERS[job.state], "health": HEALTH_NUMBERS[job.health],
            "priority": job.priority, "description": job.name, "health_check": job.health_check,
            "submit_time": lava_time(job.submit_time), "start_time": lava_time(job.start_time),
            "end_time": lava_time(job.end_time)}


def job_data(job: Job, snapshot: dict[str, Any] | None = None, *, logs: bool = False,
             results: bool = False, max_log_bytes: int | None = None) -> dict[str, Any]:
    """The callback payload of ``job``; ``snapshot`` (state, health, times, failure comment at the
    state change that queued the callback) overrides the row's current values."""
    state = (snapshot or {}).get("state", job.state)
    health = (snapshot or {}).get("health", job.health)
    start = (snapshot or {}).get("start_time", job.start_time)
    end = (snapshot or {}).get("end_time", job.end_time)
    comment = (snapshot or {}).get("failure_comment", job.failure_comment)
    status = legacy_status(state, health)
    submitter = User.get_by_id(job.submitter_id).username
    device = Device.get_or_none(Device.id == job.actual_device_id) if job.actual_device_id else None
    data: dict[str, Any] = {
        "id": job.id,
        "status": status,
        "status_string": LEGACY_NAMES[status].lower(),
        "state": STATE_NUMBERS[state],
        "state_string": state,
        "health": HEALTH_NUMBERS[health],
        "health_string": health,
        "submit_time": lava_time(job.submit_time),
        "start_time": lava_time(start),
        "end_time": lava_time(end),
        "submitter_username": submitter,
        "failure_comment": comment,
        "priority": job.priority,
        "description": job.name,
        "actual_device_id": device.hostname if device else None,
        "definition": redact_definition(job.definition),
        "metadata": job_metadata(job.definition),
        "health_check": bool(job.health_check),
    }
    if logs:
        log, truncated = read_log(job.id, max_log_bytes)
        if log is not None:
            data["log"] = log
            if truncated:
                data["log_truncated"] = truncated
    if results:
        data["results"] = suite_results(job.id)
    return data


def read_log(job_id: int, max_bytes: int | None) -> tuple[str | None, dict[str, Any] | None]:
    """The job's output.yaml (None when it has none) and, when it is over ``max_bytes``, what was
    kept: whole lines from the start (a valid YAML list), ``{sent_bytes, total_bytes, limit_bytes}``."""
    path = current().store.job_dir(job_id) / "output.yaml"
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            if max_bytes is None or size <= max_bytes:
                return handle.read().decode("utf-8", errors="replace"), None
            head = handle.read(max_bytes)
    except FileNotFoundError:
        return None, None
    head = head[:head.rfind(b"\n") + 1]
    return head.decode("utf-8", errors="replace"), {"sent_bytes": len(head), "total_bytes": size,
                                                    "limit_bytes": max_bytes}


def case_metadata(case: TestCase, suite: str) -> dict[str, Any]:
    """A test case's metadata as LAVA keeps it (the result record the dispatcher sent)."""
    metadata: dict[str, Any] = {"case": case.name, "definition": suite, "result": case.result}
    if case.level:
        metadata["level"] = case.level
    if case.measurement is not None:
        metadata["measurement"] = case.measurement
    if case.units:
        metadata["units"] = case.units
    if case.duration is not None:
        metadata["duration"] = f"{case.duration:.2f}"
    if case.test_set:
        metadata["set"] = case.test_set
    metadata.update(case.extra or {})
    return metadata


def export_case(case: TestCase, suite: str, job_id: int) -> dict[str, Any]:
    """One test case as LAVA exports it (every value text, measurement with LAVA's 10 decimals)."""
    return {
        "name": case.name,
        "job": str(job_id),
        "suite": suite,
        "result": case.result,
        "measurement": "None" if case.measurement is None else f"{case.measurement:.10f}",
        "unit": case.units or "",
        "level": case.level or "",
        "url": f"/results/testcase/{case.id}",
        "id": str(case.id),
        "logged": lava_time(case.logged),
        "log_start_line": "",
        "log_end_line": "",
        "metadata": case_metadata(case, suite),
    }


def export_cases(job_id: int, suite: str | None = None, case: str | None = None) -> list[dict[str, Any]]:
    """The job's test cases as LAVA exports them (by suite, then as recorded), optionally of one
    suite or one case: what a callback's ``results`` and ``results.get_*_results_yaml`` hold."""
    query = (TestCase.select(TestCase, TestSuite.name.alias("suite_name")).join(TestSuite)
             .where(TestCase.job == job_id))
    if suite is not None:
        query = query.where(TestSuite.name == suite)
    if case is not None:
        query = query.where(TestCase.name == case)
    return [export_case(row, row.suite_name, job_id)
            for row in query.order_by(TestSuite.id, TestCase.id).objects()]


def lava_yaml(data: Any) -> str:
    """YAML as LAVA's yaml_dump writes it: block style, keys sorted, non-ASCII escaped."""
    return yaml.safe_dump(data)


def suite_results(job_id: int) -> dict[str, str]:
    """Suite name -> YAML text of its exported test cases, suites in the order they were created."""
    out: dict[str, list[dict[str, Any]]] = {
        name: [] for (name,) in TestSuite.select(TestSuite.name).where(TestSuite.job == job_id)
        .order_by(TestSuite.id).tuples()}
    for row in export_cases(job_id):
        out[row["suite"]].append(row)
    return {name: lava_yaml(cases) for name, cases in out.items()}
