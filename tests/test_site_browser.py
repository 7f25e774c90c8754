"""The site in headless Chromium, served by nginx with deploy/nginx/pumice-site.conf and so under its
Content-Security-Policy: no console errors, results visible, filters, paging, live tail, and no CSP
violation anywhere; hostile links from users (a bundle's source, test references, metadata...) are
clicked and nothing runs.

Chromium is driven over the DevTools protocol with a tiny stdlib WebSocket client (no extra package).
CSP violations are caught twice: by a ``securitypolicyviolation`` listener installed in every page
before its own scripts (reporting through a DevTools binding, so a violation on a page that navigates
away is not lost) and by Chromium's console log. Dialogs (``alert``) are recorded and dismissed.
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

from results.imports import import_bundle
from results.log import LogRecord
from results.logfile import LogFile
from results.record import Result
from sitegen import build_site, publish_job
from sitegen.fixtures import HOSTILE_URLS, hostile_bundle, make_store

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

    _dialog_ids = 1 << 30  # ids of the dialog answers: apart from call()'s own

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
        self.violations: list[dict] = []  # securitypolicyviolation events, from every page
        self.dialogs: list[str] = []  # messages of alert/confirm/prompt dialogs, which are dismissed
        for method in ("Page.enable", "Runtime.enable", "Log.enable"):
            self.call(method)
        self.call("Runtime.addBinding", name="pumiceCspViolation")
        self.call("Page.addScriptToEvaluateOnNewDocument", source=CSP_LISTENER)
        self.call("Emulation.setDeviceMetricsOverride", width=1400, height=1000, deviceScaleFactor=1, mobile=False)

    def _event(self, message: dict) -> None:
        method, params = message.get("method"), message.get("params", {})
        self.events.append(message)
        if method == "Runtime.bindingCalled" and params.get("name") == "pumiceCspViolation":
            self.violations.append(json.loads(params["payload"]))
        elif method == "Page.javascriptDialogOpening":
            self.dialogs.append(params.get("message", ""))
            # answered at once, without waiting: a call may be blocked until the dialog is gone
            self._dialog_ids += 1
            self.ws.send(json.dumps({"id": self._dialog_ids, "method": "Page.handleJavaScriptDialog",
                                     "params": {"accept": True}}))
        elif method == "Runtime.exceptionThrown":
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

    def settle(self, seconds: float = 0.5) -> None:
        """Let the page run for ``seconds`` while its events (violations, dialogs) are collected."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            time.sleep(0.05)
            self.call("Runtime.evaluate", expression="0")

    def click(self, x: float, y: float) -> None:
        """A real left click (mouse moved, pressed, released) at viewport coordinates x, y."""
        for kind in ("mouseMoved", "mousePressed", "mouseReleased"):
            self.call("Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left", clickCount=1)

    def click_text(self, needle: str, index: int) -> dict | None:
        """Scroll occurrence ``index`` of ``needle`` in the page's text into view and click its middle;
        returns where it was ({tag, link}: the element holding it, the href of the link around it), or
        None when there are not that many occurrences."""
        spot = self.js(f"({FIND_TEXT})({json.dumps(needle)}, {index})")
        if spot:
            self.click(spot["x"], spot["y"])
        return spot

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


# Installed in every document before its own scripts (DevTools' scripts are not subject to the page's CSP).
CSP_LISTENER = """document.addEventListener("securitypolicyviolation", (e) => {
  window.pumiceCspViolation(JSON.stringify({directive: e.effectiveDirective, blocked: e.blockedURI,
    sample: e.sample, source: e.sourceFile, line: e.lineNumber, page: document.location.href}));
});"""
# Occurrence `index` of `needle` in the page's text: scrolled into view, its middle in viewport pixels.
FIND_TEXT = """(needle, index) => {
  const walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
  let seen = 0;
  for (let node = walker.nextNode(); node; node = walker.nextNode()) {
    for (let at = node.data.indexOf(needle); at >= 0; at = node.data.indexOf(needle, at + 1)) {
      if (seen++ < index) continue;
      node.parentElement.scrollIntoView({block: "center"});
      const range = document.createRange();
      range.setStart(node, at);
      range.setEnd(node, at + needle.length);
      const box = range.getClientRects()[0];
      const link = node.parentElement.closest("a");
      return {x: box.left + box.width / 2, y: box.top + box.height / 2, tag: node.parentElement.tagName,
              link: link ? link.getAttribute("href") : null};
    }
  }
  return null;
}"""
# Every href on the page that does not resolve to http(s) (relative links resolve to the site's own).
UNSAFE_HREFS = """[...document.querySelectorAll("[href]")]
  .map((e) => e.getAttribute("href"))
  .filter((h) => !["http:", "https:"].includes(new URL(h, document.baseURI).protocol))"""

VISIBLE = """(() => { const e = document.querySelector(%s); if (!e) return false;
  const r = e.getBoundingClientRect(); const s = getComputedStyle(e);
  return r.width > 200 && r.height > 20 && s.display !== 'none' && s.visibility !== 'hidden'; })()"""


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory):
    chromium = Browser(tmp_path_factory.mktemp("profile"))
    try:
        yield chromium
    finally:
        chromium.close()


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory, browser: Browser):
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
    # job 9: a bundle uploaded from "elsewhere" whose source URL and test references are hostile
    imported = import_bundle(store, hostile_bundle())
    publish_job(store.root, base / "site", imported.job_id, instance="lab-a.example.org", log_page_lines=500)
    (base / "site" / "control.html").write_text(CONTROL_PAGE, encoding="utf-8")
    shots = Path(os.environ.get("PUMICE_SCREENSHOTS") or base / "shots")
    shots.mkdir(parents=True, exist_ok=True)
    with serve_site(base / "site", base / "nginx") as url:
        yield url, store, base, browser, shots


@pytest.fixture()
def clean(site):
    """The browser with nothing collected yet; after the test, it saw no CSP violation and no dialog."""
    browser = site[3]
    browser.errors.clear()
    browser.violations.clear()
    browser.dialogs.clear()
    yield site
    assert browser.violations == []
    assert browser.dialogs == []


def test_job_page_and_log_page(clean) -> None:
    url, _store, _base, browser, shots = clean
    browser.open(f"{url}/jobs/2/index.html")
    assert browser.js(VISIBLE % json.dumps("table.results"))
    assert browser.js("document.querySelectorAll('table.results tbody tr').length") >= 24
    assert browser.js("document.title").startswith("Job 2: nasty <script>")  # shown as text
    assert browser.js("window.pwned === undefined && !document.querySelector('main script, main img')")
    # the widths and indents that were inline styles: classes of the site's stylesheet now
    assert browser.js("document.querySelector('.counts .bar i').getBoundingClientRect().width") > 10
    indents = browser.js(
        "[...document.querySelectorAll('table.pipeline td.action')].map(e => getComputedStyle(e).paddingLeft)"
    )
    assert len(set(indents)) == 3  # depths 0, 1 and 2
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


def test_log_filters_and_anchors(clean) -> None:
    url, _store, _base, browser, shots = clean
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
    # site.js remembers the choice: the next page opens with debug lines hidden
    browser.open(f"{url}/jobs/2/log-2.html")
    assert browser.js("document.getElementById('lv-debug').checked") is False
    assert browser.js("[...document.querySelectorAll('#log .debug')].every(e => e.offsetParent === null)")
    browser.js("document.getElementById('lv-debug').click()")
    browser.open(f"{url}/jobs/2/log.html")
    assert browser.js("document.getElementById('lv-debug').checked") is True
    # a line on another page: the page's script follows the anchor there
    browser.call("Page.navigate", url=f"{url}/jobs/2/log.html#L700")
    browser.wait_js("location.pathname.endsWith('/log-2.html') && !!document.getElementById('L700')")
    assert browser.js("location.hash") == "#L700"
    browser.screenshot(shots / "log-anchor.png")
    # the pager's links
    browser.open(f"{url}/jobs/2/log-2.html")
    spot = browser.js("(() => { const a = document.querySelector('nav.pager a[rel=prev]'); a.scrollIntoView();"
                      " const r = a.getBoundingClientRect(); return {x: r.left + 5, y: r.top + r.height / 2}; })()")
    browser.click(spot["x"], spot["y"])
    browser.wait_js("location.pathname.endsWith('/jobs/2/log.html') && !!document.getElementById('L1')")
    assert browser.errors == []


def test_the_job_list_filters_its_rows_as_one_types(clean) -> None:
    url, _store, _base, browser, _shots = clean
    browser.open(f"{url}/index.html")
    rows = "[...document.querySelectorAll('table.jobs tbody tr')]"
    total = browser.js(f"{rows}.length")
    assert total >= 7 and browser.js(VISIBLE % json.dumps("#job-search"))
    browser.js("document.getElementById('job-search').focus()")
    browser.call("Input.insertText", text="bbb-01")
    shown = browser.js(f"{rows}.filter(r => !r.hidden).map(r => r.textContent.includes('bbb-01'))")
    assert shown and all(shown) and len(shown) < total
    browser.js("document.getElementById('job-search').select()")
    browser.call("Input.dispatchKeyEvent", type="keyDown", key="Backspace", code="Backspace",
                 windowsVirtualKeyCode=8)
    browser.call("Input.dispatchKeyEvent", type="keyUp", key="Backspace", code="Backspace", windowsVirtualKeyCode=8)
    browser.wait_js(f"{rows}.every(r => !r.hidden)")
    assert browser.errors == []


def test_live_tail_of_a_running_job(clean) -> None:
    url, store, base, browser, shots = clean
    browser.open(f"{url}/jobs/8/log.html")  # job 8 is running
    assert browser.js("document.getElementById('log').dataset.live") == "1"
    last = browser.js("document.querySelectorAll('#log > div').length")
    with LogFile(store.job_dir(8) / "output.yaml") as log:
        log.append(
            [
                LogRecord("2023-01-10T11:00:00.000000", "target", "tail <b>one</b> \u00e9\u4e2d"),
                LogRecord("2023-01-10T11:00:01.000000", "info", "tail two"),
                LogRecord("2023-01-10T11:00:02.000000", "target", "<img src=x onerror=alert('pwned')>"),
            ]
        )
    site_log = base / "site/jobs/8/output.yaml"
    if site_log.stat().st_ino != (store.job_dir(8) / "output.yaml").stat().st_ino:
        pytest.skip("store and site on different file systems: the site has a copy of the log")
    browser.wait_js(f"document.querySelectorAll('#log > div').length === {last + 3}", timeout=20)
    row = browser.js(f"document.getElementById('L{last + 1}').textContent")
    assert "tail <b>one</b> \u00e9\u4e2d" in row  # shown as text, multi-byte characters intact
    assert browser.js(f"document.querySelector('#L{last + 1} .m').children.length") == 0
    assert browser.js(f"document.querySelector('#L{last + 3} .m').children.length") == 0
    browser.settle(0.5)  # an <img onerror> parsed as HTML would have fired by now
    browser.screenshot(shots / "log-live.png")
    assert browser.errors == []


# -- hostile links -------------------------------------------------------------------------------------

# A page that does what the site never does: inline script, inline handler, a javascript: link, an inline
# style. Under the CSP each is a violation and nothing runs; without it, each runs. It shows that the
# checks of the tests below (violations, dialogs, the title) see what they look for.
CONTROL_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>control</title>
<script>document.title = "pwned by an inline script";</script></head>
<body><p><a href="javascript:alert(document.title='pwned by a javascript: link')">pwned link</a></p>
<p><button type="button" onclick="alert(document.title='pwned by a handler')">pwned button</button></p>
<p style="color: red">an inline style</p></body></html>
"""


# How long a click is given to run something: the control below shows a javascript: link's script and an
# inline handler run within it when nothing stops them.
CLICK_SETTLE = 0.3


def click_every_hostile_text(browser: Browser, url: str) -> int:
    """Open ``url`` and click every occurrence of "pwned" in its text (the hostile values carry it).
    Each must be plain text, and clicking it must run nothing and go nowhere. Returns how many there were."""
    browser.open(url)
    title = browser.js("document.title")
    assert browser.js(UNSAFE_HREFS) == [], url
    count = 0
    while (spot := browser.click_text("pwned", count)) is not None:
        count += 1
        assert spot["link"] is None, f"{url}: a hostile value is a link: {spot}"
        browser.settle(CLICK_SETTLE)
        assert browser.dialogs == [], f"{url}: clicking {spot} opened a dialog"
        assert (browser.js("location.href"), browser.js("document.title")) == (url, title)
    return count


def test_hostile_links_from_users_are_text_and_clicking_them_runs_nothing(clean) -> None:
    url, _store, _base, browser, shots = clean
    # the imported bundle: its source URL and a reference of each hostile kind; one safe reference
    imported = f"{url}/jobs/9/index.html"
    # the source URL (in the note and in the job's description) and each reference
    assert click_every_hostile_text(browser, imported) == 2 + len(HOSTILE_URLS)
    assert browser.js("document.querySelector('.note').textContent").count("javascript:alert(") == 1
    assert browser.js("[...document.querySelectorAll('td.name .extra a')].map(a => a.href)") == [
        "https://ci.example.org/builds/42?log=full&step=2"
    ]
    assert browser.js("document.querySelectorAll('td.name .extra').length") == len(HOSTILE_URLS) + 1
    browser.screenshot(shots / "hostile-bundle.png", full=True)
    # the nasty job: metadata, a test reference, a test definition's repository, an image URL
    assert click_every_hostile_text(browser, f"{url}/jobs/2/index.html") >= 6
    # its log: the reference on the results line (and the console's own hostile text)
    assert click_every_hostile_text(browser, f"{url}/jobs/2/log.html") >= 1
    # a device's description: a protocol-relative URL
    assert click_every_hostile_text(browser, f"{url}/devices/bbb-01.html") == 1
    assert browser.errors == []


def test_the_csp_blocks_and_reports_what_the_site_never_does(clean) -> None:
    """The control: under the shipped CSP, inline script, handler, javascript: link and style are blocked
    and reported as violations, so a test that expects none would fail on them."""
    url, _store, _base, browser, _shots = clean
    browser.open(f"{url}/control.html")
    assert browser.click_text("pwned link", 0)["link"].startswith("javascript:")
    assert browser.click_text("pwned button", 0) is not None
    browser.settle(CLICK_SETTLE)
    assert browser.js("document.title") == "control" and browser.dialogs == []
    directives = sorted({v["directive"] for v in browser.violations})
    assert directives == ["script-src-attr", "script-src-elem", "style-src-attr"], browser.violations
    assert len(browser.violations) == 4, browser.violations  # the inline script, style, link and handler
    assert any("Content Security Policy" in error for error in browser.errors)  # the console says so too
    browser.violations.clear()  # expected here: the fixture's check is for the site's pages


def test_without_the_csp_the_site_alone_still_runs_nothing_and_the_control_does_run(clean) -> None:
    """The site's escaping on its own (the CSP is defence in depth), and the proof that the checks of
    click_every_hostile_text see a script that runs: the control page's scripts do run without the CSP."""
    url, _store, base, browser, _shots = clean
    with serve_site(base / "site", base / "nginx-no-csp", csp=False) as bare:
        browser.open(f"{bare}/control.html")
        assert browser.js("document.title") == "pwned by an inline script"
        browser.click_text("pwned link", 0)
        browser.settle(CLICK_SETTLE)
        assert browser.dialogs == ["pwned by a javascript: link"]
        browser.click_text("pwned button", 0)
        browser.settle(CLICK_SETTLE)
        assert browser.dialogs == ["pwned by a javascript: link", "pwned by a handler"]
        browser.dialogs.clear()
        assert click_every_hostile_text(browser, f"{bare}/jobs/9/index.html") == 2 + len(HOSTILE_URLS)
        assert click_every_hostile_text(browser, f"{bare}/jobs/2/index.html") >= 6
        assert browser.violations == []


def test_a_bundle_uploaded_to_a_real_master_with_hostile_links_runs_nothing_when_clicked(
    tmp_path: Path, browser: Browser
) -> None:
    """The attack as reported: an ordinary user's token uploads a bundle whose source URL is
    ``javascript:``; the master publishes it; a reader opens the job on the site (nginx, shipped
    configuration) and clicks. Beside it, a job of the lab whose metadata, test reference and test
    definition repository are hostile, and a worker whose description is."""
    from support.master import build_lab, job_text
    from test_master_bundles import serving

    from master import inventory, jobs, publish
    from master.client import Client
    from master.db import close_database, connection
    from master.scheduler import Scheduler
    from master.users import SYSTEM, authenticate

    data = tmp_path / "data"
    browser.errors.clear()
    browser.violations.clear()
    browser.dialogs.clear()
    with serve_site(data / "site", tmp_path / "nginx") as site:
        safe = f"{site}/index.html"  # a safe reference that leads somewhere: clicking it must go there
        lab = build_lab(data, None, name="lab-b", url=f"{site}/")
        with connection():
            inventory.update_worker(SYSTEM, "w1", description=HOSTILE_URLS["javascript"])
            inventory.update_device(SYSTEM, "qemu01", description=HOSTILE_URLS["tabbed"])
            inventory.update_device(SYSTEM, "qemu02", description=HOSTILE_URLS["tabbed"])
            metadata = "".join(f"  {name}: {json.dumps(url)}\n" for name, url in HOSTILE_URLS.items())
            [job_id] = jobs.submit_job(
                job_text("hostile metadata") + f"metadata:\n{metadata}  build: {json.dumps(safe)}\n",
                authenticate(f"Token {lab.tokens['alice']}"),
            )
            assert job_id in [job for job, _ in Scheduler().loop_once()]
            jobs.job_started(job_id)
            board = [
                Result(job=str(job_id), level="3.1", suite="0_smoke", case="ref", result="pass",
                       extra={"reference": HOSTILE_URLS["data"]}),
                Result(job=str(job_id), level="1.2.1", suite="lava", case="git-repo-action", result="pass",
                       extra={"repository": HOSTILE_URLS["spaced"], "path": "smoke.yaml"}),
            ]
            jobs.append_logs(job_id, [LogRecord("2024-01-01T10:00:00.000000", "results", r.to_record())
                                      for r in board])
            jobs.append_results(job_id, board)
            jobs.job_finished(job_id, "Complete")
            publish.publish_pages(job_id)
        close_database()
        with serving(data, None, "lab-b", f"{site}/") as master:
            alice = Client(master, token=lab.tokens["alice"])  # not an admin
            reply = alice.upload_bundle(hostile_bundle(safe_url=safe))
            alice.close()
        assert reply["created"] and reply["source"]["url"] == HOSTILE_URLS["javascript"]
        imported = f"{site}/jobs/{reply['job']}/index.html"
        assert click_every_hostile_text(browser, imported) == 1 + len(HOSTILE_URLS)  # the source, each reference
        assert click_every_hostile_text(browser, f"{site}/jobs/{job_id}/index.html") == 2 + len(HOSTILE_URLS)
        assert click_every_hostile_text(browser, f"{site}/jobs/{job_id}/log.html") == 2
        assert click_every_hostile_text(browser, f"{site}/workers/w1.html") == 1
        device = sorted((data / "site/devices").glob("qemu0*.html"))[0]  # the one the job ran on
        assert click_every_hostile_text(browser, f"{site}/devices/{device.name}") == 1
        # the one safe reference is a link, and a click on it follows it
        browser.open(imported)
        spot = browser.click_text(safe, 0)
        assert spot["link"] == safe
        browser.wait_js(f"location.href === {json.dumps(safe)}")
    assert browser.violations == [] and browser.dialogs == [] and browser.errors == []


# -- lab now ------------------------------------------------------------------------------------------

def phone(browser: Browser, on: bool) -> None:
    """A 390 px wide phone screen (on), or the desktop window back (off)."""
    width, height, mobile = (390, 844, True) if on else (1400, 1000, False)
    browser.call("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1,
                 mobile=mobile)


def test_lab_now_shows_a_device_set_to_maintenance_within_a_second_of_the_api_call(
    lab, tmp_path: Path, browser: Browser
) -> None:
    """An open lab-now page (nginx, the shipped CSP) shows the change, timed from the API call to the
    DOM update; desktop and 390 px wide; the device's own page has the transition."""
    from support.master import stop_server

    from master.client import Client
    from master.server import MasterServer

    shots = Path(os.environ.get("PUMICE_SCREENSHOTS") or tmp_path / "shots")
    shots.mkdir(parents=True, exist_ok=True)
    browser.errors.clear()
    browser.violations.clear()
    master = MasterServer("127.0.0.1", 0, threads=4, scheduler_interval=3600, validators=0).start()
    admin = Client(master.url, lab.tokens["admin"])
    site_dir = lab.instance.site_dir
    try:
        deadline = time.monotonic() + 20
        while not (site_dir / "lab/index.html").exists():  # the lab publisher's first publish
            assert time.monotonic() < deadline, "no lab-now page"
            time.sleep(0.05)
        with serve_site(site_dir, tmp_path / "nginx") as url:
            for name, is_phone in (("desktop", False), ("phone", True)):
                phone(browser, is_phone)
                device, health = ("qemu02", "Maintenance") if not is_phone else ("qemu01", "Bad")
                browser.open(f"{url}/lab/index.html")
                assert browser.js(f"!!document.querySelector('tr[data-device=\"{device}\"]')") is False
                browser.settle(0.3)  # the page polls its stamp from now on
                start = time.monotonic()
                admin.call("PATCH", f"/devices/{device}/", json_body={"health": health})
                browser.wait_js(f"!!document.querySelector('tr[data-device=\"{device}\"]')", timeout=5)
                elapsed = time.monotonic() - start
                assert elapsed < 1.0, f"{name}: the open page showed {device} after {elapsed:.2f} s"
                row = browser.js(f"document.querySelector('tr[data-device=\"{device}\"]').textContent")
                assert health in row and "set by admin" in row
                browser.screenshot(shots / f"lab-now-{name}.png", full=True)
                if is_phone:  # cards: nothing wider than the screen
                    assert browser.js("document.documentElement.scrollWidth") <= 390
            browser.open(f"{url}/devices/qemu02.html")
            assert "set by admin" in browser.js("document.getElementById('transitions').textContent")
            browser.screenshot(shots / "device-phone.png", full=True)
    finally:
        phone(browser, False)
        admin.close()
        stop_server(master)
    assert browser.violations == [] and browser.errors == []


def test_a_case_that_flips_is_a_new_failure_on_the_job_page_and_its_history_shows_it(
    tmp_path: Path, browser: Browser
) -> None:
    """Job 2 runs the job of job 1 again on the same device type and one case fails: its page marks
    it "new failure"; its link lands on the case's row of the definition's history; "compare with
    previous run" lists it as a regression (desktop, 390 px)."""
    from test_site_history import history_store

    shots = Path(os.environ.get("PUMICE_SCREENSHOTS") or tmp_path / "shots")
    shots.mkdir(parents=True, exist_ok=True)
    browser.errors.clear()
    browser.violations.clear()
    store = history_store(tmp_path / "store")
    build_site(store.root, tmp_path / "site", instance="lab-a.example.org", processes=1)
    try:
        with serve_site(tmp_path / "site", tmp_path / "nginx") as url:
            for name, is_phone in (("desktop", False), ("phone", True)):
                phone(browser, is_phone)
                browser.open(f"{url}/jobs/2/index.html")
                row = "document.querySelector('tr[data-mark=\"new failure\"]')"
                assert "linux-posix-pwd" in browser.js(f"{row}.textContent")
                assert "1 new failure" in browser.js("document.getElementById('compared').textContent")
                browser.screenshot(shots / f"job-new-failure-{name}.png")
                if is_phone:
                    assert browser.js("document.documentElement.scrollWidth") <= 390
                href = browser.js(f"{row}.querySelector('td.name a').href")
                browser.open(href)
                target = "document.querySelector('tr:target')"
                assert "linux-posix-pwd" in browser.js(f"{target}.textContent")
                assert "failing since" in browser.js(f"{target}.textContent")
                strip = browser.js(f"[...{target}.querySelectorAll('.strip a')].map(a => a.className)")
                assert strip == ["pass", "fail"]
                browser.screenshot(shots / f"case-history-{name}.png")
                if is_phone:
                    assert browser.js("document.documentElement.scrollWidth") <= 390
                # "compare with previous run": the regression is listed
                browser.open(f"{url}/jobs/2/index.html")
                browser.open(browser.js("document.getElementById('compare-previous').href"))
                assert "linux-posix-pwd" in browser.js("document.getElementById('regressions').textContent")
                browser.screenshot(shots / f"compare-{name}.png")
                if is_phone:
                    assert browser.js("document.documentElement.scrollWidth") <= 390
    finally:
        phone(browser, False)
    assert browser.violations == [] and browser.errors == []
