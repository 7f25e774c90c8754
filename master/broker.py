"""The broker: the master's ZeroMQ side, between the scheduler and the agents (``pumice-agent``).

A ROUTER socket (``--broker tcp://*:5556``; optionally a second one for logs, ``--broker-logs
tcp://*:5555``) speaks the messages of :mod:`agent.messages` with every worker. The broker runs in
a thread of ``pumice-master serve`` and works through the service layer (:mod:`master.jobs`,
:mod:`master.inventory`); it only keeps in memory what it can rebuild from the database and the
artifact store after a restart.

- Authentication (CURVE, the default): the ZAP handler admits a connection only with a key
  registered for a worker (:mod:`master.certificates` decides), before any message; a HELLO must
  come with the key registered for the hostname it claims, and every later message with the key
  its session was admitted with (a revoked or replaced key loses its session at once). Plain mode
  (``--insecure-plain``) admits anyone who knows a worker's name, and is logged as a WARNING at
  start, every 10 minutes and at every worker's connection.
- HELLO from a worker: the protocol version must match and the hostname be a registered worker,
  else REFUSED with the reason, logged on both sides. WELCOME is followed by STATUS (the jobs the
  master thinks run there), START for its Scheduled jobs and CANCEL for its Canceling ones.
- Worker online/offline from heartbeats: offline after ``LIVENESS`` silent intervals. A job whose
  worker stays away longer than the job's timeout ends Incomplete (Infrastructure error; the
  device's health goes to Unknown).
- ``job_scheduled`` events send START (resent until START_OK, then ``job_started``);
  ``job_canceling`` events send CANCEL (resent until END).
- LOG batches go to the job's log in the artifact store and their results to the database, each
  acknowledged once durable (a group commit per burst of messages): :mod:`master.joblogs`. State
  changes (a job's start and end, a worker's presence) wait on the service thread until they are
  written (a full disk or database: :mod:`master.diskfull`).
- END: ``job_finished`` (once the store holds every line and the database every result),
  description.yaml stored, END_OK (only once the end is recorded).

Keys: the master's key pair (``--master-cert``, created on first use) and the workers' public
keys live in :mod:`master.certificates`; the ZAP handler that checks them is :mod:`master.zap`.

START is assembled by :mod:`master.start`; the results in log lines are read by
:func:`results.record.results_in_lines`. ``pumice-master serve`` (master/cli.py) builds and binds
the broker from its options; :class:`~master.server.MasterServer` starts and stops it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zmq

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
    StartOk,
    Status,
    StatusReply,
    VersionMismatch,
    Welcome,
    decode,
    encode,
)
from agent.transport import LIVENESS
from master import certificates, diskfull, events, inventory
from master.db import connection
from master.errors import NotFound, ServiceError
from master.instance import current
from master.joblogs import JobLogs, Unavailable
from master.models import Job, Worker, utcnow
from master.servicethread import ServiceThread, record_end, record_start
from master.start import job_timeout, start_message
from master.states import JobHealth, JobState, WorkerState
from master.zap import ZapHandler, curve_server, master_keys

log = logging.getLogger("pumice.broker")

DEFAULT_ENDPOINT = "tcp://*:5556"
DEFAULT_HEARTBEAT = 5.0
#: seconds between two checks for jobs whose worker stayed away past their timeout
AWAY_CHECK = 5.0
#: seconds between two updates of a worker's last_seen in the database
SEEN_REFRESH = 10.0
#: the health an agent may report
HEALTHS = (JobHealth.COMPLETE, JobHealth.INCOMPLETE, JobHealth.CANCELED)

_ALL = zmq.POLLIN
#: seconds between two WARNING lines of a broker that runs without authentication
PLAIN_WARNING_EVERY = 600.0
PLAIN_WARNING = ("the broker runs WITHOUT worker authentication (--insecure-plain): anyone who can reach "
                 "%s can connect with a worker's name and receive its jobs (definitions, env, secrets)")


# ---- the broker ----


@dataclass
class Session:
    """A worker that said HELLO and has not gone silent."""

    hostname: str
    version: str
    last_seen: float
    db_seen: float
    #: the CURVE public key (Z85) the session was admitted with (None in plain mode)
    key: str | None = None


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
                 heartbeat: float = DEFAULT_HEARTBEAT, encrypt: bool = True, master_cert: Path | None = None,
                 old_keys: Path | None = None, context: zmq.Context | None = None) -> None:
        self.endpoint = endpoint
        self.log_endpoint = log_endpoint
        self.heartbeat = heartbeat
        #: CURVE authentication and encryption of every worker (False: --insecure-plain)
        self.encrypt = encrypt
        self.master_cert = Path(master_cert) if master_cert else None
        #: a directory of <hostname>.key files of an older release, imported at bind
        self.old_keys = Path(old_keys) if old_keys else None
        self.context = context or zmq.Context()
        self._own_context = context is None
        self.sessions: dict[str, Session] = {}
        self.starts: dict[int, Pending] = {}
        self.cancels: dict[int, Pending] = {}
        self.stats = BrokerStats()
        #: the jobs' log streams (store files, results, acknowledgements)
        self.logs = JobLogs(self.stats)
        #: workers the database says are online, waiting for their HELLO after our (re)start
        self._expected: dict[str, float] = {}
        self._inbox: deque[tuple[str, list[int]]] = deque()
        self._wake_r, self._wake_w = os.pipe()
        self._wake_fds: tuple[int, ...] = (self._wake_r, self._wake_w)
        self._wake_lock = threading.Lock()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        #: the ZAP handler (CURVE): libzmq asks it about every new connection
        self._zap: ZapHandler | None = None
        self._next_plain_warning = 0.0
        self.sockets: list[zmq.Socket] = []
        self._poller = zmq.Poller()
        self._next_timers = 0.0
        self._next_away = 0.0
        self.bound: list[str] = []
        #: the service-layer calls (a job's start and end, a worker's presence), in order, off the loop
        self.services = ServiceThread(self._stop)
        #: replies produced by the service thread, sent by the loop (sockets are the loop's only)
        self._outbox: deque[tuple[zmq.Socket, str, Message]] = deque()
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
            curve_server(sock, public, secret)
        sock.bind(endpoint)
        self.bound.append(sock.last_endpoint.decode())
        self._poller.register(sock, _ALL)
        return sock

    def bind(self) -> Broker:
        """Bind the socket(s), after the ZAP handler when authenticating; returns self."""
        public = secret = None
        if self.encrypt:
            public, secret = master_keys(self.master_cert, self.old_keys)
            # bound before the ROUTER: a CURVE socket without a ZAP handler would admit any key
            self._zap = ZapHandler(self.context, self.stats)
            self._poller.register(self._zap.socket, zmq.POLLIN)
        self.socket = self._router(self.endpoint, public, secret)
        self.sockets.append(self.socket)
        if self.log_endpoint:
            self.sockets.append(self._router(self.log_endpoint, public, secret))
        self._poller.register(self._wake_r, zmq.POLLIN)
        log.info("broker listening on %s (protocol %d, heartbeat %.1f s, %s)", ", ".join(self.bound),
                 PROTOCOL_VERSION, self.heartbeat,
                 f"workers authenticated with CURVE, master key SHA256:{certificates.fingerprint(public)}"
                 if public else "NO worker authentication")
        if not self.encrypt:
            self._warn_plain(time.monotonic())
        return self

    def _warn_plain(self, now: float) -> None:
        log.warning(PLAIN_WARNING, ", ".join(self.bound))
        self._next_plain_warning = now + PLAIN_WARNING_EVERY

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
        self.services.start()
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
        self.services.stop()
        self.logs.close_all()
        for sock in self.sockets:
            sock.close(linger=0)
        self.sockets.clear()
        if self._zap is not None:  # after the ROUTERs: none of them is left without its handler
            self._zap.close()
            self._zap = None
        if self._own_context and not self.context.closed:
            self.context.term()
        # closed once only: a second close could hit a file another thread has opened since
        with self._wake_lock:
            fds, self._wake_fds = self._wake_fds, ()
            for fd in fds:
                os.close(fd)
        if _running is self:
            _running = None

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
        elif event == "worker_key_changed":
            self._inbox.append(("keys", list(data.get("workers") or ())))
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
                if kind == "keys":
                    self._check_keys(job_ids)
                    continue
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

    def _check_keys(self, hostnames: list[str]) -> None:
        """Drop the sessions whose key is no longer their worker's (revoked, or replaced)."""
        for hostname in hostnames:
            session = self.sessions.get(hostname)
            if session is None or not self.encrypt:
                continue
            key = certificates.worker_key(hostname)
            if key != session.key:
                log.warning("worker %s: the CURVE key of its session was %s: session dropped", hostname,
                            "revoked" if key is None else "replaced by a new one")
                del self.sessions[hostname]
                self.services.submit(inventory.worker_offline, hostname)

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
                pending.message = start_message(job_id)
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

    # -- the loop --

    def loop_once(self, timeout: float = 0.5) -> int:
        """Wait up to ``timeout`` seconds for messages or events, handle them, run the timers.
        Returns the number of messages handled."""
        now = time.monotonic()
        wait = max(0.0, min(timeout, self._next_timers - now))
        ready = dict(self._poller.poll(int(wait * 1000)))
        handled = 0
        if self._zap is not None and self._zap.socket in ready:
            self._zap.answer()
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
                    except Exception as exc:
                        if diskfull.is_storage_error(exc):  # the agent sends it again
                            diskfull.report(exc, "broker: handling a message")
                        else:
                            log.exception("failed to handle a message from %r", bytes(frames[0].bytes)[:100])
            finally:
                self._flush()
        self.stats.messages += count
        return count

    def _flush(self) -> None:
        """Acknowledge the LOG batches of this burst once their lines are durable and their results
        committed (:meth:`JobLogs.flush`)."""
        for sock, hostname, reply in self.logs.flush():
            self._send(hostname, reply, sock)

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
        # the key this connection was admitted with (ZAP's User-Id)
        key = frames[-1].get("User-Id") if self.encrypt else None
        if isinstance(msg, Hello):
            self._on_hello(sock, identity, hostname, msg, key)
            return
        session = self.sessions.get(hostname)
        if session is not None and session.key != key:
            # another connection claiming the worker, or one whose key was revoked since its HELLO
            self._refuse(sock, identity, "key", f"worker {hostname}: this connection's CURVE key is not the "
                                                "one its session was admitted with")
            return
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
            self.services.submit(inventory.worker_offline, hostname)
        else:
            log.warning("worker %s sent %s, which only the master sends", hostname, msg.TYPE)

    # -- handlers --

    def _on_hello(self, sock: zmq.Socket, identity: bytes, hostname: str, msg: Hello, key: str | None) -> None:
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
            refusal = certificates.admit(hostname, key) if self.encrypt else None
            if refusal is not None:
                session = self.sessions.get(hostname)
                if session is not None and session.key == key:  # its key was revoked meanwhile
                    del self.sessions[hostname]
                self._refuse(sock, identity, "key", refusal)
                return
            first = hostname not in self.sessions
            self.sessions[hostname] = Session(hostname, msg.version, now, now, key)
            self._expected.pop(hostname, None)
            self.services.submit(inventory.worker_seen, hostname, msg.version)
            welcome = Welcome(protocol=PROTOCOL_VERSION, version=__version__, heartbeat=self.heartbeat)
            self._send(hostname, welcome, sock)
            if first:
                log.info("worker %s connected (Pumice %s; unfinished jobs on it: %s)", hostname, msg.version,
                         ", ".join(map(str, msg.jobs)) or "none")
                if not self.encrypt:
                    log.warning("worker %s connected WITHOUT authentication (--insecure-plain): whoever "
                                "connects with its name gets its jobs", hostname)
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
        self.services.submit(record_start, session.hostname, msg.job_id, pending.sent if pending else 0.0)

    def _on_log(self, sock: zmq.Socket, session: Session, msg: Log) -> None:
        reply = self.logs.append(sock, session.hostname, msg)
        if reply is not None:
            self._send(session.hostname, reply, sock)

    def _on_end(self, sock: zmq.Socket, session: Session, msg: End) -> None:
        try:
            stream = self.logs.stream(msg.job_id, session.hostname)
        except Unavailable:
            return  # not acknowledged: the agent sends END again
        if stream is None:
            self._send(session.hostname, EndOk(job_id=msg.job_id), sock)
            return
        if stream.lines < msg.lines:
            # lines are missing: have them resent before the end is recorded
            if not self.logs.blocked(msg.job_id):
                self._send(session.hostname, LogOk(job_id=msg.job_id, lines=stream.lines, rewind=True), sock)
            return
        if stream.unstored:  # results the database refused so far (_flush tries again)
            return
        health, error_type, error = msg.health, msg.error_type, msg.error_msg
        if health not in HEALTHS:
            health, error_type = JobHealth.INCOMPLETE, "Bug"
            error = (f"worker {session.hostname} reported the health {msg.health!r}; "
                     f"allowed: {', '.join(HEALTHS)}")
        if msg.description:
            try:
                current().store.write_file(msg.job_id, "description.yaml", msg.description)
            except OSError as exc:
                diskfull.report(exc, f"job {msg.job_id}: storing its description.yaml")
                return  # not acknowledged: the agent sends END again
        self._finish(msg.job_id, health, error if health != JobHealth.COMPLETE else None,
                     error_type if health != JobHealth.COMPLETE else None,
                     reply=(sock, session.hostname, EndOk(job_id=msg.job_id)))

    def _finish(self, job_id: int, health: str, error: str | None, error_type: str | None,
                reply: tuple[zmq.Socket, str, Message] | None = None) -> None:
        """Forget the job here and record its end on the service thread (then send ``reply``)."""
        self.starts.pop(job_id, None)
        self.cancels.pop(job_id, None)
        self.logs.forget(job_id)
        if job_id in self._ending:  # its end is being recorded already
            if reply is not None:
                self.services.submit(self._reply, *reply)
            return
        self._ending.add(job_id)
        self.services.submit(self._record_end, job_id, health, error, error_type, reply)

    def _record_end(self, job_id: int, health: str, error: str | None, error_type: str | None,
                    reply: tuple[zmq.Socket, str, Message] | None) -> None:
        """(service thread) Record the job's end, then send the acknowledgement."""
        try:
            record_end(job_id, health, error, error_type, self._stop)
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
            self.services.submit(inventory.worker_offline, hostname)
        for hostname in missing:
            if hostname not in self.sessions:
                self.services.submit(inventory.worker_offline, hostname)
        for session in self.sessions.values():
            if now - session.db_seen > SEEN_REFRESH:
                session.db_seen = now
                self.services.submit(self._seen, session.hostname, session.key)
        if not self.encrypt and now >= self._next_plain_warning:
            self._warn_plain(now)
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

    def _seen(self, hostname: str, key: str | None) -> None:
        """(service thread) Keep the worker's last_seen fresh in the database, and see a key
        revoked or replaced by another process (the CLI)."""
        try:
            inventory.worker_seen(hostname)
        except NotFound:  # deleted meanwhile: it is refused at its next HELLO
            log.warning("worker %s was deleted while connected", hostname)
        if self.encrypt and certificates.worker_key(hostname) != key:
            self._inbox.append(("keys", [hostname]))
            self._wake()

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
            timeout = job_timeout(job)
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
