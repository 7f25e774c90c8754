"""REST handlers of notifications and remote tokens (in :mod:`master.rest`'s route table).

- ``GET /jobs/<id>/notifications/``: the job's callbacks and emails with every attempt.
- ``/remote-artifact-tokens/`` (LAVA's path): the caller's named tokens; GET lists, POST
  ``{"name", "token"}`` sets one, ``GET|DELETE /remote-artifact-tokens/<name>/``.
"""

from __future__ import annotations

from typing import Any

from bottle import response

from master import remote_tokens
from master.outbox import job_notifications
from master.rest import TEXT, body_fields, created, listing, route, user


@route("/jobs/<job_id>/notifications/")
def notifications(job_id: str) -> dict[str, Any]:
    return listing(job_notifications(job_id, user()))


@route("/remote-artifact-tokens/")
def list_remote_tokens() -> dict[str, Any]:
    return listing(remote_tokens.list_tokens(user()))


@route("/remote-artifact-tokens/", "POST")
def add_remote_token() -> dict[str, str]:
    fields = body_fields(name=TEXT, token=TEXT)
    return created(remote_tokens.add_token(user(), fields.get("name"), fields.get("token") or ""))


@route("/remote-artifact-tokens/<name>/")
def show_remote_token(name: str) -> dict[str, str]:
    return {"name": name, "token": remote_tokens.show_token(user(), name)}


@route("/remote-artifact-tokens/<name>/", "DELETE")
def delete_remote_token(name: str) -> None:
    remote_tokens.delete_token(user(), name)
    response.status = 204

