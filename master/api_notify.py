"""REST handlers of notifications and remote tokens (registered by :func:`install` in make_app).

- ``GET /jobs/<id>/notifications/``: the job's callbacks and emails with every attempt.
- ``/remote-artifact-tokens/`` (LAVA's path): the caller's named tokens; GET lists, POST
  ``{"name", "token"}`` sets one, ``GET|DELETE /remote-artifact-tokens/<name>/``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from bottle import response

from master import remote_tokens
from master.api import TEXT, body_fields, user
from master.outbox import job_notifications


def notifications(job_id: str) -> dict[str, Any]:
    rows = job_notifications(job_id, user())
    return {"count": len(rows), "next": None, "previous": None, "results": rows}


def list_remote_tokens() -> dict[str, Any]:
    rows = remote_tokens.list_tokens(user())
    return {"count": len(rows), "next": None, "previous": None, "results": rows}


def add_remote_token() -> dict[str, str]:
    fields = body_fields(name=TEXT, token=TEXT)
    record = remote_tokens.add_token(user(), fields.get("name"), fields.get("token") or "")
    response.status = 201
    return record


def show_remote_token(name: str) -> dict[str, str]:
    return {"name": name, "token": remote_tokens.show_token(user(), name)}


def delete_remote_token(name: str) -> None:
    remote_tokens.delete_token(user(), name)
    response.status = 204


def install(route: Callable[..., Callable]) -> None:
    """Register the handlers with make_app's ``route``."""
    route("/jobs/<job_id>/notifications/")(notifications)
    route("/remote-artifact-tokens/")(list_remote_tokens)
    route("/remote-artifact-tokens/", "POST")(add_remote_token)
    route("/remote-artifact-tokens/<name>/")(show_remote_token)
    route("/remote-artifact-tokens/<name>/", "DELETE")(delete_remote_token)
