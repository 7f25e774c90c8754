"""A job: its definition, the device it runs on, its pipeline, and what it leaves behind.

``validate_job()`` is what the master calls at submission; ``Job`` is what ``pumice-run`` runs.
"""

from __future__ import annotations

import functools
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import voluptuous as v

import agent.actions  # noqa: F401  (registers the strategies)
from agent import __version__
from agent.actions.boot.qemu import policy_refusals
from agent.device import DeviceConfig, as_device
from agent.errors import Bug, Canceled, ConfigurationError, Fault, JobDefinitionError, PumiceError
from agent.logger import JobLogger
from agent.pipeline import Action, BuildContext, Pipeline, strategy
from agent.policy import FilePolicy, accesses
from agent.power import CommandPower, Power
from agent.schema import YamlDocument, faults_from, format_path, job_schema, load_yaml, timeout_faults
from agent.timeout import Deadline, parse_duration
from results.bounded import DEFAULT_LIMITS, Limits

if TYPE_CHECKING:  # results.record is imported once a job runs: validating one makes no result
    from collections.abc import Callable, Mapping

    from results.record import Result

#: how long finalize may take when the job's own deadline is already gone (LAVA: 30 s)
CLEANUP_TIMEOUT = 30.0

SECTIONS = ("deploy", "boot", "test", "command")
#: the protocols LAVA 2023.01's job schema knows
LAVA_PROTOCOLS = ("lava-lxc", "lava-multinode", "lava-vland", "lava-xnbd")


@dataclass
class JobData:
    """What actions hand to each other while a job runs (one namespace)."""

    #: image key -> local file after download (and decompression)
    downloads: dict[str, Path] = field(default_factory=dict)
    #: the directory that holds ``lava-<job id>/`` (the test overlay), once built
    overlay_root: Path | None = None
    #: the console of the booted board
    connection: Any = None
    #: kernel/ramdisk/dtb placed for the bootloader: key -> path relative to the TFTP root
    tftp_files: dict[str, str] = field(default_factory=dict)
    #: ``undo`` commands of user commands, run at finalize
    undo_commands: list[str] = field(default_factory=list)
    #: extra QEMU arguments added by deploy actions (e.g. a guest drive)
    qemu_extra: list[str] = field(default_factory=list)
    #: the label of the guest disk that carries the overlay, when it is not in a ramdisk
    guest_label: str | None = None
    #: fetched test definitions: stage -> [(index in the block, TestDefinition)]
    testdefs: dict[int, list[tuple[int, Any]]] = field(default_factory=dict)


def method_of(section: str, params: dict) -> str:
    """The strategy key of an action block: deploy ``to``, boot ``method``, the kind of test."""
    if section == "deploy":
        return str(params.get("to", ""))
    if section == "boot":
        return str(params.get("method", ""))
    if section == "test":
        if "definitions" in params:  # LAVA: definitions run in a docker container are their own kind
            return "docker" if "docker" in params else "definitions"
        for kind in ("monitors", "interactive"):
            if kind in params:
                return kind
        return ""
    if section == "command":
        return "command"
    return ""


class Job:
    """One job on one device."""

    def __init__(self, job_id: str, definition: dict, device: Mapping | DeviceConfig | None,
                 output_dir: Path | None = None, logger: JobLogger | None = None,
                 env: dict[str, str] | None = None, doc: YamlDocument | None = None,
                 dispatcher: dict | None = None, on_worker: bool = True,
                 device_own: Mapping | DeviceConfig | None = None, power: Power | None = None,
                 console: Any = None) -> None:
        """``device`` (and ``device_own``) are parsed here (ConfigurationError when malformed);
        ``power`` replaces the device's power commands and ``console`` is a console already open
        (connect-device keeps it): fakes, in tests (agent.power.FakePower, agent.connections.fake)."""
        self.job_id = str(job_id)
        self.definition = definition
        self.device = as_device(device)
        #: the device's configuration rendered without the job's context (what in ``device`` is the
        #: lab's own, see agent.qemu_policy); None: all of ``device`` is (a standalone run)
        self.device_own = None if device_own is None else as_device(device_own)
        self.output_dir = Path(output_dir) if output_dir else None
        self.logger = logger or JobLogger(None)
        self.env = dict(env or {})
        #: the worker's dispatcher configuration (e.g. dispatcher_ip, tftp root)
        self.dispatcher = dict(dispatcher or {})
        self.doc = doc
        #: False when the master validates: the worker's tools are not checked there
        self.on_worker = on_worker
        #: the board's power control: the device's commands unless given
        self.power: Power = power or CommandPower(self.device.commands, self.logger, self.env or None)
        self.data = JobData(connection=console)
        self.results: list[Result] = []
        self.pipeline = Pipeline(self)
        self.faults: list[Fault] = []
        self.canceled = False
        self.cleaning = False
        self._workdir: Path | None = None
        self.timeout = parse_duration(definition["timeouts"]["job"], "timeouts.job")
        self.action_paths: dict[int, tuple] = {}
        #: work for later that need not hold the board up: done while it boots (see while_booting)
        self._deferred: list[Callable[[], None]] = []
        #: action block index -> its parameters through its strategy's schema (or the schema's
        #: refusal; as written for a method Pumice has no strategy for)
        self._checked: dict[int, dict | v.MultipleInvalid] = {}

    # -- building -------------------------------------------------------------------------------------
    def build(self) -> None:
        """Build the pipeline; collect a Fault for each unknown method or malformed action block."""
        from agent.actions.finalize import FinalizeAction

        for protocol in self.definition.get("protocols") or {}:
            if protocol in LAVA_PROTOCOLS:
                self._fault(("protocols", protocol), f"not implemented: the {protocol} protocol")
            else:
                self._fault(("protocols", protocol), f"unknown protocol; LAVA knows: {', '.join(LAVA_PROTOCOLS)}")
        test_stage = 0
        for index, block in enumerate(self.definition.get("actions") or []):
            (section, params), = block.items()
            path = ("actions", index, section)
            if section not in SECTIONS:
                self._fault(path[:2] + (section,), f"unknown action {section!r}; known: {', '.join(SECTIONS)}")
                continue
            if not isinstance(params, dict):
                self._fault(path, "an action block is a mapping")
                continue
            method = method_of(section, params)
            try:
                cls = strategy(section, method)
            except PumiceError as exc:
                key = {"deploy": "to", "boot": "method"}.get(section)
                self._fault(path + ((key,) if key and key in params else ()), str(exc))
                self._checked[index] = params  # no schema to check it: the other blocks read it as written
                continue
            try:
                params = self._block_params(index, cls, params)
            except v.MultipleInvalid as exc:
                self.faults.extend(faults_from(exc, self.doc, path) if self.doc else
                                   [Fault(format_path(path + tuple(e.path)), e.msg) for e in exc.errors])
                continue
            refusal = cls.accepts(self.device, params)
            if refusal:
                self._fault(path, refusal)
                continue
            if section == "test":
                params = {**params, "stage": test_stage}
                test_stage += 1
            try:
                action = self.pipeline.add(cls(), params, context=self._context(index))
            except PumiceError as exc:
                self._fault(path, str(exc))
                continue
            self.action_paths[id(action)] = path
        self.finalize = self.pipeline.add(FinalizeAction(), {})

    def _fault(self, path: tuple, message: str) -> None:
        line = self.doc.line(path) if self.doc else None
        self.faults.append(Fault(format_path(path), message, line))

    def _block_params(self, index: int, cls: type[Action], params: dict) -> dict:
        """The parameters of action block ``index`` through ``cls``'s schema, checked once per job
        (a deploy's overlay looks ahead at the test blocks before they are built); raises the
        schema's MultipleInvalid."""
        if index not in self._checked:
            try:
                self._checked[index] = block_schema(cls)(params)
            except v.MultipleInvalid as exc:
                self._checked[index] = exc
        checked = self._checked[index]
        if isinstance(checked, v.MultipleInvalid):
            raise checked
        return checked

    def _context(self, index: int) -> BuildContext:
        """What block ``index`` is built with: the blocks before it and the tests after it."""
        return BuildContext(index, tuple(self._tests_after(index)), tuple(self._checked_before("deploy", index)),
                            tuple(self._checked_before("boot", index)))

    def _checked_before(self, section: str, before: int) -> list[dict]:
        """The parameters, as their schema checked them, of the job's ``section`` blocks before
        block ``before``, in order. A block its schema refused is not among them (its own faults
        say why); one of a method Pumice does not implement is as written (a reader checks the
        shapes it reads)."""
        actions = self.definition.get("actions") or []
        return [checked for index, checked in sorted(self._checked.items())
                if isinstance(checked, dict) and index < before and section in actions[index]]

    def _tests_after(self, index: int) -> list[tuple[int, dict]]:
        """(stage, block) of each test block after action ``index`` up to the next deploy: what the
        overlay built by that deploy must hold. Stages count the job's test blocks from 0. A block
        its own schema refuses is left out (it is not built yet: its faults come when it is)."""
        found, stage = [], 0
        for position, block in enumerate(self.definition.get("actions") or []):
            (section, params), = block.items()
            if position > index and section == "deploy":
                break
            if section == "test":
                if position > index and isinstance(params, dict) and "definitions" in params:
                    try:
                        self._block_params(position, strategy("test", "definitions"), params)
                        found.append((stage, params))
                    except v.MultipleInvalid:
                        pass
                stage += 1
        return found

    def validate(self) -> list[Fault]:
        """Every fault of the job: building, the worker's file policy, then each action's own checks."""
        self.faults.extend(self.check_policy())
        self.pipeline.validate()
        for action, message in self.pipeline.errors():
            top = self._top_of(action)
            path = self.action_paths.get(id(top), ())
            line = self.doc.line(path) if self.doc and path else None
            self.faults.append(Fault(format_path(path) or action.name, f"{action.name}: {message}", line))
        return self.faults

    def _top_of(self, action: Action) -> Action:
        top_level = action.level.split(".")[0]
        for candidate in self.pipeline.actions:
            if candidate.level == top_level:
                return candidate
        return action

    def describe(self) -> dict:
        return {
            "job": {"id": self.job_id, "name": self.definition.get("job_name"),
                    "timeout": self.timeout, "dispatcher": f"pumice {__version__}"},
            "device": {"hostname": self.device.hostname, "device_type": self.device.device_type},
            "pipeline": self.pipeline.describe(),
        }

    @functools.cached_property
    def policy(self) -> FilePolicy:
        """The worker's file policy (:mod:`agent.policy`), from its dispatcher configuration."""
        return FilePolicy.from_dispatcher(self.dispatcher)

    def check_policy(self) -> list[Fault]:
        """A fault for each URL or repository of the job the worker's file policy refuses, and for
        what its QEMU command line may not do (on the worker only, with symlinks resolved: the
        master checks each worker's policy itself)."""
        if not self.on_worker:
            return []
        try:
            policy = self.policy
        except ValueError as exc:
            return [Fault("", f"the worker's dispatcher configuration: {exc}")]
        found = [(access.path, policy.refusal(access, resolve=True)) for access in accesses(self.definition)]
        found += policy_refusals(self)
        return [Fault(format_path(path), refusal, self.doc.line(path) if self.doc else None)
                for path, refusal in found if refusal]

    # -- running --------------------------------------------------------------------------------------
    @property
    def workdir(self) -> Path:
        """A private scratch directory for downloads and overlays, removed at the end."""
        if self._workdir is None:
            from agent import scratch

            self._workdir = scratch.make(self.job_id, self.dispatcher.get("tmp_dir"))
        return self._workdir

    def defer(self, work: Callable[[], None]) -> None:
        """Have ``work`` done while the board boots, when the agent waits anyway, rather than
        before the boot (writing a file, importing what the test run needs); ``work`` is done at
        the end of the job at the latest. It must not fail: its errors are logged, not raised."""
        self._deferred.append(work)

    def while_booting(self) -> None:
        """Do the deferred work (once): called by the login action as the board boots, and by
        whoever runs the job once it is over."""
        work, self._deferred = self._deferred, []
        for item in work:
            try:
                item()
            except Exception as exc:  # noqa: BLE001  (deferred work must not end the job)
                self.logger.error(f"deferred work failed: {type(exc).__name__}: {exc}")

    def check_canceled(self) -> None:
        if self.canceled and not self.cleaning:
            raise Canceled("The job was canceled")

    def run(self) -> str:
        """Run the pipeline, always finalize, and return the job's health."""
        error: PumiceError | None = None
        deadline = Deadline.after(self.timeout, owner="job")
        actions = [a for a in self.pipeline.actions if a is not self.finalize]
        try:
            self.pipeline.run(None, deadline, actions)
        except PumiceError as exc:
            error = exc
        except BaseException as exc:  # anything else is our bug, reported as such
            self.logger.exception()
            error = Bug(f"{type(exc).__name__}: {exc}")
        finally:
            self.cleaning = True
            try:
                self.pipeline.run(self.data.connection, Deadline.after(CLEANUP_TIMEOUT, "finalize"),
                                  [self.finalize])
            except PumiceError as exc:
                error = error or exc
            except Exception as exc:
                self.logger.exception()
                error = error or Bug(f"finalize: {exc}")
            self.pipeline.cleanup(self.data.connection)
            if self._workdir is not None:
                shutil.rmtree(self._workdir, ignore_errors=True)
        return self.finish(error)

    def finish(self, error: PumiceError | None) -> str:
        """Record the final ``lava/job`` result and return the health it means."""
        from results.record import job_result

        extra: dict[str, Any] = {}
        if error is None:
            health = "Complete"
            self.logger.info("Job finished correctly")
        else:
            health = error.health
            extra = {"error_type": error.error_type, "error_msg": str(error)}
            self.logger.error(f"{error.error_type} error: {error}")
        self.record(job_result(self.job_id, "pass" if error is None else "fail",
                               extra.get("error_type"), extra.get("error_msg")))
        self.health = health
        self.error = error
        return health

    # -- results --------------------------------------------------------------------------------------
    def record(self, result: Result) -> None:
        """Keep a result and log it as a ``results`` record (LAVA's shape)."""
        self.results.append(result)
        self.logger.results(result.to_record())

    def action_result(self, action: Action, failed: bool) -> None:
        """The ``lava`` suite result of one action: pass/fail, duration, level and timeout."""
        from results.record import action_result

        extra = dict(action.results)
        if action.connection_timeout != action.timeout:
            extra["connection-timeout"] = action.connection_timeout
        self.record(action_result(self.job_id, action.level, action.name,
                                  "fail" if failed or action.errors else "pass",
                                  action.elapsed, action.timeout, **extra))


@functools.cache
def block_schema(cls: type[Action]) -> v.Schema:
    """The compiled schema of a strategy's action block (built once per strategy)."""
    return v.Schema(cls.schema(), extra=v.PREVENT_EXTRA)


def parse_job(text: str, limits: Limits = DEFAULT_LIMITS) -> tuple[dict, YamlDocument]:
    """Parse and schema-check job YAML within ``limits``; raise JobDefinitionError with every fault."""
    doc = load_yaml(text, limits=limits)
    if not isinstance(doc.data, dict):
        raise JobDefinitionError([Fault("", "a job definition is a YAML mapping", 1)])
    faults = timeout_faults(doc.data, doc, limits)
    try:
        data = job_schema(limits)(doc.data)
    except v.MultipleInvalid as exc:
        faults = sorted(faults_from(exc, doc) + faults, key=lambda f: (f.line or 0, f.path))
    if faults:
        raise JobDefinitionError(faults)
    return data, doc


def load_job(text: str, device: Mapping | DeviceConfig | None, job_id: str = "0", limits: Limits = DEFAULT_LIMITS,
             **kwargs: Any) -> Job:
    """A built and validated Job, or JobDefinitionError with every fault."""
    data, doc = parse_job(text, limits)
    try:
        job = Job(job_id, data, device, doc=doc, **kwargs)
    except ConfigurationError as exc:
        raise JobDefinitionError([Fault("device", str(exc))]) from None
    except PumiceError as exc:
        raise JobDefinitionError([Fault("timeouts.job", str(exc), doc.line(("timeouts", "job")))]) from None
    job.build()
    faults = job.validate()
    if faults:
        raise JobDefinitionError(faults)
    return job


def validate_job(text: str, device: Mapping | None = None, limits: Limits = DEFAULT_LIMITS) -> list[Fault]:
    """Every fault of the job YAML ``text`` against the rendered ``device`` configuration.

    An empty list means the job would run on that device. Checks the YAML syntax and its limits,
    the schema, then builds the real pipeline and validates every action, without side effects.
    """
    try:
        load_job(text, device or {}, limits=limits, on_worker=False)
    except JobDefinitionError as exc:
        return exc.faults
    return []
