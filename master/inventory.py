"""The lab's inventory (service layer): device types, devices, device dictionaries, workers and tags.

Plain functions over the models, shared by the REST API, the CLI and the broker (``worker_seen``).
Changing the lab requires an admin (the CLI acts as :data:`master.users.SYSTEM`); reading it does
not. Every change rewrites ``lab.yaml`` in the artifact store (the site's view of the lab) and
wakes the scheduler when it may free capacity.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Iterable
from typing import Any

import yaml
from peewee import fn

from agent.errors import Fault
from agent.policy import FilePolicy
from master import events
from master.db import db
from master.errors import Conflict, Forbidden, Invalid, NotFound, Unauthorized
from master.instance import current
from master.models import Device, DeviceHealthChange, DeviceTag, DeviceType, Job, Tag, User, Worker, iso, utcnow
from master.states import (
    DEFAULT_HEALTH_DENOMINATOR,
    DEFAULT_HEALTH_FREQUENCY,
    DeviceHealth,
    DeviceState,
    WorkerHealth,
    WorkerState,
    check_choice,
    given,
    parse_count,
)
from master.validation import bare_dictionary, check_definition, render_device, stored_templates
from results import bounded

log = logging.getLogger("pumice.inventory")

#: device type, device, worker and tag names: safe in URLs, file names and template names
NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,100}$")
HOSTNAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,199}$")
_UNSET: Any = object()


def require_admin(user: User | None, what: str) -> None:
    if user is None:
        raise Unauthorized(f"{what} needs an admin token: 'Authorization: Token <token>'")
    if not user.is_admin:
        raise Forbidden(f"only admins may {what}; {user.username} is not an admin")


def _check_name(kind: str, name: str, pattern: re.Pattern[str] = NAME_RE) -> str:
    if not isinstance(name, str) or not pattern.match(name):
        raise Invalid(f"bad {kind} name {name!r}: use letters, digits, '_', '.' and '-' "
                      f"(at most {100 if pattern is NAME_RE else 200} characters)")
    return name


def _yaml_mapping(what: str, text: str | None) -> str | None:
    """``text`` if it is a YAML mapping (or empty) within the limits, else Invalid naming the line."""
    if text is None or not text.strip():
        return None
    try:
        data = bounded.load_data(text, current().limits)
    except bounded.LimitExceeded as exc:
        raise Invalid(f"{what} is over a limit: {exc}", [Fault(bounded.format_path(exc.path), exc.message,
                                                               exc.line)]) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        raise Invalid(f"{what} is not valid YAML{where}: {getattr(exc, 'problem', exc)}") from None
    if data is not None and not isinstance(data, dict):
        raise Invalid(f"{what} must be a YAML mapping, not {type(data).__name__}")
    return text


# ---- lab.yaml ----

def lab_snapshot() -> dict[str, Any]:
    """Devices, device types and workers as plain data (``lab.yaml``, read by the site); each device
    with its latest health transitions and health checks (for its page)."""
    # not the dictionaries: a thousand of them would be most of the time spent here
    devices = list(Device.select(Device.id, Device.hostname, Device.device_type, Device.worker, Device.description,
                                 Device.state, Device.health, Device.current_job_id, Device.last_health_check)
                   .order_by(Device.hostname))
    records = device_records(devices)
    transitions = health_history(d.id for d in devices)
    checks = health_checks(d.id for d in devices)
    for device, record in zip(devices, records, strict=True):
        record["transitions"] = transitions.get(device.id, [])
        record["health_checks"] = checks.get(device.id, [])
    return {
        "device_types": [device_type_record(dt) for dt in DeviceType.select().order_by(DeviceType.name)],
        "devices": records,
        "workers": [worker_record(w) for w in Worker.select().order_by(Worker.hostname)],
    }


_lab_lock = threading.Lock()


def write_lab() -> None:
    """Rewrite ``lab.yaml`` in the artifact store (after a committed change; read and written
    under a lock, so the last write reflects the last committed state)."""
    with _lab_lock:
        current().store.write_lab(lab_snapshot())


def _lab_changed(event: str = "lab_changed", **data: Any) -> None:
    write_lab()
    events.publish(event, **data)


# ---- device types ----

def device_type_record(dt: DeviceType) -> dict[str, Any]:
    counts = dict(Device.select(Device.health, fn.COUNT(Device.id)).where(Device.device_type == dt.id)
                  .group_by(Device.health).tuples())
    return {
        "name": dt.name, "description": dt.description, "display": dt.display,
        "health_check": bool(dt.health_check), "health_frequency": dt.health_frequency,
        "health_denominator": dt.health_denominator,
        "template": "database" if dt.template else "file",
        "devices": sum(counts.values()), "devices_retired": counts.get(DeviceHealth.RETIRED, 0),
    }


def get_device_type(name: str) -> DeviceType:
    dt = DeviceType.get_or_none(DeviceType.name == name)
    if dt is None:
        known = [n for (n,) in DeviceType.select(DeviceType.name).order_by(DeviceType.name).tuples()]
        raise NotFound(f"unknown device type {name!r}; known: {', '.join(known) or 'none'}")
    return dt


def list_device_types() -> list[dict[str, Any]]:
    return [device_type_record(dt) for dt in DeviceType.select().order_by(DeviceType.name)]


def _check_template(name: str, text: str) -> None:
    """Render a bare dictionary of type ``name`` with ``text`` as its template: Invalid if it fails."""
    templates = dict(stored_templates())
    templates[name] = text
    try:
        rendered = current().renderer().render(bare_dictionary(name), extra_templates=templates)
        bounded.load_data(rendered, current().limits)
    except Exception as exc:
        raise Invalid(f"template {name}.jinja2 does not render: {exc}") from None


def _template_exists(name: str) -> bool:
    try:
        return name in current().renderer().names()
    except Exception:
        return False


def add_device_type(user: User | None, name: str, *, description: str | None = None, template: str | None = None,
                    health_check: str | None = None, health_frequency: int | str | None = None,
                    health_denominator: str | None = None, display: bool = True) -> dict[str, Any]:
    """Add a device type. Its template is the packaged/site file ``NAME.jinja2`` unless ``template``
    is given (stored in the database)."""
    require_admin(user, "add device types")
    health_frequency = parse_count("health_frequency", given(health_frequency, DEFAULT_HEALTH_FREQUENCY), 1)
    _check_name("device type", name)
    if DeviceType.select().where(DeviceType.name == name).exists():
        raise Conflict(f"device type {name!r} exists already")
    if template is not None:
        _check_template(name, template)
    elif not _template_exists(name):
        raise Invalid(f"no template {name}.jinja2 for device type {name!r}: install one in the site's "
                      "device-types directory or give the template text")
    denominator = check_choice("health denominator", given(health_denominator, DEFAULT_HEALTH_DENOMINATOR),
                               ("hours", "jobs"))
    DeviceType.create(name=name, description=description or "", template=template,
                      health_frequency=health_frequency, health_denominator=denominator,
                      display=bool(display))
    if health_check:
        set_health_check(user, name, health_check)
    _lab_changed()
    return device_type_record(get_device_type(name))


def update_device_type(user: User | None, name: str, *, description: str | None = None,
                       health_frequency: int | str | None = None, health_denominator: str | None = None,
                       display: bool | None = None) -> dict[str, Any]:
    require_admin(user, "change device types")
    dt = get_device_type(name)
    if description is not None:
        dt.description = description
    if given(health_frequency, None) is not None:
        dt.health_frequency = parse_count("health_frequency", health_frequency, 1)
    if given(health_denominator, None) is not None:
        dt.health_denominator = check_choice("health denominator", health_denominator, ("hours", "jobs"))
    if display is not None:
        dt.display = bool(display)
    dt.save()
    _lab_changed("device_changed")
    return device_type_record(dt)


def device_type_template(name: str) -> str:
    """The template of a device type: stored in the database, else the file the renderer finds."""
    dt = get_device_type(name)
    if dt.template:
        return dt.template
    try:
        return current().renderer().template_text(name)
    except Exception as exc:
        raise NotFound(f"device type {name!r} has no template: {exc}") from None


def set_device_type_template(user: User | None, name: str, text: str | None) -> None:
    """Store a template for a device type (None: go back to the file). Checked by rendering."""
    require_admin(user, "change device-type templates")
    dt = get_device_type(name)
    if text is not None and not text.strip():
        text = None
    if text is not None:
        _check_template(name, text)
    dt.template = text
    dt.save()
    _lab_changed("device_changed")


def set_health_check(user: User | None, name: str, definition: str | None) -> None:
    """Set (or with None remove) the health-check job of a device type; it is validated like a
    submission when the type has a device, else for syntax and schema."""
    require_admin(user, "set health checks")
    dt = get_device_type(name)
    if definition is not None and not definition.strip():
        definition = None
    if definition is not None:
        has_device = (Device.select().where((Device.device_type == dt.id)
                                            & (Device.health != DeviceHealth.RETIRED)).exists())
        if has_device:
            check_definition(definition, device_type=name)
        else:
            from agent.errors import JobDefinitionError
            from agent.job import parse_job

            try:
                parse_job(definition)
            except JobDefinitionError as exc:
                raise Invalid("invalid health check definition", exc.faults) from None
    dt.health_check = definition
    dt.save()
    _lab_changed("device_changed")


def health_check_definition(name: str) -> str | None:
    return get_device_type(name).health_check


# ---- workers ----

def worker_record(worker: Worker) -> dict[str, Any]:
    return {
        "hostname": worker.hostname, "description": worker.description, "state": worker.state,
        "health": worker.health, "last_seen": iso(worker.last_seen), "version": worker.version,
        "job_limit": worker.job_limit,
    }


def get_worker(hostname: str) -> Worker:
    worker = Worker.get_or_none(Worker.hostname == hostname)
    if worker is None:
        raise NotFound(f"no worker {hostname!r}: add it with 'pumice-master workers add {hostname}'")
    return worker


def list_workers() -> list[dict[str, Any]]:
    return [worker_record(w) for w in Worker.select().order_by(Worker.hostname)]


def show_worker(hostname: str) -> dict[str, Any]:
    worker = get_worker(hostname)
    record = worker_record(worker)
    record["devices"] = [h for (h,) in Device.select(Device.hostname).where(Device.worker == worker.id)
                         .order_by(Device.hostname).tuples()]
    return record


def add_worker(user: User | None, hostname: str, *, description: str | None = None, disabled: bool = False,
               job_limit: int | str | None = None) -> dict[str, Any]:
    """Add a worker; ``disabled`` adds it Retired (as LAVA's ``workers add --disabled``)."""
    require_admin(user, "add workers")
    _check_name("worker", hostname, HOSTNAME_RE)
    if Worker.select().where(Worker.hostname == hostname).exists():
        raise Conflict(f"worker {hostname!r} exists already")
    worker = Worker.create(hostname=hostname, description=description or "",
                           health=WorkerHealth.RETIRED if disabled else WorkerHealth.ACTIVE,
                           job_limit=parse_count("job_limit", given(job_limit, 0)))
    _lab_changed()
    return worker_record(worker)


def update_worker(user: User | None, hostname: str, *, description: str | None = None,
                  health: str | None = None, job_limit: int | str | None = None) -> dict[str, Any]:
    require_admin(user, "change workers")
    worker = get_worker(hostname)
    if description is not None:
        worker.description = description
    if health is not None:
        worker.health = check_choice("worker health", health, WorkerHealth.ALL)
    if given(job_limit, None) is not None:
        worker.job_limit = parse_count("job_limit", job_limit)
    worker.save()
    _lab_changed("worker_changed", workers=[hostname])
    return worker_record(worker)


def worker_text(hostname: str, what: str) -> str:
    """The worker's ``env`` (job environment, proxy settings) or ``config`` (dispatcher config)."""
    if what not in ("env", "config"):
        raise Invalid(f"unknown worker file {what!r}; allowed: env, config")
    return getattr(get_worker(hostname), what) or ""


def set_worker_text(user: User | None, hostname: str, what: str, text: str | None) -> None:
    """Replace the worker's ``env`` or ``config`` YAML (checked to be a mapping)."""
    require_admin(user, f"change worker {what}")
    if what not in ("env", "config"):
        raise Invalid(f"unknown worker file {what!r}; allowed: env, config")
    worker = get_worker(hostname)
    text = _yaml_mapping(f"worker {what}", text)
    if what == "config":
        try:
            FilePolicy.from_dispatcher(yaml.safe_load(text or "") or {})
        except ValueError as exc:
            raise Invalid(f"worker config: {exc}") from None
    setattr(worker, what, text)
    worker.save()
    events.publish("worker_changed", workers=[hostname])


def worker_seen(hostname: str, version: str | None = None) -> bool:
    """The broker heard from a worker: mark it Online (and record its version).

    Returns True when it was Offline (the scheduler then wakes: its devices are usable again).
    """
    now = utcnow()
    worker = get_worker(hostname)
    came_online = worker.state != WorkerState.ONLINE
    fields: dict[Any, Any] = {Worker.last_seen: now, Worker.state: WorkerState.ONLINE}
    if version is not None:
        fields[Worker.version] = version
    Worker.update(fields).where(Worker.id == worker.id).execute()
    if came_online:
        log.info("worker %s online (version %s)", hostname, version)
        _lab_changed("worker_online", workers=[hostname])
    return came_online


def worker_offline(hostname: str) -> bool:
    """The broker lost a worker: mark it Offline (its devices get no new jobs). True if it was Online."""
    changed = (Worker.update(state=WorkerState.OFFLINE)
               .where((Worker.hostname == hostname) & (Worker.state == WorkerState.ONLINE)).execute())
    if changed:
        log.warning("worker %s offline", hostname)
        _lab_changed("worker_offline", workers=[hostname])
    return bool(changed)


# ---- devices ----

def device_records(devices: Iterable[Device]) -> list[dict[str, Any]]:
    devices = list(devices)
    ids = [d.id for d in devices]
    tags: dict[int, list[str]] = {}
    if ids:
        for device_id, name in (DeviceTag.select(DeviceTag.device, Tag.name).join(Tag)
                                .where(DeviceTag.device.in_(ids)).order_by(Tag.name).tuples()):
            tags.setdefault(device_id, []).append(name)
    types = dict(DeviceType.select(DeviceType.id, DeviceType.name).tuples())
    workers = dict(Worker.select(Worker.id, Worker.hostname).tuples())
    return [{
        "hostname": d.hostname, "device_type": types.get(d.device_type_id),
        "worker": workers.get(d.worker_id), "description": d.description, "state": d.state,
        "health": d.health, "tags": tags.get(d.id, []), "current_job": d.current_job_id,
        "last_health_check": iso(d.last_health_check),
    } for d in devices]


#: health transitions and health checks kept per device on the site's view of the lab
DEVICE_HISTORY = 20


def record_health_change(device_id: int, old: str, new: str, reason: str, job_id: int | None = None) -> None:
    """Note a change of a device's health (inside the transaction that makes it)."""
    DeviceHealthChange.create(device=device_id, old=old, new=new, reason=reason[:200], job_id=job_id)


def _latest_per_device(model: Any, device_field: Any, where: Any, columns: list[Any]) -> list[tuple]:
    """Rows of ``model`` (``columns`` then the device id), the latest :data:`DEVICE_HISTORY` per device."""
    rank = fn.ROW_NUMBER().over(partition_by=[device_field], order_by=[model.id.desc()])
    inner = model.select(*columns, device_field.alias("device_id"), rank.alias("rank")).where(where)
    return list(model.select(*[inner.c[c.column_name] for c in columns], inner.c.device_id).from_(inner)
                .where(inner.c.rank <= DEVICE_HISTORY).order_by(inner.c.device_id, inner.c.id.desc()).tuples())


def health_history(device_ids: Iterable[int]) -> dict[int, list[dict[str, Any]]]:
    """The latest :data:`DEVICE_HISTORY` health transitions of each device, newest first."""
    ids = list(device_ids)
    history: dict[int, list[dict[str, Any]]] = {}
    if not ids:
        return history
    change = DeviceHealthChange
    for _id, time, old, new, reason, job_id, device_id in _latest_per_device(
            change, change.device, change.device.in_(ids),
            [change.id, change.time, change.old, change.new, change.reason, change.job_id]):
        history.setdefault(device_id, []).append({"time": iso(time), "old": old, "new": new,
                                                  "reason": reason, "job": job_id})
    return history


def health_checks(device_ids: Iterable[int]) -> dict[int, list[dict[str, Any]]]:
    """The latest :data:`DEVICE_HISTORY` health-check jobs of each device, newest first."""
    ids = list(device_ids)
    checks: dict[int, list[dict[str, Any]]] = {}
    if not ids:
        return checks
    for job_id, state, health, end_time, device_id in _latest_per_device(
            Job, Job.actual_device, Job.health_check & Job.actual_device.in_(ids),
            [Job.id, Job.state, Job.health, Job.end_time]):
        checks.setdefault(device_id, []).append({"id": job_id, "state": state, "health": health,
                                                 "end_time": iso(end_time)})
    return checks


def get_device(hostname: str) -> Device:
    device = Device.get_or_none(Device.hostname == hostname)
    if device is None:
        raise NotFound(f"no device {hostname!r}")
    return device


def show_device(hostname: str) -> dict[str, Any]:
    return device_records([get_device(hostname)])[0]


def list_devices(*, device_type: str | None = None, worker: str | None = None, state: str | None = None,
                 health: str | None = None, tag: str | None = None) -> list[dict[str, Any]]:
    query = Device.select()
    if device_type:
        query = query.where(Device.device_type.in_(DeviceType.select(DeviceType.id)
                                                   .where(DeviceType.name == device_type)))
    if worker:
        query = query.where(Device.worker.in_(Worker.select(Worker.id).where(Worker.hostname == worker)))
    if state:
        query = query.where(Device.state == check_choice("device state", state, DeviceState.ALL))
    if health:
        query = query.where(Device.health == check_choice("device health", health, DeviceHealth.ALL))
    if tag:
        query = query.where(Device.id.in_(DeviceTag.select(DeviceTag.device).join(Tag).where(Tag.name == tag)))
    return device_records(query.order_by(Device.hostname))


def _set_tags(device: Device, names: Iterable[str]) -> None:
    names = sorted({_check_name("tag", str(n)) for n in names})
    DeviceTag.delete().where(DeviceTag.device == device.id).execute()
    if not names:
        return
    existing = dict(Tag.select(Tag.name, Tag.id).where(Tag.name.in_(names)).tuples())
    for name in names:
        if name not in existing:
            existing[name] = Tag.create(name=name).id
    DeviceTag.insert_many([(device.id, existing[n]) for n in names],
                          fields=[DeviceTag.device, DeviceTag.tag]).execute()


def add_device(user: User | None, hostname: str, device_type: str, *, worker: str | None = None,
               tags: Iterable[str] | None = None, description: str | None = None, health: str | None = None,
               dictionary: str | None = None) -> dict[str, Any]:
    """Add a device (health Unknown by default: its health check runs before any job)."""
    require_admin(user, "add devices")
    _check_name("device", hostname, HOSTNAME_RE)
    dt = get_device_type(device_type)
    owner = get_worker(worker) if worker else None
    health = check_choice("device health", given(health, DeviceHealth.UNKNOWN), DeviceHealth.ALL)
    if dictionary is not None:
        dictionary = _checked_dictionary(hostname, dictionary)
    with db.atomic():
        if Device.select().where(Device.hostname == hostname).exists():
            raise Conflict(f"device {hostname!r} exists already")
        device = Device.create(hostname=hostname, device_type=dt, worker=owner, description=description or "",
                               health=health, dictionary=dictionary)
        _set_tags(device, tags or ())
    _lab_changed("device_changed", devices=[hostname])
    return show_device(hostname)


def update_device(user: User | None, hostname: str, *, health: str | None = None, worker: Any = _UNSET,
                  tags: Iterable[str] | None = None, description: str | None = None,
                  device_type: str | None = None) -> dict[str, Any]:
    """Change a device's health, worker (None: detach), tags, description or type."""
    require_admin(user, "change devices")
    with db.atomic():
        device = get_device(hostname)
        if health is not None:
            new = check_choice("device health", health, DeviceHealth.ALL)
            if new != device.health:
                record_health_change(device.id, device.health, new, f"set by {user.username}")
            device.health = new
        if worker is not _UNSET:
            device.worker = get_worker(worker) if worker else None
        if description is not None:
            device.description = description
        if device_type is not None:
            if device.state != DeviceState.IDLE:
                raise Conflict(f"device {hostname} is {device.state}: change its type when it is Idle")
            device.device_type = get_device_type(device_type)
        device.save()
        if tags is not None:
            _set_tags(device, tags or ())
    _lab_changed("device_changed", devices=[hostname])
    return show_device(hostname)


def _checked_dictionary(hostname: str, text: str) -> str:
    """``text`` if it is a device dictionary that renders to valid YAML, else Invalid."""
    from master.devicetypes import parse_dictionary

    try:
        template, _ = parse_dictionary(text)
    except Exception as exc:
        raise Invalid(f"device dictionary of {hostname} is not valid: {exc}") from None
    if not template:
        raise Invalid(f"device dictionary of {hostname} must start with {{% extends 'TYPE.jinja2' %}}")
    try:
        bounded.load_data(render_device(text), current().limits)
    except Exception as exc:
        raise Invalid(f"device dictionary of {hostname} does not render: {exc}") from None
    return text


def get_dictionary(hostname: str) -> str:
    """The device dictionary (a bare ``{% extends %}`` of its type when none was set)."""
    device = get_device(hostname)
    return device.dictionary or bare_dictionary(device.device_type.name)


def set_dictionary(user: User | None, hostname: str, text: str) -> None:
    """Replace a device's dictionary; it must render with its templates."""
    require_admin(user, "change device dictionaries")
    device = get_device(hostname)
    device.dictionary = _checked_dictionary(hostname, text)
    device.save()
    events.publish("device_changed", devices=[hostname])


def device_yaml(hostname: str, context: dict | None = None) -> str:
    """The device YAML the agent gets for this device (the dictionary rendered with its template)."""
    try:
        return render_device(get_dictionary(hostname), context)
    except NotFound:
        raise
    except Exception as exc:
        raise Invalid(f"device {hostname} does not render: {exc}") from None



# ---- tags ----

def _get_tag(name: str) -> Tag:
    tag = Tag.get_or_none(Tag.name == name)
    if tag is None:
        raise NotFound(f"no tag {name!r}")
    return tag


def list_tags() -> list[dict[str, Any]]:
    """Every tag with its description (devices and jobs name tags; a device's tags are set with it)."""
    return [{"name": t.name, "description": t.description} for t in Tag.select().order_by(Tag.name)]


def show_tag(name: str) -> dict[str, Any]:
    """A tag, its description and the devices that have it."""
    tag = _get_tag(name)
    devices = [h for (h,) in Device.select(Device.hostname).join(DeviceTag)
               .where(DeviceTag.tag == tag.id).order_by(Device.hostname).tuples()]
    return {"name": tag.name, "description": tag.description, "devices": devices}


def add_tag(user: User | None, name: str, description: str = "") -> dict[str, Any]:
    """Create a tag (devices get it through ``update_device(tags=...)``)."""
    require_admin(user, "add tags")
    _check_name("tag", name)
    if Tag.select().where(Tag.name == name).exists():
        raise Conflict(f"tag {name!r} exists already")
    Tag.create(name=name, description=description or "")
    return show_tag(name)


def delete_tag(user: User | None, name: str) -> None:
    """Delete a tag (devices and jobs lose it)."""
    require_admin(user, "delete tags")
    _get_tag(name).delete_instance(recursive=True)
    _lab_changed("device_changed")
