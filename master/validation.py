"""Job definitions at submission: everything checked before a job is queued.

The YAML syntax and the schema come from the agent (``agent.job.parse_job``); the master then checks
what only it knows (the device type exists, some device of that type can take the job's tags) and
finally builds the agent's real pipeline against the rendered configuration of a device of that
type (``agent.job.validate_job``). Every fault carries its YAML path and line.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from peewee import fn

from agent.errors import Fault, JobDefinitionError
from agent.job import parse_job, validate_job
from agent.schema import load_yaml
from master import events
from master.db import db
from master.errors import Invalid, TooLarge
from master.instance import current
from master.models import Device, DeviceTag, DeviceType, Tag
from master.states import DeviceHealth, parse_priority

log = logging.getLogger("pumice.validation")


@dataclass
class JobRequest:
    """What the master keeps from a valid definition."""

    definition: str
    name: str
    device_type: DeviceType
    tags: list[str] = field(default_factory=list)
    priority: int = 50
    visibility: str = "public"
    context: dict[str, Any] = field(default_factory=dict)


# ---- the lab as submissions see it (cached briefly) ----

#: how long a lookup below is reused. Changes made through this process's service layer drop the
#: cache at once (events); changes by another process (the admin CLI) are seen within this time.
LAB_CACHE_SECONDS = 2.0
#: the events after which a device type, device, dictionary or template may have changed
LAB_EVENTS = frozenset({"lab_changed", "device_changed"})
_lab_cache: dict[tuple, tuple[float, Any, Any]] = {}


def _cached(key: tuple, compute: Callable[[], Any]) -> Any:
    """``compute()``, reused for :data:`LAB_CACHE_SECONDS` on the same database. A None answer
    (unknown type, no device) is never kept: what an admin just added is found at once."""
    now = time.monotonic()
    hit = _lab_cache.get(key)
    if hit is not None and hit[0] > now and hit[2] is db.obj:
        return hit[1]
    value = compute()
    if value is not None:
        if len(_lab_cache) > 4096:
            _lab_cache.clear()
        _lab_cache[key] = (now + LAB_CACHE_SECONDS, value, db.obj)
    return value


def forget_lab() -> None:
    """Drop the cached lookups (the lab changed)."""
    _lab_cache.clear()


def _on_event(event: str, data: dict[str, Any]) -> None:
    if event in LAB_EVENTS:
        _lab_cache.clear()


events.subscribe(_on_event)


def bare_dictionary(device_type: str) -> str:
    """The dictionary of a device that has none of its own: just its type's template."""
    return f"{{% extends '{device_type}.jinja2' %}}\n"


def stored_templates() -> tuple[tuple[str, str], ...]:
    """Device-type templates stored in the database, as (device-type name, text) pairs (hashable)."""
    return _cached(("templates",), _stored_templates)


def _stored_templates() -> tuple[tuple[str, str], ...]:
    rows = (DeviceType.select(DeviceType.name, DeviceType.template)
            .where(DeviceType.template.is_null(False)).order_by(DeviceType.name).tuples())
    return tuple(rows)


def render_device(dictionary: str, context: dict | None = None) -> str:
    """The device YAML a dictionary renders to with this instance's templates (and the DB's)."""
    return current().renderer().render(dictionary, context=context or None,
                                       extra_templates=dict(stored_templates()) or None)


def device_config(dictionary: str, context: dict | None = None) -> dict:
    """The device configuration (parsed) for ``dictionary``; cached, as most jobs share a few."""
    key = json.dumps(context or {}, sort_keys=True, default=str)
    return _device_config(current().renderer(), dictionary, key, stored_templates())


@lru_cache(maxsize=512)
def _device_config(renderer: Any, dictionary: str, context_key: str,
                   templates: tuple[tuple[str, str], ...]) -> dict:
    # Keyed on every input of the render (templates included), so a changed template or
    # dictionary is a different key, never a stale answer. Callers must not mutate the result.
    return renderer.device_config(dictionary, context=json.loads(context_key) or None,
                                  extra_templates=dict(templates) or None)


def candidate_device(device_type: DeviceType, tags: list[str]) -> Device | None:
    """A device of ``device_type`` (not retired) that has every tag in ``tags``: the job's
    pipeline is validated against its configuration. The first by hostname, for stable answers."""
    return _cached(("candidate", device_type.id, tuple(sorted(set(tags)))),
                   lambda: _candidate_device(device_type, tags))


def _candidate_device(device_type: DeviceType, tags: list[str]) -> Device | None:
    query = (Device.select(Device.id, Device.hostname, Device.dictionary)
             .where((Device.device_type == device_type) & (Device.health != DeviceHealth.RETIRED)))
    if tags:
        matching = (DeviceTag.select(DeviceTag.device).join(Tag)
                    .where(Tag.name.in_(tags))
                    .group_by(DeviceTag.device)
                    .having(fn.COUNT(DeviceTag.tag) == len(set(tags))))
        query = query.where(Device.id.in_(matching))
    return query.order_by(Device.hostname).first()


def check_size(text: str | bytes) -> None:
    limit = current().max_body
    size = len(text.encode("utf-8") if isinstance(text, str) else text)
    if size > limit:
        raise TooLarge(f"job definition is {size} bytes; the limit is {limit} bytes")


def _well_formed(data: Any) -> bool:
    """Whether the keys the master reads have the right shapes (the schema gives the details)."""
    if not isinstance(data, dict):
        return False
    tags = data.get("tags", [])
    try:
        parse_priority(data.get("priority", "medium"))
    except ValueError:
        return False
    return (isinstance(data.get("device_type", ""), str)
            and isinstance(tags, list) and all(isinstance(t, str) for t in tags)
            and isinstance(data.get("context") or {}, dict)
            and isinstance(data.get("job_name", ""), str)
            and isinstance(data.get("protocols") or {}, dict))


def check_definition(text: str, *, device_type: str | None = None) -> JobRequest:
    """The JobRequest for a valid definition, or Invalid with every fault (path, line, message).

    ``device_type`` forces the type (a device type's health check must run on that type).
    """
    check_size(text)
    try:
        doc = load_yaml(text)
    except JobDefinitionError as exc:
        raise Invalid("invalid job definition", exc.faults) from None
    data = doc.data
    if not _well_formed(data):
        # Let the agent's schema name every fault; the pipeline check below repeats the schema
        # check anyway, so the common (valid) case parses the job only twice, not three times.
        try:
            data, doc = parse_job(text)
        except JobDefinitionError as exc:
            raise Invalid("invalid job definition", exc.faults) from None

    def fault(path: tuple, message: str) -> Invalid:
        return Invalid("invalid job definition", [Fault(".".join(path), message, doc.line(path))])

    if "lava-multinode" in (data.get("protocols") or {}):
        raise fault(("protocols", "lava-multinode"), "MultiNode jobs are not supported by this master")
    name = data.get("device_type") or device_type
    if not name:
        raise fault(("device_type",), "required key missing: the device type to run the job on")
    if device_type and name != device_type:
        raise fault(("device_type",), f"a health check of {device_type!r} must run on {device_type!r}, "
                                      f"not {name!r}")
    dtype = _cached(("device_type", name), lambda: DeviceType.get_or_none(DeviceType.name == name))
    if dtype is None:
        known = [n for (n,) in DeviceType.select(DeviceType.name).order_by(DeviceType.name).tuples()]
        raise fault(("device_type",), f"unknown device type {name!r}; known: {', '.join(known) or 'none'}")
    tags = sorted(set(data.get("tags") or []))
    device = candidate_device(dtype, tags)
    if device is None:
        if tags and candidate_device(dtype, []) is not None:
            raise fault(("tags",), f"no {name} device has all the tags {', '.join(tags)}")
        raise fault(("device_type",), f"device type {name!r} is unavailable: it has no device that is "
                                      "not retired")
    priority = parse_priority(data.get("priority", "medium"))
    visibility = data.get("visibility", "public")
    context = data.get("context") or {}
    try:
        config = device_config(device.dictionary or bare_dictionary(name), context)
    except Exception as exc:  # the renderer's errors name the template and line
        log.warning("device %s does not render: %s", device.hostname, exc)
        raise fault(("device_type",), f"the configuration of device {device.hostname} ({name}) does not "
                                      f"render, ask the lab admins: {exc}") from None
    faults = validate_job(text, config)
    if faults:
        raise Invalid("invalid job definition", faults)
    return JobRequest(
        definition=text, name=str(data.get("job_name", "")), device_type=dtype, tags=tags,
        priority=priority, visibility=visibility if isinstance(visibility, str) else "group",
        context=context,
    )
