"""The downloads of a deploy block run side by side (agent/actions/deploy/download.py): each action
still waits for its own image, checks it, logs it, retries it and fails on it in its turn."""

from __future__ import annotations

import gzip
import hashlib
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml
from conftest import allowing

from agent.job import load_job
from agent.logger import JobLogger
from results.log import read_log

DATA = Path(__file__).parent / "data"
KERNEL = bytes(range(256)) * 4096  # 1 MiB
RAMDISK = b"070701" + b"cpio-ish " * 50_000
DTB = b"\xd0\x0d\xfe\xed" + b"\0" * 4000


class Server:
    """Serves ``files`` (name -> bytes); ``delay`` (name -> seconds before the body), ``fail_first``
    (names answered 500 the first time) and ``silent`` (names never answered) make it misbehave.
    ``requests`` is (name, monotonic time) of each request received, ``served`` of each body sent."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.delay: dict[str, float] = {}
        self.fail_first: set[str] = set()
        self.silent: set[str] = set()
        self.requests: list[tuple[str, float]] = []
        self.served: list[tuple[str, float]] = []
        self.release = threading.Event()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:
                name = self.path.lstrip("/")
                server.requests.append((name, time.monotonic()))
                if name in server.silent:
                    server.release.wait(30)
                    return
                if name in server.fail_first:
                    server.fail_first.discard(name)
                    self.send_error(500, "try again")
                    return
                body = server.files.get(name)
                if body is None:
                    self.send_error(404)
                    return
                time.sleep(server.delay.get(name, 0))
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                server.served.append((name, time.monotonic()))

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.httpd.server_address[1]}"

    def url(self, name: str) -> str:
        return f"http://{self.address}/{name}"

    def close(self) -> None:
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = Server()
    s.files = {"vmlinuz": KERNEL, "initrd.gz": gzip.compress(RAMDISK), "board.dtb": DTB}
    yield s
    s.close()


@pytest.fixture(scope="module")
def device() -> dict:
    from master.devicetypes import DeviceTypes

    return DeviceTypes().device_config((DATA / "qemu-amd64.jinja2").read_text(), context={"arch": "amd64"})


def deploy_job(server: Server, sums: dict[str, str] | None = None, timeouts: dict | None = None) -> str:
    sums = sums or {}
    images = {
        "kernel": {"url": server.url("vmlinuz"), "sha256sum": sums.get("kernel", hashlib.sha256(KERNEL).hexdigest())},
        "ramdisk": {"url": server.url("initrd.gz"), "compression": "gz",
                    "sha256sum": sums.get("ramdisk", hashlib.sha256(server.files["initrd.gz"]).hexdigest())},
        "dtb": {"url": server.url("board.dtb"), "md5sum": hashlib.md5(DTB).hexdigest()},
    }
    job = {"device_type": "qemu", "job_name": "downloads", "visibility": "public",
           "timeouts": {"job": {"minutes": 2}, "action": {"minutes": 1}, **(timeouts or {})},
           "actions": [{"deploy": {"to": "tmpfs", "images": images, "os": "oe"}}]}
    return yaml.safe_dump(job, sort_keys=False)


def run(text: str, device: dict, tmp_path: Path, server: Server):
    log = tmp_path / "output.yaml"
    logger = JobLogger(log)
    job = load_job(text, device, job_id="9", logger=logger, output_dir=tmp_path,
                   dispatcher=allowing(addresses=[server.address], tmp_dir=str(tmp_path)))
    health = job.run()
    logger.close()
    return job, health, [record.msg for record in read_log(log)]


def test_images_come_side_by_side_and_are_checked(server, device, tmp_path) -> None:
    server.delay["vmlinuz"] = 0.5  # the kernel's body comes late: the others must not wait for it
    job, health, messages = run(deploy_job(server), device, tmp_path, server)
    assert health == "Complete", job.error
    started = dict(server.requests)
    served = dict(server.served)
    assert started["initrd.gz"] < served["vmlinuz"] and started["board.dtb"] < served["vmlinuz"]
    # each action reports its own image, in the pipeline's order, with what it checked
    downloaded = [m for m in messages if isinstance(m, str) and ": downloaded " in m]
    assert [m.split(":")[0] for m in downloaded] == ["kernel", "ramdisk", "dtb"]
    assert f"{len(RAMDISK)} bytes after decompression" in downloaded[1]
    results = {(r.level, r.case): r for r in job.results}
    assert [results[level, "http-download"].result for level in ("1.1.1", "1.2.1", "1.3.1")] == ["pass"] * 3


def test_a_bad_image_fails_in_its_own_turn(server, device, tmp_path) -> None:
    job, health, messages = run(deploy_job(server, sums={"ramdisk": "0" * 64}), device, tmp_path, server)
    assert health == "Incomplete"
    assert "ramdisk: sha256 checksum mismatch" in str(job.error)
    results = {(r.level, r.case): r.result for r in job.results}
    assert results["1.1.1", "http-download"] == "pass"  # the kernel, before it
    assert results["1.2.1", "http-download"] == "fail"
    assert ("1.3.1", "http-download") not in results  # the dtb's turn never came


def test_a_retry_downloads_again(server, device, tmp_path) -> None:
    server.fail_first.add("initrd.gz")
    job, health, messages = run(deploy_job(server), device, tmp_path, server)
    assert health == "Complete", job.error
    assert [name for name, _ in server.requests].count("initrd.gz") == 2
    assert any(isinstance(m, str) and "download-retry failed" in m and "HTTP 500" in m for m in messages)


def test_a_silent_server_times_the_download_out(server, device, tmp_path) -> None:
    server.silent.add("board.dtb")
    start = time.monotonic()
    text = deploy_job(server, timeouts={"actions": {"http-download": {"seconds": 2}}})
    job, health, _ = run(text, device, tmp_path, server)
    assert health == "Incomplete"
    assert "timed out" in str(job.error) and "board.dtb" in str(job.error)
    assert time.monotonic() - start < 20
