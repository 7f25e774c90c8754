"""The master's database: one proxy the models bind to, opened on SQLite (WAL) or PostgreSQL.

``open_database("postgresql://user@host:5432/name")`` or ``open_database("/var/lib/pumice/pumice.db")``
initialises :data:`db`; every model is bound to it, so the service layer never names the backend.
A PostgreSQL URL may carry libpq options, e.g. ``?options=-csearch_path%3Dci`` to use a schema.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import parse_qsl, unquote, urlparse

from peewee import Database, DatabaseProxy, PostgresqlDatabase, SqliteDatabase

log = logging.getLogger("pumice.db")

#: what every model is bound to; initialised by :func:`open_database`
db = DatabaseProxy()

SQLITE_PRAGMAS = {
    "journal_mode": "wal",
    # NORMAL is durable across application crashes in WAL mode; only an OS crash can lose the
    # last transactions, which the agents resend anyway (nothing is acked before commit).
    "synchronous": "normal",
    "foreign_keys": 1,
    "busy_timeout": 10000,
    "cache_size": -16000,
}


def is_postgres_url(url: str) -> bool:
    return url.startswith(("postgresql://", "postgres://"))


def make_database(url: str | Path) -> Database:
    """A peewee database for ``url``: a ``postgresql://`` URL, or a path to an SQLite file."""
    url = str(url)
    if is_postgres_url(url):
        # Pooled: waitress serves each request on one of a few threads; a pool avoids one
        # TCP+auth handshake per request while each thread keeps its own connection.
        from playhouse.pool import PooledPostgresqlDatabase

        parts = urlparse(url)
        kwargs: dict[str, object] = dict(parse_qsl(parts.query))
        if parts.hostname:
            kwargs["host"] = parts.hostname
        if parts.port:
            kwargs["port"] = parts.port
        if parts.username:
            kwargs["user"] = unquote(parts.username)
        if parts.password:
            kwargs["password"] = unquote(parts.password)
        name = parts.path.lstrip("/") or "pumice"
        return PooledPostgresqlDatabase(name, max_connections=32, stale_timeout=300, **kwargs)
    if url.startswith("sqlite:///"):
        url = url[len("sqlite:///") - 1:]
    # IMMEDIATE: a write transaction takes the write lock when it begins, so two writers queue on
    # busy_timeout instead of one failing with SQLITE_BUSY when it upgrades a read lock.
    return SqliteDatabase(url, pragmas=SQLITE_PRAGMAS, lock_type="IMMEDIATE", check_same_thread=False)


def open_database(url: str | Path) -> Database:
    """Bind :data:`db` (and so every model) to the database at ``url`` and return it."""
    database = make_database(url)
    db.initialize(database)
    # never log a PostgreSQL URL: it may hold a password
    log.debug("database: %s", "postgresql" if is_postgres_url(str(url)) else url)
    return database


def is_postgres() -> bool:
    """Whether :data:`db` is bound to PostgreSQL (row locks with SKIP LOCKED are available)."""
    return isinstance(db.obj, PostgresqlDatabase)


@contextmanager
def connection() -> Iterator[None]:
    """Hold a connection for the block (a request, a scheduler pass), reusing an open one.

    On SQLite the thread keeps its connection afterwards (closed when the thread ends or by
    :func:`close_database`): opening one per request, with its pragmas and a fresh read of the
    schema, cost half a millisecond, a fifth of a submission. A PostgreSQL connection goes back
    to the pool, whose checkout is cheap and which replaces stale connections.
    """
    opened = db.connect(reuse_if_open=True)
    try:
        yield
    finally:
        if opened and is_postgres() and db.in_transaction() is False:
            db.close()


def close_database() -> None:
    """Close this thread's connection, and on a pooled database every idle one."""
    if db.obj is None:
        return
    if not db.is_closed():
        db.close()
    close_all = getattr(db.obj, "close_all", None)
    if close_all:
        close_all()
