"""LAVA's XML-RPC API at ``/RPC2``: ``lavacli``, SQUAD, KernelCI and LAVA scripts drive the master.

The second front door of the service layer (the REST API in :mod:`master.api` is the first): every
method here is a thin adapter that calls the same functions of :mod:`master.jobs` and
:mod:`master.inventory` and reshapes their records into what LAVA 2023.01 returns (names, capitalised
states, XML-RPC date-times, ``nil`` where LAVA has ``None``, files as ``Binary``).

Authentication is LAVA's: HTTP basic ``user:token`` (a token from ``pumice-master tokens create``,
the user its owner), which is what a lavacli identity sends. No credentials: anonymous. Wrong
credentials are refused on every method, anonymous ones included, so a typo in a token never
silently downgrades a script to anonymous.

Errors are XML-RPC faults with LAVA's codes: the service layer's HTTP status (400 invalid, 401
no or bad credentials, 403 not allowed, 404 unknown object, 409 conflict, 413 too large, 507 the
master's data directory or database is full), -32601 for an unknown method (as LAVA's
dispatcher), -32603 for a bug in the master. Every fault is logged with the method and the user,
except 507: a full disk is logged once a minute (:mod:`master.diskfull`).
"""

from __future__ import annotations

import base64
import binascii
import contextvars
import datetime as _dt
import functools
import inspect
import logging
import re
import types
import typing
from collections.abc import Callable
from typing import Any
from xmlrpc.client import Binary, ExpatParser, Fault, Unmarshaller, dumps
from xmlrpc.server import SimpleXMLRPCDispatcher

import yaml
from bottle import Bottle, HTTPResponse, request

from master import certificates, diskfull, inventory, jobs, remote_tokens
from master.db import connection
from master.errors import Invalid, NotFound, ServiceError, StorageFull, Unauthorized
from master.instance import current
from master.jobdata import LEGACY_NAMES, export_cases, lava_yaml, legacy_status
from master.models import User
from master.states import DeviceHealth, JobState, WorkerHealth
from master.users import authenticate
from results import bounded

log = logging.getLogger("pumice.xmlrpc")

#: where LAVA serves its XML-RPC API (lavacli identities point at ``http://HOST/RPC2``)
PATH = "/RPC2"
#: fault codes LAVA's dispatcher uses for what is not a service error
METHOD_NOT_FOUND = -32601
INTERNAL_ERROR = -32603
#: ``system.api_version``: LAVA's API version whose signatures this module follows
API_VERSION = 2

#: the user of the call being dispatched (set per request; system.multicall reuses it)
_caller: contextvars.ContextVar[User | None] = contextvars.ContextVar("pumice_xmlrpc_user", default=None)

#: method name -> function(user, *params); docstrings are what ``system.methodHelp`` returns
METHODS: dict[str, Callable[..., Any]] = {}


def method(name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register an XML-RPC method under its LAVA name; the function gets the caller first."""

    def register(func: Callable[..., Any]) -> Callable[..., Any]:
        if name in METHODS:
            raise ValueError(f"XML-RPC method {name} registered twice")
        METHODS[name] = func
        return func

    return register


# ---- shapes ----

#: the last ping of a worker never seen
NEVER = _dt.datetime(1970, 1, 1)


def _time(value: str | None) -> _dt.datetime | None:
    """A record's ISO 8601 UTC time as a datetime (marshalled as an XML-RPC dateTime.iso8601)."""
    if not value:
        return None
    return _dt.datetime.fromisoformat(value.rstrip("Z"))


def _text(value: str | None) -> Binary:
    """A file's text, sent as LAVA sends files (base64 bytes; lavacli decodes them as UTF-8)."""
    return Binary((value or "").encode("utf-8"))


def _ids(ids: list[int]) -> int | list[int]:
    """LAVA returns one job id as an integer and the ids of a multi-job submission as a list."""
    return ids[0] if len(ids) == 1 else ids


def _yaml(data: Any) -> str:
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True, default_flow_style=False)


def _visibility(value: str) -> str:
    """LAVA's spelling of a job's visibility."""
    return {"public": "Public", "personal": "Personal"}.get(value, "Group")


# ---- system ----

@method("system.version")
def system_version(user: User | None) -> str:
    """system.version(): the version of the master (lavacli reads it to pick method signatures)."""
    from agent import __version__

    return __version__


@method("system.api_version")
def system_api_version(user: User | None) -> int:
    """system.api_version(): the LAVA XML-RPC API version whose signatures this master follows."""
    return API_VERSION


@method("system.whoami")
def system_whoami(user: User | None) -> str | None:
    """system.whoami(): the user name of the credentials of this call (nil: anonymous)."""
    return user.username if user else None


@method("system.listMethods")
def system_list_methods(user: User | None) -> list[str]:
    """system.listMethods(): every method this master serves."""
    return sorted(METHODS)


def _known(name: str) -> Callable[..., Any]:
    func = METHODS.get(name)
    if func is None:
        raise Fault(METHOD_NOT_FOUND, f"no such method {name!r}: 'lavacli system methods list' lists them")
    return func


def _signature(name: str, func: Callable[..., Any]) -> str:
    """``name(arg, arg=default, ...)``: the method as its callers see it (without the caller)."""
    params = [p.replace(annotation=p.empty) for p in list(inspect.signature(func).parameters.values())[1:]]
    return name + str(inspect.Signature(params))


@method("system.methodHelp")
def system_method_help(user: User | None, name: str) -> str:
    """system.methodHelp(name): what the method does, its arguments and what it returns."""
    return inspect.getdoc(_known(name)) or ""


@method("system.methodSignature")
def system_method_signature(user: User | None, name: str) -> str:
    """system.methodSignature(name): the method's arguments, with their defaults."""
    return _signature(name, _known(name))


@method("system.get_master_certificate")
def system_master_certificate(user: User | None) -> str:
    """system.get_master_certificate(): the master's public CURVE certificate (give it to workers)."""
    return certificates.master_certificate()["certificate"]


# ---- jobs ----

def _job(user: User | None, record: dict[str, Any]) -> dict[str, Any]:
    """A job record as LAVA's ``scheduler.jobs.show`` returns it."""
    error: dict[str, Any] = {}
    if record["state"] == JobState.FINISHED:
        for result in jobs.job_results(record["id"], user):
            if result.suite == "lava" and result.case == "job":
                error = result.extra or {}
    return {
        "id": record["id"], "description": record["description"], "device": record["device"],
        "device_type": record["device_type"], "health_check": record["health_check"], "pipeline": True,
        "health": record["health"], "state": record["state"], "submitter": record["submitter"],
        "submit_time": _time(record["submit_time"]), "start_time": _time(record["start_time"]),
        "end_time": _time(record["end_time"]), "tags": record["tags"],
        "visibility": _visibility(record["visibility"]), "failure_comment": record["failure_comment"],
        "error_msg": error.get("error_msg"), "error_type": error.get("error_type"),
    }


@method("scheduler.jobs.submit")
def jobs_submit(user: User | None, definition: str) -> int | list[int]:
    """scheduler.jobs.submit(definition): validate a job definition (YAML) and queue it.

    Returns the new job id. Needs credentials. An invalid definition is a 400 fault listing every
    fault with its YAML path and line."""
    return _ids(jobs.submit_job(definition, user))


@method("scheduler.jobs.resubmit")
def jobs_resubmit(user: User | None, job_id: str | int) -> int | list[int]:
    """scheduler.jobs.resubmit(job_id): submit the definition of a job again; returns the new id."""
    return _ids(jobs.resubmit_job(job_id, user))


@method("scheduler.jobs.cancel")
def jobs_cancel(user: User | None, job_id: str | int) -> bool:
    """scheduler.jobs.cancel(job_id): cancel a job (its submitter or an admin). A queued job ends at
    once; a running one is Canceling until its worker stops it."""
    jobs.cancel_job(job_id, user)
    return True


@method("scheduler.jobs.validate")
def jobs_validate(user: User | None, definition: str, strict: bool = False) -> dict[str, Any]:
    """scheduler.jobs.validate(definition, strict=False): check a definition without queuing it.

    Returns {} when it is valid, else {"path": the first fault's YAML path, "msg": every fault}."""
    faults = jobs.validate_definition(definition)
    if not faults:
        return {}
    return {"path": faults[0].path, "msg": "; ".join(str(f) for f in faults)}


@method("scheduler.jobs.show")
def jobs_show(user: User | None, job_id: str | int) -> dict[str, Any]:
    """scheduler.jobs.show(job_id): a job's details (state, health, device, times, failure)."""
    return _job(user, jobs.show_job(job_id, user))


@method("scheduler.jobs.definition")
def jobs_definition(user: User | None, job_id: str | int) -> str:
    """scheduler.jobs.definition(job_id): the job definition as submitted, the values of its
    ``secrets:`` redacted."""
    return jobs.job_definition(job_id, user)


@method("scheduler.jobs.logs")
def jobs_logs(user: User | None, job_id: str | int, start: int = 0, end: int | None = None) -> list[Any]:
    """scheduler.jobs.logs(job_id, start=0, end=None): [finished, log] where log is the YAML of lines
    start to end (0-based, end excluded) of the job's output.yaml; finished once the job is."""
    lines = jobs.job_logs(job_id, user, int(start or 0), None if end is None else int(end))
    finished = jobs.show_job(job_id, user)["state"] == JobState.FINISHED
    return [finished, _text("".join(line + "\n" for line in lines) if lines else "[]")]


@method("scheduler.jobs.logs_count")
def jobs_logs_count(user: User | None, job_id: str | int) -> int:
    """scheduler.jobs.logs_count(job_id): the number of lines in the job's log so far."""
    job = jobs.get_job(job_id, user)
    if not (current().store.job_dir(job.id) / "output.yaml").exists():
        return 0
    with current().store.log(job.id) as logfile:
        return logfile.count()


def _job_summary(record: dict[str, Any], verbose: bool, user: User | None) -> dict[str, Any]:
    data = {"id": record["id"], "description": record["description"], "device_type": record["device_type"],
            "health": record["health"], "state": record["state"], "submitter": record["submitter"]}
    if verbose:
        full = _job(user, record)
        # LAVA sends these times as text in lists (and as dateTime in show)
        data.update({"actual_device": record["device"], "start_time": record["start_time"],
                     "end_time": record["end_time"], "error_msg": full["error_msg"],
                     "error_type": full["error_type"]})
    return data


@method("scheduler.jobs.list")
def jobs_list(user: User | None, state: str | None = None, health: str | None = None, start: int = 0,
              limit: int = 25, since: int | None = 0, verbose: bool = False) -> list[dict[str, Any]]:
    """scheduler.jobs.list(state=None, health=None, start=0, limit=25, since=0, verbose=False): the
    jobs you may see, newest first, filtered by state (SUBMITTED ... FINISHED) and health (UNKNOWN,
    COMPLETE, INCOMPLETE, CANCELED); at most 100. ``since`` (minutes) is not supported."""
    if since:
        raise Invalid("since is not supported by this master: filter on state/health, or use the REST "
                      "API /api/v0.2/jobs/")
    _, records = jobs.list_jobs(user, limit=max(0, min(int(limit), 100)), offset=max(0, int(start)),
                                state=state, health=health)
    return [_job_summary(r, bool(verbose), user) for r in records]


@method("scheduler.jobs.queue")
def jobs_queue(user: User | None, device_types: list[str] | None = None, start: int = 0,
               limit: int = 25) -> list[dict[str, Any]]:
    """scheduler.jobs.queue(device_types=None, start=0, limit=25): the queued (Submitted) jobs,
    newest first, optionally only those for the given device types; at most 100."""
    start, limit = max(0, int(start)), max(0, min(int(limit), 100))
    records: list[dict[str, Any]] = []
    for device_type in device_types or [None]:
        records += jobs.list_jobs(user, limit=start + limit, state=JobState.SUBMITTED,
                                  device_type=device_type)[1]
    records.sort(key=lambda r: -r["id"])
    return [{"id": r["id"], "description": r["description"], "requested_device_type": r["device_type"],
             "submitter": r["submitter"]} for r in records[start:start + limit]]


# ---- results ----

def _results(user: User | None, job_id: str | int, suite: str | None = None,
             case: str | None = None) -> list[dict[str, Any]]:
    """The job's results as LAVA exports them (master.jobdata: every value text, measurements with
    LAVA's 10 decimals), of one suite or one case."""
    job = jobs.get_job(job_id, user)
    rows = export_cases(job.id, suite, case)
    if suite is not None and not rows and all(s["name"] != suite for s in jobs.job_suites(job.id, user)):
        raise NotFound(f"job {job.id} has no test suite {suite!r}")
    return rows


@method("results.get_testjob_results_yaml")
def results_job(user: User | None, job_id: str | int) -> str:
    """results.get_testjob_results_yaml(job_id): every result of the job, as YAML."""
    return lava_yaml(_results(user, job_id))


@method("results.get_testsuite_results_yaml")
def results_suite(user: User | None, job_id: str | int, suite_name: str, limit: int | None = None,
                  offset: int | None = None) -> str:
    """results.get_testsuite_results_yaml(job_id, suite_name, limit=None, offset=None): the results
    of one test suite of the job, as YAML."""
    rows = _results(user, job_id, suite_name)
    first = int(offset or 0)
    return lava_yaml(rows[first:first + int(limit)] if limit else rows[first:])


@method("results.get_testcase_results_yaml")
def results_case(user: User | None, job_id: str | int, suite_name: str, case_name: str) -> str:
    """results.get_testcase_results_yaml(job_id, suite_name, case_name): one test case's results."""
    return lava_yaml(_results(user, job_id, suite_name, case_name))


@method("results.get_testjob_suites_list_yaml")
def results_suites(user: User | None, job_id: str | int) -> str:
    """results.get_testjob_suites_list_yaml(job_id): the job's test suites, as YAML."""
    job = jobs.get_job(job_id, user)
    return _yaml([{"job": str(job.id), "name": s["name"], "pass": s["pass"], "fail": s["fail"],
                   "skip": s["skip"], "unknown": s["unknown"]} for s in jobs.job_suites(job.id, user)])


# ---- devices ----

@method("scheduler.devices.list")
def devices_list(user: User | None, show_all: bool = False, offline_info: bool = False) -> list[dict[str, Any]]:
    """scheduler.devices.list(show_all=False, offline_info=False): the devices (Retired ones only
    with show_all), with their type, state, health and current job."""
    return [{"hostname": d["hostname"], "type": d["device_type"], "health": d["health"], "state": d["state"],
             "current_job": d["current_job"], "pipeline": True}
            for d in inventory.list_devices() if show_all or d["health"] != DeviceHealth.RETIRED]


@method("scheduler.devices.show")
def devices_show(user: User | None, hostname: str) -> dict[str, Any]:
    """scheduler.devices.show(hostname): a device's type, state, health, worker, tags, current job."""
    record = inventory.show_device(hostname)
    return {
        "hostname": record["hostname"], "device_type": record["device_type"], "health": record["health"],
        "state": record["state"], "health_job": bool(inventory.health_check_definition(record["device_type"])),
        "description": record["description"], "pipeline": True,
        "has_device_dict": inventory.get_device(hostname).dictionary is not None, "worker": record["worker"],
        "current_job": record["current_job"], "tags": record["tags"], "permissions": [],
    }


@method("scheduler.devices.add")
def devices_add(user: User | None, hostname: str, type_name: str, worker_hostname: str | None,
                user_name: str | None = None, group_name: str | None = None, public: bool = True,
                health: str | None = None, description: str | None = None) -> None:
    """scheduler.devices.add(hostname, type_name, worker_hostname, user_name=None, group_name=None,
    public=True, health=None, description=None): [admin] add a device (user, group and public are
    LAVA's deprecated fields, ignored)."""
    inventory.add_device(user, hostname, type_name, worker=worker_hostname, description=description, health=health)


@method("scheduler.devices.update")
def devices_update(user: User | None, hostname: str, worker_hostname: str | None = None,
                   user_name: str | None = None, group_name: str | None = None, public: bool | None = None,
                   health: str | None = None, description: str | None = None, device_type: str | None = None,
                   reason: str | None = None) -> None:
    """scheduler.devices.update(hostname, worker_hostname=None, user_name=None, group_name=None,
    public=None, health=None, description=None, device_type=None, reason=None): [admin] change the
    given fields of a device (None: unchanged)."""
    changes: dict[str, Any] = {"health": health, "description": description, "device_type": device_type}
    if worker_hostname is not None:
        changes["worker"] = worker_hostname
    inventory.update_device(user, hostname, **changes)
    if reason:
        log.info("device %s updated by %s: %s", hostname, user.username if user else "?", reason)


@method("scheduler.devices.get_dictionary")
def devices_get_dictionary(user: User | None, hostname: str, render: bool = False,
                           context: str | None = None) -> Binary:
    """scheduler.devices.get_dictionary(hostname, render=False, context=None): the device
    dictionary, or with render the device YAML it renders to (context: job context as YAML)."""
    if not render:
        return _text(inventory.get_dictionary(hostname))
    job_context = None
    if context:
        try:
            job_context = bounded.load_data(context, current().limits)
        except yaml.YAMLError as exc:
            raise Invalid(f"context is not valid YAML: {exc}") from None
        if not isinstance(job_context, dict):
            raise Invalid(f"context must be a YAML mapping, not {type(job_context).__name__}")
    return _text(inventory.device_yaml(hostname, job_context))


@method("scheduler.devices.set_dictionary")
def devices_set_dictionary(user: User | None, hostname: str, dictionary: str) -> bool:
    """scheduler.devices.set_dictionary(hostname, dictionary): [admin] replace the device
    dictionary; it must extend a template and render. Returns True."""
    inventory.set_dictionary(user, hostname, dictionary)
    return True


def _device_tags(user: User | None, hostname: str, add: str | None = None, remove: str | None = None) -> None:
    tags = set(inventory.show_device(hostname)["tags"])
    if remove is not None and remove not in tags:
        raise NotFound(f"device {hostname} has no tag {remove!r}")
    tags = (tags | {add} if add else tags) - {remove}
    inventory.update_device(user, hostname, tags=sorted(tags))


@method("scheduler.devices.tags.add")
def devices_tags_add(user: User | None, hostname: str, name: str) -> None:
    """scheduler.devices.tags.add(hostname, name): [admin] give the device a tag."""
    _device_tags(user, hostname, add=name)


@method("scheduler.devices.tags.delete")
def devices_tags_delete(user: User | None, hostname: str, name: str) -> None:
    """scheduler.devices.tags.delete(hostname, name): [admin] take a tag off the device."""
    _device_tags(user, hostname, remove=name)


@method("scheduler.devices.tags.list")
def devices_tags_list(user: User | None, hostname: str) -> list[str]:
    """scheduler.devices.tags.list(hostname): the device's tags."""
    return inventory.show_device(hostname)["tags"]


# ---- tags ----

@method("scheduler.tags.list")
def tags_list(user: User | None) -> list[dict[str, Any]]:
    """scheduler.tags.list(): every tag with its description."""
    return inventory.list_tags()


@method("scheduler.tags.show")
def tags_show(user: User | None, name: str) -> dict[str, Any]:
    """scheduler.tags.show(name): a tag, its description and its devices."""
    return inventory.show_tag(name)


@method("scheduler.tags.add")
def tags_add(user: User | None, name: str, description: str | None = None) -> None:
    """scheduler.tags.add(name, description=None): [admin] create a tag."""
    inventory.add_tag(user, name, description or "")


@method("scheduler.tags.delete")
def tags_delete(user: User | None, name: str) -> None:
    """scheduler.tags.delete(name): [admin] delete a tag (devices and jobs lose it)."""
    inventory.delete_tag(user, name)


# ---- device types ----

@method("scheduler.device_types.list")
def device_types_list(user: User | None, show_all: bool = False) -> list[dict[str, Any]]:
    """scheduler.device_types.list(show_all=False): the device types (hidden ones with show_all)
    with their number of devices (not retired)."""
    return [{"name": dt["name"], "devices": dt["devices"] - dt["devices_retired"], "installed": True,
             "template": dt["template"] == "database"}
            for dt in inventory.list_device_types() if show_all or dt["display"]]


@method("scheduler.device_types.show")
def device_types_show(user: User | None, name: str) -> dict[str, Any]:
    """scheduler.device_types.show(name): a device type's description, health-check settings and
    devices."""
    dt = inventory.device_type_record(inventory.get_device_type(name))
    return {"name": dt["name"], "description": dt["description"], "display": dt["display"],
            "health_disabled": not dt["health_check"], "health_frequency": dt["health_frequency"],
            "health_denominator": dt["health_denominator"], "aliases": [],
            "devices": [d["hostname"] for d in inventory.list_devices(device_type=name)],
            "default_template": dt["template"] != "database"}


@method("scheduler.device_types.add")
def device_types_add(user: User | None, name: str, description: str | None = None, display: bool = True,
                     owners_only: bool = False, health_frequency: int | None = None,
                     health_denominator: str | None = None) -> None:
    """scheduler.device_types.add(name, description=None, display=True, owners_only=False,
    health_frequency=24, health_denominator="hours"): [admin] add a device type; its template is the
    file NAME.jinja2 until one is set (owners_only is ignored)."""
    inventory.add_device_type(user, name, description=description, display=bool(display),
                        health_frequency=health_frequency, health_denominator=health_denominator)


@method("scheduler.device_types.update")
def device_types_update(user: User | None, name: str, description: str | None = None,
                        display: bool | None = None, owners_only: bool | None = None,
                        health_frequency: int | None = None, health_denominator: str | None = None,
                        health_disabled: bool | None = None) -> None:
    """scheduler.device_types.update(name, description=None, display=None, owners_only=None,
    health_frequency=None, health_denominator=None, health_disabled=None): [admin] change the given
    fields (health checks are disabled by removing the type's health check)."""
    inventory.update_device_type(user, name, description=description, display=display,
                           health_frequency=health_frequency, health_denominator=health_denominator)
    if health_disabled:
        inventory.set_health_check(user, name, None)


@method("scheduler.device_types.devices")
def device_types_devices(user: User | None, name: str, health: str | None = None) -> list[dict[str, Any]]:
    """scheduler.device_types.devices(name, health=None): the devices of a type."""
    inventory.get_device_type(name)
    return [{"hostname": d["hostname"], "state": d["state"], "health": d["health"]}
            for d in inventory.list_devices(device_type=name, health=health)]


@method("scheduler.device_types.get_template")
def device_types_get_template(user: User | None, name: str) -> Binary:
    """scheduler.device_types.get_template(name): the device-type template (Jinja2)."""
    return _text(inventory.device_type_template(name))


@method("scheduler.device_types.set_template")
def device_types_set_template(user: User | None, name: str, template: str) -> None:
    """scheduler.device_types.set_template(name, template): [admin] store a template for the type
    (checked by rendering it); an empty template goes back to the file NAME.jinja2."""
    inventory.set_device_type_template(user, name, template)


@method("scheduler.device_types.get_health_check")
def device_types_get_health_check(user: User | None, name: str) -> Binary:
    """scheduler.device_types.get_health_check(name): the type's health-check job definition."""
    definition = inventory.health_check_definition(name)
    if definition is None:
        raise NotFound(f"device type {name!r} has no health check")
    return _text(definition)


@method("scheduler.device_types.set_health_check")
def device_types_set_health_check(user: User | None, name: str, definition: str) -> None:
    """scheduler.device_types.set_health_check(name, definition): [admin] set (empty: remove) the
    type's health-check job definition."""
    inventory.set_health_check(user, name, definition or None)


# ---- workers ----

@method("scheduler.workers.list")
def workers_list(user: User | None, show_all: bool = False) -> list[str]:
    """scheduler.workers.list(show_all=False): the workers' hostnames (Retired ones with show_all)."""
    return [w["hostname"] for w in inventory.list_workers() if show_all or w["health"] != WorkerHealth.RETIRED]


@method("scheduler.workers.show")
def workers_show(user: User | None, hostname: str) -> dict[str, Any]:
    """scheduler.workers.show(hostname): a worker's state, health, devices, last ping, job limit and
    version. A worker never seen has the epoch as its last ping: LAVA always sends a date there, and
    lavacli reads it as one."""
    record = inventory.show_worker(hostname)
    return {"hostname": record["hostname"], "description": record["description"], "state": record["state"],
            "health": record["health"], "devices": record["devices"], "last_ping": _time(record["last_seen"]) or NEVER,
            "job_limit": record["job_limit"], "version": record["version"],
            "default_config": not inventory.worker_text(hostname, "config"),
            "default_env": not inventory.worker_text(hostname, "env"), "default_env_dut": True}


@method("scheduler.workers.add")
def workers_add(user: User | None, hostname: str, description: str | None = None, disabled: bool = False) -> None:
    """scheduler.workers.add(hostname, description=None, disabled=False): [admin] add a worker
    (disabled: Retired)."""
    inventory.add_worker(user, hostname, description=description, disabled=bool(disabled))


@method("scheduler.workers.update")
def workers_update(user: User | None, hostname: str, description: str | None = None, health: str | None = None,
                   job_limit: int | None = None) -> None:
    """scheduler.workers.update(hostname, description=None, health=None, job_limit=None): [admin]
    change the given fields; health is ACTIVE, MAINTENANCE or RETIRED."""
    inventory.update_worker(user, hostname, description=description, health=health, job_limit=job_limit)


def _worker_text_methods(what: str) -> None:
    def get(user: User | None, hostname: str) -> Binary:
        inventory.get_worker(hostname)
        return _text(inventory.worker_text(hostname, what))

    def put(user: User | None, hostname: str, text: str) -> bool:
        inventory.set_worker_text(user, hostname, what, text)
        return True

    meaning = {"env": "environment of the jobs on the worker (LAVA's env.yaml)",
               "config": "dispatcher configuration of the worker (LAVA's dispatcher.yaml)"}[what]
    get.__doc__ = f"scheduler.workers.get_{what}(hostname): the {meaning}."
    put.__doc__ = (f"scheduler.workers.set_{what}(hostname, {what}): [admin] replace the {meaning}; "
                   "a YAML mapping, empty to remove it. Returns True.")
    method(f"scheduler.workers.get_{what}")(get)
    method(f"scheduler.workers.set_{what}")(put)


_worker_text_methods("env")
_worker_text_methods("config")


@method("scheduler.workers.get_certificate")
def workers_get_certificate(user: User | None, hostname: str) -> str:
    """scheduler.workers.get_certificate(hostname): [admin] the worker's public CURVE certificate."""
    return certificates.worker_certificate(user, hostname)["certificate"]


@method("scheduler.workers.set_certificate")
def workers_set_certificate(user: User | None, hostname: str, certificate: str) -> bool:
    """scheduler.workers.set_certificate(hostname, certificate): [admin] register the worker's
    public CURVE certificate (the NAME.key file of 'pumice-agent create-certificate'). Returns True."""
    certificates.set_worker_key(user, hostname, certificate)
    return True


# ---- the dispatcher and the route ----

class Dispatcher(SimpleXMLRPCDispatcher):
    """The stdlib dispatcher over :data:`METHODS`: checks arguments against each method's signature
    and turns service errors into faults with LAVA's codes."""

    def __init__(self) -> None:
        super().__init__(allow_none=True, encoding="utf-8")
        self.funcs.update(METHODS)

    def _dispatch(self, method: str, params: tuple[Any, ...]) -> Any:
        func = _known(method)
        user = _caller.get()
        try:
            bound = inspect.signature(func).bind(user, *params)
        except TypeError as exc:
            raise Fault(400, f"wrong arguments for {method}: {exc}; expected {_signature(method, func)}") from None
        hints = _hints(func)
        for name, value in list(bound.arguments.items())[1:]:
            if name in hints and not _accepts(value, hints[name]):
                raise Fault(400, f"argument {name} of {method} must be {_type_text(hints[name])}, not "
                                 f"{_value_text(value)}; expected {_signature(method, func)}")
        try:
            return func(user, *params)
        except ServiceError as exc:
            message = exc.message
            if exc.faults:
                # one line: lavacli prints a fault's repr, where newlines would show as \n
                message += ": " + " | ".join(str(fault) for fault in exc.faults)
            if isinstance(exc, Unauthorized):
                message += ("; over XML-RPC, send HTTP basic user:token (a lavacli identity with --username "
                            "and --token)")
            raise Fault(exc.status, message) from None
        except Fault:
            raise
        except (TypeError, ValueError, OverflowError) as exc:
            # int("x") or a list where a name belongs: the caller's values, not a bug of ours
            raise Fault(400, f"bad argument for {method}: {exc}") from None
        except Exception as exc:
            if diskfull.is_full(exc):
                raise Fault(StorageFull.status, diskfull.refusal(exc, method).message) from None
            raise


#: the integers a call may carry: what a database column holds (a larger one is no id, count or offset)
INT_RANGE = range(-(2**63), 2**63)


@functools.cache
def _hints(func: Callable[..., Any]) -> dict[str, Any]:
    return typing.get_type_hints(func)


def _accepts(value: Any, hint: Any) -> bool:
    """Whether an argument fits its parameter's type: a text where a text belongs, a list of texts
    where one belongs (never a nested structure a method would walk), integers in INT_RANGE.
    An integer parameter takes a text too, converted by the method (a 400 when it is no number)."""
    if isinstance(hint, types.UnionType):
        return any(_accepts(value, option) for option in hint.__args__)
    if hint is type(None):
        return value is None
    if isinstance(hint, types.GenericAlias) and hint.__origin__ is list:
        return isinstance(value, list) and all(_accepts(item, hint.__args__[0]) for item in value)
    if hint is str:
        return isinstance(value, str)
    if hint is int:
        return isinstance(value, str) or (isinstance(value, int) and value in INT_RANGE)
    if hint is bool:
        return isinstance(value, int) and value in INT_RANGE
    return True


def _type_text(hint: Any) -> str:
    if isinstance(hint, types.UnionType):
        return " or ".join(_type_text(option) for option in hint.__args__)
    if isinstance(hint, types.GenericAlias) and hint.__origin__ is list:
        return f"a list of {_type_text(hint.__args__[0])}"
    return {str: "a string", int: "an integer", bool: "a boolean", type(None): "nil"}.get(hint, str(hint))


def _value_text(value: Any) -> str:
    """What was sent instead, without its contents (a nested list's repr could recurse too deep)."""
    if isinstance(value, int) and value not in INT_RANGE:
        return "an integer out of range"
    return f"a {type(value).__name__}"


_dispatcher: Dispatcher | None = None


def dispatcher() -> Dispatcher:
    global _dispatcher
    if _dispatcher is None:
        _dispatcher = Dispatcher()
    return _dispatcher


def _authenticate(header: str | None) -> User | None:
    """The user of HTTP basic ``user:token`` (or ``Token <t>``); None without credentials."""
    if not header:
        return None
    scheme, _, value = header.strip().partition(" ")
    if scheme.lower() != "basic":
        return authenticate(header)
    try:
        username, sep, token = base64.b64decode(value.strip(), validate=True).decode("utf-8").partition(":")
    except (binascii.Error, UnicodeDecodeError):
        raise Unauthorized("bad Authorization header: expected HTTP basic 'user:token'") from None
    if not sep or not username or not token:
        raise Unauthorized("bad credentials: expected 'user:token' (a token from 'pumice-master tokens "
                           "create --user NAME')")
    try:
        user = authenticate(f"Token {token}")
    except Unauthorized:
        raise Unauthorized(f"invalid token for user {username!r}: create one with 'pumice-master tokens "
                           f"create --user {username}'") from None
    if user is None or user.username != username:
        raise Unauthorized(f"invalid token for user {username!r}: that token belongs to another user")
    return user


class _BoundedUnmarshaller(Unmarshaller):
    """xmlrpc.client's unmarshaller within the limits of what users send: arrays and structs
    nested at most ``max_depth`` deep, integers of at most ``max_int_digits`` characters (the
    stdlib builds any nesting, and int() of 5000 digits raises a ValueError)."""

    def __init__(self, limits: bounded.Limits) -> None:
        super().__init__()
        self.limits = limits

    def start(self, tag: str, attrs: Any) -> None:
        super().start(tag, attrs)
        if len(self._marks) > self.limits.max_depth:
            raise bounded.LimitExceeded(f"arrays and structs nested deeper than {self.limits.max_depth} levels "
                                        "(limit max_depth)", "max_depth")

    def end_int(self, data: str) -> None:
        if len(data.strip()) > self.limits.max_int_digits:
            raise bounded.LimitExceeded(f"an integer of {len(data.strip())} characters; at most "
                                        f"{self.limits.max_int_digits} (limit max_int_digits)", "max_int_digits")
        super().end_int(data)


# the stdlib's table of end handlers names its own end_int: each integer tag gets ours
_BoundedUnmarshaller.dispatch = {tag: _BoundedUnmarshaller.end_int if func is Unmarshaller.end_int else func
                                 for tag, func in Unmarshaller.dispatch.items()}


def parse_call(body: bytes, limits: bounded.Limits) -> tuple[tuple[Any, ...], str | None]:
    """``(params, method name)`` of an XML-RPC call, as ``xmlrpc.client.loads`` returns them,
    within ``limits`` (expat itself refuses entity expansion bombs)."""
    unmarshaller = _BoundedUnmarshaller(limits)
    parser = ExpatParser(unmarshaller)
    parser.feed(body)
    parser.close()
    return unmarshaller.close(), unmarshaller.getmethodname()


def handle(body: bytes, authorization: str | None) -> bytes:
    """One XML-RPC request: the response document (a result or a fault), logged when it fails."""
    method_name, who = "?", "anonymous"
    try:
        limit = current().max_body
        if len(body) > limit:
            raise Fault(413, f"request of {len(body)} bytes is over the limit of {limit} bytes")
        try:
            params, method_name = parse_call(body, current().limits)
        except bounded.LimitExceeded as exc:
            raise Fault(400, f"the request is over a limit: {exc}") from None
        except Exception as exc:
            raise Fault(400, f"the request is not an XML-RPC call: {exc}") from None
        with connection():
            try:
                user = _authenticate(authorization)
            except ServiceError as exc:
                raise Fault(exc.status, exc.message) from None
            who = user.username if user else "anonymous"
            token = _caller.set(user)
            try:
                result = dispatcher()._dispatch(method_name, params)
            finally:
                _caller.reset(token)
        return _document(dumps((result,), methodresponse=True, allow_none=True, encoding="utf-8"))
    except Fault as fault:
        if fault.faultCode != StorageFull.status:  # a full disk is logged once a minute (master.diskfull)
            log.warning("XML-RPC %s by %s: fault %s: %s", method_name, who, fault.faultCode, fault.faultString)
        return _document(dumps(fault, allow_none=True, encoding="utf-8"))
    except Exception:
        log.exception("XML-RPC %s by %s failed", method_name, who)
        fault = Fault(INTERNAL_ERROR, "internal error in the master; the admins can find the details in its log")
        return _document(dumps(fault, allow_none=True, encoding="utf-8"))


#: characters XML 1.0 cannot carry, even as references: control characters, lone surrogates
_NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")


def _document(text: str) -> bytes:
    """A response document any XML parser reads: a user's text echoed in a fault or stored in a
    job (``"\\x1f"`` in a double-quoted YAML string) may hold characters XML forbids; each becomes
    U+FFFD."""
    return _NOT_XML.sub("\ufffd", text).encode("utf-8")


def install(app: Bottle) -> None:
    """Serve the XML-RPC API at ``/RPC2`` on the REST API's Bottle app."""

    def rpc() -> HTTPResponse:
        body = request.body.read() if request.content_length else b""
        return HTTPResponse(handle(body, request.get_header("Authorization")), status=200,
                            headers={"Content-Type": "text/xml; charset=utf-8"})

    def rpc_help() -> HTTPResponse:
        text = (f"LAVA XML-RPC API of this Pumice master: POST XML-RPC calls to {PATH} (HTTP basic "
                "user:token). Methods:\n\n" + "\n".join(sorted(METHODS)) + "\n")
        return HTTPResponse(text, status=200, headers={"Content-Type": "text/plain; charset=utf-8"})

    for path in (PATH, PATH + "/"):
        app.route(path, "POST", rpc)
        app.route(path, "GET", rpc_help)


# ---- remote tokens (lavacli tokens) ----

@method("scheduler.remote_artifact_tokens.list")
def remote_tokens_list(user: User | None) -> list[dict[str, str]]:
    """scheduler.remote_artifact_tokens.list(): the caller's named remote tokens, [{name, token}]."""
    return remote_tokens.list_tokens(user)


@method("scheduler.remote_artifact_tokens.show")
def remote_tokens_show(user: User | None, name: str) -> str:
    """scheduler.remote_artifact_tokens.show(name): the value of the caller's token ``name``."""
    return remote_tokens.show_token(user, name)


@method("scheduler.remote_artifact_tokens.add")
def remote_tokens_add(user: User | None, name: str, token: str) -> None:
    """scheduler.remote_artifact_tokens.add(name, token): set the caller's token ``name`` (a job's
    ``notify: callback: token: name`` sends it)."""
    remote_tokens.add_token(user, name, token)


@method("scheduler.remote_artifact_tokens.delete")
def remote_tokens_delete(user: User | None, name: str) -> None:
    """scheduler.remote_artifact_tokens.delete(name): remove the caller's token ``name``."""
    remote_tokens.delete_token(user, name)


# ---- the event stream ----

@method("scheduler.get_publisher_event_socket")
def get_publisher_event_socket(user: User | None) -> str:
    """scheduler.get_publisher_event_socket(): the ZeroMQ endpoint of the event stream (as configured,
    e.g. ``tcp://*:5500``: '*' stands for this master's host); '' when the master publishes none."""
    return current().event_socket


# ---- LAVA's older scheduler methods (SQUAD, Mesa CI and KernelCI scripts call them) ----

@method("scheduler.submit_job")
def submit_job(user: User | None, definition: str) -> int | list[int]:
    """scheduler.submit_job(definition): as scheduler.jobs.submit (the older name SQUAD calls)."""
    return jobs_submit(user, definition)


@method("scheduler.cancel_job")
def cancel_job(user: User | None, job_id: str | int) -> bool:
    """scheduler.cancel_job(job_id): as scheduler.jobs.cancel."""
    return jobs_cancel(user, job_id)


@method("scheduler.resubmit_job")
def resubmit_job(user: User | None, job_id: str | int) -> int | list[int]:
    """scheduler.resubmit_job(job_id): as scheduler.jobs.resubmit."""
    return jobs_resubmit(user, job_id)


@method("scheduler.job_details")
def job_details(user: User | None, job_id: str | int) -> dict[str, Any]:
    """scheduler.job_details(job_id): the job's fields as LAVA returns them (status is the legacy
    name: Submitted, Running, Complete, Incomplete, Canceled, Canceling; definition with its secrets
    redacted; times as XML-RPC dateTime)."""
    job = jobs.get_job(job_id, user)
    record = jobs.job_records([job.id])[0]
    definition = jobs.job_definition(job.id, user)
    return {
        "id": job.id, "sub_id": "", "target_group": None, "is_pipeline": True, "pipeline_compatibility": 0,
        "status": LEGACY_NAMES[legacy_status(job.state, job.health)], "state": job.state, "health": job.health,
        "submitter_id": job.submitter_id, "submitter_username": record["submitter"],
        "description": job.name, "priority": job.priority, "health_check": bool(job.health_check),
        "is_public": job.visibility == "public", "visibility": _visibility(job.visibility),
        "submit_time": _time(record["submit_time"]), "start_time": _time(record["start_time"]),
        "end_time": _time(record["end_time"]), "failure_comment": job.failure_comment,
        "actual_device_id": record["device"], "requested_device_type_id": record["device_type"],
        "definition": definition, "original_definition": definition, "multinode_definition": "",
        "absolute_url": f"/scheduler/job/{job.id}",
    }


@method("scheduler.job_state")
def job_state(user: User | None, job_id: str | int) -> dict[str, Any]:
    """scheduler.job_state(job_id): {job_id, job_state} (Submitted ... Finished)."""
    job = jobs.get_job(job_id, user)
    return {"job_id": job.id, "job_state": job.state}


@method("scheduler.job_health")
def job_health(user: User | None, job_id: str | int) -> dict[str, Any]:
    """scheduler.job_health(job_id): {job_id, job_health} (Unknown, Complete, Incomplete, Canceled)."""
    job = jobs.get_job(job_id, user)
    return {"job_id": job.id, "job_health": job.health}
