"""The agent's ZeroMQ side: DEALER socket(s) to the master, HELLO, heartbeats, reconnect, CURVE.

The agent always connects out (a worker may sit behind a firewall). Its DEALER's identity is the
worker's hostname. Rules (the ZeroMQ guide's "paranoid pirate", plus a handshake):

- Every new connection (the first, ZeroMQ's own reconnects, a master restart) is greeted with
  ``HELLO``; until ``WELCOME`` arrives the agent is not online and sends nothing else.
- Any message counts as a heartbeat. An idle agent sends ``PING`` every interval; when the master
  stays silent for ``LIVENESS`` intervals the socket is replaced by a new one at once, which
  says HELLO every second; it is given ``LIVENESS`` intervals plus a patience that doubles up to
  ``max_backoff`` before it is replaced in turn. A master back from a pause or a restart thus
  hears a HELLO as soon as its connection is up.
- ``REFUSED`` (wrong protocol version, unregistered hostname...) is logged with its reason and the
  agent tries again later, so fixing the master side is enough to bring it online.
- With CURVE, a handshake the master refuses (unknown key) is seen on a socket monitor and logged.

Only this module and ``master/broker.py`` hold sockets; the daemon (``agent/worker.py``) sees
messages.
"""

from __future__ import annotations

import contextlib
import logging
import os
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import zmq

from agent import __version__
from agent.messages import (
    PROTOCOL_VERSION,
    Bye,
    Hello,
    HelloRequired,
    Log,
    Message,
    MessageError,
    Ping,
    Pong,
    Refused,
    Welcome,
    decode,
    encode,
)

log = logging.getLogger("pumice.transport")

#: heartbeat intervals of silence after which the peer is considered gone
LIVENESS = 3
DEFAULT_HEARTBEAT = 5.0
#: how often a refused agent tries again, at most
REFUSED_RETRY_MAX = 60.0
_MONITOR_EVENTS = (zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_HANDSHAKE_FAILED_AUTH
                   | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
                   | zmq.EVENT_DISCONNECTED)


class CertificateError(ValueError):
    """A CURVE certificate file that cannot be used (the text says which and why)."""


def read_certificate(path: str | os.PathLike[str], *, secret: bool = False) -> tuple[bytes, bytes | None]:
    """``(public, secret)`` Z85 keys of a ZeroMQ certificate file; ``secret=True`` requires the
    secret key (a ``NAME.key_secret`` file)."""
    from zmq.auth.certs import load_certificate

    try:
        public, secret_key = load_certificate(path)
    except (OSError, ValueError) as exc:
        raise CertificateError(f"cannot read the CURVE certificate {path}: {exc}") from None
    if len(public) != 40:
        raise CertificateError(f"{path}: the public key must be 40 Z85 characters, not {len(public)}")
    if secret and not secret_key:
        raise CertificateError(f"{path} holds no secret key: give NAME.key_secret (made by "
                               "'pumice-agent create-certificate NAME')")
    return public, secret_key


def create_certificate(name: str, directory: str | os.PathLike[str] = ".") -> tuple[Path, Path]:
    """Write ``NAME.key`` (public) and ``NAME.key_secret`` (public + secret) in ``directory``."""
    from zmq.auth.certs import create_certificates

    if not zmq.has("curve"):
        raise CertificateError("this libzmq has no CURVE support (it needs libsodium)")
    target = Path(directory)
    target.mkdir(parents=True, exist_ok=True)
    for suffix in (".key", ".key_secret"):
        if (target / f"{name}{suffix}").exists():
            raise CertificateError(f"{target / (name + suffix)} exists already: remove it first or pick "
                                   "another --directory")
    public, secret = create_certificates(str(target), name)
    os.chmod(secret, 0o600)
    return Path(public), Path(secret)


@dataclass(frozen=True)
class CurveKeys:
    """The keys an encrypted agent needs: the master's public key and its own key pair."""

    master_public: bytes
    public: bytes
    secret: bytes

    @classmethod
    def load(cls, master_cert: str | os.PathLike[str], worker_cert: str | os.PathLike[str]) -> CurveKeys:
        master_public, _ = read_certificate(master_cert)
        public, secret = read_certificate(worker_cert, secret=True)
        assert secret is not None
        return cls(master_public, public, secret)

    def apply(self, sock: zmq.Socket) -> None:
        sock.curve_serverkey = self.master_public
        sock.curve_publickey = self.public
        sock.curve_secretkey = self.secret


class Transport:
    """The connection to the master; ``poll()`` returns the messages the daemon has to handle.

    ``jobs`` is called for the job list of each HELLO. ``WELCOME`` is returned from ``poll()``
    too: after it, the daemon resends whatever the master has not acknowledged.
    """

    def __init__(self, master: str, hostname: str, *, logger: str | None = None,
                 curve: CurveKeys | None = None, heartbeat: float = DEFAULT_HEARTBEAT,
                 jobs: Callable[[], list[int]] = list, max_backoff: float = 32.0,
                 context: zmq.Context | None = None) -> None:
        self.master = master
        self.logger_url = logger
        self.hostname = hostname
        self.curve = curve
        self.heartbeat = heartbeat
        self.jobs = jobs
        self.max_backoff = max_backoff
        self.context = context or zmq.Context.instance()
        self.online = False
        #: the last refusal's reason (None once welcomed)
        self.refused: str | None = None
        self._socket: zmq.Socket | None = None
        self._log_socket: zmq.Socket | None = None
        self._monitor: zmq.Socket | None = None
        self._poller = zmq.Poller()
        self._backoff = 1.0
        self._patience = 0.0
        self._last_received = 0.0
        self._last_sent = 0.0
        self._hello_sent = 0.0
        self._opened = 0.0
        self._reopen_at: float | None = None
        self._auth_logged = 0.0

    # -- sockets ------------------------------------------------------------------------------

    def _new_socket(self, url: str) -> zmq.Socket:
        sock = self.context.socket(zmq.DEALER)
        sock.linger = 0
        sock.identity = self.hostname.encode()
        # queue only to completed connections: nothing piles up for a master that is away
        sock.immediate = True
        sock.sndhwm = sock.rcvhwm = 10000
        sock.reconnect_ivl = 500
        sock.reconnect_ivl_max = int(self.max_backoff * 1000)
        sock.tcp_keepalive = 1
        if self.curve is not None:
            self.curve.apply(sock)
        sock.connect(url)
        return sock

    def open(self) -> None:
        """Connect (a no-op when connected); HELLO follows when the connection is up."""
        if self._socket is not None:
            return
        self._socket = self._new_socket(self.master)
        self._monitor = self._socket.get_monitor_socket(_MONITOR_EVENTS)
        self._poller.register(self._socket, zmq.POLLIN)
        self._poller.register(self._monitor, zmq.POLLIN)
        if self.logger_url:
            self._log_socket = self._new_socket(self.logger_url)
            self._poller.register(self._log_socket, zmq.POLLIN)
        self.online = False
        self._opened = self._last_received = time.monotonic()
        self._hello_sent = 0.0
        self._reopen_at = None
        log.info("connecting to the master at %s%s as %s%s", self.master,
                 f" (logs to {self.logger_url})" if self.logger_url else "", self.hostname,
                 " with CURVE encryption" if self.curve else "")

    def _close_sockets(self) -> None:
        for sock in (self._monitor, self._socket, self._log_socket):
            if sock is not None:
                self._poller.unregister(sock)
        if self._socket is not None:
            with contextlib.suppress(zmq.ZMQError):
                self._socket.disable_monitor()
        for sock in (self._monitor, self._socket, self._log_socket):
            if sock is not None:
                sock.close(linger=0)
        self._socket = self._log_socket = self._monitor = None
        self.online = False

    def _reconnect(self, why: str, delay: float = 0.0) -> None:
        """A new socket: at once (the patience of the next one doubles), or after ``delay``."""
        self._close_sockets()
        if delay:
            log.warning("%s: reconnecting in %.1f s", why, delay)
            self._reopen_at = time.monotonic() + delay
            return
        log.warning("%s: reconnecting", why)
        self.open()
        self._patience = self._backoff
        self._backoff = min(self._backoff * 2, self.max_backoff)

    def close(self, bye: bool = True) -> None:
        """Say BYE (when online) and close the sockets."""
        if bye and self.online:
            self.send(Bye())
        self._close_sockets()

    # -- sending --------------------------------------------------------------------------------

    def _send_frames(self, sock: zmq.Socket | None, frames: list[bytes]) -> bool:
        if sock is None:
            return False
        try:
            sock.send_multipart(frames, flags=zmq.NOBLOCK, copy=len(frames[-1]) < 65536)
        except zmq.Again:
            return False
        self._last_sent = time.monotonic()
        return True

    def send(self, msg: Message) -> bool:
        """Send ``msg`` if the master has welcomed us; False when it could not go (the daemon
        resends what matters after the next WELCOME)."""
        if not self.online:
            return False
        sock = self._log_socket if isinstance(msg, Log) and self._log_socket is not None else self._socket
        return self._send_frames(sock, encode(msg))

    def _hello(self) -> None:
        hello = Hello(hostname=self.hostname, protocol=PROTOCOL_VERSION, version=__version__,
                      jobs=sorted(self.jobs()))
        if self._send_frames(self._socket, encode(hello)):
            self._hello_sent = time.monotonic()
            log.debug("HELLO sent (jobs %s)", hello.jobs)

    # -- receiving ------------------------------------------------------------------------------

    def _on_monitor(self) -> None:
        assert self._monitor is not None
        # (zmq.utils.monitor would pull in asyncio and ssl: 8 MB of RSS on a small worker)
        frames = self._monitor.recv_multipart()
        kind, value = struct.unpack("=hi", frames[0][:6])
        event = {"event": kind, "value": value, "endpoint": frames[1].decode("utf-8", "replace")}
        now = time.monotonic()
        if kind == zmq.EVENT_HANDSHAKE_SUCCEEDED:
            # a new connection (first one, or the master restarted): greet it at once
            log.debug("connected to %s", event.get("endpoint"))
            self.online = False
            self._hello()
        elif kind == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
            if now - self._auth_logged > 60:
                self._auth_logged = now
                log.error("the master at %s refused this worker's CURVE key (ZAP status %s): register %s.key "
                          "on the master (POST /api/v0.2/workers/%s/certificate/)", self.master,
                          event.get("value"), self.hostname, self.hostname)
        elif kind in (zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL, zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL):
            if now - self._auth_logged > 60:
                self._auth_logged = now
                log.error("the security handshake with the master at %s failed (%s): check --encrypt "
                          "and that --master-cert is the master's public key", self.master,
                          "protocol error" if kind == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL else "no detail")
        elif kind == zmq.EVENT_DISCONNECTED:
            log.info("disconnected from the master at %s", self.master)
            self.online = False

    def _receive(self, sock: zmq.Socket, out: list[Message]) -> None:
        while True:
            try:
                frames = sock.recv_multipart(flags=zmq.NOBLOCK)
            except zmq.Again:
                return
            self._last_received = time.monotonic()
            try:
                msg = decode(frames)
            except MessageError as exc:
                log.error("unreadable message from the master: %s", exc)
                continue
            if isinstance(msg, Pong):
                continue
            if isinstance(msg, Welcome):
                if msg.version != __version__:
                    log.warning("the master runs Pumice %s, this worker %s", msg.version, __version__)
                self.heartbeat = float(msg.heartbeat) or self.heartbeat
                if not self.online:
                    log.info("online: the master at %s welcomed %s (heartbeat %.1f s)", self.master,
                             self.hostname, self.heartbeat)
                self.online = True
                self.refused = None
                self._backoff = 1.0
                self._patience = 0.0
                out.append(msg)
            elif isinstance(msg, Refused):
                self.refused = msg.reason
                log.error("the master at %s refused this worker (%s): %s", self.master, msg.code, msg.reason)
                delay = min(max(self._backoff, 5.0), REFUSED_RETRY_MAX)
                self._reconnect("refused by the master", delay)
                self._backoff = min(delay * 2, REFUSED_RETRY_MAX)
                return
            elif isinstance(msg, HelloRequired):
                log.info("the master asks for a new HELLO (it restarted)")
                self.online = False
                self._hello()
            else:
                out.append(msg)

    def _timers(self, now: float) -> None:
        if self._socket is None:
            if self._reopen_at is not None and now >= self._reopen_at:
                self.open()
            return
        silent = now - self._last_received
        if silent > LIVENESS * self.heartbeat + self._patience:
            what = "the master is silent" if self.online else "no WELCOME from the master"
            self._reconnect(f"{what} for {silent:.1f} s")
            return
        if not self.online:
            if now - self._hello_sent >= min(self.heartbeat, 1.0):
                self._hello()
        elif now - self._last_sent >= self.heartbeat:
            self._send_frames(self._socket, encode(Ping()))

    def _next_timer(self, now: float) -> float:
        if self._socket is None:
            return max(0.0, (self._reopen_at or now) - now)
        if not self.online:
            return max(0.0, min(self.heartbeat, 1.0) - (now - self._hello_sent))
        return max(0.0, min(self.heartbeat - (now - self._last_sent),
                            LIVENESS * self.heartbeat + self._patience - (now - self._last_received)))

    def poll(self, timeout: float) -> list[Message]:
        """Wait up to ``timeout`` seconds; returns the messages for the daemon (WELCOME, START,
        LOG_OK, END_OK, CANCEL, STATUS), after handling heartbeats and reconnects."""
        if self._socket is None and self._reopen_at is None:
            self.open()
        now = time.monotonic()
        self._timers(now)
        wait = min(timeout, self._next_timer(now))
        out: list[Message] = []
        events = dict(self._poller.poll(max(0, int(wait * 1000)))) if self._socket is not None else {}
        if self._socket is None and wait > 0:
            time.sleep(wait)
        if self._monitor is not None and self._monitor in events:
            while self._monitor is not None and self._monitor.poll(0):
                self._on_monitor()
        for sock in (self._socket, self._log_socket):
            # a REFUSED read from the first socket closes both
            if sock is not None and not sock.closed and sock in events:
                self._receive(sock, out)
        self._timers(time.monotonic())
        return out
