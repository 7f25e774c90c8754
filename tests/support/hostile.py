"""Support of the hostile-input and fuzz tests (no tests here): a real master as a process, the
hostile documents, and the memory budget they are held to.

``MasterProcess`` runs ``pumice-master serve`` (its validator processes included, no broker) on
SQLite in its data directory or on a PostgreSQL URL, with a small lab made by the CLI: device type
qemu, worker w1, device qemu01 (``tests/data/qemu-amd64.jinja2``), tokens for admin and alice.
Each request can be measured: its answer, its wall time, and the peak memory growth of the
master's process tree meanwhile (:class:`memory.TreeMeter`).
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import re
import subprocess
import sys
import time
import xmlrpc.client
from dataclasses import dataclass
from pathlib import Path

import yaml
from conftest import allowing
from memory import TreeMeter

from support.broker import add_qemu_lab, free_port, master_cli, wait_for
from support.master import LOCAL_IMAGES, job_text

#: what refusing a hostile document may cost the master's process tree (kB), and how long (s)
BUDGET_KB = 5 * 1024
BUDGET_SECONDS = 1.0


@dataclass
class Answer:
    """One HTTP exchange: status, body text, wall time (s), peak memory growth of the tree (kB)."""

    status: int
    text: str
    seconds: float
    growth_kb: int

    def json(self) -> dict:
        return json.loads(self.text)


class MasterProcess:
    """``pumice-master serve`` as a process, and its lab (see the module docstring)."""

    def __init__(self, root: Path, database: str | None = None, *extra: str) -> None:
        self.root = root
        self.data = root / "data"
        self.port = free_port()
        self.env = {**os.environ, "PUMICE_DATA": str(self.data), "PYTHONUNBUFFERED": "1"}
        self.env.pop("PUMICE_DATABASE", None)
        if database:
            self.env["PUMICE_DATABASE"] = database
        self.extra = extra
        self.log = root / "master.log"
        self.proc: subprocess.Popen | None = None
        add_qemu_lab(self.cli)
        self.tokens = {user: self.cli("tokens", "create", "--user", user, *(["--admin"] if user == "admin" else []))
                       .strip() for user in ("admin", "alice")}

    def cli(self, *args: str) -> str:
        return master_cli(self.env, *args)

    def start(self) -> MasterProcess:
        command = [sys.executable, "-m", "master.cli", "serve", "--http", f"127.0.0.1:{self.port}", *self.extra]
        with open(self.log, "a") as log:
            self.proc = subprocess.Popen(command, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_for(self.serves, 30, "the master's API")
            wait_for(self.validators_ready, 60, "the master's validator processes")
            # the file policy: w1's jobs may read the test job's loopback image server
            config = yaml.safe_dump(allowing(addresses=[LOCAL_IMAGES]))
            assert self.request("PUT", "/api/v0.2/workers/w1/config/", config, user="admin",
                                measure=False).status == 200
        except BaseException:
            self.stop()
            raise
        return self

    def serves(self) -> bool:
        """Whether the master answers a plain GET (asserting it did not exit)."""
        assert self.proc is not None and self.proc.poll() is None, f"the master exited: {self.tail()}"
        try:
            return self.request("GET", "/api/v0.2/system/version/", measure=False).status == 200
        except OSError:
            return False

    def validators_ready(self) -> bool:
        """Whether every validator process of the master is ready (the master logs each one):
        only then are submissions checked in them, not in the master's threads."""
        from master.validation import default_validators

        wanted = default_validators()
        if "--validators" in self.extra:
            wanted = int(self.extra[self.extra.index("--validators") + 1])
        return len(re.findall(r"validator process \d+ ready", self.log.read_text(errors="replace"))) >= wanted

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def request(self, method: str, path: str, body: str | bytes | None = None, *, user: str | None = "alice",
                content_type: str | None = None, headers: dict[str, str] | None = None,
                measure: bool = True) -> Answer:
        """One request; with ``measure``, the tree's peak memory growth while it is answered."""
        data = body.encode() if isinstance(body, str) else body
        sent = dict(headers or {})
        if user:
            sent.setdefault("Authorization", f"Token {self.tokens[user]}")
        if content_type:
            sent["Content-Type"] = content_type
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        meter = TreeMeter(self.pid).start() if measure else None
        start = time.perf_counter()
        try:
            conn.request(method, path, body=data, headers=sent)
            response = conn.getresponse()
            text = response.read().decode("utf-8", "replace")
        finally:
            seconds = time.perf_counter() - start
            growth = meter.stop() if meter else 0
            conn.close()
        return Answer(response.status, text, seconds, growth)

    def submit(self, text: str | bytes, **kwargs) -> Answer:
        return self.request("POST", "/api/v0.2/jobs/", text, **kwargs)

    def rpc_body(self, method: str, *params) -> bytes:
        return xmlrpc.client.dumps(params, method, allow_none=True).encode()

    def rpc(self, body: bytes, user: str = "alice") -> tuple[object, Answer]:
        """An XML-RPC call (its body as given): ``(result or Fault, answer)``."""
        auth = base64.b64encode(f"{user}:{self.tokens[user]}".encode()).decode()
        answer = self.request("POST", "/RPC2", body, user=None, content_type="text/xml",
                              headers={"Authorization": f"Basic {auth}"})
        try:
            result: object = xmlrpc.client.loads(answer.text.encode())[0][0]
        except xmlrpc.client.Fault as fault:
            result = fault
        return result, answer


# ---- hostile documents ----

def alias_bomb(levels: int = 9, width: int = 9, indent: str = "") -> str:
    """YAML lines of a "billion laughs": ``a`` is a list of ``width`` strings, each next level a
    list of ``width`` aliases of the one before: ``width ** levels`` strings once expanded, in
    well under a kilobyte."""
    names = "abcdefghijklmnopqrstuvwxyz"
    lines = [f"{indent}a: &a [{', '.join(['lol'] * width)}]"]
    for level in range(1, levels):
        previous, name = names[level - 1], names[level]
        lines.append(f"{indent}{name}: &{name} [{', '.join(['*' + previous] * width)}]")
    return "\n".join(lines) + "\n"


def job_with(extra: str, name: str = "hostile") -> str:
    """A valid job of the lab plus ``extra`` top-level YAML."""
    return job_text(name) + extra


def bomb_job(section: str = "context") -> str:
    """A job of about a kilobyte whose ``section:`` (context or metadata) holds an alias bomb."""
    text = job_text("hostile")
    if section == "context":
        return text.replace("context:\n  arch: amd64\n", "context:\n  arch: amd64\n" + alias_bomb(indent="  "))
    return text + f"{section}:\n" + alias_bomb(indent="  ")
