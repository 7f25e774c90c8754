"""Who may connect to the broker: the master's CURVE key pair on its sockets and the ZAP handler
(ZeroMQ's authentication protocol, RFC 27) that admits a connection only with a key registered for
a worker. The keys themselves, and the decisions about them, are :mod:`master.certificates`'s.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import zmq
from zmq.utils import z85

from agent.transport import CertificateError
from master import certificates
from master.db import connection
from master.instance import current

log = logging.getLogger("pumice.broker")

ZAP_DOMAIN = "pumice"
#: where libzmq asks its ZAP handler (RFC 27) about each new connection
ZAP_ENDPOINT = "inproc://zeromq.zap.01"
#: seconds between two log lines about the same refused CURVE key
ZAP_LOG_EVERY = 60.0


def master_keys(master_cert: Path | None, old_keys: Path | None) -> tuple[bytes, bytes]:
    """The master's key pair (created on first use), after taking the key files of an older
    release (``old_keys``, default DATA/certificates/workers) into the database."""
    if not zmq.has("curve"):
        raise CertificateError("this libzmq has no CURVE support (it needs libsodium): install one "
                               "that has, or run --insecure-plain")
    with connection():
        public, secret = certificates.load_master_keys(master_cert)
        old = old_keys or current().data_dir / "certificates" / "workers"
        if old.is_dir():
            for hostname in certificates.import_key_directory(old):
                log.warning("worker %s: its key file in %s is now in the database", hostname, old)
    return public, secret


def curve_server(sock: zmq.Socket, public: bytes, secret: bytes) -> None:
    """Make ``sock`` (before it binds) a CURVE server whose connections the ZAP handler admits."""
    sock.curve_server = True
    sock.curve_publickey = public
    sock.curve_secretkey = secret
    sock.zap_domain = ZAP_DOMAIN.encode()


class ZapHandler:
    """The ZAP socket of a broker, bound at once (before any CURVE socket binds: without its
    handler, such a socket would admit any key). ``stats.refused`` counts the keys it refuses."""

    def __init__(self, context: zmq.Context, stats: Any) -> None:
        self.stats = stats
        self.socket = context.socket(zmq.REP)
        self.socket.linger = 0
        self.socket.bind(ZAP_ENDPOINT)
        #: when each refused key was last logged
        self._logged: dict[str, float] = {}

    def close(self) -> None:
        self.socket.close(linger=0)

    def answer(self) -> None:
        """Answer libzmq's pending authentication requests: a CURVE key registered for a worker is
        admitted, with the key as the connection's User-Id; anything else is refused."""
        while True:
            try:
                frames = self.socket.recv_multipart(flags=zmq.NOBLOCK)
            except zmq.Again:
                return
            request_id = frames[1] if len(frames) > 1 else b""
            status, text, user = b"400", b"refused", b""
            try:
                status, text, user = self._decide(frames)
            finally:  # a REP socket must answer every request
                self.socket.send_multipart([b"1.0", request_id, status, text, user, b""])

    def _decide(self, frames: list[bytes]) -> tuple[bytes, bytes, bytes]:
        address = frames[3].decode("utf-8", "replace") if len(frames) > 3 else "?"
        if len(frames) < 7 or frames[0] != b"1.0" or frames[2] != ZAP_DOMAIN.encode() or frames[5] != b"CURVE":
            log.error("refused a connection from %s: not a CURVE handshake of this broker", address)
            return b"400", b"CURVE only", b""
        key = z85.encode(frames[6]).decode("ascii")
        with connection():
            owner = certificates.owner_of_key(key)
        if owner is None:
            self.stats.refused += 1
            # an agent retries every few seconds: its refusal is logged once a minute, not each time
            now = time.monotonic()
            if len(self._logged) > 1000:
                self._logged.clear()
            quiet = now - self._logged.get(key, -ZAP_LOG_EVERY) < ZAP_LOG_EVERY
            if not quiet:
                self._logged[key] = now
            log.log(logging.DEBUG if quiet else logging.ERROR,
                    "refused a connection from %s: unknown CURVE key %s (registered for no worker: enrol the "
                    "worker with 'pumice-agent --join', or its key was revoked)", address, key)
            return b"400", b"unknown key", b""
        log.debug("CURVE key of %s admitted from %s", owner, address)
        return b"200", b"OK", key.encode("ascii")
