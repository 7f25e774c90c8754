"""The notification outbox's sender: delivers queued callbacks and emails, retries, records attempts.

Rows are written by :func:`master.notify.enqueue` in the transaction of the job's state change, so a
notification exists exactly when its change does, whatever happens to the master afterwards. The
:class:`Outbox` thread wakes on the job events that follow those commits (the first attempt starts
within milliseconds of the change), claims due rows and hands each to a small pool of sender
threads: a slow or hung receiver holds one sender for at most the timeout, never the scheduler, the
broker or log ingestion. A failed attempt (network error, timeout, HTTP 5xx/408/429, SMTP error) is
retried with a doubling backoff (1 s, 2 s, 4 s ... up to ``max_backoff``) until ``retry_period`` has
passed since the change; a refusal (the URL policy, HTTP 4xx) ends it. Every attempt is a row of
``notification_attempts`` (when, how long, the outcome: never the token or the headers sent),
shown by ``GET /api/v0.2/jobs/<id>/notifications/``. After a kill -9 the rows a sender held are
released at the next start and delivered then.

Callbacks follow LAVA: GET without a body, or POST of the job data (:mod:`master.jobdata`) as JSON
or form-encoded (as ``requests`` encodes a dict); the token in ``header`` (default
``Authorization``), bare. Redirects are followed (at most 5), each target checked against the URL
policy; the connection goes to the very address that was checked.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import http.client
import json
import logging
import smtplib
import socket
import ssl
import string
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from email.message import EmailMessage
from typing import Any
from urllib.parse import quote, urlencode, urljoin, urlsplit

import yaml
from peewee import fn

from master import events
from master.db import connection, db
from master.instance import current
from master.jobdata import job_data
from master.jobs import get_job, job_suites
from master.models import Job, JobNotify, Notification, NotificationAttempt, RemoteToken, User, iso, utcnow
from master.notify import NotifySettings, settings
from master.urlpolicy import AddressPolicy, Refused, url_for_display
from master.users import SYSTEM

log = logging.getLogger("pumice.outbox")

MAX_REDIRECTS = 5
#: HTTP answers worth trying again later (besides 5xx)
RETRY_STATUSES = (408, 425, 429)
#: the job events after whose commit new rows may be due
WAKE_EVENTS = ("job_started", "job_finished", "job_canceling")


@dataclass(frozen=True)
class Outcome:
    """What one attempt came to: ``ok``; ``retry`` (worth another attempt); the text recorded."""

    ok: bool
    retry: bool
    text: str


# ---- HTTP ----

class _PinnedHTTP(http.client.HTTPConnection):
    """A connection to an address already checked by the policy (not a new DNS lookup)."""

    def __init__(self, host: str, port: int, address: str, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout)
        self._address = address

    def connect(self) -> None:
        self.sock = socket.create_connection((self._address, self.port), self.timeout)


class _PinnedHTTPS(http.client.HTTPSConnection):
    def __init__(self, host: str, port: int, address: str, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout, context=ssl.create_default_context())
        self._address = address

    def connect(self) -> None:
        sock = socket.create_connection((self._address, self.port), self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)


def form_encode(data: dict[str, Any]) -> str:
    """``data`` form-encoded as ``requests.post(data=dict)`` does it (what LAVA sends for
    ``content-type: urlencoded``): None values dropped, lists repeated, other values as text."""
    pairs = []
    for key, values in data.items():
        if isinstance(values, str | bytes) or not hasattr(values, "__iter__"):
            values = [values]
        pairs.extend((key, value) for value in values if value is not None)
    return urlencode(pairs, doseq=True)


def http_call(url: str, method: str, body: bytes | None, headers: dict[str, str], policy: AddressPolicy,
              timeout: float) -> Outcome:
    """One callback: connect to a checked address, follow redirects to checked targets."""
    deadline = time.monotonic() + timeout
    for _ in range(MAX_REDIRECTS + 1):
        try:
            host, port, addresses = policy.resolve(url)
        except Refused as exc:
            return Outcome(False, False, f"refused: {exc}")
        except OSError as exc:
            return Outcome(False, True, f"{url_for_display(url)}: cannot resolve: {exc}")
        parts = urlsplit(url)
        # as requests sends them: a non-ASCII path percent-encoded, a non-ASCII host in IDNA
        target = quote((parts.path or "/") + (f"?{parts.query}" if parts.query else ""), safe=string.punctuation)
        try:
            host = host.encode("idna").decode("ascii")
        except UnicodeError:
            return Outcome(False, False, f"refused: {url_for_display(url)}: {host[:100]!r} is not a valid host name")
        connection_class = _PinnedHTTPS if parts.scheme == "https" else _PinnedHTTP
        remaining = max(0.1, deadline - time.monotonic())
        conn = None
        error: Exception | None = None
        for address in addresses:
            conn = connection_class(host, port, str(address), remaining)
            try:
                conn.request(method, target, body=body, headers=headers)
                response = conn.getresponse()
                response.read(1 << 16)  # a receiver's answer is not kept
                break
            except (OSError, http.client.HTTPException) as exc:
                error = exc
                conn.close()
                conn = None
        if conn is None:
            if isinstance(error, TimeoutError | socket.timeout):
                return Outcome(False, True, f"timeout after {timeout:g} s")
            return Outcome(False, True, f"{type(error).__name__}: {error}"[:500])
        status = response.status
        location = response.getheader("Location")
        conn.close()
        if status in (301, 302, 303, 307, 308) and location:
            url = urljoin(url, location)
            if status in (301, 302, 303) and method == "POST":  # as requests (and browsers) do
                method, body = "GET", None
                headers = {k: v for k, v in headers.items() if k.lower() != "content-type"}
            continue
        if 200 <= status < 400:
            return Outcome(True, False, f"HTTP {status}")
        return Outcome(False, status >= 500 or status in RETRY_STATUSES, f"HTTP {status} {response.reason}"[:200])
    return Outcome(False, False, f"more than {MAX_REDIRECTS} redirects")


def remote_token(user_id: int, name: str) -> str:
    """The submitter's remote token called ``name``, else ``name`` itself (LAVA's rule)."""
    row = RemoteToken.get_or_none((RemoteToken.user == user_id) & (RemoteToken.name == name))
    return row.token if row else name


# ---- email ----

def email_text(job: Job, data: dict[str, Any], verbosity: str) -> tuple[str, str]:
    """Subject (LAVA's) and body of a job's notification email."""
    # a job name is the user's: no line break may reach the Subject header
    subject = " ".join(f"LAVA notification for Test Job {job.id} {job.name[:200]}".split())
    url = current().job_url(job.id)
    lines = [f"Job {job.id} ({job.name}): {data['state_string']}"
             + (f", {data['health_string']}" if data["state_string"] == "Finished" else "")]
    if verbosity != "status-only":
        lines += ["", f"Device: {data['actual_device_id'] or '-'}", f"Submitter: {data['submitter_username']}",
                  f"Submitted: {data['submit_time']}", f"Started: {data['start_time']}",
                  f"Ended: {data['end_time']}"]
        if data["failure_comment"]:
            lines.append(f"Failure: {data['failure_comment']}")
        if url:
            lines.append(f"Details: {url}")
    if verbosity == "verbose":
        lines += ["", "Test suites (pass/fail/skip/unknown):"]
        for suite in job_suites(job.id, None if job.visibility == "public" else _owner(job)):
            lines.append(f"  {suite['name']}: {suite['pass']}/{suite['fail']}/{suite['skip']}/{suite['unknown']}")
    return subject, "\n".join(lines) + "\n"


def _owner(job: Job) -> User:
    return User.get_by_id(job.submitter_id)


def send_email(config: NotifySettings, address: str, subject: str, body: str) -> Outcome:
    if not config.smtp_host:
        return Outcome(False, True, "no SMTP server configured (pumice-master serve --smtp HOST:PORT)")
    message = EmailMessage()
    message["From"] = config.smtp_from
    message["To"] = address
    message["Subject"] = subject
    message.set_content(body)
    try:
        with smtplib.SMTP(config.smtp_host, config.smtp_port, timeout=config.timeout) as smtp:
            if config.smtp_starttls:
                smtp.starttls(context=ssl.create_default_context())
            if config.smtp_user:
                smtp.login(config.smtp_user, config.smtp_password)
            smtp.send_message(message)
    except smtplib.SMTPRecipientsRefused as exc:
        return Outcome(False, False, f"SMTP refused the recipient: {exc}"[:300])
    except (OSError, smtplib.SMTPException) as exc:
        return Outcome(False, True, f"SMTP: {type(exc).__name__}: {exc}"[:300])
    return Outcome(True, False, "sent")


# ---- the sender ----

class Outbox:
    """The delivery loop (a thread) and its sender pool. ``loop_once()`` claims and hands out what is
    due; tests drive it step by step, a master runs :meth:`start`."""

    def __init__(self, config: NotifySettings | None = None, *, batch: int = 64) -> None:
        self._config = config
        self.batch = batch
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._inflight = 0
        self._lock = threading.Lock()
        self._emails: deque[float] = deque()

    @property
    def config(self) -> NotifySettings:
        return self._config or settings()

    def on_event(self, event: str, data: dict[str, Any]) -> None:
        if event in WAKE_EVENTS:
            self._wake.set()

    def release_leases(self) -> int:
        """Rows a sender held when the master stopped (kill -9) become due again."""
        with connection():
            return Notification.update(leased=False).where(Notification.leased == True).execute()  # noqa: E712

    def loop_once(self, now: Any = None) -> int:
        """Claim the due rows (as many as free senders) and hand them out; returns how many."""
        with self._lock:
            room = self.config.senders * 2 - self._inflight
        if room <= 0:
            return 0
        now = now or utcnow()
        with connection():
            due = [i for (i,) in Notification.select(Notification.id)
                   .where((Notification.status == "pending") & (Notification.leased == False)  # noqa: E712
                          & (Notification.next_attempt <= now))
                   .order_by(Notification.next_attempt).limit(min(room, self.batch)).tuples()]
            # claimed with a conditional UPDATE each: a row another sender took meanwhile is skipped
            ids = [i for i in due if Notification.update(leased=True).where(
                (Notification.id == i) & (Notification.leased == False)).execute()]  # noqa: E712
        for notification_id in ids:
            with self._lock:
                self._inflight += 1
            if self._pool is None:
                self._deliver(notification_id)
            else:
                self._pool.submit(self._deliver, notification_id)
        return len(ids)

    def _next_due(self) -> float:
        """Seconds until the next pending row is due (at most 5)."""
        with connection():
            (first,) = (Notification.select(fn.MIN(Notification.next_attempt))
                        .where((Notification.status == "pending") & (Notification.leased == False))  # noqa: E712
                        .tuples().get())
        if first is None:
            return 5.0
        if isinstance(first, str):  # SQLite hands back text for an aggregate
            first = _dt.datetime.fromisoformat(first)
        return max(0.0, min(5.0, (first - utcnow()).total_seconds()))

    def _deliver(self, notification_id: int) -> None:
        try:
            started = time.monotonic()
            when = utcnow()
            outcome = self._attempt(notification_id)
            if outcome is None:  # deferred (email rate): not an attempt
                return
            self._record(notification_id, when, time.monotonic() - started, outcome)
        except Exception:
            log.exception("notification %d: delivery failed", notification_id)
            with contextlib.suppress(Exception), connection():
                self._record(notification_id, utcnow(), 0.0, Outcome(False, True, "internal error in the master"))
        finally:
            with self._lock:
                self._inflight -= 1

    def _attempt(self, notification_id: int) -> Outcome | None:
        config = self.config
        with connection():
            row = Notification.get_by_id(notification_id)
            job = Job.get_by_id(row.job_id)
            spec = JobNotify.get_by_id(row.job_id).spec
            if row.kind == "email":
                if row.target.startswith("user:"):
                    return Outcome(False, False, f"user {row.target[5:]} has no email address")
                if not self._email_slot(notification_id):
                    return None
                data = job_data(job, row.snapshot)
                subject, body = email_text(job, data, spec.get("verbosity", "quiet"))
            else:
                callback = spec["callbacks"][row.position]
                headers = {"User-Agent": "pumice-notify"}
                if callback.get("token"):
                    headers[callback["header"]] = remote_token(job.submitter_id, callback["token"])
                body_bytes = None
                if callback["method"] == "POST":
                    dataset = callback["dataset"]
                    data = job_data(job, row.snapshot, logs=dataset in ("logs", "all"),
                                    results=dataset in ("results", "all"), max_log_bytes=config.max_log_bytes)
                    if callback["content_type"] == "json":
                        body_bytes = json.dumps(data).encode("utf-8")
                        headers["Content-Type"] = "application/json"
                    else:
                        body_bytes = form_encode(data).encode("ascii")
                        headers["Content-Type"] = "application/x-www-form-urlencoded"
        if row.kind == "email":
            return send_email(config, row.target, subject, body)
        return http_call(row.target, callback["method"], body_bytes, headers, config.policy, config.timeout)

    def _email_slot(self, notification_id: int) -> bool:
        """Take one of the minute's email sends; else put the row back for when one frees."""
        now = time.monotonic()
        with self._lock:
            while self._emails and now - self._emails[0] >= 60:
                self._emails.popleft()
            if len(self._emails) < self.config.email_rate:
                self._emails.append(now)
                return True
            wait = 60 - (now - self._emails[0])
        Notification.update(leased=False, next_attempt=utcnow() + _dt.timedelta(seconds=wait)).where(
            Notification.id == notification_id).execute()
        return False

    def _record(self, notification_id: int, when: Any, duration: float, outcome: Outcome) -> None:
        config = self.config
        with connection(), db.atomic():
            row = Notification.get_by_id(notification_id)
            number = row.attempts + 1
            NotificationAttempt.create(notification=notification_id, number=number, started=when,
                                       duration=round(duration, 3), ok=outcome.ok, outcome=outcome.text)
            now = utcnow()
            fields: dict[Any, Any] = {Notification.attempts: number, Notification.leased: False,
                                      Notification.last_error: None if outcome.ok else outcome.text}
            if outcome.ok:
                fields.update({Notification.status: "delivered", Notification.finished: now})
            else:
                delay = min(config.max_backoff, 2.0 ** (number - 1))
                give_up = (now - row.created).total_seconds() + delay > config.retry_period
                if outcome.retry and not give_up:
                    fields[Notification.next_attempt] = now + _dt.timedelta(seconds=delay)
                else:
                    fields.update({Notification.status: "failed", Notification.finished: now})
            Notification.update(fields).where(Notification.id == notification_id).execute()
        level = logging.INFO if outcome.ok else logging.WARNING
        log.log(level, "job %d %s to %s: attempt %d: %s", row.job_id, row.kind,
                url_for_display(row.target) if row.kind == "callback" else row.target, number, outcome.text)
        self._write_file(row.job_id)
        if Notification.status in fields:  # delivered or given up: the job's page shows it
            events.publish("job_notified", job_ids=[row.job_id])

    def _write_file(self, job_id: int) -> None:
        """The job's notifications.yaml in the store (what its page shows); a failure only logged."""
        try:
            with connection():
                rows = job_notifications(job_id, SYSTEM)
            current().store.write_file(job_id, "notifications.yaml", yaml.safe_dump(rows, sort_keys=False))
        except Exception as exc:
            log.warning("job %d: notifications.yaml not written: %s", job_id, exc)

    # ---- the thread ----

    def start(self) -> Outbox:
        self.release_leases()
        self._pool = ThreadPoolExecutor(self.config.senders, thread_name_prefix="pumice-notify-send")
        events.subscribe(self.on_event)
        self._thread = threading.Thread(target=self._run, name="pumice-notify", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.loop_once()
                wait = self._next_due()
            except Exception:
                log.exception("the notification outbox failed a pass; trying again")
                wait = 1.0
            self._wake.wait(wait)
            self._wake.clear()

    def stop(self) -> None:
        events.unsubscribe(self.on_event)
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(10)
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)


# ---- what the API shows ----

def job_notifications(job_id: int | str, user: User | None) -> list[dict[str, Any]]:
    """The job's notifications with every attempt (targets without credentials; never a token)."""
    job = get_job(job_id, user)
    rows = list(Notification.select().where(Notification.job == job.id).order_by(Notification.id))
    attempts: dict[int, list[dict[str, Any]]] = {}
    if rows:
        for attempt in (NotificationAttempt.select()
                        .where(NotificationAttempt.notification.in_([r.id for r in rows]))
                        .order_by(NotificationAttempt.id)):
            attempts.setdefault(attempt.notification_id, []).append(
                {"number": attempt.number, "started": iso(attempt.started), "duration": attempt.duration,
                 "ok": attempt.ok, "outcome": attempt.outcome})
    spec = getattr(JobNotify.get_or_none(JobNotify.job == job.id), "spec", None) or {}
    recipients = spec.get("recipients", [])

    def target(row: Notification) -> str:
        if row.kind == "callback":
            return url_for_display(row.target)
        recipient = recipients[row.position] if row.position < len(recipients) else {}
        # a user's own address is not shown (the page is public): the user's name is
        if recipient.get("submitter"):
            return "the submitter"
        return f"user {recipient['user']}" if "user" in recipient else row.target

    return [{"id": r.id, "kind": r.kind, "trigger": r.trigger, "target": target(r),
             "status": r.status, "attempts": r.attempts, "created": iso(r.created),
             "next_attempt": iso(r.next_attempt) if r.status == "pending" else None,
             "finished": iso(r.finished), "last_error": r.last_error, "attempt_list": attempts.get(r.id, [])}
            for r in rows]
