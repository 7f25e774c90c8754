"""LAVA's web paths that CI systems read besides the API: SQUAD downloads a job's log from
``/scheduler/job/<id>/log_file/plain?user=NAME&token=TOKEN`` (the output.yaml, as LAVA serves it),
and KernelCI asks for ``/api/v0.2/jobs/<id>`` without the trailing slash (DRF redirects it).
"""

from __future__ import annotations

from typing import Any

from bottle import Bottle, HTTPResponse, redirect, request, static_file

from master import jobs
from master.errors import Unauthorized
from master.instance import current
from master.models import User
from master.rest import PREFIX, api_call
from master.users import authenticate

PLAIN_LOG = "/scheduler/job/<job_id>/log_file/plain"


def _query_user() -> User | None:
    """LAVA's ``?user=NAME&token=TOKEN`` credentials (both or neither; a wrong pair is refused)."""
    name, token = request.query.getunicode("user"), request.query.getunicode("token")
    if not name and not token:
        return None
    who = authenticate(f"Token {token}") if token else None
    if who is None or who.username != name:
        raise Unauthorized("the user and token in the URL do not match")
    return who


def log_file_plain(job_id: str) -> Any:
    """The job's output.yaml as a download (LAVA's ``log_file/plain``)."""
    user = request.environ.get("pumice.user") or _query_user()
    job = jobs.get_job(job_id, user)
    job_dir = current().store.job_dir(job.id)
    if not (job_dir / "output.yaml").exists():
        return HTTPResponse(b"", status=404)
    # streamed from the file (a log may be 250,000 lines), with Range support
    return static_file("output.yaml", root=str(job_dir), mimetype="application/yaml",
                       download=f"job_{job.id}.log")


def install(app: Bottle) -> None:
    app.route(PLAIN_LOG, method="GET", callback=api_call(log_file_plain))

    def job_without_slash(job_id: str) -> None:
        query = request.query_string
        redirect(f"{PREFIX}/jobs/{job_id}/" + (f"?{query}" if query else ""), 301)

    app.route(f"{PREFIX}/jobs/<job_id:int>", method="GET", callback=job_without_slash)
