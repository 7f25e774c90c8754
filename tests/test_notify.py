"""notify: callbacks and emails (LAVA 2023.01's block), delivered through the durable outbox.

A real HTTP receiver on loopback (allowed with the setting an admin would use) checks what a
KernelCI-style receiver reads: the token header, the LAVA job data, ``results`` and ``log`` as YAML
strings; a real SMTP server (aiosmtpd) receives the emails.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs

import pytest
import yaml
from support.master import build_lab, job_text

from master import jobs, remote_tokens
from master.db import close_database, connection
from master.errors import Invalid
from master.models import Notification
from master.notify import NotifySettings, check_notify, configure, criteria_met
from master.outbox import Outbox, form_encode, job_notifications
from master.publish import publish_pages
from master.scheduler import Scheduler
from master.urlpolicy import AddressPolicy, parse_networks
from results.log import LogRecord
from results.record import Result

LOOPBACK = AddressPolicy(allow=parse_networks(["127.0.0.1"]))

#: the keys of LAVA's job data (create_job_data), minimal dataset, in LAVA's order
MINIMAL_KEYS = ["id", "status", "status_string", "state", "state_string", "health", "health_string",
                "submit_time", "start_time", "end_time", "submitter_username", "failure_comment", "priority",
                "description", "actual_device_id", "definition", "metadata", "health_check"]
#: the keys of one exported test case (lava_results_app's export_testcase)
CASE_KEYS = ["name", "job", "suite", "result", "measurement", "unit", "level", "url", "id", "logged",
             "log_start_line", "log_end_line", "metadata"]


@dataclass
class Received:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Receiver:
    """An HTTP server that records each request and answers from ``answers`` (then 200)."""

    server: ThreadingHTTPServer
    requests: list[Received] = field(default_factory=list)
    answers: list[int] = field(default_factory=list)
    redirect_to: str | None = None
    delay: float = 0.0
    arrived: threading.Event = field(default_factory=threading.Event)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def wait(self, count: int, timeout: float = 20) -> list[Received]:
        deadline = time.monotonic() + timeout
        while len(self.requests) < count:
            assert time.monotonic() < deadline, f"{len(self.requests)} request(s) arrived, {count} expected"
            self.arrived.wait(0.05)
            self.arrived.clear()
        return self.requests


def start_receiver() -> Receiver:
    box: dict[str, Receiver] = {}

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:
            pass

        def _handle(self) -> None:
            receiver = box["r"]
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            if receiver.delay:
                time.sleep(receiver.delay)
            receiver.requests.append(Received(self.command, self.path, dict(self.headers.items()), body))
            receiver.arrived.set()
            if receiver.redirect_to:
                self.send_response(302)
                self.send_header("Location", receiver.redirect_to)
            else:
                self.send_response(receiver.answers.pop(0) if receiver.answers else 200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_GET = do_POST = _handle

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    box["r"] = Receiver(server)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return box["r"]


def receiving() -> Iterator[Receiver]:
    """A receiver for the test (the ``receiver`` fixture), shut down after it."""
    r = start_receiver()
    yield r
    r.server.shutdown()
    r.server.server_close()


_receiver = pytest.fixture(receiving, name="receiver")


@pytest.fixture
def nlab(tmp_path: Path, database_url: str | None):
    """The master test lab with notification settings that let callbacks reach 127.0.0.1."""
    lab = build_lab(tmp_path / "data", database_url)
    configure(NotifySettings(policy=LOOPBACK, timeout=3.0))
    yield lab
    close_database()


def notify_job(notify: dict, name: str = "notified", extra: str = "") -> str:
    return job_text(name) + extra + yaml.safe_dump({"notify": notify}, sort_keys=False)


def run_job(text: str, user, health: str = "Complete", results: list[Result] | None = None) -> int:
    """Submit and play the agent's part to the job's end, in this process."""
    [job_id] = jobs.submit_job(text, user)
    assert job_id in [job for job, _ in Scheduler().loop_once()]
    jobs.job_started(job_id)
    jobs.append_logs(job_id, [LogRecord("2024-01-01T10:00:00.000000", "info", "start: 1.1 deploy"),
                              LogRecord("2024-01-01T10:00:01.000000", "target", "hello: from the board")])
    default = [Result(job=str(job_id), level="3.1", suite="0_smoke", case="boot-time", result="pass",
                      measurement=3.5, units="s"),
               Result(job=str(job_id), level="3.1", suite="0_smoke", case="always-fail", result="fail"),
               Result(job=str(job_id), level="0", suite="lava", case="job",
                      result="pass" if health == "Complete" else "fail",
                      extra={} if health == "Complete" else {"error_type": "Job", "error_msg": "boot failed"})]
    jobs.append_results(job_id, results if results is not None else default)
    jobs.job_finished(job_id, health, None if health == "Complete" else "boot failed",
                      None if health == "Complete" else "Job")
    return job_id


def deliver(outbox: Outbox | None = None, now=None) -> int:
    """One pass of the sender, in this thread (no pool): every due row is attempted."""
    return (outbox or Outbox()).loop_once(now)


# ---- the block at submission ----

def test_the_notify_block_takes_lava_keys_with_lava_defaults() -> None:
    spec = check_notify({"criteria": {"status": "complete"}, "callback": {"url": "https://kernelci.example/cb"},
                         "verbosity": "status-only"}, policy=LOOPBACK)
    assert spec["criteria"] == {"status": "complete"} and spec["verbosity"] == "status-only"
    assert spec["callbacks"] == [{"url": "https://kernelci.example/cb", "method": "GET", "dataset": "minimal",
                                  "content_type": "urlencoded", "token": None, "header": "Authorization"}]
    assert spec["recipients"] == []  # callbacks only: nobody is mailed
    # neither callbacks nor recipients: the submitter is mailed (LAVA's default recipient)
    assert check_notify({"criteria": {"status": "finished"}}, policy=LOOPBACK)["recipients"] == [
        {"method": "email", "submitter": True}]


@pytest.mark.parametrize(("block", "path", "words"), [
    ({"criteria": {"status": "complete", "type": "regression"}}, "notify.criteria.type", "not implemented"),
    ({"criteria": {"status": "finished"}, "recipients": [{"to": {"method": "irc", "handle": "x",
                                                                 "server": "irc.example"}}]},
     "notify.recipients[0].to.method", "not implemented: IRC"),
    ({"criteria": {"status": "finished"}, "compare": {"blacklist": ["lava"]}}, "notify.compare", "not implemented"),
    ({"criteria": {"status": "done"}}, "notify.criteria.status", "must be one of all, running"),
    ({"criteria": {"status": "finished"}, "callback": {"url": "http://x.example/", "dataset": "most"}},
     "notify.callback.dataset", "minimal, logs, results, all"),
    ({"criteria": {"status": "finished"}, "callback": {"url": "http://x.example/"},
      "callbacks": [{"url": "http://y.example/"}]}, "notify.callbacks", "exclusive"),
    ({"criteria": {"status": "finished"}, "callback": {"url": "ftp://x.example/"}}, "notify.callback.url",
     "http or https only"),
    ({"callback": {"url": "http://x.example/"}}, "notify.criteria", "required key missing"),
    ({"criteria": {"status": "finished"}, "callback": {"url": "http://x.example/", "token": "a\r\nX-Evil: 1"}},
     "notify.callback.token", "one line"),
])
def test_what_lava_refuses_or_pumice_does_not_implement_is_refused_by_path(block, path, words) -> None:
    with pytest.raises(Invalid) as caught:
        check_notify(block, policy=LOOPBACK)
    assert any(f.path == path and words in f.message for f in caught.value.faults), caught.value.faults


@pytest.mark.parametrize("url", ["http://127.0.0.2:8000/cb", "http://169.254.169.254/latest/meta-data",
                                 "http://[::1]/cb", "http://0.0.0.0/", "http://localhost:9/cb"])
def test_callback_urls_to_the_master_itself_are_refused_naming_the_url_and_setting(url: str) -> None:
    with pytest.raises(Invalid) as caught:
        check_notify({"criteria": {"status": "finished"}, "callback": {"url": url}}, policy=AddressPolicy())
    [fault] = caught.value.faults
    assert fault.path == "notify.callback.url" and url.split("/")[2].split(":")[0].strip("[]") in fault.message
    assert "callbacks may not reach" in fault.message and "pumice-master serve --notify-allow" in fault.message


def test_a_refused_callback_fails_the_submission_with_its_line(nlab) -> None:
    text = notify_job({"criteria": {"status": "finished"}, "callback": {"url": "http://169.254.169.254/x"}})
    with connection(), pytest.raises(Invalid) as caught:
        jobs.submit_job(text, nlab.user("alice"))
    [fault] = caught.value.faults
    assert fault.path == "notify.callback.url" and "link-local" in fault.message
    assert text.splitlines()[fault.line - 1].strip() == "url: http://169.254.169.254/x"


@pytest.mark.parametrize(("status", "fires"), [
    ("all", {("Running", "Unknown"), ("Finished", "Complete"), ("Finished", "Incomplete"), ("Finished", "Canceled")}),
    ("running", {("Running", "Unknown")}),
    ("finished", {("Finished", "Complete"), ("Finished", "Incomplete"), ("Finished", "Canceled")}),
    ("complete", {("Finished", "Complete")}),
    ("incomplete", {("Finished", "Incomplete")}),
    ("canceled", {("Finished", "Canceled")}),
])
def test_criteria_fire_on_the_states_lava_fires_them(status: str, fires: set) -> None:
    every = {("Submitted", "Unknown"), ("Scheduled", "Unknown"), ("Running", "Unknown"), ("Canceling", "Unknown"),
             ("Finished", "Complete"), ("Finished", "Incomplete"), ("Finished", "Canceled")}
    assert {pair for pair in every if criteria_met(status, *pair)} == fires


def test_form_encoding_is_what_requests_sends_for_a_dict() -> None:
    # requests drops None, repeats list items, iterates a dict's keys (what LAVA's urlencoded POST sends)
    assert parse_qs(form_encode({"id": 3, "failure_comment": None, "metadata": [{"a": "1"}],
                                 "results": {"lava": "x"}, "health_check": False})) == {
        "id": ["3"], "metadata": ["a"], "results": ["lava"], "health_check": ["False"]}


# ---- delivery ----

def test_callback_carries_lavas_job_data_and_the_named_token(nlab, receiver: Receiver) -> None:
    with connection():
        alice = nlab.user("alice")
        remote_tokens.add_token(alice, "kernelci-callback", "s3cret-callback-token")
        secrets = "secrets:\n  ARTIFACTS: very-secret-value\nmetadata:\n  kernel.version: 6.1.0\n  build: 42\n"
        text = notify_job({"criteria": {"status": "finished"},
                           "callback": {"url": f"{receiver.url}/node/{{ID}}", "method": "POST", "dataset": "all",
                                        "content-type": "json", "token": "kernelci-callback"}},
                          extra=secrets)
        job_id = run_job(text, alice, health="Incomplete")
        assert deliver() == 1
    [request] = receiver.wait(1)
    assert request.method == "POST" and request.path == f"/node/{job_id}"
    assert request.headers["Authorization"] == "s3cret-callback-token"  # bare, as LAVA sends it
    assert request.headers["Content-Type"] == "application/json"
    data = json.loads(request.body)
    assert list(data) == MINIMAL_KEYS + ["log", "results"]
    assert (data["id"], data["status"], data["status_string"]) == (job_id, 3, "incomplete")
    assert (data["state"], data["state_string"], data["health"], data["health_string"]) == (
        5, "Finished", 2, "Incomplete")
    assert data["submitter_username"] == "alice" and data["actual_device_id"] in ("qemu01", "qemu02")
    assert data["description"] == "notified" and data["priority"] == 50 and data["health_check"] is False
    assert data["failure_comment"].endswith("boot failed")
    assert data["end_time"].endswith("+00:00") and data["start_time"] != "None"
    assert data["metadata"] == [{"kernel.version": "6.1.0"}, {"build": "42"}]
    # the job's secrets and the token never leave in the payload
    assert "very-secret-value" not in request.body.decode() and "s3cret" not in request.body.decode()
    assert yaml.safe_load(data["definition"])["secrets"] == {"ARTIFACTS": "[redacted]"}
    log = yaml.safe_load(data["log"])
    assert log[-1]["msg"] == "hello: from the board"
    assert set(data["results"]) == {"0_smoke", "lava"}
    smoke = yaml.safe_load(data["results"]["0_smoke"])
    assert [sorted(case) for case in smoke] == [sorted(CASE_KEYS)] * 2  # LAVA writes the keys sorted
    boot = smoke[0]
    assert (boot["name"], boot["result"], boot["measurement"], boot["unit"], boot["level"], boot["job"]) == (
        "boot-time", "pass", "3.5000000000", "s", "3.1", str(job_id))
    [lava_job] = yaml.safe_load(data["results"]["lava"])
    assert lava_job["metadata"]["error_type"] == "Job" and lava_job["metadata"]["error_msg"] == "boot failed"
    with connection():
        [record] = job_notifications(job_id, alice)
    assert (record["status"], record["attempts"], record["trigger"]) == ("delivered", 1, "Incomplete")
    assert record["attempt_list"][0]["outcome"] == "HTTP 200" and record["attempt_list"][0]["ok"] is True
    assert "s3cret" not in json.dumps(record)


def test_get_callback_with_a_literal_token_in_another_header(nlab, receiver: Receiver) -> None:
    with connection():
        text = notify_job({"criteria": {"status": "all"},
                           "callback": {"url": f"{receiver.url}/cb?job={{ID}}&status={{STATUS_STRING}}",
                                        "token": "not-a-token-name", "header": "X-Receiver-Token"}})
        job_id = run_job(text, nlab.user("bob"))
        assert deliver() == 2  # status all: once Running, once Finished
    requests = receiver.wait(2)
    assert {r.path for r in requests} == {f"/cb?job={job_id}&status=running", f"/cb?job={job_id}&status=complete"}
    assert all(r.method == "GET" and r.body == b"" and r.headers["X-Receiver-Token"] == "not-a-token-name"
               and "Authorization" not in r.headers for r in requests)


def test_urlencoded_post_is_form_data(nlab, receiver: Receiver) -> None:
    with connection():
        text = notify_job({"criteria": {"status": "complete"},
                           "callback": {"url": f"{receiver.url}/form", "method": "POST", "dataset": "results"}})
        job_id = run_job(text, nlab.user("bob"))
        deliver()
    [request] = receiver.wait(1)
    assert request.headers["Content-Type"] == "application/x-www-form-urlencoded"
    form = parse_qs(request.body.decode())
    assert form["id"] == [str(job_id)] and form["status"] == ["2"] and form["health_string"] == ["Complete"]
    assert sorted(form["results"]) == ["0_smoke", "lava"]


def test_unreachable_receiver_is_retried_with_backoff_and_visible_attempts(nlab, receiver: Receiver) -> None:
    import datetime as _dt

    receiver.answers = [503, 502]
    with connection():
        text = notify_job({"criteria": {"status": "finished"},
                           "callbacks": [{"url": f"{receiver.url}/flaky", "method": "POST"},
                                         {"url": "http://127.0.0.1:9/closed", "method": "POST"}]})
        job_id = run_job(text, nlab.user("alice"))
        outbox = Outbox()
        assert deliver(outbox) == 2
        now = _dt.datetime.now(_dt.UTC).replace(tzinfo=None)
        assert deliver(outbox, now) == 0  # not due again yet: the backoff is 1 s
        assert deliver(outbox, now + _dt.timedelta(seconds=1.5)) == 2
        assert deliver(outbox, now + _dt.timedelta(seconds=10)) == 2
        flaky, closed = job_notifications(job_id, nlab.user("alice"))
    assert [a["outcome"] for a in flaky["attempt_list"]] == ["HTTP 503 Service Unavailable",
                                                            "HTTP 502 Bad Gateway", "HTTP 200"]
    assert flaky["status"] == "delivered" and flaky["attempts"] == 3
    assert closed["status"] == "pending" and closed["attempts"] == 3 and closed["next_attempt"]
    assert all("ConnectionRefusedError" in a["outcome"] for a in closed["attempt_list"])


def test_a_client_error_ends_the_notification_and_retries_stop_after_the_period(nlab, receiver) -> None:
    import datetime as _dt

    receiver.answers = [404]
    with connection():
        text = notify_job({"criteria": {"status": "finished"},
                           "callbacks": [{"url": f"{receiver.url}/gone"}, {"url": "http://127.0.0.1:9/closed"}]})
        job_id = run_job(text, nlab.user("alice"))
        configure(NotifySettings(policy=LOOPBACK, timeout=3.0, retry_period=30))
        outbox = Outbox()
        deliver(outbox)
        now = _dt.datetime.now(_dt.UTC).replace(tzinfo=None)
        for seconds in (2, 4, 8, 16, 32, 64):
            deliver(outbox, now + _dt.timedelta(seconds=seconds))
        gone, closed = job_notifications(job_id, nlab.user("alice"))
    assert (gone["status"], gone["attempts"], gone["last_error"]) == ("failed", 1, "HTTP 404 Not Found")
    assert closed["status"] == "failed" and 2 <= closed["attempts"] <= 6


def test_no_redirect_is_followed_to_a_refused_target(nlab, receiver: Receiver) -> None:
    receiver.redirect_to = "http://169.254.169.254/latest/meta-data/"
    with connection():
        job_id = run_job(notify_job({"criteria": {"status": "finished"}, "callback": {"url": receiver.url}}),
                         nlab.user("alice"))
        deliver()
        [record] = job_notifications(job_id, nlab.user("alice"))
    assert record["status"] == "failed" and record["last_error"].startswith("refused: ")
    assert "169.254.169.254" in record["last_error"] and "link-local" in record["last_error"]


def test_a_hung_receiver_times_out(nlab, receiver: Receiver) -> None:
    receiver.delay = 3
    configure(NotifySettings(policy=LOOPBACK, timeout=0.5))
    with connection():
        job_id = run_job(notify_job({"criteria": {"status": "finished"}, "callback": {"url": receiver.url}}),
                         nlab.user("alice"))
        started = time.monotonic()
        deliver()
        assert time.monotonic() - started < 2.5
        [record] = job_notifications(job_id, nlab.user("alice"))
    assert record["status"] == "pending" and record["last_error"] == "timeout after 0.5 s"


def test_a_big_log_is_cut_at_a_line_and_the_cap_is_said(nlab, receiver: Receiver) -> None:
    configure(NotifySettings(policy=LOOPBACK, max_log_bytes=2000))
    with connection():
        text = notify_job({"criteria": {"status": "finished"},
                           "callback": {"url": receiver.url, "method": "POST", "dataset": "logs",
                                        "content-type": "json"}})
        [job_id] = jobs.submit_job(text, nlab.user("alice"))
        Scheduler().loop_once()
        jobs.job_started(job_id)
        jobs.append_logs(job_id, [LogRecord("2024-01-01T10:00:00.000000", "target", f"line {n} " + "x" * 80)
                                  for n in range(2000)])
        jobs.job_finished(job_id, "Complete")
        deliver()
    data = json.loads(receiver.wait(1)[0].body)
    assert len(data["log"].encode()) <= 2000 and data["log"].endswith("\n")
    assert len(yaml.safe_load(data["log"])) == data["log"].count("\n")
    truncated = data["log_truncated"]
    assert truncated["limit_bytes"] == 2000 and truncated["sent_bytes"] == len(data["log"].encode())
    assert truncated["total_bytes"] > 100_000


def test_canceling_a_queued_job_notifies_canceled(nlab, receiver: Receiver) -> None:
    with connection():
        text = notify_job({"criteria": {"status": "canceled"}, "callback": {"url": f"{receiver.url}/c/{{ID}}"}})
        [job_id] = jobs.submit_job(text, nlab.user("alice"))
        jobs.cancel_job(job_id, nlab.user("alice"))
        deliver()
    assert receiver.wait(1)[0].path == f"/c/{job_id}"


def test_the_outbox_row_is_written_with_the_state_change(nlab) -> None:
    """No sender runs: the rows wait in the outbox (a master killed now delivers them when back)."""
    with connection():
        text = notify_job({"criteria": {"status": "all"}, "callback": {"url": "http://127.0.0.1:9/"}})
        job_id = run_job(text, nlab.user("alice"))
        rows = list(Notification.select().where(Notification.job == job_id).order_by(Notification.id))
    assert [(r.trigger, r.status, r.attempts, r.snapshot["state"]) for r in rows] == [
        ("Running", "pending", 0, "Running"), ("Complete", "pending", 0, "Finished")]


# ---- emails ----

class Mailbox(list):
    """The messages an SMTP server received (aiosmtpd envelopes); ``port`` it listens on."""

    port = 0


@pytest.fixture
def smtp_server() -> Iterator[Mailbox]:
    aiosmtpd = pytest.importorskip("aiosmtpd.controller", reason="aiosmtpd is not installed (pip install aiosmtpd)")
    from support.broker import free_port

    messages = Mailbox()

    class Handler:
        async def handle_DATA(self, server, session, envelope):  # noqa: N802 (aiosmtpd's name)
            messages.append(envelope)
            return "250 OK"

    controller = aiosmtpd.Controller(Handler(), hostname="127.0.0.1", port=free_port())
    controller.start()
    messages.port = controller.port
    yield messages
    controller.stop()


def test_email_recipients_get_one_mail_each_through_smtp(nlab, smtp_server: Mailbox) -> None:
    from master.models import User

    configure(NotifySettings(policy=LOOPBACK, smtp_host="127.0.0.1", smtp_port=smtp_server.port,
                             smtp_from="lab@example.org"))
    with connection():
        User.update(email="bob@example.org").where(User.username == "bob").execute()
        text = notify_job({"criteria": {"status": "all"}, "verbosity": "verbose",
                           "recipients": [{"to": {"method": "email", "user": "bob"}},
                                          {"to": {"method": "email", "email": "ci@example.org"}},
                                          {"to": {"method": "email", "user": "alice"}}]})
        job_id = run_job(text, nlab.user("alice"))
        assert deliver() == 3  # once each, at Running (LAVA mails a recipient once per job)
        records = job_notifications(job_id, nlab.user("alice"))
    assert sorted(m.rcpt_tos[0] for m in smtp_server) == ["bob@example.org", "ci@example.org"]
    mail = smtp_server[0].content.decode()
    assert f"Subject: LAVA notification for Test Job {job_id} notified" in mail and "lab@example.org" in mail
    # the state is the one that triggered the mail (Running), the results those recorded when it was sent
    assert f"Job {job_id} (notified): Running" in mail and "0_smoke: 1/1/0/0" in mail
    # users' addresses are not shown (the job's page is public): their names are
    assert sorted(r["target"] for r in records) == ["ci@example.org", "user alice", "user bob"]
    alice = [r for r in records if r["target"] == "user alice"]
    assert alice[0]["status"] == "failed" and alice[0]["last_error"] == "user alice has no email address"


def test_a_job_name_cannot_add_mail_headers(nlab, smtp_server: Mailbox) -> None:
    configure(NotifySettings(policy=LOOPBACK, smtp_host="127.0.0.1", smtp_port=smtp_server.port))
    with connection():
        text = notify_job({"criteria": {"status": "finished"},
                           "recipients": [{"to": {"method": "email", "email": "ci@example.org"}}]},
                          name='"two\\nBcc: victim@example.org"')
        job_id = run_job(text, nlab.user("alice"))
        deliver()
        [record] = job_notifications(job_id, nlab.user("alice"))
    assert record["status"] == "delivered" and [m.rcpt_tos for m in smtp_server] == [["ci@example.org"]]
    headers = smtp_server[0].content.decode().split("\r\n\r\n")[0]
    assert not [line for line in headers.split("\r\n") if line.lower().startswith("bcc")]
    assert f"Subject: LAVA notification for Test Job {job_id} two Bcc: victim@example.org" in headers


def test_emails_are_rate_limited(nlab, smtp_server: Mailbox) -> None:
    configure(NotifySettings(policy=LOOPBACK, smtp_host="127.0.0.1", smtp_port=smtp_server.port, email_rate=2))
    with connection():
        text = notify_job({"criteria": {"status": "finished"},
                           "recipients": [{"to": {"method": "email", "email": f"r{n}@example.org"}}
                                          for n in range(4)]})
        job_id = run_job(text, nlab.user("alice"))
        deliver()
        records = job_notifications(job_id, nlab.user("alice"))
    assert len(smtp_server) == 2
    assert sorted(r["status"] for r in records) == ["delivered", "delivered", "pending", "pending"]
    assert all(r["attempts"] == 0 for r in records if r["status"] == "pending")  # deferred, not failed


# ---- remote tokens ----

def test_remote_tokens_belong_to_their_owner(nlab) -> None:
    with connection():
        alice, bob = nlab.user("alice"), nlab.user("bob")
        remote_tokens.add_token(alice, "kci", "one")
        remote_tokens.add_token(alice, "kci", "two")  # replaced
        assert remote_tokens.list_tokens(alice) == [{"name": "kci", "token": "two"}]
        assert remote_tokens.list_tokens(bob) == []
        with pytest.raises(Exception, match="was not found"):
            remote_tokens.show_token(bob, "kci")
        with pytest.raises(Invalid):
            remote_tokens.add_token(alice, "bad name", "x")
        remote_tokens.delete_token(alice, "kci")
        assert remote_tokens.list_tokens(alice) == []


def test_secrets_are_redacted_in_every_definition_shown(nlab) -> None:
    with connection():
        text = job_text("secretive") + "secrets:\n  TOKEN: hunter2-very-secret\n"
        [job_id] = jobs.submit_job(text, nlab.user("alice"))
        shown = jobs.job_definition(job_id, nlab.user("alice"))
    assert "hunter2" not in shown and yaml.safe_load(shown)["secrets"] == {"TOKEN": "[redacted]"}
    stored = (nlab.instance.store.job_dir(job_id) / "job.yaml").read_text()
    assert "hunter2" not in stored


def test_a_second_lab_on_another_backend_starts_clean(tmp_path: Path, database_url) -> None:
    """Migration 7 on a fresh database creates the outbox tables (step 1 does not know them)."""
    build_lab(tmp_path / "other", database_url)
    with connection():
        assert Notification.select().count() == 0
    close_database()


def test_remote_tokens_over_rest_xmlrpc_lavacli_and_the_cli(nlab, receiver: Receiver, tmp_path: Path) -> None:
    import os
    import subprocess
    import sys
    import urllib.request
    import xmlrpc.client

    from support.master import stop_server

    from master.server import MasterServer

    server = MasterServer("127.0.0.1", 0, scheduler=False, publish_site=False, validators=0, notify=False).start()
    try:
        def rest(method: str, path: str, body: dict | None = None, token: str = nlab.tokens["alice"]):
            request = urllib.request.Request(f"{server.url}/api/v0.2{path}", method=method,
                                             data=json.dumps(body).encode() if body else None,
                                             headers={"Authorization": f"Token {token}",
                                                      "Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=10) as response:
                text = response.read().decode()
                return response.status, json.loads(text) if text else None

        assert rest("POST", "/remote-artifact-tokens/", {"name": "kci", "token": "from-rest"}) == (
            201, {"name": "kci", "token": "from-rest"})
        assert rest("GET", "/remote-artifact-tokens/kci/")[1] == {"name": "kci", "token": "from-rest"}
        assert rest("GET", "/remote-artifact-tokens/", token=nlab.tokens["bob"])[1]["results"] == []
        proxy = xmlrpc.client.ServerProxy(f"http://alice:{nlab.tokens['alice']}@127.0.0.1:{server.port}/RPC2")
        proxy.scheduler.remote_artifact_tokens.add("squad", "from-xmlrpc")
        assert proxy.scheduler.remote_artifact_tokens.show("squad") == "from-xmlrpc"
        # lavacli tokens add/list (what a lab user types)
        home = tmp_path / "home"
        home.mkdir()
        env = {**os.environ, "HOME": str(home), "NO_COLOR": "1"}
        env.pop("XDG_CONFIG_HOME", None)
        lavacli = [str(Path(sys.executable).parent / "lavacli")]
        uri = f"{server.url}/RPC2"
        subprocess.run(lavacli + ["identities", "add", "--uri", uri, "--username", "alice", "--token",
                                  nlab.tokens["alice"], "default"], env=env, check=True, timeout=60)
        subprocess.run(lavacli + ["tokens", "add", "lavacli-token", "--token", "from-lavacli"], env=env,
                       check=True, timeout=60, capture_output=True)
        listed = subprocess.run(lavacli + ["tokens", "list"], env=env, check=True, timeout=60, capture_output=True,
                                text=True).stdout
        assert "lavacli-token" in listed and "squad" in listed and "kci" in listed
        assert rest("DELETE", "/remote-artifact-tokens/kci/")[0] == 204
        with connection():
            job_id = run_job(notify_job({"criteria": {"status": "finished"},
                                         "callback": {"url": receiver.url, "token": "lavacli-token"}}),
                             nlab.user("alice"))
            deliver()
        assert receiver.wait(1)[0].headers["Authorization"] == "from-lavacli"
        status, page = rest("GET", f"/jobs/{job_id}/notifications/")
        assert page["count"] == 1 and page["results"][0]["status"] == "delivered"
        assert "from-lavacli" not in json.dumps(page)
    finally:
        stop_server(server)


def test_the_job_page_shows_each_attempt(nlab, receiver: Receiver) -> None:
    receiver.answers = [500]
    with connection():
        remote_tokens.add_token(nlab.user("alice"), "kci", "page-s3cret")
        job_id = run_job(notify_job({"criteria": {"status": "finished"},
                                     "callback": {"url": f"{receiver.url}/page", "token": "kci"}}),
                         nlab.user("alice"))
        import datetime as _dt

        outbox = Outbox()
        deliver(outbox)
        deliver(outbox, _dt.datetime.now(_dt.UTC).replace(tzinfo=None) + _dt.timedelta(seconds=2))
        publish_pages(job_id)
    page = (nlab.instance.site_dir / "jobs" / str(job_id) / "index.html").read_text()
    assert "Notifications" in page and f"{receiver.url}/page" in page
    assert "HTTP 500 Internal Server Error" in page and "HTTP 200" in page and "delivered" in page
    assert "page-s3cret" not in page


def test_a_non_ascii_callback_url_is_sent_percent_encoded(nlab, receiver: Receiver) -> None:
    with connection():
        run_job(notify_job({"criteria": {"status": "finished"},
                            "callback": {"url": f"{receiver.url}/nœud/{{ID}}?branch=mäin"}}), nlab.user("alice"))
        deliver()
    assert receiver.wait(1)[0].path == "/n%C5%93ud/1?branch=m%C3%A4in"
