"""``pumice-master``: lab administration commands and ``serve``, as real processes."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from support.master import QEMU_DICTIONARY, job_text

from master.migrations import LATEST

ROOT = Path(__file__).resolve().parent.parent


def run(data: Path, database: str | None, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "master.cli", *args, "--data", str(data)]
    if database:
        command += ["--database", database]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=60)
    if check:
        assert result.returncode == 0, f"{args}: {result.stderr}"
    return result


def test_lab_administration(tmp_path: Path, database_url: str | None) -> None:
    data = tmp_path / "data"
    out = run(data, database_url, "db", "migrate").stdout
    assert "applied migration 1: initial schema" in out and "applied migration 2: jobs.source" in out
    assert f"schema version {LATEST} (latest {LATEST})" in out
    assert "applied" not in run(data, database_url, "db", "migrate").stdout  # idempotent

    assert "device type qemu added" in run(data, database_url, "device-types", "add", "qemu",
                                           "--description", "QEMU").stdout
    listing = yaml.safe_load(run(data, database_url, "device-types", "list", "--yaml").stdout)
    assert [(t["name"], t["template"], t["devices"]) for t in listing] == [("qemu", "file", 0)]

    run(data, database_url, "workers", "add", "w1", "--description", "rack 1", "--disable")
    workers = yaml.safe_load(run(data, database_url, "workers", "list", "--yaml").stdout)
    assert [(w["hostname"], w["health"], w["description"]) for w in workers] == [("w1", "Retired", "rack 1")]
    run(data, database_url, "workers", "update", "w1", "--health", "Active", "--job-limit", "2")
    table = run(data, database_url, "workers", "list").stdout.splitlines()
    assert table[0].split()[:3] == ["hostname", "state", "health"]
    assert table[1].split()[:3] == ["w1", "Offline", "Active"]

    dictionary = tmp_path / "qemu01.jinja2"
    dictionary.write_text(QEMU_DICTIONARY)
    run(data, database_url, "devices", "add", "qemu01", "--type", "qemu", "--worker", "w1", "--tags",
        "usb,hdmi", "--dictionary", str(dictionary))
    run(data, database_url, "devices", "update", "qemu01", "--health", "Good", "--tags", "usb")
    devices = yaml.safe_load(run(data, database_url, "devices", "list", "--yaml").stdout)
    assert [(d["hostname"], d["health"], d["tags"], d["worker"]) for d in devices] == [
        ("qemu01", "Good", ["usb"], "w1")]

    assert run(data, database_url, "device-dictionary", "--hostname", "qemu01", "--export").stdout == \
        QEMU_DICTIONARY
    review = yaml.safe_load(run(data, database_url, "device-dictionary", "--hostname", "qemu01",
                                "--review").stdout)
    assert "qemu" in review["actions"]["boot"]["methods"]
    changed = tmp_path / "changed.jinja2"
    changed.write_text(QEMU_DICTIONARY.replace("512", "1536"))
    run(data, database_url, "device-dictionary", "--hostname", "qemu01", "--import", str(changed))
    assert "1536" in run(data, database_url, "device-dictionary", "--hostname", "qemu01", "--review").stdout

    bad = tmp_path / "bad.jinja2"
    bad.write_text("{% extends 'missing-type.jinja2' %}\n")
    result = run(data, database_url, "device-dictionary", "--hostname", "qemu01", "--import", str(bad),
                 check=False)
    assert result.returncode == 1 and "missing-type.jinja2" in result.stderr

    result = run(data, database_url, "devices", "add", "x1", "--type", "nope", check=False)
    assert result.returncode == 1
    assert "unknown device type 'nope'; known: qemu" in result.stderr

    token = run(data, database_url, "tokens", "create", "--user", "alice", "--admin").stdout.strip()
    assert len(token) >= 40
    if database_url is None:
        # only the hash is stored
        assert token.encode() not in (data / "pumice.db").read_bytes()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _get(url: str, token: str | None = None, data: bytes | None = None) -> dict:
    request = urllib.request.Request(url, data=data, headers={"Authorization": f"Token {token}"} if token else {})
    with urllib.request.urlopen(request, timeout=10) as reply:
        return json.loads(reply.read())


def test_serve(tmp_path: Path, database_url: str | None) -> None:
    data = tmp_path / "data"
    run(data, database_url, "device-types", "add", "qemu")
    run(data, database_url, "workers", "add", "w1")
    (tmp_path / "d.jinja2").write_text(QEMU_DICTIONARY)
    run(data, database_url, "devices", "add", "qemu01", "--type", "qemu", "--worker", "w1", "--health", "Good",
        "--dictionary", str(tmp_path / "d.jinja2"))
    token = run(data, database_url, "tokens", "create", "--user", "alice").stdout.strip()
    port = _free_port()
    command = [sys.executable, "-m", "master.cli", "serve", "--data", str(data), "--http", f"127.0.0.1:{port}"]
    if database_url:
        command += ["--database", database_url]
    server = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONUNBUFFERED": "1"})
    base = f"http://127.0.0.1:{port}/api/v0.2"
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                assert _get(f"{base}/system/version/")["version"]
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    pytest.fail(f"pumice-master serve did not come up: {server.communicate(timeout=5)}")
                time.sleep(0.1)
        assert _get(f"{base}/system/whoami/", token)["user"] == "alice"
        # w1 has no dispatcher configuration here: its file policy allows nothing of itself
        job_id = _get(f"{base}/jobs/", token, job_text(images="images.example").encode())["job_ids"][0]
        assert _get(f"{base}/jobs/{job_id}/")["state"] in ("Submitted", "Scheduled")
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            _, err = server.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            raise
    assert server.returncode == 0, err
    assert "job 1 submitted by alice" in err
