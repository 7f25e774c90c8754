"""The broker: the master's ZeroMQ side, between the scheduler and the agents (``pumice-agent``).

A ROUTER socket (``--broker tcp://*:5556``; optionally a second one for logs, ``--broker-logs
tcp://*:5555``) speaks the messages of :mod:`agent.messages` with every worker. The broker runs in
a thread of ``pumice-master serve`` and works through the service layer (:mod:`master.jobs`,
:mod:`master.lab`); it only keeps in memory what it can rebuild from the database and the
artifact store after a restart.

- HELLO from a worker: the protocol version must match and the hostname be a registered worker
  (with CURVE, the key must be the one registered for that hostname), else REFUSED with the
  reason, logged on both sides. WELCOME is followed by STATUS (the jobs the master thinks run
  there), START for its Scheduled jobs and CANCEL for its Canceling ones.
- Worker online/offline from heartbeats: offline after ``LIVENESS`` silent intervals. A job whose
  worker stays away longer than the job's timeout ends Incomplete (Infrastructure error; the
  device's health goes to Unknown).
- ``job_scheduled`` events send START (resent until START_OK, then ``job_started``);
  ``job_canceling`` events send CANCEL (resent until END).
- LOG batches are appended to the job's log file in the artifact store (``output.yaml`` with its
  line index) by line number: a batch the store already has is acknowledged and dropped, a gap is
  answered with ``rewind``. The ``results`` records in new lines go to the database at once. After
  a crash the file is the truth: results found in it but not in the database are inserted when
  the job's stream is reopened, so nothing is lost or doubled.
- END: ``job_finished`` (once the store holds every line), description.yaml stored, END_OK.

CURVE (``--encrypt``): the master's key pair (``--master-cert``, created on first use) and a
directory of workers' public keys (``--workers-certs``, ``<hostname>.key`` files), reloaded when it
changes. REST: ``GET /api/v0.2/system/certificate/`` and ``GET|POST
/api/v0.2/workers/<hostname>/certificate/`` (:func:`install_routes`).

Hooks for ``pumice-master serve`` (master/cli.py and master/api.py call them):
:func:`add_arguments`, :func:`start_from_args`, :func:`install_routes`.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
import zmq
from zmq.utils import z85

from agent import __version__
from agent.messages import (
    JOB_UNKNOWN,
    PROTOCOL_VERSION,
    Bye,
    Cancel,
    End,
    EndOk,
    Hello,
    HelloRequired,
    Log,
    LogOk,
    Message,
    MessageError,
    Ping,
    Pong,
    Refused,
    Start,
    StartOk,
    Status,
    StatusReply,
    VersionMismatch,
    Welcome,
    decode,
    encode,
)
from agent.timeout import parse_duration
from agent.transport import LIVENESS, CertificateError, create_certificate, read_certificate
from master import events, jobs, lab
from master.db import connection, db
from master.errors import Invalid, NotFound, ServiceError
from master.instance import current
from master.models import Device, Job, TestCase, Worker, utcnow
from master.states import JobHealth, JobState, WorkerState
from master.validation import own_context
from results.fastyaml import SafeLoader
from results.log import LogRecord
from results.logfile import LogFile
from results.record import Result

log = logging.getLogger("pumice.broker")

DEFAULT_ENDPOINT = "tcp://*:5556"
DEFAULT_HEARTBEAT = 5.0
#: seconds between two checks for jobs whose worker stayed away past their timeout
AWAY_CHECK = 5.0
#: seconds between two updates of a worker's last_seen in the database
SEEN_REFRESH = 10.0
#: job logs kept open at once (4 file descriptors each)
MAX_STREAMS = 256
#: the health an agent may report
HEALTHS = (JobHealth.COMPLETE, JobHealth.INCOMPLETE, JobHealth.CANCELED)

_ALL = zmq.POLLIN
ZAP_DOMAIN = "pumice"


# ---- results records -> results ----

def results_in_lines(job_id: int | str, lines: Iterable[str]) -> list[Result]:
    """The results of the ``results`` records among ``output.yaml`` lines, in order. Invalid ones
    are logged and skipped (deterministically: the same lines always give the same results)."""
    found: list[Result] = []
    for line in lines:
        if '"results"' not in line and "results" not in line:
            continue
        try:
            record = LogRecord.from_line(line)
        except ValueError:
            continue
        if record.lvl != "results":
            continue
        try:
            found.append(Result.from_record(record.msg, job_id))
        except (ValueError, TypeError) as exc:
            log.warning("job %s: results record skipped (%s): %s", job_id, exc, line[:200])
    return found


# ---- CURVE keys ----

CERT_TEMPLATE = """#   ****  Generated by Pumice  ****
#   ZeroMQ CURVE Public Certificate
#   Exchange securely, or use a secure mechanism to verify the contents
#   of this file after exchange. Store public certificates in your home
#   directory, in the .curve subdirectory.

metadata
curve
    public-key = "{key}"
"""


def certificate_text(public_key: str) -> str:
    """A public certificate file (the format ``pumice-agent create-certificate`` writes)."""
    return CERT_TEMPLATE.format(key=public_key)


def parse_public_key(text: str) -> str:
    """The Z85 public key in a certificate file's text or given bare; Invalid otherwise."""
    text = text.strip()
    if "secret-key" in text:
        raise Invalid("this is a secret key file: send the public NAME.key, never NAME.key_secret")
    key = text
    if "public-key" in text:
        for line in text.splitlines():
            line = line.strip()
            if line.startswith("public-key"):
                key = line.split("=", 1)[1].strip().strip("'\"")
                break
    try:
        if len(key) != 40 or len(z85.decode(key.encode("ascii"))) != 32:
            raise ValueError
    except (ValueError, UnicodeEncodeError, KeyError):
        raise Invalid("not a CURVE public key: give the NAME.key file written by 'pumice-agent "
                      "create-certificate NAME', or its 40-character Z85 public-key") from None
    return key


class KeyDirectory:
    """Workers' public keys: ``DIR/<hostname>.key`` files, reread when the directory changes."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._by_key: dict[bytes, str] = {}
        self._stamp: tuple[int, int] | None = None
        self._checked = 0.0
        self._lock = threading.Lock()

    def _stamp_now(self) -> tuple[int, int]:
        stat = self.directory.stat()
        return stat.st_mtime_ns, stat.st_ino

    def reload(self, force: bool = False) -> None:
        with self._lock:
            stamp = self._stamp_now()
            # a directory changes when a key is added or replaced (files are renamed in); a full
            # reread every 10 s also catches files edited in place
            if not force and stamp == self._stamp and time.monotonic() - self._checked < 10:
                return
            keys: dict[bytes, str] = {}
            for path in sorted(self.directory.glob("*.key")):
                try:
                    public, _ = read_certificate(path)
                except CertificateError as exc:
                    log.error("ignoring a worker key: %s", exc)
                    continue
                keys[public] = path.name[: -len(".key")]
            if keys != self._by_key:
                log.info("worker keys loaded from %s: %s", self.directory,
                         ", ".join(sorted(keys.values())) or "none")
            self._by_key, self._stamp, self._checked = keys, stamp, time.monotonic()

    def hostname_of(self, public_key: bytes) -> str | None:
        """The worker a Z85 public key belongs to (None: unknown key)."""
        self.reload()
        return self._by_key.get(public_key)

    def path(self, hostname: str) -> Path:
        return self.directory / f"{hostname}.key"

    def get(self, hostname: str) -> str | None:
        path = self.path(hostname)
        if not path.exists():
            return None
        try:
            return read_certificate(path)[0].decode("ascii")
        except CertificateError:
            return None

    def set(self, hostname: str, public_key: str) -> None:
        """Write ``<hostname>.key`` (renamed into place: the change is seen at once)."""
        from master.store import write_atomic

        write_atomic(self.path(hostname), certificate_text(public_key))
        self.reload(force=True)


@dataclass
class CurvePaths:
    """Where the master's key pair and the workers' public keys live."""

    master_cert: Path
    workers_certs: Path

    @classmethod
    def default(cls) -> CurvePaths:
        base = current().data_dir / "certificates"
        return cls(base / "master.key_secret", base / "workers")


def master_keys(path: Path, create: bool = True) -> tuple[bytes, bytes]:
    """The master's (public, secret) Z85 keys from ``path`` (a ``.key_secret`` file); created
    (with its public ``.key`` beside it) when missing and ``create`` is set."""
    if not path.exists() and create:
        name = path.name[: -len(".key_secret")] if path.name.endswith(".key_secret") else path.stem
        create_certificate(name, path.parent)
        created = path.parent / f"{name}.key_secret"
        if created != path:
            created.rename(path)
        log.warning("created the master's CURVE key pair %s (give the workers %s)", path,
                    path.parent / f"{name}.key")
    public, secret = read_certificate(path, secret=True)
    assert secret is not None
    return public, secret


class _Authenticator:
    """ZAP for CURVE: a key is accepted when it is in the key directory; the User-Id of the
    connection is the worker it belongs to. Refusals are logged with the reason."""

    def __init__(self, context: zmq.Context, keys: KeyDirectory) -> None:
        from zmq.auth.thread import ThreadAuthenticator

        keys_ = keys

        class Authenticator(ThreadAuthenticator):
            address = ""

            async def handle_zap_message(self, msg: list[bytes]) -> None:
                # remember the peer's address for the refusal message
                self.address = msg[3].decode("utf-8", "replace") if len(msg) > 3 else "?"
                await super().handle_zap_message(msg)

            def curve_user_id(self, client_public_key: bytes) -> str:
                key = z85.encode(client_public_key)
                return keys_.hostname_of(key) or ""

        class Provider:
            def __init__(self, auth: Authenticator) -> None:
                self.auth = auth

            def callback(self, domain: str, key: bytes) -> bool:
                hostname = keys_.hostname_of(key)
                if hostname is None:
                    log.error("refused a connection from %s: unknown CURVE key %s (not in %s); register "
                              "the worker's key with POST /api/v0.2/workers/<hostname>/certificate/",
                              self.auth.address, key.decode("ascii", "replace"), keys_.directory)
                    return False
                log.debug("CURVE key of %s accepted from %s", hostname, self.auth.address)
                return True

        self.auth = Authenticator(context, log=logging.getLogger("pumice.broker.zap"))
        self.auth.start()
        self.auth.configure_curve_callback(ZAP_DOMAIN, credentials_provider=Provider(self.auth))

    def stop(self) -> None:
        self.auth.stop()


# ---- the broker ----


@dataclass
class Session:
    """A worker that said HELLO and has not gone silent."""

    hostname: str
    version: str
    last_seen: float
    db_seen: float


@dataclass
class Stream:
    """The master's side of one job's log: its store file and what the database holds."""

    job_id: int
    worker: str
    logfile: LogFile
    lines: int
    results: int


@dataclass
class Pending:
    """A START or CANCEL to (re)send until the worker acknowledges it."""

    worker: str
    sent: float = 0.0
    message: Message | None = None


@dataclass
class BrokerStats:
    """Counters (benchmarks and tests read them)."""

    messages: int = 0
    log_lines: int = 0
    duplicate_lines: int = 0
    results: int = 0
    refused: int = 0
    extra: dict[str, int] = field(default_factory=dict)


class Broker:
    """The ROUTER socket(s), the worker sessions and the job streams; ``loop_once()`` does one
    round of I/O and timers, ``start()`` runs it in a thread."""

    def __init__(self, endpoint: str = DEFAULT_ENDPOINT, *, log_endpoint: str | None = None,
                 heartbeat: float = DEFAULT_HEARTBEAT, encrypt: bool = False, master_cert: Path | None = None,
                 workers_certs: Path | None = None, context: zmq.Context | None = None) -> None:
        self.endpoint = endpoint
        self.log_endpoint = log_endpoint
        self.heartbeat = heartbeat
        self.encrypt = encrypt
        defaults = CurvePaths.default()
        self.paths = CurvePaths(Path(master_cert) if master_cert else defaults.master_cert,
                                Path(workers_certs) if workers_certs else defaults.workers_certs)
        self.context = context or zmq.Context()
        self._own_context = context is None
        self.sessions: dict[str, Session] = {}
        self.streams: dict[int, Stream] = {}
        self.starts: dict[int, Pending] = {}
        self.cancels: dict[int, Pending] = {}
        self.stats = BrokerStats()
        #: workers the database says are online, waiting for their HELLO after our (re)start
        self._expected: dict[str, float] = {}
        self._timeouts: dict[int, float] = {}
        self._inbox: deque[tuple[str, list[int]]] = deque()
        self._wake_r, self._wake_w = os.pipe()
        self._wake_fds: tuple[int, ...] = (self._wake_r, self._wake_w)
        self._wake_lock = threading.Lock()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._authenticator: _Authenticator | None = None
        self.keys: KeyDirectory | None = None
        self.sockets: list[zmq.Socket] = []
        self._poller = zmq.Poller()
        self._next_timers = 0.0
        self._next_away = 0.0
        self.bound: list[str] = []
        # service-layer calls that may take long (a job's end writes its bundle, lab.yaml...) run
        # in order on a thread of their own, so that log streams never wait for them
        self._services: queue.SimpleQueue[tuple[Callable[..., Any], tuple] | None] = queue.SimpleQueue()
        self._service_thread: threading.Thread | None = None
        #: replies produced by the service thread, sent by the loop (sockets are the loop's only)
        self._outbox: deque[tuple[zmq.Socket, str, Message]] = deque()
        #: LOG batches handled in this burst: their results are committed together, then acked
        self._staged_results: dict[int, list[Result]] = {}
        self._staged_acks: list[tuple[zmq.Socket, str, LogOk]] = []
        #: jobs whose end the service thread is recording
        self._ending: set[int] = set()

    # -- setup --

    def _router(self, endpoint: str, public: bytes | None, secret: bytes | None) -> zmq.Socket:
        sock = self.context.socket(zmq.ROUTER)
        sock.linger = 0
        # a worker that reconnects (a new socket, same identity) replaces its old connection
        sock.router_handover = 1
        sock.router_mandatory = 1
        sock.sndhwm = sock.rcvhwm = 100000
        if public is not None:
            sock.curve_server = True
            sock.curve_publickey = public
            sock.curve_secretkey = secret
            sock.zap_domain = ZAP_DOMAIN.encode()
        sock.bind(endpoint)
        self.bound.append(sock.last_endpoint.decode())
        self._poller.register(sock, _ALL)
        return sock

    def bind(self) -> Broker:
        """Bind the socket(s) (and start CURVE authentication); returns self."""
        public = secret = None
        if self.encrypt:
            if not zmq.has("curve"):
                raise RuntimeError("--encrypt: this libzmq has no CURVE support (it needs libsodium)")
            public, secret = master_keys(self.paths.master_cert)
            self.keys = KeyDirectory(self.paths.workers_certs)
            self.keys.reload(force=True)
            self._authenticator = _Authenticator(self.context, self.keys)
        self.socket = self._router(self.endpoint, public, secret)
        self.sockets.append(self.socket)
        if self.log_endpoint:
            self.sockets.append(self._router(self.log_endpoint, public, secret))
        self._poller.register(self._wake_r, zmq.POLLIN)
        log.info("broker listening on %s (protocol %d, heartbeat %.1f s%s)", ", ".join(self.bound),
                 PROTOCOL_VERSION, self.heartbeat, ", CURVE" if self.encrypt else "")
        return self

    def recover(self) -> None:
        """Load what the database says is in flight: START for Scheduled jobs, CANCEL for
        Canceling ones, and a grace period for workers marked online."""
        now = time.monotonic()
        with connection():
            rows = (Job.select(Job.id, Job.state, Worker.hostname).join(Worker, on=(Job.worker == Worker.id))
                    .where(Job.state.in_(JobState.ACTIVE)).tuples())
            for job_id, state, hostname in rows:
                if state == JobState.SCHEDULED:
                    self.starts.setdefault(job_id, Pending(hostname))
                elif state == JobState.CANCELING:
                    self.cancels.setdefault(job_id, Pending(hostname))
            online = Worker.select(Worker.hostname).where(Worker.state == WorkerState.ONLINE).tuples()
            for (hostname,) in online:
                self._expected[hostname] = now

    def start(self) -> Broker:
        """Bind, recover, listen to events and run the loop in a daemon thread."""
        global _running
        if not self.sockets:
            self.bind()
        self.recover()
        events.subscribe(self.on_event)
        self._stop.clear()
        self._service_thread = threading.Thread(target=self._run_services, name="pumice-broker-services",
                                                daemon=True)
        self._service_thread.start()
        self._thread = threading.Thread(target=self.run, name="pumice-broker", daemon=True)
        self._thread.start()
        _running = self
        return self

    def run(self) -> None:
        while not self._stop.is_set():
            try:
                self.loop_once(0.5)
            except Exception:
                log.exception("broker loop failed; going on")
                self._stop.wait(0.5)

    def stop(self) -> None:
        """Stop the loop and release the sockets (idempotent)."""
        global _running
        events.unsubscribe(self.on_event)
        self._stop.set()
        self._wake()
        if self._thread is not None:
            self._thread.join(10)
            self._thread = None
        if self._service_thread is not None:
            self._services.put(None)
            self._service_thread.join(30)
            self._service_thread = None
        for stream in self.streams.values():
            stream.logfile.close()
        self.streams.clear()
        for sock in self.sockets:
            sock.close(linger=0)
        self.sockets.clear()
        if self._authenticator is not None:
            self._authenticator.stop()
            self._authenticator = None
        if self._own_context and not self.context.closed:
            self.context.term()
        # closed once only: a second close could hit a file another thread has opened since
        with self._wake_lock:
            fds, self._wake_fds = self._wake_fds, ()
            for fd in fds:
                os.close(fd)
        if _running is self:
            _running = None

    # -- the service thread --

    def _service(self, func: Callable[..., Any], *args: Any) -> None:
        """Run ``func(*args)`` on the service thread, after the calls queued before it (inline
        when no service thread runs: a broker driven by ``loop_once()``)."""
        if self._service_thread is None:
            self._call(func, args)
        else:
            self._services.put((func, args))

    def _call(self, func: Callable[..., Any], args: tuple) -> None:
        try:
            with connection():
                func(*args)
        except Exception:
            log.exception("broker: %s%r failed", getattr(func, "__name__", func), args)

    def _run_services(self) -> None:
        while (item := self._services.get()) is not None:
            self._call(*item)

    def _reply(self, sock: zmq.Socket, hostname: str, msg: Message) -> None:
        """Send ``msg`` from any thread (through the loop)."""
        if threading.current_thread() is self._thread or self._thread is None:
            self._send(hostname, msg, sock)
        else:
            self._outbox.append((sock, hostname, msg))
            self._wake()

    # -- events from other threads --

    def on_event(self, event: str, data: dict[str, Any]) -> None:
        """Listener of :mod:`master.events` (any thread): queue the work, wake the loop."""
        if event == "job_scheduled":
            self._inbox.append(("start", list(data.get("job_ids") or ())))
        elif event == "job_canceling":
            self._inbox.append(("cancel", list(data.get("job_ids") or ())))
        else:
            return
        self._wake()

    def _wake(self) -> None:
        with self._wake_lock:
            if not self._wake_fds:
                return  # stopped
            # a full pipe wakes the loop anyway
            with contextlib.suppress(BlockingIOError):
                os.write(self._wake_w, b"\0")

    def _drain_inbox(self) -> None:
        try:
            while os.read(self._wake_r, 4096):
                pass
        except (BlockingIOError, OSError):
            pass
        if not self._inbox:
            return
        with connection():
            while self._inbox:
                kind, job_ids = self._inbox.popleft()
                rows = dict(Job.select(Job.id, Worker.hostname).join(Worker, on=(Job.worker == Worker.id))
                            .where(Job.id.in_(job_ids)).tuples())
                for job_id in job_ids:
                    hostname = rows.get(job_id)
                    if hostname is None:
                        continue
                    if kind == "start":
                        self.starts[job_id] = Pending(hostname)
                        self._send_start(job_id)
                    else:
                        self.starts.pop(job_id, None)
                        self.cancels[job_id] = Pending(hostname)
                        self._send_cancel(job_id)

    # -- sending --

    def _send(self, hostname: str, msg: Message, sock: zmq.Socket | None = None) -> bool:
        try:
            (sock or self.socket).send_multipart([hostname.encode(), *encode(msg)], flags=zmq.NOBLOCK)
        except zmq.ZMQError as exc:  # EHOSTUNREACH (not connected), EAGAIN (queue full)
            log.debug("cannot send %s to %s: %s", msg.TYPE, hostname, exc)
            return False
        return True

    def _send_start(self, job_id: int) -> None:
        pending = self.starts.get(job_id)
        if pending is None or pending.worker not in self.sessions:
            return
        if pending.message is None:
            try:
                pending.message = self.start_message(job_id)
            except ServiceError as exc:
                self.starts.pop(job_id, None)
                log.error("job %d cannot start: %s", job_id, exc.message)
                self._finish(job_id, JobHealth.INCOMPLETE, exc.message, "Configuration")
                return
            if pending.message is None:  # not Scheduled any more
                self.starts.pop(job_id, None)
                return
        if self._send(pending.worker, pending.message):
            pending.sent = time.monotonic()
            log.info("job %d: START sent to %s", job_id, pending.worker)

    def _send_cancel(self, job_id: int) -> None:
        pending = self.cancels.get(job_id)
        if pending is None or pending.worker not in self.sessions:
            return
        if self._send(pending.worker, Cancel(job_id=job_id)):
            pending.sent = time.monotonic()
            log.info("job %d: CANCEL sent to %s", job_id, pending.worker)

    def start_message(self, job_id: int) -> Start | None:
        """START for a Scheduled job: the definition, the device YAML rendered with the job's
        context, the worker's env and dispatcher config (None if the job is not Scheduled)."""
        job = Job.get_or_none(Job.id == job_id)
        if job is None or job.state != JobState.SCHEDULED or job.actual_device_id is None:
            return None
        device = Device.get_by_id(job.actual_device_id)
        worker = Worker.get_by_id(job.worker_id)
        data = _load_yaml(job.definition, f"job {job_id}")
        context = data.get("context") if isinstance(data.get("context"), dict) else None
        device_yaml = lab.review_dictionary(device.hostname, context)
        # the same without the job's context: what of it the job's context did not write (agent.qemu_policy)
        device_own = lab.review_dictionary(device.hostname, own_context(lab.get_dictionary(device.hostname), context))
        config = _load_yaml(worker.config, f"worker {worker.hostname} config")
        return Start(job_id=job.id, definition=job.definition, device=device_yaml, device_own=device_own,
                     device_name=device.hostname, env=worker_env(worker.env), dispatcher=config,
                     timeout=self._job_timeout(job))

    def _job_timeout(self, job: Job) -> float:
        if job.id not in self._timeouts:
            try:
                timeouts = _load_yaml(job.definition, f"job {job.id}").get("timeouts") or {}
                self._timeouts[job.id] = parse_duration(timeouts["job"], "timeouts.job")
            except Exception:  # a job that validated has one; be safe with anything else
                self._timeouts[job.id] = 24 * 3600.0
        return self._timeouts[job.id]

    # -- the loop --

    def loop_once(self, timeout: float = 0.5) -> int:
        """Wait up to ``timeout`` seconds for messages or events, handle them, run the timers.
        Returns the number of messages handled."""
        now = time.monotonic()
        wait = max(0.0, min(timeout, self._next_timers - now))
        ready = dict(self._poller.poll(int(wait * 1000)))
        handled = 0
        for sock in self.sockets:
            if sock in ready:
                handled += self._receive(sock)
        if self._wake_r in ready or self._inbox:
            self._drain_inbox()
        while self._outbox:
            sock, hostname, msg = self._outbox.popleft()
            self._send(hostname, msg, sock)
        now = time.monotonic()
        if now >= self._next_timers:
            self._timers(now)
            self._next_timers = now + min(0.25, self.heartbeat / 4)
        return handled

    def _receive(self, sock: zmq.Socket, budget: int = 1000) -> int:
        """Handle a burst of messages: one database connection, the results of its LOG batches
        committed in one transaction, then their acknowledgements."""
        count = 0
        with connection():
            try:
                while count < budget:
                    try:
                        frames = sock.recv_multipart(flags=zmq.NOBLOCK, copy=False)
                    except zmq.Again:
                        break
                    count += 1
                    try:
                        self._on_frames(sock, frames)
                    except Exception:
                        log.exception("failed to handle a message from %r", bytes(frames[0].bytes)[:100])
            finally:
                self._flush()
        self.stats.messages += count
        return count

    def _flush(self) -> None:
        """Commit the staged results, then acknowledge the staged LOG batches. A failure leaves
        their lines in the store but not their results: the streams are reopened (which catches
        up from the store) and the batches are not acknowledged (the agents resend them)."""
        results, acks = self._staged_results, self._staged_acks
        if not results and not acks:
            return
        self._staged_results, self._staged_acks = {}, []
        if results:
            try:
                with db.atomic():
                    for job_id, found in results.items():
                        jobs.append_results(job_id, found)
            except Exception:
                log.exception("storing the results of jobs %s failed; they are taken again from the log",
                              ", ".join(map(str, results)))
                for job_id in results:
                    self._close_stream(job_id)
                acks = [ack for ack in acks if ack[2].job_id not in results]
            else:
                for job_id, found in results.items():
                    if job_id in self.streams:
                        self.streams[job_id].results += len(found)
                    self.stats.results += len(found)
        for sock, hostname, ack in acks:
            self._send(hostname, ack, sock)

    def _refuse(self, sock: zmq.Socket, identity: bytes, code: str, reason: str) -> None:
        self.stats.refused += 1
        log.error("refused worker %s: %s", identity.decode("utf-8", "replace")[:200], reason)
        with contextlib.suppress(zmq.ZMQError):
            sock.send_multipart([identity, *encode(Refused(reason=reason, code=code))], flags=zmq.NOBLOCK)

    def _on_frames(self, sock: zmq.Socket, frames: list[zmq.Frame]) -> None:
        identity = frames[0].bytes
        hostname = identity.decode("utf-8", "replace")
        try:
            msg = decode([f.bytes for f in frames[1:]])
        except VersionMismatch as exc:
            self._refuse(sock, identity, "protocol",
                         f"protocol version mismatch: the master speaks pumice protocol {PROTOCOL_VERSION} "
                         f"(Pumice {__version__}), worker {hostname} speaks {exc.peer_version}: install the "
                         "same Pumice release on both")
            return
        except MessageError as exc:
            if len(frames) > 3 and frames[3].bytes == b"HELLO":
                self._refuse(sock, identity, "bad-message", f"unreadable HELLO: {exc}")
            else:
                log.error("unreadable message from worker %s: %s", hostname, exc)
            return
        if self.encrypt:
            owner = frames[-1].get("User-Id")
            if owner != hostname:
                self._refuse(sock, identity, "key",
                             f"worker {hostname} connected with the CURVE key of {owner or 'nobody'}: "
                             "each worker must use its own key")
                self.sessions.pop(hostname, None)
                return
        if isinstance(msg, Hello):
            self._on_hello(sock, identity, hostname, msg)
            return
        session = self.sessions.get(hostname)
        if session is None:
            if not isinstance(msg, Bye):
                self._send(hostname, HelloRequired(), sock)
            return
        now = time.monotonic()
        session.last_seen = now
        if isinstance(msg, Log):
            self._on_log(sock, session, msg)
            return
        # anything else sees the state after the LOG batches before it
        self._flush()
        if isinstance(msg, Ping):
            self._send(hostname, Pong(), sock)
        elif isinstance(msg, StartOk):
            self._on_start_ok(session, msg)
        elif isinstance(msg, End):
            self._on_end(sock, session, msg)
        elif isinstance(msg, StatusReply):
            self._on_status_reply(session, msg)
        elif isinstance(msg, Bye):
            log.info("worker %s says goodbye", hostname)
            del self.sessions[hostname]
            self._service(lab.worker_offline, hostname)
        else:
            log.warning("worker %s sent %s, which only the master sends", hostname, msg.TYPE)

    # -- handlers --

    def _on_hello(self, sock: zmq.Socket, identity: bytes, hostname: str, msg: Hello) -> None:
        if msg.protocol != PROTOCOL_VERSION:
            self._refuse(sock, identity, "protocol",
                         f"protocol version mismatch: the master speaks pumice protocol {PROTOCOL_VERSION}, "
                         f"worker {hostname} says {msg.protocol}")
            return
        if msg.hostname != hostname:
            self._refuse(sock, identity, "bad-message",
                         f"the HELLO names {msg.hostname!r} but the connection's identity is {hostname!r}")
            return
        now = time.monotonic()
        with connection():
            worker = Worker.get_or_none(Worker.hostname == hostname)
            if worker is None:
                self._refuse(sock, identity, "unknown-worker",
                             f"worker {hostname} is not registered on this master: an admin adds it with "
                             f"'pumice-master workers add {hostname}' (or POST /api/v0.2/workers/)")
                return
            first = hostname not in self.sessions
            self.sessions[hostname] = Session(hostname, msg.version, now, now)
            self._expected.pop(hostname, None)
            self._service(lab.worker_seen, hostname, msg.version)
            welcome = Welcome(protocol=PROTOCOL_VERSION, version=__version__, heartbeat=self.heartbeat)
            self._send(hostname, welcome, sock)
            if first:
                log.info("worker %s connected (Pumice %s; unfinished jobs on it: %s)", hostname, msg.version,
                         ", ".join(map(str, msg.jobs)) or "none")
                if msg.version != __version__:
                    log.warning("worker %s runs Pumice %s, the master %s: upgrade them together", hostname,
                                msg.version, __version__)
            active = list(Job.select(Job.id, Job.state).where((Job.worker == worker.id)
                                                              & Job.state.in_(JobState.ACTIVE)).tuples())
            asked = [job_id for job_id, state in active if state != JobState.SCHEDULED]
            if asked:
                self._send(hostname, Status(job_ids=asked))
            for job_id, state in active:
                if state == JobState.SCHEDULED:
                    self.starts.setdefault(job_id, Pending(hostname))
                    self._send_start(job_id)
                elif state == JobState.CANCELING:
                    self.cancels.setdefault(job_id, Pending(hostname))
                    self._send_cancel(job_id)

    def _on_start_ok(self, session: Session, msg: StartOk) -> None:
        pending = self.starts.pop(msg.job_id, None)
        self._service(self._record_start, session.hostname, msg.job_id, pending.sent if pending else 0.0)

    @staticmethod
    def _record_start(hostname: str, job_id: int, sent: float) -> None:
        """(service thread) The worker runs the job: Scheduled -> Running."""
        job = Job.get_or_none(Job.id == job_id)
        owner = Worker.get_by_id(job.worker_id).hostname if job and job.worker_id else None
        if owner != hostname:
            log.warning("worker %s acknowledged job %d, which is not its job", hostname, job_id)
            return
        if jobs.job_started(job_id):
            log.info("job %d running on %s%s", job_id, hostname,
                     f" ({(time.monotonic() - sent) * 1000:.1f} ms after START)" if sent else "")

    def _stream(self, job_id: int, hostname: str) -> Stream | None:
        """The job's log stream (opened, and its results made consistent, on first use); None if
        the job is not this worker's."""
        stream = self.streams.get(job_id)
        if stream is not None:
            return stream if stream.worker == hostname else None
        with connection():
            row = (Job.select(Job.id, Worker.hostname).join(Worker, on=(Job.worker == Worker.id))
                   .where(Job.id == job_id).tuples().first())
            if row is None or row[1] != hostname:
                log.warning("worker %s sent the log of job %d, which is %s", hostname, job_id,
                            "unknown" if row is None else f"{row[1]}'s")
                return None
            logfile = current().store.log(job_id)
            lines = logfile.count()
            in_db = TestCase.select().where(TestCase.job == job_id).count()
            found = results_in_lines(job_id, logfile.read(0, lines)) if lines else []
            if in_db < len(found):
                # the master stopped between a log append and its results insert: catch up
                log.warning("job %d: %d result(s) of the stored log were not in the database: adding them",
                            job_id, len(found) - in_db)
                jobs.append_results(job_id, found[in_db:])
            elif in_db > len(found):
                log.warning("job %d: the database holds %d results, its stored log %d", job_id, in_db,
                            len(found))
        stream = Stream(job_id, hostname, logfile, lines, max(in_db, len(found)))
        if len(self.streams) >= MAX_STREAMS:
            # file descriptors are finite: the oldest stream is closed (it reopens when needed)
            self._close_stream(next(iter(self.streams)))
        self.streams[job_id] = stream
        return stream

    def _close_stream(self, job_id: int) -> None:
        stream = self.streams.pop(job_id, None)
        if stream is not None:
            stream.logfile.close()

    def _on_log(self, sock: zmq.Socket, session: Session, msg: Log) -> None:
        stream = self._stream(msg.job_id, session.hostname)
        if stream is None:  # not its job: acknowledge so that it stops, keep nothing
            self._send(session.hostname, LogOk(job_id=msg.job_id, lines=msg.seq + len(msg.lines)), sock)
            return
        have = stream.lines
        if msg.seq > have:
            self._send(session.hostname, LogOk(job_id=msg.job_id, lines=have, rewind=True), sock)
            return
        new = msg.lines[have - msg.seq:]
        self.stats.duplicate_lines += len(msg.lines) - len(new)
        if new:
            try:
                stream.lines = stream.logfile.append_lines(new)
            except ValueError as exc:
                log.error("job %d: log batch from %s refused: %s", msg.job_id, session.hostname, exc)
                return
            self.stats.log_lines += len(new)
            found = results_in_lines(msg.job_id, new)
            if found:
                self._staged_results.setdefault(msg.job_id, []).extend(found)
        # acknowledged once the burst's results are committed (_flush)
        self._staged_acks.append((sock, session.hostname, LogOk(job_id=msg.job_id, lines=stream.lines)))

    def _on_end(self, sock: zmq.Socket, session: Session, msg: End) -> None:
        stream = self._stream(msg.job_id, session.hostname)
        if stream is None:
            self._send(session.hostname, EndOk(job_id=msg.job_id), sock)
            return
        if stream.lines < msg.lines:
            # lines are missing: have them resent before the end is recorded
            self._send(session.hostname, LogOk(job_id=msg.job_id, lines=stream.lines, rewind=True), sock)
            return
        health, error_type, error = msg.health, msg.error_type, msg.error_msg
        if health not in HEALTHS:
            health, error_type = JobHealth.INCOMPLETE, "Bug"
            error = (f"worker {session.hostname} reported the health {msg.health!r}; "
                     f"allowed: {', '.join(HEALTHS)}")
        if msg.description:
            current().store.write_file(msg.job_id, "description.yaml", msg.description)
        self._finish(msg.job_id, health, error if health != JobHealth.COMPLETE else None,
                     error_type if health != JobHealth.COMPLETE else None,
                     reply=(sock, session.hostname, EndOk(job_id=msg.job_id)))

    def _finish(self, job_id: int, health: str, error: str | None, error_type: str | None,
                reply: tuple[zmq.Socket, str, Message] | None = None) -> None:
        """Forget the job here and record its end on the service thread (then send ``reply``)."""
        self.starts.pop(job_id, None)
        self.cancels.pop(job_id, None)
        self._close_stream(job_id)
        self._timeouts.pop(job_id, None)
        if job_id in self._ending:  # its end is being recorded already
            if reply is not None:
                self._service(self._reply, *reply)
            return
        self._ending.add(job_id)
        self._service(self._record_end, job_id, health, error, error_type, reply)

    def _record_end(self, job_id: int, health: str, error: str | None, error_type: str | None,
                    reply: tuple[zmq.Socket, str, Message] | None) -> None:
        """(service thread) ``job_finished``, then the acknowledgement."""
        try:
            if jobs.job_finished(job_id, health, error, error_type):
                log.info("job %d ended %s%s", job_id, health, f" ({error_type}: {error})" if error else "")
        except ServiceError as exc:
            log.error("job %d: cannot record its end (%s): %s", job_id, health, exc.message)
        finally:
            self._ending.discard(job_id)
        if reply is not None:
            self._reply(*reply)

    def _on_status_reply(self, session: Session, msg: StatusReply) -> None:
        lost = [entry.get("job_id") for entry in msg.jobs if entry.get("state") == JOB_UNKNOWN]
        if not lost:
            return
        with connection():
            rows = list(Job.select(Job.id, Job.state).join(Worker, on=(Job.worker == Worker.id))
                        .where(Job.id.in_(lost) & (Worker.hostname == session.hostname)).tuples())
        for job_id, state in rows:
            if state == JobState.CANCELING:
                # canceled before its START reached the worker: nothing ran
                self._finish(job_id, JobHealth.CANCELED, "the job was canceled before it started", "Canceled")
            elif state == JobState.RUNNING:
                error = (f"worker {session.hostname} no longer knows job {job_id} (its spool was lost): "
                         "the job's log and results end where they stopped")
                log.error("job %d: %s", job_id, error)
                self._finish(job_id, JobHealth.INCOMPLETE, error, "Infrastructure")

    # -- timers --

    def _timers(self, now: float) -> None:
        limit = LIVENESS * self.heartbeat
        silent = [s.hostname for s in self.sessions.values() if now - s.last_seen > limit]
        missing = [h for h, since in self._expected.items() if now - since > limit]
        for hostname in missing:
            del self._expected[hostname]
        for hostname in silent:
            log.warning("worker %s silent for %.1f s: offline", hostname,
                        now - self.sessions[hostname].last_seen)
            del self.sessions[hostname]
            self._service(lab.worker_offline, hostname)
        for hostname in missing:
            if hostname not in self.sessions:
                self._service(lab.worker_offline, hostname)
        for session in self.sessions.values():
            if now - session.db_seen > SEEN_REFRESH:
                session.db_seen = now
                self._service(self._seen, session.hostname)
        for job_id, pending in list(self.starts.items()):
            if pending.worker in self.sessions and now - pending.sent >= max(self.heartbeat, 1.0):
                with connection():
                    self._send_start(job_id)
        for job_id, pending in list(self.cancels.items()):
            if pending.worker in self.sessions and now - pending.sent >= max(2 * self.heartbeat, 2.0):
                self._send_cancel(job_id)
        if now >= self._next_away:
            self._next_away = now + min(AWAY_CHECK, self.heartbeat)
            self._end_abandoned_jobs()

    @staticmethod
    def _seen(hostname: str) -> None:
        """(service thread) Keep the worker's last_seen fresh in the database."""
        try:
            lab.worker_seen(hostname)
        except NotFound:  # deleted meanwhile: it is refused at its next HELLO
            log.warning("worker %s was deleted while connected", hostname)

    def _end_abandoned_jobs(self) -> None:
        """Jobs whose worker has been offline for longer than the job's timeout end Incomplete."""
        with connection():
            rows = list(Job.select(Job, Worker.hostname.alias("worker_name"), Worker.last_seen.alias("seen"))
                        .join(Worker, on=(Job.worker == Worker.id))
                        .where(Job.state.in_(JobState.ACTIVE) & (Worker.state == WorkerState.OFFLINE))
                        .objects())
        now = utcnow()
        for job in rows:
            if job.worker_name in self.sessions:
                continue
            timeout = self._job_timeout(job)
            since = job.seen or job.start_time or job.submit_time
            away = (now - since).total_seconds()
            if away > timeout:
                error = (f"worker {job.worker_name} has been away for {away:.0f} s, longer than the job "
                         f"timeout ({timeout:.0f} s): the job is lost")
                log.error("job %d: %s", job.id, error)
                self._finish(job.id, JobHealth.INCOMPLETE, error, "Infrastructure")


_running: Broker | None = None


def running() -> Broker | None:
    """The broker running in this process (None if there is none)."""
    return _running


def _load_yaml(text: str | None, what: str) -> dict:
    if not text:
        return {}
    try:
        data = yaml.load(text, Loader=SafeLoader)  # noqa: S506 - a safe loader
    except yaml.YAMLError as exc:
        raise Invalid(f"{what} is not valid YAML: {exc}") from None
    return data if isinstance(data, dict) else {}


def worker_env(text: str | None) -> dict[str, Any]:
    """A worker's env (LAVA's env.yaml: ``purge``, ``removes``, ``overrides``) as START carries it;
    a plain mapping is taken as overrides."""
    data = _load_yaml(text, "worker env")
    if not data:
        return {}
    if set(data) <= {"purge", "removes", "overrides"}:
        return {"purge": bool(data.get("purge")), "removes": [str(n) for n in data.get("removes") or ()],
                "overrides": {str(k): v for k, v in (data.get("overrides") or {}).items()}}
    return {"purge": False, "removes": [], "overrides": {str(k): v for k, v in data.items()}}


# ---- REST: certificates ----


def curve_paths() -> CurvePaths:
    """The running broker's key locations, else the defaults in the data directory."""
    return _running.paths if _running is not None else CurvePaths.default()


def install_routes(app: Any) -> None:
    """Add the certificate endpoints to the REST API's Bottle app (once)."""
    from master.api import PREFIX, api_call, text_field, user

    if getattr(app, "_pumice_certificate_routes", False):
        return
    app._pumice_certificate_routes = True

    def system_certificate() -> dict:
        path = curve_paths().master_cert
        if not path.exists():
            raise NotFound("the master has no CURVE key pair: start it with 'pumice-master serve --encrypt'")
        public, _ = read_certificate(path)
        key = public.decode("ascii")
        return {"name": "master", "public_key": key, "certificate": certificate_text(key)}

    def get_worker_certificate(hostname: str) -> dict:
        lab.require_admin(user(), "read worker certificates")
        worker = lab.get_worker(hostname)
        key = KeyDirectory(curve_paths().workers_certs).get(hostname) or worker.public_key
        return {"hostname": hostname, "public_key": key,
                "certificate": certificate_text(key) if key else None}

    def set_worker_certificate(hostname: str) -> dict:
        lab.require_admin(user(), "set worker certificates")
        worker = lab.get_worker(hostname)
        key = parse_public_key(text_field("certificate"))
        keys = _running.keys if _running is not None and _running.keys is not None else None
        (keys or KeyDirectory(curve_paths().workers_certs)).set(hostname, key)
        Worker.update(public_key=key).where(Worker.id == worker.id).execute()
        log.info("CURVE key of worker %s set to %s", hostname, key)
        return {"hostname": hostname, "public_key": key, "certificate": certificate_text(key)}

    app.route(f"{PREFIX}/system/certificate/", "GET", api_call(system_certificate))
    app.route(f"{PREFIX}/workers/<hostname>/certificate/", "GET", api_call(get_worker_certificate))
    app.route(f"{PREFIX}/workers/<hostname>/certificate/", ["POST", "PUT"], api_call(set_worker_certificate))


# ---- hooks for pumice-master serve ----


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The broker's options of ``pumice-master serve``."""
    group = parser.add_argument_group("broker (the ZeroMQ endpoint of pumice-agent workers)")
    group.add_argument("--broker", metavar="ENDPOINT",
                       help=f"run the broker on this ZeroMQ endpoint, e.g. {DEFAULT_ENDPOINT}")
    group.add_argument("--broker-logs", metavar="ENDPOINT",
                       help="a second endpoint for job logs (agents' --logger), e.g. tcp://*:5555")
    group.add_argument("--heartbeat", type=float, default=DEFAULT_HEARTBEAT,
                       help="seconds between heartbeats; a worker is offline after 3 silent ones "
                            "(default %(default)s)")
    group.add_argument("--encrypt", action="store_true", help="CURVE: authenticate and encrypt the workers")
    group.add_argument("--master-cert", metavar="FILE",
                       help="the master's key pair (default DATA/certificates/master.key_secret, "
                            "created if missing)")
    group.add_argument("--workers-certs", metavar="DIR",
                       help="workers' public keys, <hostname>.key (default DATA/certificates/workers)")


def start_from_args(args: argparse.Namespace) -> Broker | None:
    """Start the broker thread when ``--broker`` was given (after the instance is open)."""
    endpoint = getattr(args, "broker", None)
    if not endpoint:
        return None
    if getattr(args, "encrypt", False) and not zmq.has("curve"):
        raise SystemExit("pumice-master: --encrypt needs a libzmq with CURVE (libsodium)")
    try:
        broker = Broker(endpoint, log_endpoint=args.broker_logs, heartbeat=args.heartbeat,
                        encrypt=args.encrypt,
                        master_cert=Path(args.master_cert) if args.master_cert else None,
                        workers_certs=Path(args.workers_certs) if args.workers_certs else None)
        broker.bind()
    except zmq.ZMQError as exc:
        raise SystemExit(f"pumice-master: cannot bind the broker on {endpoint}: {exc}") from None
    except CertificateError as exc:
        raise SystemExit(f"pumice-master: {exc}") from None
    print(f"pumice broker on {', '.join(broker.bound)}{' (CURVE)' if broker.encrypt else ''}", flush=True)
    return broker.start()
