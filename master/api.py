"""The REST API (LAVA v0.2 paths where LAVA has them): a thin Bottle layer over the service layer.

Each handler is a plain module-level function registered in :mod:`master.rest`'s route table;
:func:`make_app` returns the WSGI app with every route of the table (this module's, the
notifications' and remote tokens' of :mod:`master.api_notify`), LAVA's extra web paths
(:mod:`master.api_lava`) and LAVA's XML-RPC at /RPC2.
"""

from __future__ import annotations

import functools
from typing import Any

from bottle import Bottle, request, response

from master import bundles, certificates, inventory, jobs
from master.errors import Invalid
from master.rest import (
    FLAG,
    NAMES,
    NUMBER,
    PREFIX,
    ROUTES,
    TEXT,
    YAML_TYPE,
    api_call,
    as_bool,
    body_fields,
    body_json,
    created,
    error_page,
    int_param,
    listing,
    master_version,
    page,
    route,
    submitted,
    text_field,
    text_reply,
    user,
)


def make_app() -> Bottle:
    """The WSGI application of the REST API (and of LAVA's XML-RPC at /RPC2)."""
    from master import api_lava, api_notify  # noqa: F401  (their handlers join the route table)
    from master.xmlrpc import install as install_xmlrpc

    app = Bottle(autojson=True)
    app.default_error_handler = error_page  # type: ignore[method-assign]
    for path, methods, handler in ROUTES:
        app.route(PREFIX + path, method=list(methods), callback=api_call(handler))
    api_lava.install(app)
    # LAVA's XML-RPC API (lavacli) at /RPC2: the same service layer behind a second front door
    install_xmlrpc(app)
    return app


# ---- system ----

@route("/system/version/")
def version() -> dict:
    return {"version": master_version()}


@route("/system/whoami/")
def whoami() -> dict:
    who = user()
    return {"user": who.username if who else None, "admin": bool(who and who.is_admin)}


# ---- jobs ----

@route("/jobs/")
def list_jobs() -> dict:
    limit = int_param("limit", 50) or 0
    offset = int_param("offset", 0) or 0
    filters = {key: request.query.get(key) for key in jobs.JOB_FILTERS if request.query.get(key)}
    count, records = jobs.list_jobs(user(), limit=limit, offset=offset,
                                    ordering=request.query.get("ordering") or "-id", **filters)
    return page(count, records, limit, offset)


@route("/jobs/", "POST")
def submit() -> dict:
    return submitted(jobs.submit_job(text_field("definition"), user()))


@route("/jobs/validate/", "POST")
def validate() -> dict:
    faults = jobs.validate_definition(text_field("definition"))
    return {"valid": not faults, "faults": [fault.to_dict() for fault in faults]}


@route("/jobs/<job_id>/")
def show_job(job_id: str) -> dict:
    return jobs.show_job(job_id, user())


@route("/jobs/<job_id>/definition/")
def definition(job_id: str) -> str:
    return text_reply(jobs.job_definition(job_id, user()), YAML_TYPE)


@route("/jobs/<job_id>/cancel/", "POST")
def cancel(job_id: str) -> dict:
    return jobs.cancel_job(job_id, user())


@route("/jobs/<job_id>/resubmit/", "POST")
def resubmit(job_id: str) -> dict:
    return submitted(jobs.resubmit_job(job_id, user()))


@route("/jobs/<job_id>/logs/")
def logs(job_id: str) -> str:
    lines = jobs.job_logs(job_id, user(), int_param("start", 0) or 0, int_param("end", None))
    return text_reply("".join(line + "\n" for line in lines), YAML_TYPE)


RESULT_FORMATS = ("yaml", "junit", "tap13", "csv")


def results_as(job_id: str, fmt: str) -> str:
    """The job's results as a bundle (yaml), JUnit XML, TAP13 or CSV."""
    from results.export import to_csv, to_junit, to_tap13

    if fmt == "yaml":
        return text_reply(jobs.job_bundle(job_id, user()), YAML_TYPE)
    rows = jobs.job_results(job_id, user())
    job = str(int(job_id))
    if fmt == "junit":
        return text_reply(to_junit(job, rows), "application/xml; charset=utf-8")
    if fmt == "tap13":
        return text_reply(to_tap13(job, rows))
    if fmt == "csv":
        return text_reply(to_csv(job, rows), "text/csv; charset=utf-8")
    raise Invalid(f"unknown results format {fmt!r}; allowed: {', '.join(RESULT_FORMATS)}")


@route("/jobs/<job_id>/results/")
def results(job_id: str) -> str:
    return results_as(job_id, request.query.get("format") or "yaml")


for _format in RESULT_FORMATS:
    route(f"/jobs/<job_id>/{_format}/")(functools.partial(results_as, fmt=_format))


@route("/jobs/<job_id>/suites/")
def suites(job_id: str) -> dict:
    return listing(jobs.job_suites(job_id, user()))


@route("/jobs/<job_id>/tests/")
def tests(job_id: str) -> dict:
    return listing([r.to_dict() for r in jobs.job_results(job_id, user())])


# ---- bundles ----

@route("/bundles/", "POST")
def upload_bundle() -> dict:
    reply = bundles.upload_bundle(text_field("bundle"), user())
    response.status = 201 if reply["created"] else 200
    return reply


# ---- devices ----

@route("/devices/")
def list_devices() -> dict:
    return listing(inventory.list_devices(**{k: request.query.get(k)
                                               for k in ("device_type", "worker", "state", "health", "tag")}))


@route("/devices/", "POST")
def add_device() -> dict:
    data = body_fields(hostname=TEXT, device_type=TEXT, worker=TEXT, tags=NAMES, description=TEXT, health=TEXT,
                       dictionary=TEXT)
    hostname, device_type = data.pop("hostname", None), data.pop("device_type", None)
    if not hostname or not device_type:
        raise Invalid("a device needs a hostname and a device_type")
    if "tags" in data:
        data["tags"] = _list(data["tags"])
    return created(inventory.add_device(user(), hostname, device_type, **data))


@route("/devices/<hostname>/")
def show_device(hostname: str) -> dict:
    return inventory.show_device(hostname)


@route("/devices/<hostname>/", "PUT", "PATCH")
def update_device(hostname: str) -> dict:
    data = body_fields(health=TEXT, description=TEXT, device_type=TEXT, worker=TEXT, tags=NAMES)
    if "tags" in data:
        data["tags"] = _list(data["tags"])
    return inventory.update_device(user(), hostname, **data)


@route("/devices/<hostname>/dictionary/")
def get_dictionary(hostname: str) -> dict:
    if as_bool(request.query.get("render", "")):
        return {"device": hostname, "dictionary": inventory.device_yaml(hostname)}
    return {"device": hostname, "dictionary": inventory.get_dictionary(hostname)}


@route("/devices/<hostname>/dictionary/", "POST", "PUT")
def set_dictionary(hostname: str) -> dict:
    inventory.set_dictionary(user(), hostname, text_field("dictionary"))
    return {"device": hostname, "dictionary": inventory.get_dictionary(hostname)}


# ---- device types ----

@route("/devicetypes/")
def list_device_types() -> dict:
    return listing(inventory.list_device_types())


@route("/devicetypes/", "POST")
def add_device_type() -> dict:
    data = body_fields(name=TEXT, description=TEXT, template=TEXT, health_check=TEXT, health_frequency=NUMBER,
                       health_denominator=TEXT, display=FLAG)
    name = data.pop("name", None)
    if not name:
        raise Invalid("a device type needs a name")
    if "display" in data:
        data["display"] = as_bool(data["display"])
    return created(inventory.add_device_type(user(), name, **data))


@route("/devicetypes/<name>/")
def show_device_type(name: str) -> dict:
    return inventory.device_type_record(inventory.get_device_type(name))


@route("/devicetypes/<name>/", "PUT", "PATCH")
def update_device_type(name: str) -> dict:
    data = body_fields(description=TEXT, health_frequency=NUMBER, health_denominator=TEXT, display=FLAG)
    if "display" in data:
        data["display"] = as_bool(data["display"])
    return inventory.update_device_type(user(), name, **data)


@route("/devicetypes/<name>/template/")
def get_template(name: str) -> dict:
    return {"name": name, "template": inventory.device_type_template(name)}


@route("/devicetypes/<name>/template/", "POST", "PUT")
def set_template(name: str) -> dict:
    inventory.set_device_type_template(user(), name, text_field("template"))
    return {"name": name, "template": inventory.device_type_template(name)}


@route("/devicetypes/<name>/health_check/")
def get_health_check(name: str) -> dict:
    return {"name": name, "health_check": inventory.health_check_definition(name)}


@route("/devicetypes/<name>/health_check/", "POST", "PUT")
def set_health_check(name: str) -> dict:
    inventory.set_health_check(user(), name, text_field("health_check"))
    return {"name": name, "health_check": inventory.health_check_definition(name)}


# ---- workers ----

@route("/workers/")
def list_workers() -> dict:
    return listing(inventory.list_workers())


@route("/workers/", "POST")
def add_worker() -> dict:
    data = body_fields(hostname=TEXT, description=TEXT, disabled=FLAG, job_limit=NUMBER)
    hostname = data.pop("hostname", None)
    if not hostname:
        raise Invalid("a worker needs a hostname")
    if "disabled" in data:
        data["disabled"] = as_bool(data["disabled"])
    return created(inventory.add_worker(user(), hostname, **data))


@route("/workers/<hostname>/")
def show_worker(hostname: str) -> dict:
    return inventory.show_worker(hostname)


@route("/workers/<hostname>/", "PUT", "PATCH")
def update_worker(hostname: str) -> dict:
    return inventory.update_worker(user(), hostname, **body_fields(description=TEXT, health=TEXT, job_limit=NUMBER))


def get_worker_text(hostname: str, what: str) -> dict:
    """The worker's env or dispatcher configuration (``what``)."""
    inventory.get_worker(hostname)
    return {"hostname": hostname, what: inventory.worker_text(hostname, what)}


def set_worker_text(hostname: str, what: str) -> dict:
    inventory.set_worker_text(user(), hostname, what, text_field(what))
    return {"hostname": hostname, what: inventory.worker_text(hostname, what)}


for _what in ("env", "config"):
    route(f"/workers/<hostname>/{_what}/")(functools.partial(get_worker_text, what=_what))
    route(f"/workers/<hostname>/{_what}/", "PUT", "POST")(functools.partial(set_worker_text, what=_what))


# ---- CURVE keys and enrolment (master.certificates) ----

@route("/system/certificate/")
def master_certificate() -> dict:
    return certificates.master_certificate()


@route("/workers/<hostname>/certificate/")
def worker_certificate(hostname: str) -> dict:
    return certificates.worker_certificate(user(), hostname)


@route("/workers/<hostname>/certificate/", "POST", "PUT")
def set_worker_certificate(hostname: str) -> dict:
    return certificates.set_worker_key(user(), hostname, text_field("certificate"))


@route("/workers/<hostname>/certificate/", "DELETE")
def revoke_worker_certificate(hostname: str) -> dict:
    return certificates.revoke_worker_key(user(), hostname)


@route("/workers/<hostname>/join-token/", "POST")
def issue_join_token(hostname: str) -> dict:
    return created(certificates.issue_join_token(user(), hostname, body_fields().get("lifetime")))


@route("/workers/<hostname>/join/", "POST")
def join(hostname: str) -> dict:
    data = body_json()
    return created(certificates.join(hostname, data.get("token"), data.get("public_key")))


def _list(value: Any) -> list[str]:
    """Tags given as a JSON list or a comma-separated string."""
    if value is None or value == "":
        return []
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return value
    raise Invalid(f"tags must be a list of names or a comma-separated string, not {value!r}")

