"""Enrolment of a worker: ``pumice-agent --join TOKEN --url URL`` (the agent's side).

A join token (``pumice-master workers add NAME`` or ``workers rotate NAME`` prints it) reads
``pj1.<fingerprint>.<secret>``: the fingerprint of the master's CURVE public key, and a one-time
secret the master keeps only as a hash. The agent

1. fetches the master's public key (``GET URL/api/v0.2/system/certificate/``) and checks it
   against the token's fingerprint, before it sends anything secret: a forged master key (a wrong
   URL, someone in between) is refused and the token is not given away;
2. generates its own key pair (or uses ``--worker-cert``'s);
3. registers its public key with the token (``POST URL/api/v0.2/workers/NAME/join/``); the master
   accepts a token once, before it expires, for the worker it was issued for;
4. keeps the master's public key and its own key pair in its key directory (``SPOOL/keys``), and
   the hash of the token (``join.sha256``) so that starting again with the same ``--join`` is not
   an error but a no-op.

Only the standard library, imported when enrolling: the idle daemon stays small. The
master imports :func:`fingerprint`, :func:`make_join_token`, :func:`parse_join_token` and
:func:`token_digest`, so that both sides read tokens the same way.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

# hashlib, hmac, secrets, json and urllib are imported where they are used: hashlib alone loads
# OpenSSL's libcrypto (4 MB of RSS) into a daemon that, enrolled, never needs it

log = logging.getLogger("pumice.enrolment")

TOKEN_PREFIX = "pj1"
#: seconds an HTTP request of the enrolment may take
HTTP_TIMEOUT = 30.0
API = "/api/v0.2"


class JoinError(Exception):
    """An enrolment that did not happen; the text says why and what to do."""


def fingerprint(public_key: str | bytes) -> str:
    """The fingerprint of a Z85 CURVE public key: SHA-256 of its 32 bytes, base64url (43 chars)."""
    import base64
    import hashlib

    from zmq.utils import z85

    key = public_key.encode("ascii") if isinstance(public_key, str) else public_key
    digest = hashlib.sha256(z85.decode(key)).digest()
    return base64.urlsafe_b64encode(digest).decode("ascii").rstrip("=")


def make_join_token(master_public_key: str) -> str:
    """A new join token for the master whose public key is given (the secret is random)."""
    import secrets

    return f"{TOKEN_PREFIX}.{fingerprint(master_public_key)}.{secrets.token_urlsafe(32)}"


def parse_join_token(token: str) -> str:
    """The master key fingerprint a join token carries; JoinError if it is not a join token."""
    parts = token.strip().split(".")
    if len(parts) != 3 or parts[0] != TOKEN_PREFIX or len(parts[1]) != 43 or len(parts[2]) < 32:
        raise JoinError("this is not a Pumice join token (pj1.<fingerprint>.<secret>): copy the whole "
                        "token that 'pumice-master workers add' or 'workers rotate' printed")
    return parts[1]


def token_digest(token: str) -> str:
    """What is kept of a token: its SHA-256 (the master looks tokens up by it)."""
    import hashlib

    return hashlib.sha256(token.strip().encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class KeyFiles:
    """Where an agent keeps its CURVE keys: the master's public key and its own key pair."""

    directory: Path
    hostname: str

    @property
    def master_cert(self) -> Path:
        return self.directory / "master.key"

    @property
    def worker_cert(self) -> Path:
        return self.directory / f"{self.hostname}.key_secret"

    @property
    def public_cert(self) -> Path:
        return self.directory / f"{self.hostname}.key"

    @property
    def marker(self) -> Path:
        return self.directory / "join.sha256"

    def complete(self) -> bool:
        return self.master_cert.exists() and self.worker_cert.exists()


def _request(url: str, data: dict | None = None) -> dict:
    """GET (or POST ``data`` as JSON) and the JSON answer; JoinError with the master's message."""
    import json
    import urllib.error
    import urllib.request  # here: http.client and ssl would cost an idle daemon megabytes

    body = None if data is None else json.dumps(data).encode("utf-8")
    request = urllib.request.Request(url, data=body, method="GET" if data is None else "POST",
                                     headers={"Content-Type": "application/json", "Accept": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT) as response:
            answer = json.loads(response.read(1 << 20).decode("utf-8"))
    except urllib.error.HTTPError as exc:
        try:
            message = json.loads(exc.read(1 << 16).decode("utf-8")).get("error") or exc.reason
        except (ValueError, AttributeError):
            message = exc.reason
        raise JoinError(f"the master refused the enrolment ({exc.code}): {message}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise JoinError(f"cannot reach the master's API at {url}: {getattr(exc, 'reason', exc)}") from None
    except ValueError:
        raise JoinError(f"{url} did not answer JSON: is --url the master's REST API (http://HOST:8000)?") from None
    if not isinstance(answer, dict):
        raise JoinError(f"{url} did not answer a JSON object")
    return answer


def join(token: str, url: str, hostname: str, keys: KeyFiles, *, worker_cert: Path | None = None) -> KeyFiles:
    """Enrol this worker with ``token`` at the master's API ``url``; returns the key files to use.

    Raises JoinError (nothing is changed in ``keys.directory``) when the master's key does not
    match the token, or the master refuses the token."""
    import hmac
    import shutil
    import tempfile
    import urllib.parse

    import zmq

    from agent.transport import CertificateError, read_certificate, write_certificate

    expected = parse_join_token(token)
    digest = token_digest(token)
    if keys.complete() and keys.marker.exists() and keys.marker.read_text().strip() == digest:
        log.info("this worker was enrolled with this join token already: using %s", keys.directory)
        return keys
    base = url.rstrip("/")
    if urllib.parse.urlsplit(base).scheme not in ("http", "https"):
        raise JoinError(f"--url must be the master's REST API, http(s)://HOST:PORT, not {url!r}")
    master = _request(f"{base}{API}/system/certificate/")
    master_key = master.get("public_key")
    try:
        found = fingerprint(master_key)
    except Exception:
        raise JoinError(f"{base} answered no usable CURVE public key ({master_key!r})") from None
    if not hmac.compare_digest(found, expected):
        raise JoinError(f"the master at {base} presented the CURVE key {master_key} (fingerprint SHA256:{found}), "
                        f"but the join token is for the master key SHA256:{expected}: refusing it. Check --url; "
                        "if it is right, someone between this worker and the master answered in its place")
    if worker_cert is not None:
        try:
            public, secret = read_certificate(worker_cert, secret=True)
        except CertificateError as exc:
            raise JoinError(str(exc)) from None
    else:
        # a new pair at every enrolment: a rotation replaces a key that may have leaked
        public, secret = zmq.curve_keypair()
    reply = _request(f"{base}{API}/workers/{urllib.parse.quote(hostname, safe='')}/join/",
                     {"token": token.strip(), "public_key": public.decode("ascii")})
    if reply.get("public_key") != public.decode("ascii"):
        raise JoinError(f"the master's answer to the enrolment is not the key sent: {reply!r}")
    keys.directory.mkdir(parents=True, exist_ok=True)
    os.chmod(keys.directory, 0o700)
    staging = Path(tempfile.mkdtemp(dir=keys.directory, prefix=".join-"))
    try:
        write_certificate(staging / "master.key", master_key.encode("ascii"))
        write_certificate(staging / "worker.key", public)
        write_certificate(staging / "worker.key_secret", public, secret)
        (staging / "join.sha256").write_text(digest + "\n")
        for name, target in (("master.key", keys.master_cert), ("worker.key", keys.public_cert),
                             ("worker.key_secret", keys.worker_cert), ("join.sha256", keys.marker)):
            os.replace(staging / name, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("enrolled as worker %s with the master at %s (master key SHA256:%s); keys in %s", hostname, base,
             found, keys.directory)
    return keys
