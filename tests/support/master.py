"""Helpers of the master's tests: the database backends and a small lab.

:data:`BACKENDS` are SQLite and, when ``PUMICE_TEST_PG`` is set, PostgreSQL (the ``database_url``
fixture of conftest.py gives each test a fresh schema of its own there, created before the test
and dropped after, so parallel or repeated runs never collide). :func:`build_lab` opens an instance
in a data directory with a small lab: the qemu device type, worker w1 (online), devices
qemu01/qemu02, and tokens for admin, alice and bob (the ``lab`` fixture).
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import pytest
import yaml

from master import inventory
from master.db import close_database
from master.instance import Instance, open_instance
from master.users import SYSTEM, authenticate, create_token

PG_URL = os.environ.get("PUMICE_TEST_PG", "")
CORPUS = Path(
    os.environ.get("PUMICE_LAVA_CORPUS")
    or Path(__file__).resolve().parents[3] / "shared" / "lava-corpus"
)

BACKENDS = [
    "sqlite",
    pytest.param(
        "postgres",
        marks=[
            pytest.mark.postgres,
            pytest.mark.skipif(
                not PG_URL,
                reason="PUMICE_TEST_PG is not set (e.g. "
                "postgresql://postgres@127.0.0.1:5432/test): PostgreSQL "
                "tests skipped",
            ),
        ],
    ),
]

QEMU_DICTIONARY = """{% extends 'qemu.jinja2' %}
{% set arch = 'amd64' %}
{% set memory = 512 %}
{% set no_kvm = True %}
"""

#: where the test job's image is: an address of the worker itself, that w1's file policy allows
LOCAL_IMAGES = "127.0.0.1:80"

#: a small valid job for the qemu devices above
JOB = """device_type: qemu
job_name: {name}
timeouts:
  job:
    minutes: 5
  action:
    minutes: 1
visibility: {visibility}
priority: {priority}
context:
  arch: amd64
actions:
- deploy:
    to: tmpfs
    images:
      rootfs:
        url: http://{local_images}/rootfs.img
        image_arg: -drive format=raw,file={{rootfs}}
- boot:
    method: qemu
    media: tmpfs
    prompts: ['/ # ']
"""


def job_text(
    name: str = "master test",
    *,
    visibility: str = "public",
    priority: str | int = "medium",
    tags: list[str] | None = None,
    images: str = LOCAL_IMAGES,
) -> str:
    """The test job; its image comes from ``images`` (host[:port])."""
    text = JOB.format(name=name, visibility=visibility, priority=priority, local_images=images)
    if tags:
        text += "tags: [" + ", ".join(tags) + "]\n"
    return text


def corpus_file(relative: str) -> str:
    path = CORPUS / relative
    if not path.is_file():
        pytest.skip(f"LAVA corpus file {path} not found (set PUMICE_LAVA_CORPUS)")
    return path.read_text(encoding="utf-8")


def pg_admin(sql: str) -> None:
    import psycopg2

    conn = psycopg2.connect(PG_URL)
    try:
        conn.autocommit = True
        with conn.cursor() as cursor:
            cursor.execute(sql)
    finally:
        conn.close()


@contextlib.contextmanager
def database(backend: str) -> Iterator[str | None]:
    """None for SQLite (the data directory's file), or a PostgreSQL URL with a fresh schema of its
    own, dropped afterwards; the master's database connection is closed afterwards either way."""
    if backend == "sqlite":
        try:
            yield None
        finally:
            close_database()
        return
    schema = f"pumice_test_{uuid.uuid4().hex[:12]}"
    pg_admin(f"CREATE SCHEMA {schema}")
    sep = "&" if "?" in PG_URL else "?"
    try:
        yield f"{PG_URL}{sep}options={quote(f'-csearch_path={schema}')}"
    finally:
        close_database()
        pg_admin(f"DROP SCHEMA {schema} CASCADE")


@dataclass
class Lab:
    instance: Instance
    database_url: str | None
    tokens: dict[str, str]

    def user(self, name: str):
        return authenticate(f"Token {self.tokens[name]}")


def build_lab(data_dir: Path, database_url: str | None, *, devices: int = 2, name: str = "test-lab",
              url: str = "http://lab.example") -> Lab:
    from conftest import allowing  # conftest imports this module: its helper is taken when called

    instance = open_instance(data_dir, database_url, name=name, url=url)
    inventory.add_device_type(SYSTEM, "qemu", description="QEMU x86_64")
    inventory.add_worker(SYSTEM, "w1", description="the test worker")
    # the test job downloads from http://127.0.0.1/ (never fetched: these runners are fakes)
    inventory.set_worker_text(SYSTEM, "w1", "config", yaml.safe_dump(allowing(addresses=[LOCAL_IMAGES])))
    for number in range(1, devices + 1):
        inventory.add_device(
            SYSTEM, f"qemu{number:02d}", "qemu", worker="w1", health="Good", dictionary=QEMU_DICTIONARY
        )
    inventory.worker_seen("w1", "0.1.0")
    tokens = {
        "admin": create_token("admin", admin=True),
        "alice": create_token("alice"),
        "bob": create_token("bob"),
    }
    return Lab(instance, database_url, tokens)


def stop_server(server) -> None:
    """Stop a MasterServer; its scheduler and site publisher even if closing the HTTP side fails
    (a leaked scheduler thread would claim the next test's jobs)."""
    try:
        server.stop()
    finally:
        if server.scheduler:
            server.scheduler.stop()
        if server.publisher:
            server.publisher.stop()
        if getattr(server, "lab_publisher", None):
            server.lab_publisher.stop()
