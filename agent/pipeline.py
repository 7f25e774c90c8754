"""Actions and pipelines: the shape of every job, with LAVA's level strings and timeout precedence.

A job is a pipeline of top-level actions (deploy, boot, test, finalize), each with its own pipeline
of children. Levels are assigned by the pipeline (``1``, ``1.2``, ``2.4.1``); an action never sets its
own. Every action is validated before anything touches a board, and ``run()`` gets a
:class:`~agent.timeout.Deadline` (no SIGALRM): a child's deadline is the earlier of its own and its
parent's.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from agent.device import DeviceConfig, Needs
from agent.errors import Bug, Canceled, JobError, JobTimeout, PumiceError
from agent.timeout import Deadline, format_duration, parse_duration

if TYPE_CHECKING:
    from agent.job import Job

#: LAVA's default action timeout (seconds) when neither device nor job names one
ACTION_TIMEOUT = 30.0

_REGISTRY: dict[tuple[str, str], type[Action]] = {}

#: Every deploy ``to:``, boot ``method:`` and test kind LAVA 2023.01's job schema knows (read from
#: lava_common/schemas): one Pumice has no strategy for is refused as "not implemented", any other
#: name as "unknown", as LAVA refuses it.
LAVA_METHODS: dict[str, frozenset[str]] = {
    "deploy": frozenset((
        "docker", "download", "downloads", "fastboot", "flasher", "fvp", "iso-installer", "lxc", "mps",
        "musca", "nbd", "nfs", "overlay", "recovery", "sata", "sd", "ssh", "tftp", "tmpfs", "u-boot-ums",
        "usb", "uuu", "vemsd")),
    "boot": frozenset((
        "barebox", "bootloader", "cmsis-dap", "depthcharge", "dfu", "docker", "fastboot", "fvp", "gdb", "grub",
        "grub-efi", "ipxe", "jlink", "kexec", "lxc", "minimal", "monitor", "musca", "new_connection",
        "openocd", "pyocd", "qemu", "qemu-iso", "qemu-nfs", "recovery", "schroot", "ssh", "u-boot", "uefi",
        "uefi-menu", "uuu")),
    "test": frozenset(("definitions", "docker", "interactive", "monitors")),
}


def register(section: str, method: str) -> Callable[[type[Action]], type[Action]]:
    """Register a strategy: the top-level action for ``section`` (deploy, boot, test, command)
    and ``method`` (the deploy ``to:``, the boot ``method:``, the kind of test)."""

    def wrap(cls: type[Action]) -> type[Action]:
        key = (section, method)
        if key in _REGISTRY:
            raise Bug(f"strategy {section} {method!r} registered twice: "
                      f"{_REGISTRY[key].__name__} and {cls.__name__}")
        _REGISTRY[key] = cls
        return cls

    return wrap


def known_methods(section: str) -> list[str]:
    return sorted(method for (sec, method) in _REGISTRY if sec == section)


def strategy(section: str, method: str) -> type[Action]:
    """The registered strategy for (section, method), or a JobError naming the known ones: "not
    implemented" for a method LAVA 2023.01 has, "unknown" for one it does not know either."""
    try:
        return _REGISTRY[(section, method)]
    except KeyError:
        known = ", ".join(known_methods(section)) or "none"
        noun = {"deploy": "deploy to", "boot": "boot method", "test": "test kind"}.get(section, section)
        if method in LAVA_METHODS.get(section, ()):
            raise JobError(f"not implemented: {noun} {method!r} (LAVA has it; Pumice implements: {known})") from None
        raise JobError(f"unknown {noun} {method!r}; known: {known}") from None


@dataclass(frozen=True)
class BuildContext:
    """Where the action block being built stands in its job, handed to its pipeline when it is
    built: what comes before it and what follows (a deploy builds the overlay of the tests after it;
    a boot fills in what the deploy before it placed)."""

    #: the block's index in the job's ``actions``
    index: int = 0
    #: (stage, parameters) of each test block after this one up to the next deploy
    tests_after: tuple[tuple[int, dict], ...] = ()
    #: the parameters, as their schema checked them, of the deploy and boot blocks before this one
    deploys_before: tuple[dict, ...] = ()
    boots_before: tuple[dict, ...] = ()

    @property
    def deploy_before(self) -> dict:
        """The parameters of the last deploy before this block ({} when none)."""
        return self.deploys_before[-1] if self.deploys_before else {}


class Action:
    """One step of a job.

    Subclasses set ``name`` (LAVA's action name, so ``timeouts: actions: NAME`` applies),
    ``description`` and ``summary``; they may override ``populate()`` to add children,
    ``validate()`` to report problems (append to ``self.errors``), ``run()`` and ``cleanup()``.
    """

    name = "action"
    description = ""
    summary = ""
    #: what a timeout of this action raises
    timeout_exception: type[PumiceError] = JobTimeout
    #: what a strategy needs of the device (checked by ``accepts`` when the job is built)
    needs: ClassVar[Needs | None] = None

    def __init__(self) -> None:
        self.level = ""
        self.job: Job | None = None
        self.parameters: dict[str, Any] = {}
        self.pipeline: Pipeline | None = None
        self.context = BuildContext()
        self.timeout = ACTION_TIMEOUT
        self.connection_timeout = ACTION_TIMEOUT
        self.max_retries = 1
        self.errors: list[str] = []
        #: extra data for this action's result in the lava suite
        self.results: dict[str, Any] = {}
        self.elapsed = 0.0
        self.started = False

    # -- the contract ---------------------------------------------------------------------------------
    def populate(self, parameters: dict) -> None:
        """Add child actions (called once, when the action joins a pipeline)."""

    def validate(self) -> None:
        """Check parameters and configuration; append every problem to ``self.errors``."""
        if self.pipeline is not None:
            self.pipeline.validate()

    def run(self, connection: Any, deadline: Deadline) -> Any:
        """Do the work before ``deadline``; return the (possibly new) connection."""
        if self.pipeline is not None:
            return self.pipeline.run(connection, deadline)
        return connection

    def cleanup(self, connection: Any) -> None:
        """Undo side effects; runs at the end of every job that got past validation."""
        if self.pipeline is not None:
            self.pipeline.cleanup(connection)

    @classmethod
    def accepts(cls, device: DeviceConfig, params: dict) -> str | None:
        """Why ``device`` cannot run the action block ``params`` (None: it can): what ``needs``
        declares; a strategy adds its own checks."""
        return cls.needs.refusal(device, params) if cls.needs is not None else None

    # -- helpers ----------------------------------------------------------------------------------------
    @property
    def logger(self):
        return self.job.logger

    @property
    def device(self) -> DeviceConfig:
        """The typed configuration of the job's device."""
        return self.job.device

    def require_tool(self, *names: str, why: str = "") -> None:
        """An error unless one of the commands ``names`` is installed. Only checked on the worker
        that runs the job: the master validates jobs without the worker's tools."""
        if self.job is not None and not self.job.on_worker:
            return
        import shutil

        if not any(shutil.which(name) for name in names):
            self.errors.append(f"{' or '.join(names)} is not installed on this worker" + (f": {why}" if why else ""))

    def child_pipeline(self, parameters: dict) -> Pipeline:
        self.pipeline = Pipeline(self.job, parent=self, parameters=parameters, context=self.context)
        return self.pipeline

    def timed_out(self, what: str = "") -> PumiceError:
        """The error to raise when this action's deadline passes."""
        detail = f" ({what})" if what else ""
        return self.timeout_exception(f"{self.name} timed out after {format_duration(self.timeout)}{detail}")

    def describe(self) -> dict:
        data = {
            "name": self.name,
            "level": self.level,
            "description": self.description,
            "summary": self.summary,
            "timeout": self.timeout,
            "max_retries": self.max_retries,
            "class": f"{type(self).__module__.removeprefix('agent.')}.{type(self).__name__}",
        }
        if self.pipeline is not None:
            data["pipeline"] = self.pipeline.describe()
        return data


class LevelOnly(Action):
    """An action LAVA 2023.01 has at this place that has nothing to do on a Pumice worker (or
    not for this job): it holds LAVA's level, since results and test run uuids are keyed by
    levels, and says so in the log. Subclass it, or name one in place: ``LevelOnly("name", why)``."""

    #: why it has nothing to do here
    reason = ""

    def __init__(self, name: str | None = None, reason: str | None = None) -> None:
        super().__init__()
        if name:
            self.name = self.description = self.summary = name
        if reason:
            self.reason = reason

    def run(self, connection: Any, deadline: Deadline) -> Any:
        self.logger.debug(f"{self.name}: nothing to do here ({self.reason})")
        return connection


class RetryAction(Action):
    """Runs its children again, up to ``failure_retry`` times, when they fail (not when canceled)."""

    def populate(self, parameters: dict) -> None:
        self.max_retries = int(parameters.get("failure_retry", self.max_retries))

    def run(self, connection: Any, deadline: Deadline) -> Any:
        attempt = 0
        while True:
            attempt += 1
            try:
                return super().run(connection, deadline)
            except (Canceled, Bug):
                raise
            except PumiceError as exc:
                if attempt >= self.max_retries or deadline.expired():
                    raise
                self.logger.warning(f"{self.name} failed: {exc} ({attempt}/{self.max_retries}), retrying")
                self.results.setdefault("retries", 0)
                self.results["retries"] += 1
                if self.pipeline is not None:
                    self.pipeline.cleanup(connection)


class Pipeline:
    """An ordered list of actions at one level of the job."""

    def __init__(self, job: Job | None, parent: Action | None = None, parameters: dict | None = None,
                 context: BuildContext | None = None) -> None:
        self.job = job
        self.parent = parent
        self.parameters = parameters or {}
        self.context = context or BuildContext()
        self.actions: list[Action] = []

    def add(self, action: Action, parameters: dict | None = None, context: BuildContext | None = None) -> Action:
        """Append ``action``: give it its level, let it populate its children, then set its timeouts
        in LAVA's order (device then job ``action``, ``actions.NAME``, the block's ``timeout``,
        the block's ``timeouts.NAME``; connection timeouts likewise)."""
        self.actions.append(action)
        action.job = self.job
        action.context = context or self.context
        action.level = f"{self.parent.level}.{len(self.actions)}" if self.parent else str(len(self.actions))
        if parameters is None:
            parameters = self.parameters
        action.parameters = parameters
        action.populate(parameters)
        self._set_timeouts(action, parameters)
        return action

    def _set_timeouts(self, action: Action, parameters: dict) -> None:
        layers = []
        if self.job is not None:
            layers = [self.job.device.timeouts, self.job.definition.get("timeouts") or {}]

        def merged(key: str, name: str | None = None):
            value = None
            for layer in layers:
                entry = layer.get(key)
                if name is not None:
                    entry = entry.get(name) if isinstance(entry, dict) else None
                if entry is not None:
                    value = entry
            return value

        where = f"{action.level} {action.name}"
        for value in (merged("action"), merged("actions", action.name), parameters.get("timeout"),
                      (parameters.get("timeouts") or {}).get(action.name)):
            if value is not None:
                action.timeout = parse_duration(_strip_skip(value), f"timeout of {where}")
        for value in (merged("connection"), merged("connections", action.name)):
            if value is not None:
                action.connection_timeout = parse_duration(_strip_skip(value), f"connection timeout of {where}")

    def validate(self) -> None:
        for action in self.actions:
            try:
                action.validate()
            except PumiceError as exc:
                action.errors.append(str(exc))

    def errors(self) -> list[tuple[Action, str]]:
        """Every (action, message) of this pipeline and its children, in level order."""
        found = []
        for action in self.actions:
            found.extend((action, message) for message in action.errors)
            if action.pipeline is not None:
                found.extend(action.pipeline.errors())
        return found

    def walk(self):
        for action in self.actions:
            yield action
            if action.pipeline is not None:
                yield from action.pipeline.walk()

    def run(self, connection: Any, deadline: Deadline, actions: list[Action] | None = None) -> Any:
        """Run ``actions`` (default: all) in order, each under its own deadline within ``deadline``."""
        top = self.parent is None
        for action in self.actions if actions is None else actions:
            job = self.job
            job.check_canceled()
            own = Deadline.after(action.timeout, owner=action.name, parent=deadline)
            log = job.logger.info if top else job.logger.debug
            log(f"start: {action.level} {action.name} (timeout {format_duration(own.remaining())}) [common]")
            start = time.monotonic()
            failed = False
            action.started = True
            try:
                new = action.run(connection, own)
                if new is not None:
                    connection = new
            except JobTimeout as exc:
                failed = True
                action.results.setdefault("fail", str(exc))
                if not getattr(exc, "logged", False):
                    job.logger.error(str(exc))
                    exc.logged = True
                if (action.parameters.get("timeout") or {}).get("skip") and top:
                    job.logger.warning(f"skip_timeout is set for {action.name}: continuing with the next action")
                    connection = None
                    continue
                raise
            except PumiceError as exc:
                failed = True
                action.results.setdefault("fail", str(exc))
                if not getattr(exc, "logged", False):  # log an error once, where it happened
                    job.logger.error(f"{action.name} failed: {exc}")
                    exc.logged = True
                raise
            except Exception as exc:
                failed = True
                action.results.setdefault("fail", str(exc))
                job.logger.exception()
                raise Bug(f"{action.name}: {type(exc).__name__}: {exc}") from exc
            finally:
                action.elapsed = time.monotonic() - start
                log(f"end: {action.level} {action.name} (duration {format_duration(action.elapsed)}) [common]")
                job.action_result(action, failed)
        return connection

    def cleanup(self, connection: Any) -> None:
        """Clean up in reverse order; one action's failure does not stop the others'."""
        for action in reversed(self.actions):
            try:
                action.cleanup(connection)
            except Exception as exc:  # cleanup must reach every action
                self.job.logger.error(f"cleanup of {action.name} failed: {exc}")

    def describe(self) -> list[dict]:
        return [action.describe() for action in self.actions]


def _strip_skip(value: Any) -> Any:
    if isinstance(value, dict) and "skip" in value:
        return {k: v for k, v in value.items() if k != "skip"}
    return value
