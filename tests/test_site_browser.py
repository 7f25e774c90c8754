"""The site in headless Chromium (served by nginx): no console errors, results visible, filters, live tail.

Chromium is driven over the DevTools protocol with a tiny stdlib WebSocket client (no extra package).
Screenshots go to the test's tmp dir, or to ``$PUMICE_SCREENSHOTS`` when set, to be looked at.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import socket
import struct
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from test_site_nginx import serve_site

from results.log import LogRecord
from results.logfile import LogFile
from sitegen import build_site
from sitegen.fixtures import make_store

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
pytestmark = pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="needs chromium (make apt)")


class DevToolsError(RuntimeError):
    """A DevTools command failed (e.g. the page navigated while it ran)."""


class WebSocket:
    """Just enough of RFC 6455 for the DevTools protocol: text frames out (masked), frames in."""

    def __init__(self, url: str, timeout: float = 30) -> None:
        match = re.match(r"ws://([^:/]+):(\d+)(/.*)", url)
        assert match, url
        host, port, path = match.group(1), int(match.group(2)), match.group(3)
        self.sock = socket.create_connection((host, port), timeout=timeout)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall(
            (
                f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                "Sec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
        )
        response = b""
        while b"\r\n\r\n" not in response:
            chunk = self.sock.recv(4096)
            assert chunk, "DevTools closed the connection during the handshake"
            response += chunk
        assert response.startswith(b"HTTP/1.1 101"), response[:200]
        self.buffer = response.split(b"\r\n\r\n", 1)[1]

    def _read(self, size: int) -> bytes:
        while len(self.buffer) < size:
            chunk = self.sock.recv(1 << 20)
            if not chunk:
                raise ConnectionError("DevTools closed the connection")
            self.buffer += chunk
        data, self.buffer = self.buffer[:size], self.buffer[size:]
        return data

    def send(self, text: str) -> None:
        payload = text.encode()
        head = bytes([0x81])
        if len(payload) < 126:
            head += bytes([0x80 | len(payload)])
        elif len(payload) < 1 << 16:
            head += bytes([0x80 | 126]) + struct.pack(">H", len(payload))
        else:
            head += bytes([0x80 | 127]) + struct.pack(">Q", len(payload))
        mask = os.urandom(4)
        self.sock.sendall(head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))

    def recv(self) -> str:
        message = b""
        while True:
            first, second = self._read(2)
            size = second & 0x7F
            if size == 126:
                size = struct.unpack(">H", self._read(2))[0]
            elif size == 127:
                size = struct.unpack(">Q", self._read(8))[0]
            payload = self._read(size)
            opcode = first & 0x0F
            if opcode == 0x8:
                raise ConnectionError("DevTools closed the WebSocket")
            if opcode in (0x9, 0xA):  # ping/pong: nothing to do for a short-lived client
                continue
            message += payload
            if first & 0x80:
                return message.decode()


class Browser:
    """A headless Chromium with one page, its console errors collected."""

    def __init__(self, profile: Path) -> None:
        self.proc = subprocess.Popen(
            [
                CHROMIUM,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                f"--user-data-dir={profile}",
                "--remote-debugging-port=0",
                "--remote-debugging-address=127.0.0.1",
                "--window-size=1400,1000",
                "about:blank",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + 30
        port = None
        while port is None:
            assert time.monotonic() < deadline, "chromium did not open its DevTools port"
            line = self.proc.stderr.readline().decode(errors="replace")
            assert line or self.proc.poll() is None, "chromium exited"
            match = re.search(r"DevTools listening on ws://127\.0\.0\.1:(\d+)/", line)
            if match:
                port = int(match.group(1))
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as response:
            targets = json.load(response)
        page = next(t for t in targets if t["type"] == "page")
        self.ws = WebSocket(page["webSocketDebuggerUrl"])
        self.next_id = 0
        self.errors: list[str] = []
        self.events: list[dict] = []
        for method in ("Page.enable", "Runtime.enable", "Log.enable"):
            self.call(method)
        self.call("Emulation.setDeviceMetricsOverride", width=1400, height=1000, deviceScaleFactor=1, mobile=False)

    def _event(self, message: dict) -> None:
        method, params = message.get("method"), message.get("params", {})
        self.events.append(message)
        if method == "Runtime.exceptionThrown":
            self.errors.append(json.dumps(params.get("exceptionDetails", {}))[:500])
        elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert", "warning"):
            self.errors.append(json.dumps(params.get("args", []))[:500])
        elif method == "Log.entryAdded" and params.get("entry", {}).get("level") in ("error", "warning"):
            self.errors.append(json.dumps(params["entry"])[:500])

    def call(self, method: str, **params: object) -> dict:
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.ws.recv())
            if message.get("id") == self.next_id:
                if "error" in message:
                    raise DevToolsError(f"{method}: {message['error']}")
                return message.get("result", {})
            self._event(message)

    def wait_event(self, method: str, timeout: float = 20) -> dict:
        deadline = time.monotonic() + timeout
        self.ws.sock.settimeout(timeout)
        while time.monotonic() < deadline:
            message = json.loads(self.ws.recv())
            if "method" in message:
                self._event(message)
                if message["method"] == method:
                    return message
        raise TimeoutError(method)

    def open(self, url: str) -> None:
        self.call("Page.navigate", url=url)
        self.wait_event("Page.loadEventFired")

    def js(self, expression: str) -> object:
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        assert "exceptionDetails" not in result, result
        return result["result"].get("value")

    def wait_js(self, expression: str, timeout: float = 20) -> object:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                value = self.js(expression)
            except (DevToolsError, AssertionError):  # the page is navigating: ask the next one
                value = None
            if value:
                return value
            time.sleep(0.2)
        raise TimeoutError(expression)

    def screenshot(self, path: Path, full: bool = False) -> None:
        params: dict = {"format": "png"}
        if full:
            params["captureBeyondViewport"] = True
        data = self.call("Page.captureScreenshot", **params)["data"]
        path.write_bytes(base64.b64decode(data))

    def close(self) -> None:
        self.ws.sock.close()
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.proc.stderr.close()


VISIBLE = """(() => { const e = document.querySelector(%s); if (!e) return false;
  const r = e.getBoundingClientRect(); const s = getComputedStyle(e);
  return r.width > 200 && r.height > 20 && s.display !== 'none' && s.visibility !== 'hidden'; })()"""


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory):
    base = tmp_path_factory.mktemp("browser")
    store = make_store(base / "store", 8, cases=24, log_lines=900, nasty=True)
    build_site(
        store.root,
        base / "site",
        instance="lab-a.example.org",
        base_url="http://lab-a.example.org/",
        processes=1,
        log_page_lines=500,
    )
    shots = Path(os.environ.get("PUMICE_SCREENSHOTS") or base / "shots")
    shots.mkdir(parents=True, exist_ok=True)
    with serve_site(base / "site", base / "nginx") as url:
        browser = Browser(base / "profile")
        try:
            yield url, store, base, browser, shots
        finally:
            browser.close()


def test_job_page_and_log_page(site) -> None:
    url, _store, _base, browser, shots = site
    browser.errors.clear()
    browser.open(f"{url}/jobs/2/index.html")
    assert browser.js(VISIBLE % json.dumps("table.results"))
    assert browser.js("document.querySelectorAll('table.results tbody tr').length") >= 24
    assert browser.js("document.title").startswith("Job 2: nasty <script>")  # shown as text
    assert browser.js("window.pwned === undefined && !document.querySelector('main script, main img')")
    browser.screenshot(shots / "job.png")
    browser.open(f"{url}/jobs/2/log.html")
    assert browser.js(VISIBLE % json.dumps("#log"))
    assert browser.js("getComputedStyle(document.querySelector('#log .target')).backgroundColor") != browser.js(
        "getComputedStyle(document.querySelector('#log .debug')).backgroundColor"
    )
    browser.screenshot(shots / "log.png")
    browser.open(f"{url}/index.html")
    assert browser.js(VISIBLE % json.dumps("table.jobs"))
    browser.screenshot(shots / "index.png")
    browser.open(f"{url}/suites/1_benchmarks.html")
    assert browser.js("document.querySelectorAll('svg.chart').length") >= 6
    browser.screenshot(shots / "suite.png")
    assert browser.errors == []


def test_log_filters_and_anchors(site) -> None:
    url, _store, _base, browser, shots = site
    browser.errors.clear()
    browser.open(f"{url}/jobs/2/log.html")
    shown = (
        "document.querySelectorAll('#log .debug').length && "
        "[...document.querySelectorAll('#log .debug')].every(e => e.offsetParent !== null)"
    )
    assert browser.js(shown)
    browser.js("document.getElementById('lv-debug').click()")  # the checkbox alone (CSS) hides them
    assert browser.js("[...document.querySelectorAll('#log .debug')].every(e => e.offsetParent === null)")
    assert browser.js("[...document.querySelectorAll('#log .target')].some(e => e.offsetParent !== null)")
    browser.screenshot(shots / "log-no-debug.png")
    browser.js("document.getElementById('lv-debug').click()")
    # a line on another page: the page's script follows the anchor there
    browser.call("Page.navigate", url=f"{url}/jobs/2/log.html#L700")
    browser.wait_js("location.pathname.endsWith('/log-2.html') && !!document.getElementById('L700')")
    assert browser.js("location.hash") == "#L700"
    browser.screenshot(shots / "log-anchor.png")
    assert browser.errors == []


def test_live_tail_of_a_running_job(site) -> None:
    url, store, base, browser, shots = site
    browser.errors.clear()
    browser.open(f"{url}/jobs/8/log.html")  # job 8 is running
    assert browser.js("document.getElementById('log').dataset.live") == "1"
    last = browser.js("document.querySelectorAll('#log > div').length")
    with LogFile(store.job_dir(8) / "output.yaml") as log:
        log.append(
            [
                LogRecord("2023-01-10T11:00:00.000000", "target", "tail <b>one</b> \u00e9\u4e2d"),
                LogRecord("2023-01-10T11:00:01.000000", "info", "tail two"),
            ]
        )
    site_log = base / "site/jobs/8/output.yaml"
    if site_log.stat().st_ino != (store.job_dir(8) / "output.yaml").stat().st_ino:
        pytest.skip("store and site on different file systems: the site has a copy of the log")
    browser.wait_js(f"document.querySelectorAll('#log > div').length === {last + 2}", timeout=20)
    row = browser.js(f"document.getElementById('L{last + 1}').textContent")
    assert "tail <b>one</b> \u00e9\u4e2d" in row  # shown as text, multi-byte characters intact
    assert browser.js(f"document.querySelector('#L{last + 1} .m').children.length") == 0
    browser.screenshot(shots / "log-live.png")
    assert browser.errors == []
