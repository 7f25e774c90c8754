"""Worker authentication (service layer): the master's CURVE key, workers' keys, join tokens.

The broker authenticates every worker with ZeroMQ's CURVE: a connection is admitted (by the ZAP
handler, before any message) only with the public key registered for the hostname it claims.
REST (:mod:`master.api`), XML-RPC (:mod:`master.xmlrpc`), the CLI and the broker all call the
functions here, and nothing else touches keys.

Where keys live, and why:

- **Workers' public keys** in the database (``workers.public_key``): every process (several API
  processes on PostgreSQL later, the CLI, the broker) sees one truth, a registration or a
  revocation made by one is seen by the others, and a backup of the database is a backup of the
  lab's keys. (They were ``DATA/certificates/workers/<hostname>.key`` files, reread by the broker:
  a second copy that only one host could see; :func:`import_key_directory` takes old ones in.)
- **The master's key pair** in a file of the broker's host (``DATA/certificates/master.key_secret``,
  mode 0600, or ``serve --master-cert``): the secret key never goes into the database, its dumps or
  its replicas. Its public half is recorded in the database (``master_keys``), where the processes
  that issue join tokens and serve ``GET /api/v0.2/system/certificate/`` read it.
- **Join tokens** in the database as SHA-256 digests only (``join_tokens``): a token is shown once,
  when issued; it enrols one key once, for one worker, before it expires.

Enrolment: ``pumice-master workers add NAME`` (or ``workers rotate NAME``) issues a token carrying
the master key's fingerprint; ``pumice-agent --join TOKEN --url URL`` checks the master's key
against it, then registers its own key with the token (:func:`join`; the agent's side is
:mod:`agent.enrolment`).

Rotation keeps the worker working: the old key stays valid until a key is registered with the new
token, which replaces it (the sessions on the old key are dropped). Revocation is immediate: the
key is removed, unused tokens are void, and the worker's sessions are dropped. Both announce
``worker_key_changed``; a broker in another process (the CLI's changes) sees them within
``broker.SEEN_REFRESH`` seconds.
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import zmq
from zmq.utils import z85

from agent.enrolment import JoinError, fingerprint, make_join_token, parse_join_token, token_digest
from agent.transport import CertificateError, certificate_text, read_certificate, write_certificate
from master import events
from master.db import db
from master.errors import Conflict, Forbidden, Invalid, NotFound, Unauthorized
from master.instance import current
from master.inventory import get_worker, require_admin
from master.models import JoinToken, MasterKey, User, Worker, iso, utcnow

log = logging.getLogger("pumice.certificates")

#: how long a join token is valid by default, and the range allowed (seconds)
JOIN_TOKEN_LIFETIME = 3600.0
JOIN_TOKEN_LIFETIME_RANGE = (1.0, 30 * 86400.0)
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


# ---- key files and texts ----

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


def key_record(name: str, key: str, **extra: Any) -> dict[str, Any]:
    """What REST answers for a key: its Z85 form, its fingerprint and its certificate file."""
    return {**extra, "name": name, "public_key": key, "fingerprint": f"SHA256:{fingerprint(key)}",
            "certificate": certificate_text(key)}


# ---- the master's key pair ----

def default_master_cert() -> Path:
    return current().data_dir / "certificates" / "master.key_secret"


def _create_master_cert(path: Path) -> None:
    """Create the key pair file; a process that loses the race to create it reads the winner's."""
    path.parent.mkdir(parents=True, exist_ok=True)
    public, secret = zmq.curve_keypair()
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".master.")
    os.close(fd)
    try:
        write_certificate(tmp, public, secret)
        owner = path.parent.parent.stat() if path.parent.parent.exists() else None
        if owner is not None and os.geteuid() == 0:
            # created by an admin command run as root: the master's own user must read it
            os.chown(tmp, owner.st_uid, owner.st_gid)
        os.link(tmp, path)
    except FileExistsError:
        return
    finally:
        os.unlink(tmp)
    if path.name.endswith(".key_secret"):
        write_certificate(path.with_name(path.name.removesuffix("_secret")), public)
    log.warning("created the master's CURVE key pair %s (public key %s, fingerprint SHA256:%s)", path,
                public.decode("ascii"), fingerprint(public))


def load_master_keys(path: Path | None = None, *, create: bool = True) -> tuple[bytes, bytes]:
    """The master's (public, secret) Z85 keys from ``path`` (a ``.key_secret`` file, default
    ``DATA/certificates/master.key_secret``), created when missing; its public key is recorded
    in the database. CertificateError if the file cannot be used."""
    path = Path(path) if path else default_master_cert()
    if not path.exists() and create:
        if not zmq.has("curve"):
            raise CertificateError("this libzmq has no CURVE support (it needs libsodium)")
        _create_master_cert(path)
    public, secret = read_certificate(path, secret=True)
    assert secret is not None
    _record_master_key(public.decode("ascii"))
    return public, secret


def _record_master_key(key: str) -> None:
    with db.atomic():
        last = MasterKey.select().order_by(MasterKey.id.desc()).first()
        if last is not None and last.public_key == key:
            return
        MasterKey.create(public_key=key)
    if last is not None:
        log.warning("the master's CURVE key changed (SHA256:%s, was SHA256:%s): workers must enrol again, and "
                    "join tokens issued before carry the old fingerprint", fingerprint(key),
                    fingerprint(last.public_key))


def master_public_key() -> str | None:
    """The master's public key (Z85), None until a master or an admin command created it."""
    last = MasterKey.select(MasterKey.public_key).order_by(MasterKey.id.desc()).first()
    return last.public_key if last else None


def master_certificate() -> dict[str, Any]:
    """The master's public key, for workers (anyone may read it)."""
    key = master_public_key()
    if key is None:
        raise NotFound("the master has no CURVE key pair yet: 'pumice-master serve' (without --insecure-plain) "
                       "or 'pumice-master workers add' creates it")
    return key_record("master", key)


# ---- workers' keys ----

def worker_key(hostname: str) -> str | None:
    """The public key registered for a worker (None: none, or no such worker)."""
    row = Worker.select(Worker.public_key).where(Worker.hostname == hostname).first()
    return row.public_key if row else None


def worker_certificate(user: User | None, hostname: str) -> dict[str, Any]:
    """[admin] The worker's registered public key; NotFound when it has none."""
    require_admin(user, "read worker certificates")
    worker = get_worker(hostname)
    if not worker.public_key:
        raise NotFound(f"worker {hostname!r} has no certificate: enrol it ('pumice-master workers rotate "
                       f"{hostname}' prints a join token for 'pumice-agent --join') or set its NAME.key")
    return key_record(hostname, worker.public_key, hostname=hostname)


def owner_of_key(key: str) -> str | None:
    """The worker a Z85 public key is registered for (None: nobody's)."""
    row = Worker.select(Worker.hostname).where(Worker.public_key == key).first()
    return row.hostname if row else None


def _register(worker: Worker, key: str, how: str) -> None:
    """Make ``key`` the worker's one key (in the caller's transaction)."""
    owner = owner_of_key(key)
    if owner is not None and owner != worker.hostname:
        raise Conflict(f"this CURVE key is worker {owner}'s already: each worker needs a key of its own")
    Worker.update(public_key=key).where(Worker.id == worker.id).execute()
    log.info("CURVE key of worker %s set (%s): SHA256:%s", worker.hostname, how, fingerprint(key))


def _key_changed(hostname: str) -> None:
    events.publish("worker_key_changed", workers=[hostname])


def set_worker_key(user: User | None, hostname: str, certificate: str) -> dict[str, Any]:
    """[admin] Register a worker's public key by hand (a ``NAME.key`` file or the bare key);
    it replaces the worker's key at once."""
    require_admin(user, "set worker certificates")
    key = parse_public_key(certificate)
    with db.atomic():
        _register(get_worker(hostname), key, f"by {user.username if user else '?'}")
    _key_changed(hostname)
    return key_record(hostname, key, hostname=hostname)


def revoke_worker_key(user: User | None, hostname: str) -> dict[str, Any]:
    """[admin] Remove the worker's key and void its unused join tokens: it cannot connect until
    it enrols again, and its connected sessions are dropped."""
    require_admin(user, "revoke worker certificates")
    with db.atomic():
        worker = get_worker(hostname)
        had = worker.public_key
        Worker.update(public_key=None).where(Worker.id == worker.id).execute()
        voided = JoinToken.delete().where((JoinToken.worker == worker.id) & JoinToken.used.is_null()).execute()
    log.warning("CURVE key of worker %s revoked by %s%s%s", hostname, user.username if user else "?",
                f" (was SHA256:{fingerprint(had)})" if had else " (it had none)",
                f"; {voided} unused join token(s) voided" if voided else "")
    _key_changed(hostname)
    return {"hostname": hostname, "revoked": bool(had), "join_tokens_voided": voided}


def import_key_directory(directory: Path) -> list[str]:
    """Take ``<hostname>.key`` files of the old key directory into the database, for registered
    workers that have no key yet; returns their hostnames."""
    imported = []
    for path in sorted(Path(directory).glob("*.key")):
        hostname = path.name[: -len(".key")]
        worker = Worker.get_or_none(Worker.hostname == hostname)
        if worker is None or worker.public_key:
            continue
        try:
            key = read_certificate(path)[0].decode("ascii")
            with db.atomic():
                _register(worker, key, f"imported from {path}")
        except (CertificateError, Conflict) as exc:
            log.error("not imported: %s: %s", path, getattr(exc, "message", exc))
            continue
        imported.append(hostname)
    return imported


# ---- join tokens ----

def parse_lifetime(value: Any) -> float:
    """Seconds from ``3600``, ``"90s"``, ``"30m"``, ``"1h"`` or ``"2d"``, within the allowed range."""
    text = str(value).strip().lower()
    match = re.fullmatch(r"(\d{1,9}(?:\.\d{1,6})?)\s*([smhd]?)", text)
    if not match:
        raise Invalid(f"bad join token lifetime {value!r}: give seconds, or a number with s, m, h or d (1h)")
    seconds = float(match.group(1)) * _UNITS[match.group(2)]
    low, high = JOIN_TOKEN_LIFETIME_RANGE
    if not low <= seconds <= high:
        raise Invalid(f"a join token lifetime must be between {low:.0f} s and {high / 86400:.0f} days, "
                      f"not {seconds:.0f} s")
    return seconds


def issue_join_token(user: User | None, hostname: str, lifetime: Any = None) -> dict[str, Any]:
    """[admin] A new join token for the worker (shown once; only its hash is kept). It voids the
    worker's earlier unused tokens; the worker's key stays valid until the token is used."""
    require_admin(user, "issue join tokens")
    seconds = JOIN_TOKEN_LIFETIME if lifetime in (None, "") else parse_lifetime(lifetime)
    master = master_public_key()
    if master is None:
        master = load_master_keys()[0].decode("ascii")
    token = make_join_token(master)
    expires = utcnow() + _dt.timedelta(seconds=seconds)
    with db.atomic():
        worker = get_worker(hostname)
        JoinToken.delete().where((JoinToken.worker == worker.id) & JoinToken.used.is_null()).execute()
        JoinToken.create(worker=worker, digest=token_digest(token), expires=expires)
    log.info("join token issued for worker %s by %s, valid until %s", hostname, user.username if user else "?",
             iso(expires))
    return {"hostname": hostname, "token": token, "expires": iso(expires),
            "master_fingerprint": f"SHA256:{fingerprint(master)}", "has_key": bool(worker.public_key)}


def _refuse_join(hostname: str, error: Exception) -> Exception:
    log.warning("enrolment of worker %s refused: %s", hostname, getattr(error, "message", error))
    return error


def join(hostname: str, token: str, public_key: str) -> dict[str, Any]:
    """Register ``public_key`` as the worker's key, authenticated by a join token (no API token).

    Refused, with the reason, when the token is unknown, for another worker, used already or
    expired; the token is spent only when the key is registered."""
    if not isinstance(token, str) or not isinstance(public_key, str):
        raise Invalid("a join needs the fields 'token' and 'public_key' (strings)")
    try:
        parse_join_token(token)
    except JoinError as exc:
        raise _refuse_join(hostname, Invalid(str(exc))) from None
    key = parse_public_key(public_key)
    now = utcnow()
    again = f"ask an admin for a new one ('pumice-master workers rotate {hostname}')"
    with db.atomic():
        row = JoinToken.get_or_none(JoinToken.digest == token_digest(token))
        if row is None:
            raise _refuse_join(hostname, Unauthorized(
                "this join token is not known to the master: it was mistyped, replaced by a newer one "
                f"('workers rotate'), voided by 'workers revoke', or its worker was deleted; {again}"))
        worker = Worker.get_by_id(row.worker_id)
        if worker.hostname != hostname:
            raise _refuse_join(hostname, Forbidden(
                f"this join token enrols worker {worker.hostname}, not {hostname}: give --hostname {worker.hostname}"))
        if row.used is not None:
            raise _refuse_join(hostname, Unauthorized(
                f"this join token was used already (at {iso(row.used)}): a token enrols one key, once; {again}"))
        if row.expires <= now:
            raise _refuse_join(hostname, Unauthorized(f"this join token expired at {iso(row.expires)}; {again}"))
        spent = JoinToken.update(used=now).where((JoinToken.id == row.id) & JoinToken.used.is_null()).execute()
        if spent != 1:  # another request used it meanwhile
            raise _refuse_join(hostname, Unauthorized(f"this join token was used already; {again}"))
        _register(worker, key, "enrolled with a join token")
    _key_changed(hostname)
    return key_record(hostname, key, hostname=hostname, master_public_key=master_public_key())


# ---- the broker's question ----

def admit(hostname: str, public_key: str) -> str | None:
    """Why a connection claiming ``hostname`` with ``public_key`` (Z85) is refused; None: admitted."""
    row = Worker.select(Worker.public_key).where(Worker.hostname == hostname).first()
    if row is None:
        return (f"worker {hostname} is not registered on this master: an admin adds it with "
                f"'pumice-master workers add {hostname}'")
    if row.public_key == public_key:
        return None
    owner = owner_of_key(public_key)
    presented = f"the CURVE key of worker {owner}" if owner else f"the CURVE key {public_key}, registered for no worker"
    if not row.public_key:
        return (f"worker {hostname} presented {presented}, and has no registered key (never enrolled, or "
                f"revoked): enrol it with 'pumice-agent --join TOKEN', TOKEN from 'pumice-master workers rotate "
                f"{hostname}'")
    return f"worker {hostname} presented {presented}, not its own: each worker must use its own key"
