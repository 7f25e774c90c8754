"""Users and API tokens (service layer).

A token is ``secrets.token_hex(32)`` (hex, so it never starts with '-' and reads safely as a
command-line argument), shown once; the database keeps its SHA-256 only (a token
is random and long, so a plain digest is enough, and lookups stay one indexed query).
"""

from __future__ import annotations

import hashlib
import re
import secrets

from master.db import db
from master.errors import Invalid, NotFound, Unauthorized
from master.models import Token, User

USERNAME_RE = re.compile(r"^[A-Za-z0-9_.@+-]{1,150}$")

#: the submitter of health-check jobs (created on first use, like LAVA's lava-health)
HEALTH_USER = "pumice-health"


def digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def get_or_create_user(username: str, *, admin: bool | None = None, email: str = "") -> User:
    """The user ``username``, created if missing; ``admin`` (when given) sets the admin flag."""
    if not USERNAME_RE.match(username):
        raise Invalid(f"bad username {username!r}: use 1-150 letters, digits and _ . @ + -")
    with db.atomic():
        user = User.get_or_none(User.username == username)
        if user is None:
            user = User.create(username=username, is_admin=bool(admin), email=email)
        elif admin is not None and user.is_admin != admin:
            user.is_admin = admin
            user.save()
    return user


def create_token(username: str, *, admin: bool | None = None, description: str = "") -> str:
    """A new API token for ``username`` (the user is created if needed). Returns the secret."""
    user = get_or_create_user(username, admin=admin)
    secret = secrets.token_hex(32)
    Token.create(user=user, digest=digest(secret), description=description)
    return secret


def authenticate(header: str | None) -> User | None:
    """The user of an ``Authorization: Token <t>`` header; None when there is no header.

    A header that is present but malformed or names an unknown token raises Unauthorized:
    a typo in a token must not silently downgrade a request to anonymous.
    """
    if not header:
        return None
    scheme, _, secret = header.strip().partition(" ")
    secret = secret.strip()
    if scheme.lower() not in ("token", "bearer") or not secret:
        raise Unauthorized("bad Authorization header: expected 'Authorization: Token <token>'")
    row = (Token.select(Token, User).join(User)
           .where(Token.digest == digest(secret)).first())
    if row is None:
        raise Unauthorized("invalid token: create one with 'pumice-master tokens create --user NAME'")
    return row.user


def get_user(username: str) -> User:
    """The stored user ``username`` (NotFound naming it)."""
    user = User.get_or_none(User.username == username)
    if user is None:
        raise NotFound(f"no user {username!r}")
    return user


#: the identity of local admin commands (``pumice-master devices add`` ...): an admin not stored
#: in the database; only trusted in-process callers (CLI, broker) use it
SYSTEM = User(username="pumice-master", is_admin=True)
