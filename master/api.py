"""The REST API (LAVA v0.2 paths where LAVA has them): a thin Bottle layer over the service layer.

``make_app()`` returns the WSGI app. Every route runs inside one wrapper that opens the database
connection, authenticates ``Authorization: Token <t>`` (an invalid token is a 401 even where
anonymous access is allowed), enforces the body size limit and turns service errors into JSON:
``{"error": "...", "faults": [{"path": ..., "line": ..., "message": ...}]}``. A full data directory or
database is a 507 saying so (:mod:`master.diskfull`), logged once a minute, not per request.
"""

from __future__ import annotations

import functools
import json
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from bottle import Bottle, HTTPError, HTTPResponse, request, response

from agent.errors import Fault
from master import certificates, diskfull, jobs, lab
from master.db import connection
from master.errors import Invalid, ServiceError, TooLarge
from master.instance import current
from master.users import authenticate
from results import bounded

log = logging.getLogger("pumice.api")

PREFIX = "/api/v0.2"
YAML_TYPE = "application/yaml; charset=utf-8"


def _version() -> str:
    from agent import __version__

    return __version__


# ---- request helpers ----

def user():
    """The authenticated user of this request (None: anonymous)."""
    return request.environ.get("pumice.user")


def _body_bytes() -> bytes:
    return request.body.read() if request.content_length else b""


def body_text() -> str:
    try:
        return _body_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise Invalid(f"the request body is not UTF-8 text (byte {exc.start})") from None


def _is_json() -> bool:
    return (request.content_type or "").split(";")[0].strip().lower() == "application/json"


def body_json() -> dict[str, Any]:
    """The JSON object of the body (an empty body is an empty object), within the limits."""
    text = body_text()
    if not text.strip():
        return {}
    try:
        data = bounded.load_json(text, current().limits)
    except json.JSONDecodeError as exc:
        raise Invalid(f"the request body is not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})",
                      ) from None
    except bounded.LimitExceeded as exc:
        raise Invalid(f"the request body is over a limit: {exc}",
                      [Fault(bounded.format_path(exc.path), exc.message, exc.line)]) from None
    if not isinstance(data, dict):
        raise Invalid(f"the request body must be a JSON object, not {type(data).__name__}")
    return data


#: the JSON types a field of a body may have (a form's fields are all text)
TEXT: tuple[type, ...] = (str,)
NUMBER: tuple[type, ...] = (int, str)
FLAG: tuple[type, ...] = (bool, int, str)
NAMES: tuple[type, ...] = (list, str)


def body_fields(**types: tuple[type, ...]) -> dict[str, Any]:
    """The fields of a JSON object body, or of a form: only those named in ``types``, each of one
    of its types or null (else a 400 naming the field), so no service function ever gets a list
    where it expects a name."""
    if not _is_json():
        return {key: request.forms.getunicode(key) for key in request.forms if key in types}
    data = body_json()
    fields = {}
    for key, allowed in types.items():
        value = data.get(key)
        if value is not None and not isinstance(value, allowed):
            names = " or ".join({str: "text", int: "a whole number", bool: "true or false", list: "a list"}[t]
                                for t in allowed)
            raise Invalid(f"field {key} must be {names}, not {type(value).__name__}",
                          [Fault(key, f"must be {names}, not {type(value).__name__}")])
        if key in data:
            fields[key] = value
    return fields


def text_field(name: str) -> str:
    """A text document sent as ``{"<name>": text}`` JSON, as a form field, or as the raw body.

    ``curl --data-binary @job.yaml`` sends a raw body labelled as a form: a form is recognised only
    when the body starts with ``<name>=``.
    """
    if _is_json():
        value = body_json().get(name)
        if not isinstance(value, str):
            raise Invalid(f"the JSON body needs a string field {name!r}")
        return value
    ctype = (request.content_type or "").split(";")[0].strip().lower()
    if ctype == "multipart/form-data" or (ctype == "application/x-www-form-urlencoded"
                                          and _body_bytes()[:len(name) + 1] == f"{name}=".encode()):
        value = request.forms.getunicode(name)
        if value is None:
            raise Invalid(f"the form needs a field {name!r}")
        return value
    return body_text()


def _int_param(name: str, default: int | None) -> int | None:
    value = request.query.get(name)
    if value in (None, ""):
        return default
    try:
        return int(value)
    except ValueError:
        raise Invalid(f"query parameter {name} must be a number, not {value!r}") from None


def _bool(value: Any) -> bool:
    return value if isinstance(value, bool) else str(value).lower() in ("1", "true", "yes", "on")


def _page(count: int, results: list, limit: int, offset: int) -> dict[str, Any]:
    """A DRF-style page (what lavacli and LAVA clients expect)."""
    base = request.url.split("?")[0]
    query = dict(request.query.decode())

    def link(new_offset: int) -> str:
        params = {**query, "limit": str(limit), "offset": str(max(0, new_offset))}
        return base + "?" + "&".join(f"{k}={v}" for k, v in params.items())

    return {
        "count": count,
        "next": link(offset + limit) if offset + limit < count else None,
        "previous": link(offset - limit) if offset > 0 else None,
        "results": results,
    }


def _text(body: str, content_type: str = "text/plain; charset=utf-8") -> str:
    response.content_type = content_type
    return body


# ---- authentication, with verified tokens cached ----

#: how long a verified token is trusted without asking the database again. Short: a token's user
#: changed by ``pumice-master tokens create --admin`` (another process) is seen within this time.
TOKEN_CACHE_SECONDS = 5.0
_TOKEN_CACHE_SIZE = 1024
_verified: dict[str, tuple[float, Any]] = {}
_verified_lock = threading.Lock()


def authenticate_request(header: str | None) -> Any:
    """The user of an ``Authorization`` header (None: anonymous), a database lookup at most every
    :data:`TOKEN_CACHE_SECONDS` per token (it was a third of a submission's time). A bad token is
    never cached: it is refused by :func:`master.users.authenticate` every time."""
    if not header:
        return None
    now = time.monotonic()
    hit = _verified.get(header)
    if hit is not None and hit[0] > now:
        return hit[1]
    who = authenticate(header)
    with _verified_lock:
        if len(_verified) >= _TOKEN_CACHE_SIZE:
            _verified.clear()
        _verified[header] = (now + TOKEN_CACHE_SECONDS, who)
    return who


def forget_tokens() -> None:
    """Drop every cached verification (tests, and after a change to users in this process)."""
    with _verified_lock:
        _verified.clear()


# ---- the wrapper every route runs in ----

def _json_error(status: int, message: str, faults: list | None = None) -> HTTPResponse:
    body = json.dumps({"error": message, "faults": faults or []})
    return HTTPResponse(body, status=status, headers={"Content-Type": "application/json"})


def api_call(callback: Callable) -> Callable:
    """Connection, authentication, body limit, and errors as JSON around one route."""

    @functools.wraps(callback)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            limit = current().max_body
            if (request.content_length or 0) > limit:
                raise TooLarge(f"request body of {request.content_length} bytes is over the limit of "
                               f"{limit} bytes")
            with connection():
                request.environ["pumice.user"] = authenticate_request(request.get_header("Authorization"))
                return callback(*args, **kwargs)
        except ServiceError as exc:
            return HTTPResponse(json.dumps(exc.to_dict()), status=exc.status,
                                headers={"Content-Type": "application/json"})
        except (HTTPResponse, HTTPError):
            raise
        except Exception as exc:
            if diskfull.is_full(exc):  # 507, and the condition logged once a minute
                error = diskfull.refusal(exc, f"{request.method} {request.path}")
                return HTTPResponse(json.dumps(error.to_dict()), status=error.status,
                                    headers={"Content-Type": "application/json"})
            log.exception("%s %s failed", request.method, request.path)
            return _json_error(500, "internal error in the master; the admins can find the details "
                                    "in its log")

    return wrapper


def make_app() -> Bottle:
    """The WSGI application of the REST API."""
    app = Bottle(autojson=True)

    def error_page(res: HTTPError) -> str:
        res.set_header("Content-Type", "application/json")
        message = {404: f"no such API endpoint: {request.method} {request.path}",
                   405: f"method {request.method} not allowed on {request.path}"}.get(
            res.status_code, str(res.body or res.status_line))
        return json.dumps({"error": message, "faults": []})

    app.default_error_handler = error_page  # type: ignore[method-assign]

    def route(path: str, method: str | list[str] = "GET") -> Callable:
        def decorate(callback: Callable) -> Callable:
            app.route(PREFIX + path, method=method, callback=api_call(callback))
            return callback
        return decorate

    # ---- system ----

    @route("/system/version/")
    def version() -> dict:
        return {"version": _version()}

    @route("/system/whoami/")
    def whoami() -> dict:
        who = user()
        return {"user": who.username if who else None, "admin": bool(who and who.is_admin)}

    # ---- jobs ----

    @route("/jobs/")
    def list_jobs() -> dict:
        limit = _int_param("limit", 50) or 0
        offset = _int_param("offset", 0) or 0
        filters = {key: request.query.get(key) for key in jobs.JOB_FILTERS if request.query.get(key)}
        count, records = jobs.list_jobs(user(), limit=limit, offset=offset,
                                        ordering=request.query.get("ordering") or "-id", **filters)
        return _page(count, records, limit, offset)

    @route("/jobs/", "POST")
    def submit() -> dict:
        ids = jobs.submit_job(text_field("definition"), user())
        response.status = 201
        return {"message": "job(s) successfully submitted", "job_ids": ids}

    @route("/jobs/validate/", "POST")
    def validate() -> dict:
        faults = jobs.validate_definition(text_field("definition"))
        return {"valid": not faults, "faults": [{"path": f.path, "line": f.line, "message": f.message}
                                                for f in faults]}

    @route("/jobs/<job_id>/")
    def show_job(job_id: str) -> dict:
        return jobs.show_job(job_id, user())

    @route("/jobs/<job_id>/definition/")
    def definition(job_id: str) -> str:
        return _text(jobs.job_definition(job_id, user()), YAML_TYPE)

    @route("/jobs/<job_id>/cancel/", "POST")
    def cancel(job_id: str) -> dict:
        return jobs.cancel_job(job_id, user())

    @route("/jobs/<job_id>/resubmit/", "POST")
    def resubmit(job_id: str) -> dict:
        ids = jobs.resubmit_job(job_id, user())
        response.status = 201
        return {"message": "job(s) successfully submitted", "job_ids": ids}

    @route("/jobs/<job_id>/logs/")
    def logs(job_id: str) -> str:
        lines = jobs.job_logs(job_id, user(), _int_param("start", 0) or 0, _int_param("end", None))
        return _text("".join(line + "\n" for line in lines), YAML_TYPE)

    def results_as(job_id: str, fmt: str) -> str:
        from results.export import to_csv, to_junit, to_tap13

        if fmt == "yaml":
            return _text(jobs.job_bundle(job_id, user()), YAML_TYPE)
        rows = jobs.job_results(job_id, user())
        job = str(int(job_id))
        if fmt == "junit":
            return _text(to_junit(job, rows), "application/xml; charset=utf-8")
        if fmt == "tap13":
            return _text(to_tap13(job, rows))
        if fmt == "csv":
            return _text(to_csv(job, rows), "text/csv; charset=utf-8")
        raise Invalid(f"unknown results format {fmt!r}; allowed: yaml, junit, tap13, csv")

    @route("/jobs/<job_id>/results/")
    def results(job_id: str) -> str:
        return results_as(job_id, request.query.get("format") or "yaml")

    for fmt in ("yaml", "junit", "tap13", "csv"):
        route(f"/jobs/<job_id>/{fmt}/")(functools.partial(results_as, fmt=fmt))

    @route("/jobs/<job_id>/suites/")
    def suites(job_id: str) -> dict:
        items = jobs.job_suites(job_id, user())
        return _page(len(items), items, len(items), 0)

    @route("/jobs/<job_id>/tests/")
    def tests(job_id: str) -> dict:
        items = [r.to_dict() for r in jobs.job_results(job_id, user())]
        return _page(len(items), items, len(items), 0)

    # ---- bundles ----

    @route("/bundles/", "POST")
    def upload_bundle() -> dict:
        reply = jobs.upload_bundle(text_field("bundle"), user())
        response.status = 201 if reply["created"] else 200
        return reply

    # ---- devices ----

    @route("/devices/")
    def list_devices() -> dict:
        items = lab.list_devices(**{k: request.query.get(k) for k in ("device_type", "worker", "state",
                                                                      "health", "tag")})
        return _page(len(items), items, len(items), 0)

    @route("/devices/", "POST")
    def add_device() -> dict:
        data = body_fields(hostname=TEXT, device_type=TEXT, worker=TEXT, tags=NAMES, description=TEXT, health=TEXT,
                           dictionary=TEXT)
        hostname, device_type = data.get("hostname"), data.get("device_type")
        if not hostname or not device_type:
            raise Invalid("a device needs a hostname and a device_type")
        record = lab.add_device(user(), hostname, device_type, worker=data.get("worker"),
                                tags=_list(data.get("tags")), description=data.get("description") or "",
                                health=data.get("health") or "Unknown", dictionary=data.get("dictionary"))
        response.status = 201
        return record

    @route("/devices/<hostname>/")
    def show_device(hostname: str) -> dict:
        return lab.show_device(hostname)

    @route("/devices/<hostname>/", ["PUT", "PATCH"])
    def update_device(hostname: str) -> dict:
        data = body_fields(health=TEXT, description=TEXT, device_type=TEXT, worker=TEXT, tags=NAMES)
        changes: dict[str, Any] = {k: data[k] for k in ("health", "description", "device_type") if k in data}
        if "worker" in data:
            changes["worker"] = data["worker"]
        if "tags" in data:
            changes["tags"] = _list(data["tags"])
        return lab.update_device(user(), hostname, **changes)

    @route("/devices/<hostname>/dictionary/")
    def get_dictionary(hostname: str) -> dict:
        if _bool(request.query.get("render", "")):
            return {"device": hostname, "dictionary": lab.review_dictionary(hostname)}
        return {"device": hostname, "dictionary": lab.get_dictionary(hostname)}

    @route("/devices/<hostname>/dictionary/", ["POST", "PUT"])
    def set_dictionary(hostname: str) -> dict:
        lab.set_dictionary(user(), hostname, text_field("dictionary"))
        return {"device": hostname, "dictionary": lab.get_dictionary(hostname)}

    # ---- device types ----

    @route("/devicetypes/")
    def list_device_types() -> dict:
        items = lab.list_device_types()
        return _page(len(items), items, len(items), 0)

    @route("/devicetypes/", "POST")
    def add_device_type() -> dict:
        data = body_fields(name=TEXT, description=TEXT, template=TEXT, health_check=TEXT, health_frequency=NUMBER,
                           health_denominator=TEXT, display=FLAG)
        if not data.get("name"):
            raise Invalid("a device type needs a name")
        record = lab.add_device_type(
            user(), data["name"], description=data.get("description") or "", template=data.get("template"),
            health_check=data.get("health_check"), health_frequency=data.get("health_frequency") or 24,
            health_denominator=data.get("health_denominator") or "hours",
            display=_bool(data.get("display", True)))
        response.status = 201
        return record

    @route("/devicetypes/<name>/")
    def show_device_type(name: str) -> dict:
        return lab.device_type_record(lab.get_device_type(name))

    @route("/devicetypes/<name>/", ["PUT", "PATCH"])
    def update_device_type(name: str) -> dict:
        data = body_fields(description=TEXT, health_frequency=NUMBER, health_denominator=TEXT, display=FLAG)
        return lab.update_device_type(
            user(), name, description=data.get("description"),
            health_frequency=data.get("health_frequency") or None,
            health_denominator=data.get("health_denominator"),
            display=_bool(data["display"]) if "display" in data else None)

    @route("/devicetypes/<name>/template/")
    def get_template(name: str) -> dict:
        return {"name": name, "template": lab.device_type_template(name)}

    @route("/devicetypes/<name>/template/", ["POST", "PUT"])
    def set_template(name: str) -> dict:
        lab.set_device_type_template(user(), name, text_field("template"))
        return {"name": name, "template": lab.device_type_template(name)}

    @route("/devicetypes/<name>/health_check/")
    def get_health_check(name: str) -> dict:
        return {"name": name, "health_check": lab.health_check_definition(name)}

    @route("/devicetypes/<name>/health_check/", ["POST", "PUT"])
    def set_health_check(name: str) -> dict:
        lab.set_health_check(user(), name, text_field("health_check"))
        return {"name": name, "health_check": lab.health_check_definition(name)}

    # ---- workers ----

    @route("/workers/")
    def list_workers() -> dict:
        items = lab.list_workers()
        return _page(len(items), items, len(items), 0)

    @route("/workers/", "POST")
    def add_worker() -> dict:
        data = body_fields(hostname=TEXT, description=TEXT, disabled=FLAG, job_limit=NUMBER)
        if not data.get("hostname"):
            raise Invalid("a worker needs a hostname")
        record = lab.add_worker(user(), data["hostname"], description=data.get("description") or "",
                                disabled=_bool(data.get("disabled", False)),
                                job_limit=data.get("job_limit") or 0)
        response.status = 201
        return record

    @route("/workers/<hostname>/")
    def show_worker(hostname: str) -> dict:
        return lab.show_worker(hostname)

    @route("/workers/<hostname>/", ["PUT", "PATCH"])
    def update_worker(hostname: str) -> dict:
        data = body_fields(description=TEXT, health=TEXT, job_limit=NUMBER)
        return lab.update_worker(user(), hostname, description=data.get("description"),
                                 health=data.get("health"),
                                 job_limit=data.get("job_limit") if data.get("job_limit") != "" else None)

    for what in ("env", "config"):
        def get_text(hostname: str, what: str = what) -> dict:
            lab.get_worker(hostname)
            return {"hostname": hostname, what: lab.worker_text(hostname, what)}

        def set_text(hostname: str, what: str = what) -> dict:
            lab.set_worker_text(user(), hostname, what, text_field(what))
            return {"hostname": hostname, what: lab.worker_text(hostname, what)}

        route(f"/workers/<hostname>/{what}/")(get_text)
        route(f"/workers/<hostname>/{what}/", ["PUT", "POST"])(set_text)

    # ---- CURVE keys and enrolment (master.certificates) ----

    @route("/system/certificate/")
    def master_certificate() -> dict:
        return certificates.master_certificate()

    @route("/workers/<hostname>/certificate/")
    def worker_certificate(hostname: str) -> dict:
        return certificates.worker_certificate(user(), hostname)

    @route("/workers/<hostname>/certificate/", ["POST", "PUT"])
    def set_worker_certificate(hostname: str) -> dict:
        return certificates.set_worker_key(user(), hostname, text_field("certificate"))

    @route("/workers/<hostname>/certificate/", "DELETE")
    def revoke_worker_certificate(hostname: str) -> dict:
        return certificates.revoke_worker_key(user(), hostname)

    @route("/workers/<hostname>/join-token/", "POST")
    def issue_join_token(hostname: str) -> dict:
        reply = certificates.issue_join_token(user(), hostname, body_fields().get("lifetime"))
        response.status = 201
        return reply

    @route("/workers/<hostname>/join/", "POST")
    def join(hostname: str) -> dict:
        data = body_json()
        reply = certificates.join(hostname, data.get("token"), data.get("public_key"))
        response.status = 201
        return reply

    from master.api_notify import install as install_notify

    install_notify(route)
    from master.api_lava import install as install_lava_paths

    install_lava_paths(app, PREFIX)

    # LAVA's XML-RPC API (lavacli) at /RPC2: the same service layer behind a second front door
    from master.xmlrpc import install as install_xmlrpc

    install_xmlrpc(app)
    return app


def _list(value: Any) -> list[str]:
    """Tags given as a JSON list or a comma-separated string."""
    if value is None or value == "":
        return []
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return value
    raise Invalid(f"tags must be a list of names or a comma-separated string, not {value!r}")

