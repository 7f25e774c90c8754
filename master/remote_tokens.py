"""Users' named remote tokens (LAVA's remote artifact tokens): what ``notify: callback: token: NAME``
sends.

A token here is a credential for another service (a KernelCI or SQUAD receiver), set by its owner
over REST (``/api/v0.2/remote-artifact-tokens/``), XML-RPC (``scheduler.remote_artifact_tokens.*``,
which ``lavacli tokens`` calls) or ``pumice-master remote-tokens``. Its value is kept as given (it is
sent, so it cannot be a digest), shown only to its owner, and never logged.
"""

from __future__ import annotations

from typing import Any

from master.db import db
from master.errors import Invalid, NotFound, Unauthorized
from master.models import RemoteToken, User

MAX_NAME = 200
MAX_TOKEN = 4096


def _owner(user: User | None) -> User:
    if user is None or user.id is None:
        raise Unauthorized("remote tokens belong to a user: authenticate with 'Authorization: Token <token>'")
    return user


def _check(name: Any, token: Any = "") -> None:
    if not isinstance(name, str) or not name.strip() or len(name) > MAX_NAME or any(c.isspace() for c in name):
        raise Invalid(f"bad token name {str(name)[:60]!r}: 1-{MAX_NAME} characters, no spaces")
    if not isinstance(token, str) or len(token) > MAX_TOKEN or "\n" in token or "\r" in token:
        raise Invalid(f"a remote token is one line of text of at most {MAX_TOKEN} characters")


def list_tokens(user: User | None) -> list[dict[str, str]]:
    """The user's tokens, ``[{name, token}]`` by name."""
    owner = _owner(user)
    return [{"name": name, "token": token} for name, token in
            RemoteToken.select(RemoteToken.name, RemoteToken.token).where(RemoteToken.user == owner.id)
            .order_by(RemoteToken.name).tuples()]


def show_token(user: User | None, name: str) -> str:
    owner = _owner(user)
    row = RemoteToken.get_or_none((RemoteToken.user == owner.id) & (RemoteToken.name == name))
    if row is None:
        raise NotFound(f"Token {name!r} was not found.")
    return row.token


def add_token(user: User | None, name: str, token: str) -> dict[str, str]:
    """Set the user's token ``name`` (replacing one of that name)."""
    owner = _owner(user)
    _check(name, token)
    if not token:
        raise Invalid("the token value is empty")
    with db.atomic():
        RemoteToken.delete().where((RemoteToken.user == owner.id) & (RemoteToken.name == name)).execute()
        RemoteToken.create(user=owner.id, name=name, token=token)
    return {"name": name, "token": token}


def delete_token(user: User | None, name: str) -> None:
    owner = _owner(user)
    if not RemoteToken.delete().where((RemoteToken.user == owner.id) & (RemoteToken.name == name)).execute():
        raise NotFound(f"Token {name!r} was not found.")
