"""The test action: run the overlay's test runner on the board and turn its signals into results."""

from __future__ import annotations

import functools
import importlib
import re
import time
from typing import Any

import voluptuous as v

from agent.actions.deploy.overlay import results_dir
from agent.errors import JobError, TestError
from agent.overlay import results_path, stage_command
from agent.pipeline import Action, RetryAction, register
from agent.schema import action_base
from agent.timeout import Deadline

_NAME = v.Match(r"^[-_a-zA-Z0-9.]+$", msg="test definition names use letters, digits, '-', '_' and '.'")
_COMMON = {
    v.Required("path"): str,
    v.Required("name"): _NAME,
    v.Optional("skip_install"): [v.Any("keys", "sources", "deps", "steps", "git-repos", "all")],
    v.Optional("lava-signal"): v.Any("kmsg", "stdout"),
    v.Optional("parameters"): dict,
    v.Optional("params"): dict,
}
DEFINITION = v.Any(
    {v.Required("repository"): str, v.Required("from"): "git", v.Optional("branch"): str,
     v.Optional("history"): bool, v.Optional("revision"): str, **_COMMON},
    {v.Required("repository"): str, v.Required("from"): "url", v.Optional("compression"): str, **_COMMON},
    {v.Required("repository"): dict, v.Required("from"): "inline", **_COMMON},
    msg="a test definition needs name, path, from (git, url or inline) and repository",
)

#: LAVA's default fixupdict for ``parse.pattern`` results
DEFAULT_FIXUP = {"PASS": "pass", "FAIL": "fail", "SKIP": "skip", "UNKNOWN": "unknown",
                 "pass": "pass", "fail": "fail", "skip": "skip", "unknown": "unknown"}


@register("test", "definitions")
class TestShellRetry(RetryAction):
    """Retry wrapper for the test shell."""

    name = "lava-test-retry"
    description = "Retry wrapper for lava-test-shell"
    summary = "Retry support for Lava Test Shell"

    @classmethod
    def schema(cls) -> dict:
        # name and connection: LAVA's jobs carry them; informational there too
        return {**action_base(), v.Required("definitions"): v.All([DEFINITION], v.Length(min=1)),
                v.Optional("name"): str, v.Optional("connection"): str, v.Optional("stage"): int}

    def populate(self, parameters: dict) -> None:
        super().populate(parameters)
        self.child_pipeline(parameters).add(TestShellAction())


class TestShellAction(Action):
    """Type the stage's ``lava-test-runner`` command at the prompt and follow its signals until
    ``<LAVA_TEST_RUNNER EXIT>``. A failing test case fails a result, never the job."""

    name = "lava-test-shell"
    description = "Executing lava-test-runner"
    summary = "Lava Test Shell"

    def populate(self, parameters: dict) -> None:
        # the console signals' parser is imported while the board boots, not as the test starts
        self.job.defer(functools.partial(importlib.import_module, "results.signals"))

    def validate(self) -> None:
        for definition in self.parameters.get("definitions") or []:
            parse = ((definition.get("repository") or {}).get("parse") if definition.get("from") == "inline"
                     and isinstance(definition.get("repository"), dict) else None)
            if parse and parse.get("pattern"):
                try:
                    re.compile(parse["pattern"])
                except re.error as exc:
                    self.errors.append(f"{definition['name']}: invalid parse pattern: {exc}")

    def run(self, connection: Any, deadline: Deadline) -> Any:
        if connection is None:
            raise JobError("no console: a test action needs a boot action with prompts before it")
        data = self.job.data
        stage = self.parameters.get("stage", 0)
        where = results_path(self.job.job_id, results_dir(self.job))
        if data.guest_label:
            connection.sendline(f"mkdir -p {where} && mount -t ext4 LABEL={data.guest_label} {where}")
            if not connection.wait_for_prompt(deadline):
                raise self.timed_out("mounting the test overlay disk")
        runner = TestRun(self, connection, deadline, self._patterns(stage))
        connection.sendline(stage_command(self.job.job_id, stage, results_dir(self.job)))
        runner.follow()
        connection.lines.flush_partial()
        if not connection.wait_for_prompt(deadline):
            raise self.timed_out("waiting for the prompt after the test runner")
        return connection

    def _patterns(self, stage: int) -> dict[str, tuple[re.Pattern, dict]]:
        """test run name -> (parse pattern, fixupdict) of the definitions that have one."""
        found = {}
        for _, test in self.job.data.testdefs.get(stage, []):
            parse = test.definition.get("parse") or {}
            if parse.get("pattern"):
                try:
                    pattern = re.compile(parse["pattern"], re.M)  # as LAVA: ^ is a line start
                except re.error as exc:
                    raise TestError(f"{test.name}: invalid parse pattern: {exc}") from None
                found[test.testrun_id] = (pattern, {**DEFAULT_FIXUP, **(parse.get("fixupdict") or {})})
        return found


class TestRun:
    """Follows one stage's output: signals (through TestRunParser), and lines matching a
    definition's parse pattern."""

    def __init__(self, action: TestShellAction, connection, deadline: Deadline, patterns: dict) -> None:
        self.action = action
        self.job = action.job
        self.connection = connection
        self.deadline = deadline
        self.patterns = patterns
        from results.signals import TestRunParser  # the test shell's parser, only when tests run

        self.parser = TestRunParser(self.job.job_id, action.level)

    def follow(self) -> None:
        from results.signals import SIGNAL_RE, SignalError, parse_signal

        signal_re = re.compile(SIGNAL_RE)
        while not self.parser.exited:
            expect = [signal_re]
            pattern = self.patterns.get(self.parser.run or "")
            if pattern:
                expect.append(pattern[0])
            index = self.connection.expect(expect, self.deadline)
            if index is None:
                for result in self.parser.finish(time.monotonic()):
                    self.job.record(result)
                raise self.action.timed_out(f"the test run {self.parser.run or ''} did not finish".replace("  ", " "))
            if index == 1:
                self._pattern_result(self.connection.match, pattern[1])
                continue
            try:
                sig = parse_signal(self.connection.match.group(0))
                results = self.parser.feed(sig, time.monotonic())
            except SignalError as exc:
                self.job.logger.warning(f"ignoring a malformed signal: {exc}")
                continue
            self._log(sig)
            for result in results:
                self.job.record(result)
            if self.parser.raised is not None:
                raise TestError(f"lava-test-raise: {self.parser.raised}")
        self.job.logger.info("the test runner finished")

    def _log(self, sig) -> None:
        from results.signals import EndRun, Event, StartRun

        if isinstance(sig, StartRun):
            self.job.logger.info(f"Starting test lava.{sig.run} ({sig.uuid})")
        elif isinstance(sig, EndRun):
            self.job.logger.info(f"Ending test lava.{sig.run} ({sig.uuid})")
        elif isinstance(sig, Event):
            self.job.logger.event(sig.message)

    def _pattern_result(self, match: re.Match, fixup: dict) -> None:
        from results.record import Result, clean_name

        groups = match.groupdict()
        case = (groups.get("test_case_id") or "").strip()
        if not case:
            return
        result = fixup.get((groups.get("result") or "").strip(), (groups.get("result") or "unknown").lower())
        if result not in ("pass", "fail", "skip", "unknown"):
            result = "unknown"
        measurement = groups.get("measurement")
        try:
            value = float(measurement) if measurement not in (None, "") else None
        except ValueError:
            value = None
        self.job.record(Result(job=self.job.job_id, level=self.action.level, suite=self.parser.run or "",
                               case=clean_name(case), result=result, measurement=value,
                               units=(groups.get("units") or None) if value is not None else None,
                               set=self.parser.set))
