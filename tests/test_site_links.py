"""Safe links: a URL from a user is a link only when it is http(s); every page keeps to the site's CSP.

The browser side (clicking the hostile links in Chromium under the CSP that nginx sends) is in
test_site_browser.py; here are the filter's table of inputs and a static check of every built page.
"""

from __future__ import annotations

import re
from html.parser import HTMLParser
from pathlib import Path

import pytest
from markupsafe import Markup

from results.imports import import_bundle
from sitegen import build_site, publish_job
from sitegen.fixtures import HOSTILE_URLS, SAFE_URL, hostile_bundle, make_store
from sitegen.render import TEMPLATE_DIR, make_environment
from sitegen.text import safe_url
from sitegen.widgets import url_link

REFUSED = [
    # script and data schemes, in any case, with what browsers strip at the ends or drop inside
    "javascript:alert(1)",
    "JaVaScRiPt:alert(1)",
    " javascript:alert(1)",
    "\x00\x01\x1f javascript:alert(1)",
    "\tjavascript:alert(1)\n",
    "java\tscript:alert(1)",
    "java\nscript:alert(1)",
    "java\rscript:alert(1)",
    "javascript://example.org/%0Aalert(1)",
    "javascript:alert('https://example.org/')",
    "data:text/html,<script>alert(1)</script>",
    "DATA:text/html;base64,PHNjcmlwdD5hbGVydCgxKTwvc2NyaXB0Pg==",
    "vbscript:msgbox(1)",
    "file:///etc/shadow",
    "mailto:lab@example.org",
    "ftp://example.org/image.img",
    # entity-encoded schemes: the page escapes them, so a browser would see the text as written
    "&#106;avascript:alert(1)",
    "javascript&colon;alert(1)",
    # not absolute http(s) URLs with a host
    "//evil.example/x",
    "\\\\evil.example\\x",
    "/jobs/1/index.html",
    "jobs/1/index.html",
    "#L1",
    "?page=2",
    "http:evil.example",
    "http:/evil.example",
    "http:\\\\evil.example",
    "https://",
    "http:///evil.example",
    "https:// example.org",
    # characters a browser does not strip at the ends, whitespace and controls inside
    "\ufeffhttps://example.org/",
    "\u00a0https://example.org/",
    "https://exa mple.org/",
    "https://example.org/a\tb",
    "https://example.org/a\nb",
    "https://example.org/a\x00b",
    "https://example.org/a\x85b",
    "https://example.org/\ud800",
    "",
    "   ",
    None,
    42,
    ["https://example.org/"],
    {"url": "https://example.org/"},
]
ACCEPTED = [
    ("https://example.org/", "https://example.org/"),
    ("http://lab.example:8080/jobs/1/", "http://lab.example:8080/jobs/1/"),
    ("HTTPS://EXAMPLE.ORG/", "HTTPS://EXAMPLE.ORG/"),
    ("hTtP://example.org", "hTtP://example.org"),
    (SAFE_URL, SAFE_URL),
    ("  https://example.org/x \n", "https://example.org/x"),  # ends stripped, as browsers do
    ("\x00https://example.org/\x1f", "https://example.org/"),
    ("https://user@example.org/", "https://user@example.org/"),
    ("https://[::1]:8080/", "https://[::1]:8080/"),
    ("https://例え.jp/パス?q=ü", "https://例え.jp/パス?q=ü"),
    ('https://example.org/"><script>alert(1)</script>', 'https://example.org/"><script>alert(1)</script>'),
]


@pytest.mark.parametrize("value", REFUSED, ids=repr)
def test_a_url_that_is_not_absolute_http_or_https_is_not_a_link(value: object) -> None:
    assert safe_url(value) is None
    shown = url_link(value)
    assert "<a" not in shown and "href" not in shown


@pytest.mark.parametrize(("value", "href"), ACCEPTED, ids=lambda v: repr(v))
def test_an_absolute_http_or_https_url_is_a_link(value: str, href: str) -> None:
    assert safe_url(value) == href
    shown = url_link(value)
    assert shown.startswith(f'<a href="{Markup.escape(href)}" rel="nofollow noopener noreferrer">')


@pytest.mark.parametrize("name", sorted(HOSTILE_URLS))
def test_the_fixtures_hostile_urls_are_refused(name: str) -> None:
    assert safe_url(HOSTILE_URLS[name]) is None


def test_a_link_and_its_text_are_escaped_and_what_is_not_a_link_is_visible_text() -> None:
    assert url_link('https://example.org/?a=1&b="2"') == Markup(
        '<a href="https://example.org/?a=1&amp;b=&#34;2&#34;" rel="nofollow noopener noreferrer">'
        "https://example.org/?a=1&amp;b=&#34;2&#34;</a>"
    )
    assert url_link("https://example.org/", "<b>the build</b>") == Markup(
        '<a href="https://example.org/" rel="nofollow noopener noreferrer">&lt;b&gt;the build&lt;/b&gt;</a>'
    )
    assert url_link("javascript:alert('<x>')") == Markup("javascript:alert(&#39;&lt;x&gt;&#39;)")
    assert url_link("java\x00script:alert(1)") == Markup("java\\x00script:alert(1)")  # visible, not raw
    assert url_link(None) == Markup("") and url_link(7) == Markup("7")


def test_every_template_is_autoescaped_and_none_marks_text_safe(tmp_path: Path) -> None:
    for path in TEMPLATE_DIR.glob("*.html"):
        text = path.read_text(encoding="utf-8")
        assert not re.search(r"\|\s*safe\b|autoescape\s+false|Markup", text), path.name
    # a lab's own template (an override directory) is autoescaped as ours are
    (tmp_path / "mine.html").write_text("{{ value }} {{ url_link(value) }}", encoding="utf-8")
    env = make_environment((str(tmp_path),))
    assert env.autoescape is True
    assert env.get_template("mine.html").render(value="<script>") == "&lt;script&gt; &lt;script&gt;"


# -- every built page keeps to the CSP and links only where it is safe ---------------------------------

_SCHEME_RE = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*):")
_URL_ATTRS = ("href", "src", "action", "formaction", "xlink:href", "poster", "data")


def _browser_scheme(url: str) -> str | None:
    """The scheme a browser reads from an attribute value (ends stripped, tabs and newlines dropped)."""
    cleaned = re.sub("[\t\n\r]", "", url.strip("".join(map(chr, range(0x21)))))
    if cleaned.startswith(("//", "\\\\", "/\\", "\\/")):
        return "//"
    match = _SCHEME_RE.match(cleaned)
    return match.group(1).lower() if match else None


class _PageAudit(HTMLParser):
    """Collects what a Content-Security-Policy without 'unsafe-inline' would block, and unsafe links."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.faults: list[str] = []
        self.links: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        for name, value in attrs:
            if name.startswith("on"):
                self.faults.append(f"<{tag} {name}=...>: inline event handler")
            if name == "style":
                self.faults.append(f"<{tag} style=...>: inline style")
            if name in _URL_ATTRS and value is not None:
                scheme = _browser_scheme(value)
                if scheme not in (None, "http", "https"):
                    self.faults.append(f"<{tag} {name}={value!r}>: scheme {scheme}")
                if tag == "a" and scheme in ("http", "https"):
                    self.links.append(value)
        if tag == "style":
            self.faults.append("<style>: inline stylesheet")
        if tag == "script" and not values.get("src") and values.get("type") != "application/json":
            self.faults.append("<script> without src: inline script")


def audit(html: str) -> _PageAudit:
    parser = _PageAudit()
    parser.feed(html)
    parser.close()
    return parser


def test_the_audit_finds_what_it_looks_for() -> None:
    """The control for the test below: each fault it must report, it reports."""
    page = audit(
        '<a href=" java\tscript:alert(1)">x</a><a href="//evil.example/">y</a><b onclick="x()">z</b>'
        '<i style="width:1%"></i><style>b{}</style><script>alert(1)</script>'
        '<a href="&#106;avascript:alert(1)">entity</a><a href="https://example.org/">ok</a><a href="log.html">ok</a>'
    )
    assert len(page.faults) == 7, page.faults
    assert page.links == ["https://example.org/"]


@pytest.fixture(scope="module")
def hostile_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("links")
    store = make_store(base / "store", 8, cases=12, log_lines=160, nasty=True)
    report = build_site(store.root, base / "site", instance="lab-a", base_url="https://lab-a.example.org/")
    assert report.errors == []
    imported = import_bundle(store, hostile_bundle(), submitter='"><img src=x onerror=alert(1)>')
    publish_job(store.root, base / "site", imported.job_id, instance="lab-a", base_url="https://lab-a.example.org/")
    return base / "site"


def test_every_page_has_no_inline_script_style_or_handler_and_links_only_to_http(hostile_site: Path) -> None:
    pages = sorted(hostile_site.rglob("*.html"))
    assert len(pages) > 30
    faults = {}
    links: set[str] = set()
    for path in pages:
        page = audit(path.read_text(encoding="utf-8"))
        if page.faults:
            faults[str(path.relative_to(hostile_site))] = page.faults
        links.update(page.links)
    assert faults == {}
    # the user-supplied URLs that are links: the safe reference and description, nothing else
    assert links == {SAFE_URL, "https://wiki.example.org/lab/worker-b"}


def test_the_hostile_urls_show_as_text_where_users_put_them(hostile_site: Path) -> None:
    imported = (hostile_site / "jobs/9/index.html").read_text(encoding="utf-8")
    assert "Imported bundle from <strong>evil &lt;b&gt;lab&lt;/b&gt;</strong>" in imported
    assert "(javascript:alert(document.title=&#39;pwned&#39;))" in imported  # the source, as text
    for url in HOSTILE_URLS.values():
        assert str(Markup.escape(url)) in imported  # each reference, as text
    assert imported.count(f'href="{Markup.escape(SAFE_URL)}"') == 1
    nasty = (hostile_site / "jobs/2/index.html").read_text(encoding="utf-8")
    assert "<dt>Homepage</dt><dd> \tJaVaScRiPt:alert(document.title=&#39;pwned&#39;)</dd>" in nasty  # metadata
    assert "repository java\tscript:alert(document.title=&#39;pwned&#39;)" in nasty  # test definition
    assert "url vbscript:msgbox(&#39;pwned&#39;)" in nasty  # an image URL of the job definition
    device = (hostile_site / "devices/bbb-01.html").read_text(encoding="utf-8")
    assert "<dt>Description</dt><dd>//evil.example/pwned</dd>" in device
    log = "".join(p.read_text(encoding="utf-8") for p in (hostile_site / "jobs/2").glob("log*.html"))
    assert "reference javascript:alert(document.title=&#39;pwned&#39;)</span>" in log
