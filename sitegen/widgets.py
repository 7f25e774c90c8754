"""Small HTML pieces used in every list row (badges, result bars, links), as Python functions.

They are Jinja globals rather than macros because a list page calls them thousands of times and a macro
call costs ~20x more; each escapes what it is given, exactly as a template would.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar

from markupsafe import Markup, escape

from sitegen.text import format_duration, format_time, safe_url, slug, visible

_RESULTS = ("pass", "fail", "skip", "unknown")
_HEALTHS = ("complete", "incomplete", "canceled", "unknown")


def _e(value: object) -> Markup:
    return escape(visible(str(value))) if not isinstance(value, Markup) else value


def badge(text: object, cls: str) -> Markup:
    """``<span class="badge CLS">text</span>``."""
    return Markup(f'<span class="badge {_e(cls)}">{_e(text)}</span>')


def job_status(s: dict) -> Markup:
    """A finished job's health, or the state of one that is not finished."""
    if s.get("state") == "finished":
        health = str(s.get("health") or "unknown")
        return badge(health.capitalize(), health if health in _HEALTHS else "unknown")
    return badge(str(s.get("state") or "unknown").capitalize(), "state")


def counts(c: dict) -> Markup:
    """A small stacked bar and the numbers of pass/fail/skip results."""
    values = {k: int(c.get(k, 0) or 0) for k in _RESULTS}
    total = sum(values.values())
    if not total:
        return Markup('<span class="muted">–</span>')
    bars = "".join(
        f'<i class="{k} pc-{max(1, round(100 * v / total))}"></i>' for k, v in values.items() if v
    )
    text = f'<span class="n pass">{values["pass"]}</span>'
    if values["fail"]:
        text += f' <span class="n fail">{values["fail"]} fail</span>'
    if values["skip"]:
        text += f' <span class="n skip">{values["skip"]} skip</span>'
    title = f"{values['pass']} pass, {values['fail']} fail, {values['skip']} skip, {values['unknown']} unknown"
    return Markup(f'<span class="counts" title="{title}"><span class="bar">{bars}</span>{text}</span>')


def suite_counts(suites: dict) -> Markup:
    """:func:`counts` summed over a job's test suites (the ``lava`` suite is the pipeline, not tests)."""
    total = dict.fromkeys(_RESULTS, 0)
    for name, c in suites.items():
        if name != "lava":
            for key in _RESULTS:
                total[key] += int(c.get(key, 0) or 0)
    return counts(total)


def link_to(root: str, kind: str, name: object) -> Markup:
    """A link to the page of a device/device type/worker, or a dash when there is none."""
    if not name:
        return Markup('<span class="muted">–</span>')
    return Markup(f'<a href="{root}{kind}/{escape(slug(str(name)))}.html">{_e(name)}</a>')


def url_link(url: object, text: object = None) -> Markup:
    """A URL that came from a user: a link when it is http or https (:func:`~sitegen.text.safe_url`),
    otherwise plain text. ``text`` is what the link shows (the URL itself by default).

    Every user-supplied URL on the site goes through here. ``rel`` keeps the target from seeing the
    page that linked to it (``noreferrer``) or scripting it (``noopener``), and tells crawlers that the
    site does not vouch for it (``nofollow``).
    """
    if url is None:
        return Markup("")
    label = _e(url if text is None else text)
    href = safe_url(url)
    if href is None:
        return label
    return Markup(f'<a href="{escape(href)}" rel="nofollow noopener noreferrer">{label}</a>')


def _shorten(text: str, limit: int = 140) -> str:
    if len(text) <= limit:
        return text
    cut = text[: limit - 1]
    return (cut.rsplit(" ", 1)[0] if " " in cut[limit // 2 :] else cut) + "…"


_ROWS: ContextVar[dict | None] = ContextVar("pumice_site_rows", default=None)


@contextlib.contextmanager
def row_cache() -> Iterator[None]:
    """Reuse each job's rendered row while one set of lists is rendered (a job is on up to six lists)."""
    token = _ROWS.set({})
    try:
        yield
    finally:
        _ROWS.reset(token)


def job_row(s: dict, root: str, hide: tuple[str, ...] = ()) -> Markup:
    """One row of a job list (index, filters, archives, device/device type/worker pages)."""
    cache = _ROWS.get()
    if cache is None:
        return _job_row(s, root, tuple(hide))
    key = (s["id"], root, tuple(hide))
    row = cache.get(key)
    if row is None:
        row = cache[key] = _job_row(s, root, tuple(hide))
    return row


def _job_row(s: dict, root: str, hide: tuple[str, ...]) -> Markup:
    job = f"{root}jobs/{int(s['id'])}/index.html"
    name = f'<a href="{job}">{_e(s.get("name") or "")}</a>'
    if s.get("health_check"):
        name += " " + badge("health check", "tag")
    if s.get("source"):
        name += " " + badge("imported", "tag")
    if s.get("failure"):
        name += f'<div class="failure">{_e(_shorten(str(s["failure"])))}</div>'
    cells = [
        f'<td class="num"><a href="{job}">{int(s["id"])}</a></td>',
        f'<td class="name">{name}</td>',
        f"<td>{job_status(s)}</td>",
        f"<td>{suite_counts(s.get('suites') or {})}</td>",
    ]
    for key, kind in (("device", "devices"), ("device_type", "device-types"), ("worker", "workers")):
        if key not in hide:
            cells.append(f"<td>{link_to(root, kind, s.get(key))}</td>")
    cells += [
        f"<td>{_e(s.get('submitter') or '')}</td>",
        f'<td class="time">{format_time(s.get("end_time"))}</td>',
        f'<td class="num">{format_duration(s.get("duration"))}</td>',
    ]
    return Markup(
        f'<tr data-state="{_e(s.get("state") or "")}" data-health="{_e(s.get("health") or "")}">\n  '
        + "\n  ".join(cells)
        + "\n</tr>\n"
    )


GLOBALS = {
    "job_row": job_row,
    "badge": badge,
    "job_status": job_status,
    "counts": counts,
    "suite_counts": suite_counts,
    "link_to": link_to,
    "url_link": url_link,
}
