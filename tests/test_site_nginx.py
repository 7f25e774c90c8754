"""The built site served by a real nginx with deploy/nginx/pumice-site.conf, fetched with curl."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sitegen import build_site
from sitegen.fixtures import make_store

ROOT = Path(__file__).resolve().parent.parent
SITE_CONF = ROOT / "deploy" / "nginx" / "pumice-site.conf"
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"

pytestmark = pytest.mark.skipif(
    not os.path.exists(NGINX) or not shutil.which("curl"), reason="needs nginx and curl (make apt)"
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def nginx_conf(site: Path, tmp: Path, port: int, csp: bool = True) -> str:
    """A whole nginx.conf around the repository's server block, pointed at ``site`` on 127.0.0.1:port.

    ``csp=False`` drops the Content-Security-Policy header, for the browser tests that show what the
    site's own escaping does without it (and that their checks catch a script that runs)."""
    server = SITE_CONF.read_text(encoding="utf-8")
    if not csp:
        server, count = re.subn(r"(?m)^\s*add_header\s+Content-Security-Policy\s.*\n", "", server)
        assert count == 1, "the shipped configuration has no Content-Security-Policy line to drop"
    server = re.sub(r"(?m)^(\s*)listen\s+[^;]+;", rf"\1listen 127.0.0.1:{port};", server, count=1)
    server = re.sub(r"(?m)^(\s*)root\s+[^;]+;", rf"\1root {site};", server, count=1)
    temp = "\n".join(
        f"    {kind}_temp_path {tmp}/{kind};" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    user = "user root;\n" if os.geteuid() == 0 else ""  # tmp dirs are 0700: workers must be us
    return (
        f"{user}worker_processes 1;\npid {tmp}/nginx.pid;\nerror_log {tmp}/error.log;\n"
        f"events {{ worker_connections 64; }}\nhttp {{\n    access_log {tmp}/access.log;\n{temp}\n"
        f"{server}\n}}\n"
    )


@contextlib.contextmanager
def serve_site(site: Path, tmp: Path, csp: bool = True) -> Iterator[str]:
    """Run nginx in the foreground on a free loopback port; yield its base URL; stop it after."""
    tmp.mkdir(parents=True, exist_ok=True)
    port = free_port()
    conf = tmp / "nginx.conf"
    conf.write_text(nginx_conf(site, tmp, port, csp), encoding="utf-8")
    check = subprocess.run(
        [NGINX, "-t", "-c", str(conf), "-g", "daemon off;"], capture_output=True, text=True, timeout=30
    )
    assert check.returncode == 0, f"nginx -t rejected the config:\n{check.stderr}"
    assert "[warn]" not in check.stderr, f"nginx -t warns about the shipped config:\n{check.stderr}"
    stderr = open(tmp / "stderr.log", "wb")  # noqa: SIM115 - closed in the finally below
    proc = subprocess.Popen([NGINX, "-c", str(conf), "-g", "daemon off;"], stdout=subprocess.DEVNULL, stderr=stderr)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    err = (tmp / "stderr.log").read_text(errors="replace")
                    log = (tmp / "error.log").read_text() if (tmp / "error.log").exists() else ""
                    raise AssertionError(f"nginx did not start on port {port}: {err}{log}") from None
                time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        stderr.close()


def curl(url: str, *args: str) -> tuple[int, dict[str, str], bytes]:
    """GET ``url`` with curl: (status, headers lowercased, body)."""
    out = subprocess.run(["curl", "-sS", "-D", "-", "--max-time", "20", *args, url], capture_output=True, timeout=30)
    assert out.returncode == 0, out.stderr.decode()
    head, _, body = out.stdout.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        key, _, value = line.partition(":")
        headers[key.strip().lower()] = value.strip()
    return status, headers, body


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path, Path]]:
    base = tmp_path_factory.mktemp("nginx-site")
    store = make_store(base / "store", 6, cases=10, log_lines=400, nasty=True)
    build_site(
        store.root,
        base / "site",
        instance="lab-a.example.org",
        base_url="http://lab-a.example.org/",
        log_page_lines=100,
    )
    with serve_site(base / "site", base / "nginx") as url:
        yield url, base / "site", store.root


def test_index_job_log_and_bundle_with_content_types(served: tuple[str, Path, Path]) -> None:
    url, _site, _store = served
    status, headers, body = curl(f"{url}/")
    assert status == 200
    assert headers["content-type"] == "text/html; charset=utf-8"
    assert b"Recent jobs" in body and b'href="jobs/1/index.html"' in body
    assert headers["cache-control"] == "no-cache"

    status, headers, body = curl(f"{url}/jobs/2/")
    assert status == 200 and headers["content-type"] == "text/html; charset=utf-8"
    assert b"0_smoke-tests" in body and b'<table class="results list cards">' in body
    assert b"&lt;script&gt;alert(&#34;job&#34;)&lt;/script&gt;" in body  # the nasty job name, escaped
    assert b"<script>alert" not in body

    status, headers, body = curl(f"{url}/jobs/2/log-2.html")
    assert status == 200 and headers["content-type"] == "text/html; charset=utf-8"
    assert b'id="L101"' in body and b'id="L100"' not in body

    status, headers, body = curl(f"{url}/jobs/2/results.yaml")
    assert status == 200
    assert headers["content-type"] == "application/yaml; charset=utf-8"
    text = body.decode()
    assert text.startswith(
        "# Pumice results bundle\n# instance: lab-a.example.org\n# job: http://lab-a.example.org/jobs/2/\n# uuid: "
    )
    assert "0_smoke-tests" in text

    for path, expected in (
        ("output.yaml", "application/yaml; charset=utf-8"),
        ("description.yaml", "application/yaml; charset=utf-8"),
        ("junit.xml", "application/xml; charset=utf-8"),
        ("results.tap", "text/plain; charset=utf-8"),
        ("results.csv", "text/csv; charset=utf-8"),
    ):
        status, headers, _ = curl(f"{url}/jobs/2/{path}")
        assert (status, headers["content-type"]) == (200, expected), path
    status, headers, _ = curl(f"{url}/static/site.css")
    assert headers["content-type"] == "text/css; charset=utf-8"
    assert headers["cache-control"] == "public, max-age=86400"
    status, headers, _ = curl(f"{url}/data/jobs.json")
    assert headers["content-type"] == "application/json; charset=utf-8"


def test_gzip_ranges_and_private_files(served: tuple[str, Path, Path]) -> None:
    url, site, _store = served
    status, headers, body = curl(f"{url}/jobs/2/log.html", "-H", "Accept-Encoding: gzip")
    assert status == 200 and headers.get("content-encoding") == "gzip"
    assert headers.get("vary") == "Accept-Encoding"
    import gzip

    assert b'id="L1"' in gzip.decompress(body)
    status, headers, body = curl(f"{url}/jobs/2/output.yaml", "-H", "Accept-Encoding: gzip")
    assert headers.get("content-encoding") == "gzip"
    # the live tail: a Range request on the log gets the bytes, uncompressed, even from a gzip client
    size = (site / "jobs" / "2" / "output.yaml").stat().st_size
    status, headers, body = curl(
        f"{url}/jobs/2/output.yaml", "-H", "Accept-Encoding: gzip", "-H", f"Range: bytes={size - 10}-"
    )
    assert status == 206 and "content-encoding" not in headers and len(body) == 10
    status, _, _ = curl(f"{url}/jobs/2/output.yaml", "-H", f"Range: bytes={size}-")
    assert status == 416
    status, _, _ = curl(f"{url}/.pumice-site.lock")
    assert status == 403
    status, _, _ = curl(f"{url}/jobs/999/")
    assert status == 404
    status, _, _ = curl(f"{url}/jobs/6/")  # a personal job never reaches the site
    assert status == 404


def test_etag_revalidation(served: tuple[str, Path, Path]) -> None:
    url, _site, _store = served
    status, headers, _ = curl(f"{url}/index.html")
    etag = headers["etag"]
    status, _, body = curl(f"{url}/index.html", "-H", f"If-None-Match: {etag}")
    assert status == 304 and body == b""


def content_security_policy(headers: dict[str, str]) -> dict[str, list[str]]:
    """The Content-Security-Policy header as {directive: [sources]}."""
    policy = {}
    for directive in headers["content-security-policy"].split(";"):
        name, *sources = directive.split()
        policy[name] = sources
    return policy


SITE_POLICY = {
    "default-src": ["'none'"],
    "script-src": ["'self'"],
    "style-src": ["'self'"],
    "img-src": ["'self'"],
    "connect-src": ["'self'"],
    "object-src": ["'none'"],
    "base-uri": ["'none'"],
    "form-action": ["'none'"],
    "frame-ancestors": ["'self'"],
    "require-trusted-types-for": ["'script'"],
}


@pytest.mark.parametrize(
    ("path", "args", "status", "cache"),
    [
        ("/", (), 200, "no-cache"),
        ("/jobs/2/", (), 200, "no-cache"),
        ("/jobs/2/log-2.html", ("-H", "Accept-Encoding: gzip"), 200, "no-cache"),
        ("/static/site.js", (), 200, "public, max-age=86400"),
        ("/static/site.css", (), 200, "public, max-age=86400"),
        ("/static/favicon.svg", (), 200, "public, max-age=86400"),
        ("/jobs/2/results.yaml", (), 200, "no-cache"),
        ("/jobs/2/junit.xml", (), 200, "no-cache"),
        ("/jobs/2/output.yaml", ("-H", "Range: bytes=0-9"), 206, "no-cache"),
        ("/data/jobs.json", (), 200, "no-cache"),
        ("/jobs/999/", (), 404, "no-cache"),
        ("/.pumice-site.lock", (), 403, "no-cache"),
    ],
)
def test_every_response_carries_the_content_security_policy_nosniff_and_referrer_policy(
    served: tuple[str, Path, Path], path: str, args: tuple[str, ...], status: int, cache: str
) -> None:
    url, _site, _store = served
    got, headers, _ = curl(f"{url}{path}", *args)
    assert got == status
    assert content_security_policy(headers) == SITE_POLICY
    assert "unsafe" not in headers["content-security-policy"]
    assert headers["x-content-type-options"] == "nosniff"
    assert headers["referrer-policy"] == "same-origin"
    assert headers["cache-control"] == cache
