"""The REST API's frame: request helpers, the wrapper every route runs in, and the route table.

Routes are a module-level table (:data:`ROUTES`, filled by the :func:`route` decorator, as
:mod:`master.xmlrpc`'s ``@method``); the handlers live in :mod:`master.api` (and
:mod:`master.api_notify`, :mod:`master.api_lava`), which build the WSGI app. Every route runs inside
one wrapper (:func:`api_call`) that opens the database connection, authenticates
``Authorization: Token <t>`` (an invalid token is a 401 even where anonymous access is allowed),
enforces the body size limit and turns service errors into JSON:
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

from bottle import HTTPError, HTTPResponse, request, response

from agent.errors import Fault
from master import diskfull
from master.db import connection
from master.errors import InternalError, Invalid, ServiceError, TooLarge
from master.instance import current
from master.users import authenticate
from results import bounded

log = logging.getLogger("pumice.api")

PREFIX = "/api/v0.2"
YAML_TYPE = "application/yaml; charset=utf-8"


def master_version() -> str:
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


def int_param(name: str, default: int | None) -> int | None:
    value = request.query.get(name)
    if value in (None, ""):
        return default
    try:
        return int(value)
    except ValueError:
        raise Invalid(f"query parameter {name} must be a number, not {value!r}") from None


def as_bool(value: Any) -> bool:
    return value if isinstance(value, bool) else str(value).lower() in ("1", "true", "yes", "on")


def page(count: int, results: list, limit: int, offset: int) -> dict[str, Any]:
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


def text_reply(body: str, content_type: str = "text/plain; charset=utf-8") -> str:
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


# ---- the wrapper every route runs in ----

def _json_response(error: ServiceError) -> HTTPResponse:
    """A refusal as the API's one error format (:meth:`master.errors.ServiceError.to_dict`)."""
    return HTTPResponse(json.dumps(error.to_dict()), status=error.status, headers={"Content-Type": "application/json"})


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
            return _json_response(exc)
        except (HTTPResponse, HTTPError):
            raise
        except Exception as exc:
            if diskfull.is_full(exc):  # 507, and the condition logged once a minute
                return _json_response(diskfull.refusal(exc, f"{request.method} {request.path}"))
            log.exception("%s %s failed", request.method, request.path)
            return _json_response(InternalError("internal error in the master; the admins can find the "
                                                "details in its log"))

    return wrapper


def error_page(res: HTTPError) -> str:
    """Bottle's own errors (no such path, a method not allowed) in the API's error format."""
    res.set_header("Content-Type", "application/json")
    message = {404: f"no such API endpoint: {request.method} {request.path}",
               405: f"method {request.method} not allowed on {request.path}"}.get(
        res.status_code, str(res.body or res.status_line))
    return json.dumps(ServiceError(message).to_dict())


# ---- the route table ----

#: every REST route: (path under :data:`PREFIX`, methods, handler); the handlers are the
#: module-level functions of master.api and its siblings, each callable on its own inside a request
ROUTES: list[tuple[str, tuple[str, ...], Callable]] = []


def route(path: str, *methods: str) -> Callable[[Callable], Callable]:
    """Register the decorated function as the handler of ``path`` (default method GET)."""

    def decorate(handler: Callable) -> Callable:
        ROUTES.append((path, methods or ("GET",), handler))
        return handler

    return decorate



def created(reply: Any) -> Any:
    response.status = 201
    return reply


def submitted(ids: list[int]) -> dict:
    return created({"message": "job(s) successfully submitted", "job_ids": ids})


def listing(items: list) -> dict:
    """A whole listing as one DRF-style page."""
    return page(len(items), items, len(items), 0)
