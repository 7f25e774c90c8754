"""Job definitions at submission: everything checked before a job is queued.

The YAML syntax and the schema come from the agent (``agent.job.parse_job``); the master then checks
what only it knows (the device type exists, some device of that type can take the job's tags) and
finally builds the agent's real pipeline against the rendered configuration of a device of that
type (``agent.job.validate_job``). Every fault carries its YAML path and line.

The pipeline check is most of a submission's work. A running master (:class:`master.server.MasterServer`)
hands it to a few validator processes (:class:`ValidatorPool`): the threads of one Python process
take turns on its interpreter lock, so validating in-process would use one core however many
requests arrive together. Without a pool (tests, tools, the CLI) it runs in the calling thread.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

import yaml
from peewee import fn

from agent.actions.boot.qemu import boots_qemu, command_verdict
from agent.errors import Fault, JobDefinitionError
from agent.job import parse_job, validate_job
from agent.policy import REFUSED, Access, FilePolicy, local_accesses
from agent.qemu_policy import PLACEHOLDER_ROOT
from agent.schema import context_variable_faults, format_path, load_yaml
from agent.timeout import parse_duration
from master import events
from master.db import db
from master.errors import Invalid, TooLarge
from master.instance import current
from master.models import Device, DeviceTag, DeviceType, Tag, Worker
from master.states import DEFAULT_JOB_TIMEOUT, DeviceHealth, parse_priority
from results.bounded import DEFAULT_LIMITS, Limits

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
    #: what the job reads from its worker itself, ``[[kind, location], ...]`` (see agent.policy)
    local_urls: list[list[str]] = field(default_factory=list)
    #: ``timeouts.job`` in seconds (the agent's deadline; how long the broker waits for a worker away)
    timeout: float = DEFAULT_JOB_TIMEOUT
    #: the checked ``notify:`` block (master.notify), None without one
    notify: dict[str, Any] | None = None


# ---- the lab as submissions see it (cached briefly) ----

#: how long a lookup below is reused. Changes made through this process's service layer drop the
#: cache at once (events); changes by another process (the admin CLI) are seen within this time.
LAB_CACHE_SECONDS = 2.0
#: the events after which a device type, device, dictionary, template or worker configuration may
#: have changed
LAB_EVENTS = frozenset({"lab_changed", "device_changed", "worker_changed"})
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
    return _device_config(current().renderer(), dictionary, key, stored_templates(), current().limits)


@lru_cache(maxsize=512)
def _device_config(renderer: Any, dictionary: str, context_key: str,
                   templates: tuple[tuple[str, str], ...], limits: Limits) -> dict:
    # Keyed on every input of the render (templates included), so a changed template or
    # dictionary is a different key, never a stale answer. Callers must not mutate the result.
    return renderer.device_config(dictionary, context=json.loads(context_key) or None,
                                  extra_templates=dict(templates) or None, limits=limits)


def own_context(dictionary: str, context: dict | None) -> dict:
    """What of a job's context the device's own configuration is rendered with (agent.qemu_policy):
    its ``arch`` when the device lists it in ``available_architectures`` (the admin's template
    handles each of those), nothing else."""
    arch = (context or {}).get("arch")
    if arch is None:
        return {}
    listed = device_config(dictionary).get("available_architectures")
    return {"arch": arch} if isinstance(listed, list) and arch in listed else {}


#: characters YAML reads as the end of a line
LINE_BREAKS = ("\n", "\r", "\x85", "\u2028", "\u2029")


def context_faults(context: dict, doc: Any) -> list[Fault]:
    """A fault for each ``context:`` value with a line break: rendered into the device YAML, it
    would write lines of its own there (another QEMU or power command for the worker to run)."""
    faults = []
    for name, value in context.items():
        for index, text in enumerate(value if isinstance(value, list) else [value]):
            if isinstance(text, str) and any(mark in text for mark in LINE_BREAKS):
                path = ("context", name) + ((index,) if isinstance(value, list) else ())
                faults.append(Fault(format_path(path), f"{REFUSED}: a line break in a context value would add "
                                                       "lines of its own to the device configuration rendered with "
                                                       "it (e.g. another command for the worker to run)",
                                    doc.line(path)))
    return faults


def qemu_faults(data: dict, config: dict, own: dict | None, doc: Any) -> tuple[list[Fault], list[Access]]:
    """What the worker's file policy refuses on the job's QEMU command line whatever the worker, and
    the files it reads outside the job's own (for the workers' ``allowed_file_dirs``). ``own`` is
    the device's configuration without the job's context (None: the job boots no QEMU)."""
    if own is None:
        return [], []
    verdict = command_verdict(data, config, own, PLACEHOLDER_ROOT)
    return [Fault(format_path(path), message, doc.line(path)) for path, message in verdict.refusals], verdict.reads


def candidate_device(device_type: DeviceType, tags: list[str]) -> Device | None:
    """A device of ``device_type`` (not retired) that has every tag in ``tags``: the job's
    pipeline is validated against its configuration. The first by hostname, for stable answers."""
    return _cached(("candidate", device_type.id, tuple(sorted(set(tags)))),
                   lambda: _candidate_device(device_type, tags))


def _candidate_device(device_type: DeviceType, tags: list[str]) -> Device | None:
    query = _candidates(Device.select(Device.id, Device.hostname, Device.dictionary), device_type, tags)
    return query.order_by(Device.hostname).first()


def _candidates(query: Any, device_type: DeviceType, tags: list[str]) -> Any:
    """``query`` of devices narrowed to those that may run a job for ``device_type`` and ``tags``."""
    query = query.where((Device.device_type == device_type) & (Device.health != DeviceHealth.RETIRED))
    if tags:
        matching = (DeviceTag.select(DeviceTag.device).join(Tag)
                    .where(Tag.name.in_(tags))
                    .group_by(DeviceTag.device)
                    .having(fn.COUNT(DeviceTag.tag) == len(set(tags))))
        query = query.where(Device.id.in_(matching))
    return query


def candidate_policies(device_type: DeviceType, tags: list[str]) -> tuple[tuple[str, FilePolicy], ...]:
    """(hostname, file policy) of each worker that holds a device the job could run on (cached)."""
    return _cached(("policies", device_type.id, tuple(sorted(set(tags)))),
                   lambda: _candidate_policies(device_type, tags))


def _candidate_policies(device_type: DeviceType, tags: list[str]) -> tuple[tuple[str, FilePolicy], ...]:
    query = _candidates(Device.select(Worker.hostname, Worker.config).join(Worker), device_type, tags)
    rows = query.distinct().order_by(Worker.hostname).tuples()
    return tuple((hostname, worker_policy(config)) for hostname, config in rows)


@lru_cache(maxsize=1024)
def worker_policy(config: str | None) -> FilePolicy:
    """The file policy of a worker's dispatcher configuration (its stored YAML text). A configuration
    that does not parse allows nothing (the API refuses to store one)."""
    try:
        return FilePolicy.from_dispatcher(yaml.safe_load(config or "") or {})
    except (yaml.YAMLError, ValueError, AttributeError) as exc:
        log.warning("a worker's dispatcher configuration has no valid file policy, nothing is allowed: %s", exc)
        return FilePolicy()


def policy_faults(found: list[Access], policies: tuple[tuple[str, FilePolicy], ...], device_type: str,
                  doc: Any) -> list[Fault]:
    """A fault for each access of ``found`` that no worker in ``policies`` allows, naming the setting
    that would allow it and what each worker sets it to; one more if each is allowed somewhere but
    no worker allows them all."""
    faults = []
    for access in found:
        reasons = [policy.reason(access) for _, policy in policies]
        if any(reason is None for reason in reasons):
            continue  # some worker allows it
        reason = reasons[0] if reasons else FilePolicy().reason(access)
        if reason is None:
            continue
        if reason.key is None:
            message = reason.message(FilePolicy())
        else:
            settings = "; ".join(f"{hostname}: {policy.values(reason.key)}" for hostname, policy in policies)
            message = (f"{REFUSED}: {reason.what}; {reason.key} of no worker with a {device_type} device allows "
                       f"it ({settings or f'no {device_type} device is on a worker'}): a lab admin can add it "
                       "to a worker's dispatcher configuration (lavacli workers config set, "
                       "PUT /api/v0.2/workers/NAME/config/)")
        faults.append(Fault(format_path(access.path), message, doc.line(access.path)))
    if policies and not faults and not any(policy.allows_all(found) for _, policy in policies):
        where = [access.location for access in found]
        faults.append(Fault("actions", f"{REFUSED}: no worker with a {device_type} device allows all of "
                                       f"{', '.join(where)} (each is allowed on some worker)"))
    return faults


def check_size(text: str | bytes) -> None:
    limit = current().max_body
    size = len(text.encode("utf-8") if isinstance(text, str) else text)
    if size > limit:
        raise TooLarge(f"job definition is {size} bytes; the limit is {limit} bytes")


def _well_formed(data: Any) -> bool:
    """Whether the keys the master reads have the right shapes (the schema gives the details).
    The ``context:`` is rendered into the device configuration: its values must be what the
    schema allows (scalars, lists of scalars) before it is."""
    if not isinstance(data, dict):
        return False
    tags = data.get("tags", [])
    try:
        parse_priority(data.get("priority", "medium"))
    except ValueError:
        return False
    context = data.get("context") or {}
    return (isinstance(data.get("device_type", ""), str)
            and isinstance(tags, list) and all(isinstance(t, str) for t in tags)
            and isinstance(context, dict) and all(map(_context_value, context.values()))
            and isinstance(data.get("job_name", ""), str)
            and isinstance(data.get("protocols") or {}, dict))


def _context_value(value: Any) -> bool:
    return isinstance(value, int | float | str) or (
        isinstance(value, list) and all(isinstance(item, int | str) for item in value))


def check_definition(text: str, *, device_type: str | None = None) -> JobRequest:
    """The JobRequest for a valid definition, or Invalid with every fault (path, line, message).

    ``device_type`` forces the type (a device type's health check must run on that type).
    """
    check_size(text)
    limits = current().limits
    try:
        doc = load_yaml(text, limits=limits)
    except JobDefinitionError as exc:
        raise Invalid("invalid job definition", exc.faults) from None
    data = doc.data
    if not _well_formed(data):
        # Let the agent's schema name every fault; the pipeline check below repeats the schema
        # check anyway, so the common (valid) case parses the job only twice, not three times.
        try:
            data, doc = parse_job(text, limits)
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
    dictionary = device.dictionary or bare_dictionary(name)
    unsafe = context_variable_faults(context, doc, current().context_variables) + context_faults(context, doc)
    if unsafe:
        raise Invalid("invalid job definition", unsafe)
    try:
        config = device_config(dictionary, context)
        own = device_config(dictionary, own_context(dictionary, context)) if boots_qemu(data) else None
    except Exception as exc:  # the renderer's errors name the template and line
        log.warning("device %s does not render: %s", device.hostname, exc)
        raise fault(("device_type",), f"the configuration of device {device.hostname} ({name}) does not "
                                      f"render, ask the lab admins: {exc}") from None
    notify_spec = None
    if "notify" in data:  # a refused callback URL or recipient fails the submission before the pipeline check
        from master.notify import check_notify

        notify_spec = check_notify(data["notify"], doc)
    qemu, reads = qemu_faults(data, config, own, doc)
    # what the job reads from the worker itself must be allowed by some worker that can run it
    local = local_accesses(data) + reads
    refused = qemu + (policy_faults(local, candidate_policies(dtype, tags), name, doc) if local else [])
    pool = _pool
    faults = pool.validate(text, config, limits) if pool is not None else validate_job(text, config, limits)
    if faults or refused:
        raise Invalid("invalid job definition", sorted(faults + refused, key=lambda f: f.line or 0))
    return JobRequest(
        definition=text, name=str(data.get("job_name", "")), device_type=dtype, tags=tags,
        priority=priority, visibility=visibility if isinstance(visibility, str) else "group",
        context=context, local_urls=[[access.kind, access.location] for access in local],
        timeout=parse_duration(data["timeouts"]["job"], "timeouts.job"), notify=notify_spec,
    )


# ---- validator processes ----

#: the pool :func:`check_definition` uses: the last one started (None: validate in the calling thread)
_pool: ValidatorPool | None = None
#: how long a validator process may take to start (import the agent) before the master gives up on it
VALIDATOR_START_SECONDS = 60.0


def default_validators() -> int:
    """How many validator processes a master runs by default: one per core, up to 4, when there
    are several cores (on one core they would only add the cost of the pipes)."""
    cores = os.cpu_count() or 1
    return min(cores, 4) if cores > 1 else 0


def validator_main(fd: int) -> None:
    """A validator process, talking to the master over the socket ``fd``: ``(text, config,
    limits)`` in, ``("faults", [Fault])`` or ``("error", traceback)`` out, until the master
    closes its end."""
    # Ctrl-C on `pumice-master serve` reaches the whole process group: the master stops its pool
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    conn = Connection(fd)
    conn.send(("ready", None))
    while True:
        try:
            text, config, limits = conn.recv()
        except (EOFError, OSError):
            return
        try:
            reply: tuple[str, Any] = ("faults", validate_job(text, config, limits))
        except Exception:  # a bug in a strategy: the master logs it and answers 500
            reply = ("error", traceback.format_exc())
        conn.send(reply)


class ValidatorPool:
    """Processes that build and validate job pipelines (``agent.job.validate_job``) for the master.

    Once started it is the pool :func:`check_definition` uses. ``start()`` returns at once: until
    a process is ready (it imports the agent), and when one dies, the check runs in the calling
    thread, so a submission never waits for a process to start and never fails because one died.
    """

    def __init__(self, processes: int) -> None:
        self.processes = processes
        self._idle: queue.SimpleQueue[Connection] = queue.SimpleQueue()
        self._workers: dict[Connection, subprocess.Popen] = {}
        self._lock = threading.Lock()
        self._ready = 0
        self._stopping = False

    def start(self) -> ValidatorPool:
        global _pool
        for _ in range(self.processes):
            self._spawn()
        _pool = self
        return self

    def stop(self) -> None:
        """Stop using the pool and end its processes (a busy one once its check is done)."""
        global _pool
        if _pool is self:
            _pool = None
        with self._lock:
            self._stopping = True
            self._ready = 0
        while True:
            try:
                conn = self._idle.get_nowait()
            except queue.Empty:
                break
            self._retire(conn)

    def wait_ready(self, timeout: float = VALIDATOR_START_SECONDS) -> bool:
        """Wait until every process is ready; whether they all are."""
        deadline = time.monotonic() + timeout
        while self._ready < self.processes and time.monotonic() < deadline:
            time.sleep(0.01)
        return self._ready >= self.processes

    def pids(self) -> list[int]:
        """The ids of the pool's processes (to account for their CPU time)."""
        with self._lock:
            return [p.pid for p in self._workers.values()]

    def validate(self, text: str, config: dict, limits: Limits = DEFAULT_LIMITS) -> list[Fault]:
        """The faults of ``text`` against ``config``, as ``validate_job`` finds them."""
        conn = self._take()
        if conn is None:
            return validate_job(text, config, limits)
        try:
            conn.send((text, config, limits))
            kind, value = conn.recv()
        except (EOFError, OSError):
            log.warning("a validator process died; starting another one")
            with self._lock:
                self._ready -= 1
                replace = not self._stopping
            self._retire(conn)
            if replace:
                self._spawn()
            return validate_job(text, config, limits)
        self._give_back(conn)
        if kind == "error":
            raise RuntimeError(f"validating a job pipeline failed in a validator process:\n{value}")
        return value

    def _take(self) -> Connection | None:
        """An idle process (waiting while all are busy), or None when none is running."""
        while self._ready > 0:
            try:
                return self._idle.get(timeout=1.0)
            except queue.Empty:
                continue
        return None

    def _give_back(self, conn: Connection) -> None:
        with self._lock:
            stopping = self._stopping
        if stopping:
            self._retire(conn)
        else:
            self._idle.put(conn)

    def _spawn(self) -> None:
        # A new interpreter, not multiprocessing: forking a threaded master is unsafe, and
        # multiprocessing's spawn re-runs the master's __main__ module in the child.
        ours, theirs = socket.socketpair()
        package_root = str(Path(__file__).resolve().parent.parent)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [package_root,
                                                                           os.environ.get("PYTHONPATH")]))}
        with theirs:
            process = subprocess.Popen(
                [sys.executable, "-c", "import sys; from master.validation import validator_main; "
                                       "validator_main(int(sys.argv[1]))", str(theirs.fileno())],
                pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, env=env)
        conn = Connection(ours.detach())
        with self._lock:
            self._workers[conn] = process
        threading.Thread(target=self._admit, args=(conn,), name="pumice-validator-start", daemon=True).start()

    def _admit(self, conn: Connection) -> None:
        """Wait for a new process's hello, then offer it to the requests."""
        try:
            ready = bool(wait([conn], VALIDATOR_START_SECONDS)) and conn.recv()[0] == "ready"
        except (EOFError, OSError):
            ready = False
        if not ready:
            log.warning("a validator process did not start; validating in the master's threads")
        with self._lock:
            admitted = ready and not self._stopping
            if admitted:
                self._ready += 1
            process = self._workers.get(conn)
        if admitted:
            log.info("validator process %s ready", process.pid if process else "?")
            self._idle.put(conn)
        else:
            self._retire(conn)

    def _retire(self, conn: Connection) -> None:
        with self._lock:
            process = self._workers.pop(conn, None)
        conn.close()
        if process is not None:
            try:
                process.wait(2)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
