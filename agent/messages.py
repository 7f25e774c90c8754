"""Every message between ``pumice-agent`` and the master's broker: frozen dataclasses, JSON bodies.

On the wire a message is four ZeroMQ frames (the master's ROUTER adds the worker's identity in
front)::

    b"pumice"   the protocol name
    b"1"        the protocol version (PROTOCOL_VERSION)
    b"HELLO"    the message type
    b"{...}"    the body: a JSON object of the dataclass fields

A peer speaking another protocol version is refused with a ``REFUSED`` message. :func:`decode`
reads ``REFUSED`` whatever its version, so the refusal and its reason always reach the other
side, which logs them.

Flow (agent -> master unless noted):

- ``HELLO`` (hostname, protocol and package versions) -> ``WELCOME`` (heartbeat interval) or
  ``REFUSED`` (reason). A master that restarted answers any other message with ``HELLO_REQUIRED``.
- ``PING`` -> ``PONG``: heartbeats; any message counts as a sign of life, in both directions.
- master -> ``START`` (job id, definition, rendered device YAML with and without the job's context,
  the worker's env and dispatcher config) -> ``START_OK``. START is resent until acknowledged; the agent deduplicates by
  job id.
- ``LOG`` (job id, ``seq`` = the line number of its first line, the ``output.yaml`` lines) ->
  ``LOG_OK`` (the master's line count; ``rewind`` when it saw a gap). The agent resends from the
  last acknowledged line; the master drops lines it has, so nothing is lost and nothing doubled.
- ``END`` (health, error, total line count) -> ``END_OK``, resent until acknowledged.
- master -> ``CANCEL`` (resent while the job is Canceling); the job then ends with ``END``.
- master -> ``STATUS`` (the jobs it thinks run on the worker) -> ``STATUS_REPLY``.
- ``BYE``: the agent stops; the master marks the worker offline at once.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar

PROTOCOL = b"pumice"
#: bumped on any incompatible change of a message; peers of another version are refused
PROTOCOL_VERSION = 1

_FRAMES = 4


class MessageError(ValueError):
    """A frame set that is not a valid message of this protocol (the text says what is wrong)."""


class VersionMismatch(MessageError):
    """The peer speaks another protocol version."""

    def __init__(self, peer_version: str, kind: str) -> None:
        self.peer_version = peer_version
        self.kind = kind
        super().__init__(
            f"protocol version mismatch: this side speaks pumice protocol {PROTOCOL_VERSION}, the peer "
            f"speaks {peer_version!r} (message {kind}); install the same Pumice release on the master "
            "and its workers"
        )


@dataclass(frozen=True, slots=True)
class Message:
    """Base of every message; ``TYPE`` is its name on the wire."""

    TYPE: ClassVar[str] = ""

    def body(self) -> dict[str, Any]:
        """The JSON body (the dataclass fields)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


_REGISTRY: dict[str, type[Message]] = {}
_CHECKS: dict[str, dict[str, tuple[Any, bool]]] = {}


def message(name: str):
    """Register a message class under its wire name (a duplicate name fails at import)."""

    def register(cls: type[Message]) -> type[Message]:
        if name in _REGISTRY:
            raise TypeError(f"message type {name} is defined twice: {_REGISTRY[name].__name__} and "
                            f"{cls.__name__}")
        cls.TYPE = name
        hints = typing.get_type_hints(cls)
        _CHECKS[name] = {
            f.name: (hints[f.name],
                     f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING)
            for f in dataclasses.fields(cls)
        }
        _REGISTRY[name] = cls
        return cls

    return register


# ---- connection ----


@message("HELLO")
@dataclass(frozen=True, slots=True)
class Hello(Message):
    """The agent introduces itself (sent on every (re)connection)."""

    hostname: str
    protocol: int
    version: str
    #: ids of the jobs in the agent's spool that are not finished with the master yet
    jobs: list[int] = field(default_factory=list)


@message("WELCOME")
@dataclass(frozen=True, slots=True)
class Welcome(Message):
    """The master accepts the agent; both sides use ``heartbeat`` seconds from now on."""

    protocol: int
    version: str
    heartbeat: float


@message("REFUSED")
@dataclass(frozen=True, slots=True)
class Refused(Message):
    """The master refuses the agent: ``code`` is protocol, unknown-worker, key or bad-message."""

    reason: str
    code: str = "refused"


@message("HELLO_REQUIRED")
@dataclass(frozen=True, slots=True)
class HelloRequired(Message):
    """The master does not know this connection (it restarted): say HELLO again."""


@message("PING")
@dataclass(frozen=True, slots=True)
class Ping(Message):
    """Heartbeat from the agent."""


@message("PONG")
@dataclass(frozen=True, slots=True)
class Pong(Message):
    """Heartbeat from the master."""


@message("BYE")
@dataclass(frozen=True, slots=True)
class Bye(Message):
    """The agent is stopping cleanly."""


# ---- jobs ----


@message("START")
@dataclass(frozen=True, slots=True)
class Start(Message):
    """Run a job: its definition, the device YAML rendered by the master, the worker's settings."""

    job_id: int
    definition: str
    device: str
    device_name: str = ""
    #: the device YAML rendered without the job's context (but its arch): what of ``device`` is the
    #: lab's own, not the job's (agent.qemu_policy); empty: all of it
    device_own: str = ""
    #: the worker's job environment: {"purge": bool, "overrides": {NAME: value}} (LAVA's env.yaml)
    env: dict = field(default_factory=dict)
    #: the worker's dispatcher configuration (dispatcher_ip, tmp_dir, ...)
    dispatcher: dict = field(default_factory=dict)
    #: the job timeout in seconds (the agent's last resort if pumice-run hangs)
    timeout: float = 0.0


@message("START_OK")
@dataclass(frozen=True, slots=True)
class StartOk(Message):
    """The job runs (or ran) on the agent."""

    job_id: int


@message("LOG")
@dataclass(frozen=True, slots=True)
class Log(Message):
    """``output.yaml`` lines ``seq`` to ``seq + len(lines) - 1`` of a job (without newlines)."""

    job_id: int
    seq: int
    lines: list[str]


@message("LOG_OK")
@dataclass(frozen=True, slots=True)
class LogOk(Message):
    """The master holds the job's first ``lines`` lines; ``rewind``: resend from there."""

    job_id: int
    lines: int
    rewind: bool = False


@message("END")
@dataclass(frozen=True, slots=True)
class End(Message):
    """The job is over: its health (Complete, Incomplete, Canceled) and its log's line count."""

    job_id: int
    health: str
    lines: int
    error_type: str | None = None
    error_msg: str | None = None
    #: description.yaml (the pipeline pumice-run ran), when it wrote one
    description: str | None = None


@message("END_OK")
@dataclass(frozen=True, slots=True)
class EndOk(Message):
    """The master recorded the end of the job: the agent may forget it."""

    job_id: int


@message("CANCEL")
@dataclass(frozen=True, slots=True)
class Cancel(Message):
    """Stop a job (SIGTERM, then SIGKILL after a grace period)."""

    job_id: int


@message("STATUS")
@dataclass(frozen=True, slots=True)
class Status(Message):
    """The master asks about the jobs it thinks hold a device on this worker."""

    job_ids: list[int]


@message("STATUS_REPLY")
@dataclass(frozen=True, slots=True)
class StatusReply(Message):
    """For each job asked: ``{"job_id": N, "state": "running"|"finished"|"unknown", "lines": N}``."""

    jobs: list[dict]


#: the ``state`` values of a STATUS_REPLY entry
JOB_RUNNING = "running"
JOB_FINISHED = "finished"
JOB_UNKNOWN = "unknown"


# ---- encoding ----


def encode(msg: Message) -> list[bytes]:
    """The frames of ``msg`` (header, version, type, JSON body)."""
    body = json.dumps(msg.body(), ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    return [PROTOCOL, str(PROTOCOL_VERSION).encode(), msg.TYPE.encode(), body.encode("utf-8")]


def _type_name(expected: Any) -> str:
    if typing.get_origin(expected) is not None:
        return str(expected)  # list[str], str | None
    return getattr(expected, "__name__", None) or str(expected)


def _check(value: Any, expected: Any) -> bool:
    """Whether a JSON value fits a field annotation (str, int, float, bool, dict, list[X], X | None)."""
    origin = typing.get_origin(expected)
    if origin in (types.UnionType, typing.Union):
        return any(_check(value, option) for option in typing.get_args(expected))
    if expected is type(None):
        return value is None
    if expected is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if expected is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin is list:
        if not isinstance(value, list):
            return False
        (item,) = typing.get_args(expected) or (Any,)
        if item is str:  # the hot path: LOG lines
            return all(type(v) is str for v in value)
        return item is Any or all(_check(v, item) for v in value)
    if origin is dict or expected is dict:
        return isinstance(value, dict)
    if expected is list:
        return isinstance(value, list)
    return isinstance(value, expected)


def decode(frames: list[bytes]) -> Message:
    """The message in ``frames`` (without any routing identity).

    Raises :class:`VersionMismatch` for another protocol version (except ``REFUSED``, which is
    always decoded so that a refusal is never lost) and :class:`MessageError` for anything else
    that is not a valid message: what was wrong is in the text.
    """
    if len(frames) != _FRAMES:
        raise MessageError(f"a message has {_FRAMES} frames (protocol, version, type, body), "
                           f"got {len(frames)}")
    name, version, kind, body = (bytes(f) for f in frames)
    if name != PROTOCOL:
        raise MessageError(f"not a pumice message: protocol {name[:20]!r}, expected {PROTOCOL!r}")
    kind_text = kind.decode("ascii", "replace")
    if version != str(PROTOCOL_VERSION).encode() and kind_text != Refused.TYPE:
        raise VersionMismatch(version.decode("ascii", "replace")[:20], kind_text[:40])
    cls = _REGISTRY.get(kind_text)
    if cls is None:
        raise MessageError(f"unknown message type {kind_text[:40]!r}; known: {', '.join(sorted(_REGISTRY))}")
    try:
        data = json.loads(body)
    except (ValueError, RecursionError) as exc:  # RecursionError: nested too deep to be a message
        raise MessageError(f"{kind_text} body is not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise MessageError(f"{kind_text} body must be a JSON object, not {type(data).__name__}")
    values = {}
    for key, (expected, required) in _CHECKS[kind_text].items():
        if key not in data:
            if required:
                raise MessageError(f"{kind_text} lacks the field {key!r}")
            continue
        value = data[key]
        if not _check(value, expected):
            raise MessageError(f"{kind_text}.{key} must be {_type_name(expected)}, "
                               f"got {type(value).__name__}")
        values[key] = value
    # unknown fields are ignored: a newer peer of the same protocol version may add optional ones
    return cls(**values)


def message_types() -> dict[str, type[Message]]:
    """Every registered message class by wire name."""
    return dict(_REGISTRY)
