"""Text helpers for pages: make any string from a board or a user safe and visible, name files, format times.

Everything that reaches a page goes through :func:`visible` (Jinja's ``finalize``) or :func:`log_html`
(the log renderer), so control characters, lone surrogates and ANSI escapes from a console never break
the page's encoding or layout: they show as text.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import html
import re

# C0 controls except TAB and LF, DEL, C1 controls, lone surrogates and the noncharacters U+FFFE/U+FFFF:
# none of them may appear raw in an HTML document (or be encoded to UTF-8, for surrogates).
_UNSAFE_RE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\ud800-\udfff\ufffe\uffff]")
# CSI sequences (colours, cursor moves) that consoles print: dropped from the rendered log because they
# are layout noise there; the raw output.yaml next to the page keeps them byte for byte.
_CSI_RE = re.compile("\x1b\\[[0-9;?]*[ -/]*[@-~]")


def _picture(char: str) -> str:
    """How one unsafe character shows: its Python-style escape (``\\x1b``, ``\\ud800``), readable in any font."""
    code = ord(char)
    if code <= 0xFF:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}"


def _picture_match(match: re.Match) -> str:
    return _picture(match.group())


def _span_match(match: re.Match) -> str:
    return f'<span class="cc">{_picture(match.group())}</span>'


def visible(text: str) -> str:
    """``text`` with every character HTML cannot carry replaced by a visible stand-in (still plain text)."""
    return _UNSAFE_RE.sub(_picture_match, text)


def log_html(text: str) -> str:
    """One log message as HTML: escaped, ANSI sequences dropped, control characters shown as marked text."""
    if "\x1b" in text:
        text = _CSI_RE.sub("", text)
    text = html.escape(text, quote=False)
    return _UNSAFE_RE.sub(_span_match, text)


# Browsers strip C0 controls and spaces from both ends of an href before they read its scheme (WHATWG
# URL parser), so `` javascript:`` is ``javascript:`` to them: strip the same before looking.
_URL_ENDS = "".join(map(chr, range(0x21)))
# An absolute http(s) URL with a host: ``http://`` or ``https://`` (any case), then at least one
# character of the authority.
_WEB_URL_RE = re.compile(r"https?://[^/?#\\\s]", re.IGNORECASE)


def safe_url(value: object) -> str | None:
    """``value`` as an href when it is an absolute http or https URL, else None: then it is shown as text.

    The one check for every URL that comes from a user (a bundle's source, a test reference, metadata, a
    test definition's repository, a device's description...). Only a URL that starts, once its ends are
    stripped as a browser strips them, with ``http://`` or ``https://`` and has no whitespace or control
    character anywhere passes: ``javascript:``, ``data:``, ``vbscript:``, ``file:`` in any case, with
    leading spaces or with tabs and newlines inside (which browsers drop: ``java\\tscript:``) are text,
    and so are relative and protocol-relative (``//host``) URLs and ``http:host``: a user's link says
    where it goes.
    """
    if not isinstance(value, str):
        return None
    url = value.strip(_URL_ENDS)
    if not _WEB_URL_RE.match(url) or _UNSAFE_RE.search(url) or any(char.isspace() for char in url):
        return None
    return url


_SLUG_BAD_RE = re.compile(r"[^A-Za-z0-9._-]+")


def slug(name: str) -> str:
    """A file name for ``name`` (a device, suite, worker...): readable, unique per name, never a path.

    Names made only of safe characters keep their spelling; any other name gets the safe part plus a
    short hash of the original so that two names never share a file (``a b`` vs ``a_b``).
    """
    text = str(name)
    safe = _SLUG_BAD_RE.sub("_", text).strip(".")[:80]
    if safe == text and safe:
        return safe
    digest = hashlib.sha1(text.encode("utf-8", "surrogatepass")).hexdigest()[:8]
    return f"{safe or 'x'}-{digest}"


def parse_time(value: object) -> _dt.datetime | None:
    """A timestamp from meta.yaml (a datetime, or an ISO string with or without zone) as naive UTC."""
    if value in (None, ""):
        return None
    if isinstance(value, _dt.datetime):
        moment = value
    elif isinstance(value, _dt.date):
        moment = _dt.datetime(value.year, value.month, value.day)
    else:
        try:
            moment = _dt.datetime.fromisoformat(str(value).replace("Z", "+00:00"))
        except ValueError:
            return None
    if moment.tzinfo is not None:
        moment = moment.astimezone(_dt.UTC).replace(tzinfo=None)
    return moment


def format_time(value: object) -> str:
    """``2023-01-10 10:00:00`` (UTC, seconds), or an empty string when there is no time."""
    moment = parse_time(value)
    return moment.strftime("%Y-%m-%d %H:%M:%S") if moment else ""


def format_duration(seconds: float | str | None) -> str:
    """A duration the way people read it: ``0.12 s``, ``3.5 s``, ``42 s``, ``3 min 05 s``, ``2 h 01 min``."""
    if seconds in (None, ""):
        return ""
    try:
        value = float(seconds)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return str(seconds)
    if value < 1:
        return f"{value:.2f} s"
    if value < 10:
        return f"{value:.1f} s"
    if value < 60:
        return f"{value:.0f} s"
    minutes, secs = divmod(int(round(value)), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def format_number(value: float | int | None) -> str:
    """A measurement without float noise: ``12.5``, ``3``, ``0.000123``."""
    if value is None:
        return ""
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return f"{value:.6g}" if isinstance(value, float) else str(value)
