"""The Jinja2 environment of the site: strict, autoescaping, and every value made visible.

User template directories come before the packaged ``sitegen/templates``, so a lab overrides one page
(or ``base.html`` for its own header) by dropping a file of the same name into its directory.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from pathlib import Path

from jinja2 import ChoiceLoader, Environment, FileSystemLoader, StrictUndefined
from markupsafe import Markup

from sitegen.text import format_duration, format_number, format_time, slug, visible
from sitegen.widgets import GLOBALS

TEMPLATE_DIR = Path(__file__).parent / "templates"
STATIC_DIR = Path(__file__).parent / "static"


def _finalize(value: object) -> object:
    """Applied to every ``{{ }}``: None prints nothing, and text is made visible before it is escaped."""
    if value is None:
        return ""
    if isinstance(value, Markup):
        return value
    if isinstance(value, str):
        return visible(value)
    return value


def _result_class(value: object) -> str:
    text = str(value or "").lower()
    return text if text in ("pass", "fail", "skip", "unknown") else "unknown"


def _health_class(value: object) -> str:
    text = str(value or "").lower()
    return text if text in ("complete", "incomplete", "canceled", "unknown") else "unknown"


def _percent(part: float | None, whole: float | None) -> int:
    if not part or not whole:
        return 0
    return max(1, min(100, int(round(100 * float(part) / float(whole)))))


@functools.lru_cache(maxsize=8)
def make_environment(template_dirs: Sequence[str | os.PathLike] = ()) -> Environment:
    """The site's template environment; ``template_dirs`` override the packaged templates.

    Cached per template directories: compiling the templates costs more than publishing a job, and the
    master publishes many jobs from one process (Jinja still reloads a template whose file changed).
    """
    loaders = [FileSystemLoader(str(d)) for d in template_dirs]
    loaders.append(FileSystemLoader(str(TEMPLATE_DIR)))
    env = Environment(
        loader=ChoiceLoader(loaders),
        autoescape=True,
        undefined=StrictUndefined,
        finalize=_finalize,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    env.globals.update(GLOBALS)
    env.filters.update(
        time=format_time,
        duration=format_duration,
        num=format_number,
        slug=slug,
        result_class=_result_class,
        health_class=_health_class,
        percent=_percent,
        title=lambda text: str(text or "").replace("_", " ").capitalize(),
    )
    return env
