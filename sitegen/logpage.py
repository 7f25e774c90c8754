"""A job's log as HTML pages: one element per line with a stable ``#L<n>`` anchor, split into pages.

The rows are built with plain string joins rather than a template loop: a 100,000-line log must render
in well under a second, and every message goes through :func:`sitegen.text.log_html` anyway. The page
around the rows is a normal template (``log.html``).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from results.log import LEVELS, LogRecord
from results.logfile import LogFile
from sitegen.text import log_html
from sitegen.widgets import url_link

# Lines per log page: a page of this size is ~300 kB of HTML (~40 kB gzipped) and opens at once, while
# a 2,000-line job log still fits on one page.
LOG_PAGE_LINES = 2500

_START_RE = re.compile(r"start: (\d+(?:\.\d+)*) (\S+)")
_LEVEL_CLASS = {lvl: lvl for lvl in LEVELS}


def log_page_name(page: int) -> str:
    """The file name of log page ``page`` (1-based): ``log.html``, ``log-2.html``..."""
    return "log.html" if page == 1 else f"log-{page}.html"


def page_of_line(line: int, page_lines: int = LOG_PAGE_LINES) -> int:
    """The 1-based page holding 1-based line ``line``."""
    return (max(line, 1) - 1) // page_lines + 1


@dataclass
class LogPage:
    """One rendered page: its 1-based line range, rows HTML and per-level line counts."""

    number: int
    first: int
    last: int
    rows: str
    levels: Counter


@dataclass
class RenderedLog:
    """Every page of a log plus what the job page links into it."""

    pages: list[LogPage] = field(default_factory=list)
    lines: int = 0
    size: int = 0  # bytes of output.yaml covered by the pages: where a live tail resumes
    start_lines: dict[str, int] = field(default_factory=dict)  # action level -> line of "start: ..."
    result_lines: dict[tuple[str, str], list[int]] = field(default_factory=dict)  # (suite, case) -> lines
    first_dt: str = ""
    last_dt: str = ""


def _result_html(msg: dict) -> str:
    """A results line: ``suite/case`` and a result badge, then the measurement and any other keys."""
    result = str(msg.get("result", ""))
    css = result if result in ("pass", "fail", "skip", "unknown") else "unknown"
    parts = [
        f"{log_html(str(msg.get('definition', '')))}/<b>{log_html(str(msg.get('case', '')))}</b> "
        f'<span class="badge {css}">{log_html(result)}</span>'
    ]
    if msg.get("measurement") not in (None, ""):
        parts.append(f" {log_html(str(msg['measurement']))} {log_html(str(msg.get('units') or ''))}")
    rest = {k: v for k, v in msg.items() if k not in ("definition", "case", "result", "measurement", "units")}
    extra = rest.get("extra")
    reference = extra.get("reference") if isinstance(extra, dict) else None
    if reference is not None:  # lava-test-reference's URL: shown apart, a link only if http(s)
        extra = {k: v for k, v in extra.items() if k != "reference"}
        if extra:
            rest["extra"] = extra
        else:
            del rest["extra"]
    if rest:
        parts.append(f' <span class="kv">{log_html(json.dumps(rest, ensure_ascii=False, default=str))}</span>')
    if reference is not None:
        parts.append(f' <span class="ref">reference {url_link(reference)}</span>')
    return "".join(parts)


def render_log(path: Path, page_lines: int = LOG_PAGE_LINES) -> RenderedLog:
    """Render the log at ``path`` (an output.yaml with its line index) into pages of ``page_lines``."""
    out = RenderedLog()
    with LogFile(path) as logfile:
        count = logfile.count()
        out.lines = count
        for first in range(0, count, page_lines):
            last = min(first + page_lines, count)
            lines = logfile.read(first, last)
            out.pages.append(_render_page(out, lines, first, len(out.pages) + 1))
    return out


def _parse_page(lines: list[str]) -> list[tuple[str, str, object]]:
    """(dt, lvl, msg) of each line. Pumice writes every line as ``- `` + a JSON object, so a whole page
    parses as one JSON array (7x faster than line by line); any page that does not (a LAVA log written by
    yaml.dump, a mangled line) goes line by line through ``LogRecord.from_line``."""
    if all(line[:3] == "- {" for line in lines):
        try:
            items = json.loads("[" + ",".join([line[2:] for line in lines]) + "]")
            return [(str(item["dt"]), str(item["lvl"]), item["msg"]) for item in items]
        except (ValueError, KeyError, TypeError):
            pass
    parsed = []
    for raw in lines:
        try:
            record = LogRecord.from_line(raw)
            parsed.append((record.dt, record.lvl, record.msg))
        except ValueError:  # a line LAVA or a crash mangled: show it rather than lose it
            parsed.append(("", "error", raw))
    return parsed


def _render_page(out: RenderedLog, lines: list[str], first: int, number: int) -> LogPage:
    rows = []
    levels: Counter = Counter()
    start_lines = out.start_lines
    result_lines = out.result_lines
    records = _parse_page(lines)
    lineno = first
    for dt, lvl, msg in records:
        lineno += 1
        lvl = _LEVEL_CLASS.get(lvl, "info")
        levels[lvl] += 1
        css = lvl
        if isinstance(msg, str):
            if lvl == "info" and msg.startswith("start: "):
                match = _START_RE.match(msg)
                if match:
                    start_lines.setdefault(match.group(1), lineno)
                    css = "info start"  # an action begins: the log reads as sections
            text = log_html(msg)
        elif lvl == "results" and isinstance(msg, dict):
            key = (str(msg.get("definition", "")), str(msg.get("case", "")))
            result_lines.setdefault(key, []).append(lineno)
            text = _result_html(msg)
        else:
            text = log_html(json.dumps(msg, ensure_ascii=False, default=str))
        rows.append(
            f'<div id="L{lineno}" class="{css}"><a href="#L{lineno}">{lineno}</a>'
            f'<span class="t">{dt[11:19]}</span><span class="m">{text}</span></div>\n'
        )
    if records:
        if not out.first_dt:
            out.first_dt = records[0][0]
        out.last_dt = records[-1][0]
    # bytes covered (the live tail resumes there): each line plus its newline
    out.size += (
        sum(map(len, lines)) + len(lines)
        if all(map(str.isascii, lines))
        else sum(len(line.encode("utf-8", "surrogatepass")) + 1 for line in lines)
    )
    return LogPage(number=number, first=first + 1, last=lineno, rows="".join(rows), levels=levels)
