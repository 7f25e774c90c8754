"""A job's ``notify:`` block (LAVA 2023.01): checked at submission, matched at each state change,
turned into outbox rows in the same transaction as the change.

What LAVA's job schema allows is accepted with LAVA's meaning and defaults:

- ``criteria: {status: all|running|finished|complete|incomplete|canceled}``: ``all`` fires when the
  job starts Running and when it is Finished; ``running`` and ``finished`` on those states;
  ``complete``, ``incomplete``, ``canceled`` when it is Finished with that health.
- ``callback:`` or ``callbacks: [...]``, each ``url`` (LAVA's ``{ID}``-style fields substituted),
  ``method`` GET (default) or POST, ``dataset`` minimal (default), logs, results or all,
  ``content-type`` urlencoded (default) or json, ``token`` (a name of the submitter's remote tokens,
  else the value itself), ``header`` (default ``Authorization``; the token is sent bare).
- ``recipients: [{to: {method: email, user: NAME | email: ADDRESS}}]``; with neither recipients nor
  callbacks the submitter is the recipient. Each recipient is mailed once per job, as in LAVA.
- ``verbosity``: verbose, quiet (default) or status-only, for emails.

Refused as "not implemented" (never silently ignored): ``criteria.type`` (regression/progression),
``criteria.dependency_query``, ``compare``, and recipients with ``method: irc``.

Delivery is :mod:`master.outbox`'s; the payload is :mod:`master.jobdata`'s.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field, replace
from typing import Any

from agent.errors import Fault
from master.errors import Invalid
from master.instance import current
from master.jobdata import legacy_status, url_fields
from master.models import Job, JobNotify, Notification, User, iso, utcnow
from master.states import JobHealth, JobState
from master.urlpolicy import AddressPolicy, Refused
from results.bounded import format_path

log = logging.getLogger("pumice.notify")

STATUSES = ("all", "running", "finished", "complete", "incomplete", "canceled")
METHODS = ("GET", "POST")
DATASETS = ("minimal", "logs", "results", "all")
CONTENT_TYPES = ("json", "urlencoded")
VERBOSITIES = ("verbose", "quiet", "status-only")
CALLBACK_KEYS = ("url", "method", "token", "header", "dataset", "content-type")
NOTIFY_KEYS = ("criteria", "verbosity", "recipients", "callback", "callbacks", "compare")
#: a job may not ask for more than this many callbacks or recipients
MAX_TARGETS = 20
EMAIL_RE = re.compile(r"^[^@\s<>,;]{1,64}@[^@\s<>,;]{1,255}$")


@dataclass(frozen=True)
class NotifySettings:
    """The master's notification settings (``pumice-master serve --notify-* --smtp-*``)."""

    policy: AddressPolicy = field(default_factory=AddressPolicy)
    #: seconds one HTTP attempt may take (LAVA: CALLBACK_TIMEOUT, 5 s)
    timeout: float = 5.0
    #: how long a notification is retried before it is given up (seconds)
    retry_period: float = 24 * 3600.0
    #: the longest wait between two attempts (the backoff doubles from 1 s up to this)
    max_backoff: float = 600.0
    #: the most of a job's log one callback sends (bytes; ``dataset: logs|all``)
    max_log_bytes: int = 16 << 20
    #: deliveries at once (one slow receiver holds one of them)
    senders: int = 8
    smtp_host: str = ""
    smtp_port: int = 25
    smtp_from: str = "pumice@localhost"
    smtp_starttls: bool = False
    smtp_user: str = ""
    smtp_password: str = ""
    #: emails sent per minute at most (the rest wait for the next minute)
    email_rate: int = 30
    #: False: notifications are queued but not sent (``serve --notify-hold``)
    deliver: bool = True

    def replace(self, **changes: Any) -> NotifySettings:
        return replace(self, **changes)


_default_settings: NotifySettings | None = None


def settings() -> NotifySettings:
    """The configured settings (``current().notify``), else the defaults."""
    global _default_settings
    configured = current().notify
    if configured is not None:
        return configured
    if _default_settings is None:
        _default_settings = NotifySettings()
    return _default_settings


def configure(new: NotifySettings) -> NotifySettings:
    current().notify = new
    return new


# ---- the block at submission ----

class _Check:
    """Collects the faults of one notify block, each with its path and line."""

    def __init__(self, doc: Any) -> None:
        self.doc = doc
        self.faults: list[Fault] = []

    def fault(self, path: tuple, message: str) -> None:
        self.faults.append(Fault(format_path(path), message, self.doc.line(path) if self.doc else None))

    def choice(self, path: tuple, value: Any, allowed: tuple[str, ...], default: str) -> str:
        if value is None:
            return default
        if value not in allowed:
            self.fault(path, f"must be one of {', '.join(allowed)}, not {value!r}")
            return default
        return value

    def mapping(self, path: tuple, value: Any, allowed: tuple[str, ...]) -> dict:
        if not isinstance(value, dict):
            self.fault(path, f"must be a mapping, not {type(value).__name__}")
            return {}
        for key in value:
            if key not in allowed:
                self.fault((*path, key), f"unknown key {key!r}; allowed: {', '.join(allowed)}")
        return value


def check_notify(block: Any, doc: Any = None, policy: AddressPolicy | None = None) -> dict[str, Any]:
    """The normalised notify block (what :func:`enqueue` reads), or Invalid naming every fault."""
    check = _Check(doc)
    root = ("notify",)
    block = check.mapping(root, block, NOTIFY_KEYS)
    spec: dict[str, Any] = {"criteria": {"status": "finished"}, "verbosity": "quiet", "callbacks": [],
                            "recipients": []}
    criteria = block.get("criteria")
    if criteria is None and block:
        check.fault((*root, "criteria"), "required key missing: criteria (e.g. {status: finished})")
    elif criteria is not None:
        criteria = check.mapping((*root, "criteria"), criteria, ("status", "type", "dependency_query"))
        status = criteria.get("status")
        if status is None:
            check.fault((*root, "criteria", "status"), f"required key missing: one of {', '.join(STATUSES)}")
        spec["criteria"] = {"status": check.choice((*root, "criteria", "status"), status, STATUSES, "finished")}
        if "type" in criteria:
            check.fault((*root, "criteria", "type"), f"not implemented: notify criteria type "
                        f"{criteria['type']!r} (regression/progression); leave it out to be notified on "
                        "every job with that status")
        if "dependency_query" in criteria:
            check.fault((*root, "criteria", "dependency_query"), "not implemented: notify criteria "
                        "dependency_query")
    if "compare" in block:
        check.fault((*root, "compare"), "not implemented: notify compare (result comparisons with a query)")
    spec["verbosity"] = check.choice((*root, "verbosity"), block.get("verbosity"), VERBOSITIES, "quiet")
    if "callback" in block and "callbacks" in block:
        check.fault((*root, "callbacks"), "callback and callbacks are exclusive: give one of them")
    callbacks: list[tuple[tuple, Any]] = []
    if "callback" in block:
        callbacks = [((*root, "callback"), block["callback"])]
    elif "callbacks" in block:
        if not isinstance(block["callbacks"], list):
            check.fault((*root, "callbacks"), "must be a list of callbacks")
        else:
            callbacks = [((*root, "callbacks", n), item) for n, item in enumerate(block["callbacks"])]
    for path, item in callbacks[:MAX_TARGETS]:
        spec["callbacks"].append(_check_callback(check, path, item, policy))
    if len(callbacks) > MAX_TARGETS:
        check.fault((*root, "callbacks"), f"at most {MAX_TARGETS} callbacks, not {len(callbacks)}")
    recipients = block.get("recipients")
    if recipients is not None:
        if not isinstance(recipients, list):
            check.fault((*root, "recipients"), "must be a list of {to: {...}}")
            recipients = []
        if len(recipients) > MAX_TARGETS:
            check.fault((*root, "recipients"), f"at most {MAX_TARGETS} recipients, not {len(recipients)}")
        for n, item in enumerate(recipients[:MAX_TARGETS]):
            recipient = _check_recipient(check, (*root, "recipients", n), item)
            if recipient and recipient not in spec["recipients"]:
                spec["recipients"].append(recipient)
    elif not callbacks:
        spec["recipients"] = [{"method": "email", "submitter": True}]
    if check.faults:
        raise Invalid("invalid job definition", check.faults)
    return spec


def _check_callback(check: _Check, path: tuple, item: Any, policy: AddressPolicy | None) -> dict[str, Any]:
    item = check.mapping(path, item, CALLBACK_KEYS)
    url = item.get("url")
    if not isinstance(url, str) or not url.strip():
        check.fault((*path, "url"), "required key missing: url (the http or https URL to call)")
        url = ""
    else:
        try:
            (policy or settings().policy).check_submitted(url.strip())
        except Refused as exc:
            check.fault((*path, "url"), str(exc))
    for key in ("token", "header"):
        if key in item and not isinstance(item[key], str):
            check.fault((*path, key), f"must be a string, not {type(item[key]).__name__}")
    token = item.get("token")
    if isinstance(token, str) and (len(token) > 4096 or any(ord(c) < 32 or ord(c) == 127 for c in token)):
        check.fault((*path, "token"), "must be one line of at most 4096 characters (it is sent in a header)")
    header = item.get("header") or "Authorization"
    if isinstance(header, str) and not re.fullmatch(r"[!#$%&'*+.^_`|~0-9A-Za-z-]{1,64}", header):
        check.fault((*path, "header"), f"{header[:80]!r} is not an HTTP header name")
    return {
        "url": url.strip(),
        "method": check.choice((*path, "method"), item.get("method"), METHODS, "GET"),
        "dataset": check.choice((*path, "dataset"), item.get("dataset"), DATASETS, "minimal"),
        "content_type": check.choice((*path, "content-type"), item.get("content-type"), CONTENT_TYPES,
                                     "urlencoded"),
        "token": item.get("token") if isinstance(item.get("token"), str) else None,
        "header": header if isinstance(header, str) else "Authorization",
    }


def _check_recipient(check: _Check, path: tuple, item: Any) -> dict[str, Any] | None:
    item = check.mapping(path, item, ("to",))
    to = check.mapping((*path, "to"), item.get("to"), ("method", "user", "email", "handle", "server"))
    method = to.get("method")
    if method == "irc":
        check.fault((*path, "to", "method"), "not implemented: IRC notifications (use method: email)")
        return None
    if method != "email":
        check.fault((*path, "to", "method"), f"must be email or irc, not {method!r}")
        return None
    user, email = to.get("user"), to.get("email")
    if user is None and email is None:
        check.fault((*path, "to"), "an email recipient needs user (a user of this master) or email")
        return None
    if user is not None:
        if not isinstance(user, str) or User.get_or_none(User.username == user) is None:
            check.fault((*path, "to", "user"), f"no user {str(user)[:150]!r} on this master")
            return None
        return {"method": "email", "user": user}
    if not isinstance(email, str) or not EMAIL_RE.match(email):
        check.fault((*path, "to", "email"), f"{str(email)[:100]!r} is not an email address")
        return None
    return {"method": "email", "email": email}


# ---- at each state change ----

def criteria_met(status: str, state: str, health: str) -> bool:
    """Whether a job now in ``state``/``health`` meets ``criteria.status`` (LAVA's semantics)."""
    if status == "all":
        return state in (JobState.RUNNING, JobState.FINISHED)
    if status == "running":
        return state == JobState.RUNNING
    if status == "finished":
        return state == JobState.FINISHED
    wanted = {"complete": JobHealth.COMPLETE, "incomplete": JobHealth.INCOMPLETE,
              "canceled": JobHealth.CANCELED}[status]
    return state == JobState.FINISHED and health == wanted


#: LAVA's callback URL fields: ``{ID}``, ``{STATUS}``... (upper case, substituted when queued)
_URL_FIELD = re.compile(r"{\s*[A-Z_-]*\s*}")


def substitute_url(url: str, fields: dict[str, Any]) -> str:
    """``url`` with each ``{NAME}`` replaced by the job's field ``name`` (unknown names stay)."""

    def value(match: re.Match) -> str:
        name = match.group(0).strip("{} ").lower()
        return str(fields[name]) if name in fields else match.group(0)

    return _URL_FIELD.sub(value, url)


def snapshot(job: Job) -> dict[str, Any]:
    """What a notification keeps of the job at its state change."""
    return {"state": job.state, "health": job.health, "start_time": iso(job.start_time),
            "end_time": iso(job.end_time), "failure_comment": job.failure_comment}


def enqueue(job_id: int) -> int:
    """Queue the notifications that job ``job_id``'s new state triggers (call inside the
    transaction of the change, after the job's row is updated). Returns how many were queued."""
    row = JobNotify.get_or_none(JobNotify.job == job_id)
    if row is None:
        return 0
    spec = row.spec
    job = Job.get_by_id(job_id)
    if not criteria_met(spec["criteria"]["status"], job.state, job.health):
        return 0
    trigger = job.health if job.state == JobState.FINISHED else job.state
    taken = snapshot(job)
    now = utcnow()
    rows: list[dict[str, Any]] = []
    fields = url_fields(job)
    for position, callback in enumerate(spec["callbacks"]):
        rows.append({"kind": "callback", "position": position, "target": substitute_url(callback["url"], fields)})
    mailed = {position for (position,) in Notification.select(Notification.position)
              .where((Notification.job == job_id) & (Notification.kind == "email")).tuples()}
    for position, recipient in enumerate(spec["recipients"]):
        if position in mailed:  # LAVA mails each recipient once per job
            continue
        rows.append({"kind": "email", "position": position, "target": recipient_address(recipient, job)})
    for values in rows:
        values.update(job=job_id, trigger=trigger, snapshot=taken, next_attempt=now, created=now)
    if rows:
        Notification.insert_many(rows).execute()
        log.info("job %d (%s, legacy status %d): %d notification(s) queued", job_id, trigger,
                 legacy_status(job.state, job.health), len(rows))
    return len(rows)


def recipient_address(recipient: dict[str, Any], job: Job) -> str:
    """The email address of a recipient ('' when its user has none: the attempt says so)."""
    if "email" in recipient:
        return recipient["email"]
    if recipient.get("submitter"):
        user = User.get_or_none(User.id == job.submitter_id)
    else:
        user = User.get_or_none(User.username == recipient["user"])
    return user.email if user and user.email else f"user:{user.username if user else recipient.get('user')}"


def store_spec(job_id: int, spec: dict[str, Any] | None) -> None:
    """Keep a submitted job's checked notify block (inside the submission's transaction)."""
    if spec is not None:
        JobNotify.insert(job=job_id, spec=spec).execute()


# ---- settings from the command line (pumice-master serve) ----
