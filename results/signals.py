"""The LAVA console signals printed by the test shell on the board, and a parser for test runs.

Signal formats, as LAVA 2023.01's test shell prints them and its dispatcher reads them
(``<LAVA_SIGNAL_(NAME) args>``, arguments split on whitespace)::

    <LAVA_SIGNAL_STARTRUN 0_smoke-tests 12_1.4.2.1>       test run name, uuid
    <LAVA_SIGNAL_ENDRUN 0_smoke-tests 12_1.4.2.1>
    <LAVA_SIGNAL_STARTTC linux-posix-pwd>                 around ``lava-test-case NAME --shell``
    <LAVA_SIGNAL_ENDTC linux-posix-pwd>
    <LAVA_SIGNAL_TESTCASE TEST_CASE_ID=dd-speed RESULT=pass UNITS=MB/s MEASUREMENT=12.5>
    <LAVA_SIGNAL_TESTSET START network>  /  <LAVA_SIGNAL_TESTSET STOP>
    <LAVA_SIGNAL_TESTREFERENCE kernel-log pass http://example.org/dmesg>   case, result, URL
    <LAVA_SIGNAL_TESTRAISE message words>                 stops the test job (TestError)
    <LAVA_SIGNAL_TESTEVENT message words>
    <LAVA_SIGNAL_TESTFEEDBACK namespace>                  MultiNode feedback, parsed and ignored
    <LAVA_TEST_RUNNER EXIT>  /  <LAVA_TEST_RUNNER INSTALL_FAIL>

TESTCASE keys are case-insensitive and in any order; TESTREFERENCE is positional in LAVA, and
the ``TEST_CASE_ID=.. RESULT=.. REFERENCE=..`` form is accepted too. With ``lava-signal: kmsg``
the board writes signals to the kernel log, so they may follow a prefix such as
``<8>[   18.794011] ``: SIGNAL_RE matches a signal anywhere in a line.

Signals are typed: each is an immutable subclass of ``Signal`` with named fields
(``CaseResult(case, result, measurement, units)`` ...). Every signal has ``name`` (the LAVA
name: "TESTCASE"; "RUNNER_EXIT" and "RUNNER_INSTALL_FAIL" for the runner's two lines), ``args``
(its arguments as LAVA would print them) and ``text()`` (the canonical signal line), so that
``parse_signal(s.text()) == s``.
"""

from __future__ import annotations

import math
import re
from typing import ClassVar

from results.record import LAVA_SUITE, RESULTS, Result, clean_name, format_number

# One signal anywhere in console output. Arguments never contain '>' or a newline, so a
# match never spans lines; a CR (serial consoles print CRLF, and sometimes a stray CR) is
# treated as whitespace. The runner's lines have their own shape.
SIGNAL_RE = (
    r"<(?:LAVA_SIGNAL_(?P<lava_signal>[A-Z][A-Z0-9_]*)(?:[ \t\r]+(?P<lava_args>[^>\n]*))?"
    r"|LAVA_TEST_RUNNER[ \t]+(?P<lava_runner>[A-Z_]+)[ \t\r]*)>"
)
SIGNAL_PATTERN = re.compile(SIGNAL_RE)
SIGNAL_RE_BYTES = SIGNAL_RE.encode()  # for pexpect spawns that read bytes


class SignalError(ValueError):
    """A malformed signal: the message says which signal, what is wrong and what is allowed."""


class Signal:
    """Base of all signals: an immutable value with named fields (``_fields``), compared by
    type and values. ``name`` is the LAVA signal name; see the module doc.

    (Plain classes with slots rather than dataclasses: the agent imports this module on its
    fast ``--validate`` path, and a dozen dataclasses take milliseconds to create.)
    """

    __slots__ = ()
    name: ClassVar[str] = ""
    _fields: ClassVar[tuple[str, ...]] = ()
    _defaults: ClassVar[dict[str, object]] = {}

    def __init__(self, *args: object, **kwargs: object) -> None:
        kind = type(self).__name__
        if len(args) > len(self._fields):
            raise TypeError(f"{kind} takes at most {len(self._fields)} arguments ({len(args)} given)")
        values = dict(zip(self._fields, args, strict=False))
        for key, value in kwargs.items():
            if key not in self._fields or key in values:
                raise TypeError(f"{kind} got an unexpected or repeated argument {key!r}")
            values[key] = value
        for key in self._fields:
            if key not in values:
                if key not in self._defaults:
                    raise TypeError(f"{kind} is missing the argument {key!r}")
                values[key] = self._defaults[key]
            object.__setattr__(self, key, values[key])

    def __setattr__(self, key: str, value: object) -> None:
        raise AttributeError(f"{type(self).__name__} is immutable")

    def __delattr__(self, key: str) -> None:
        raise AttributeError(f"{type(self).__name__} is immutable")

    def _values(self) -> tuple:
        return tuple(getattr(self, key) for key in self._fields)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Signal):
            return NotImplemented
        return type(other) is type(self) and other._values() == self._values()

    def __hash__(self) -> int:
        return hash((type(self), self._values()))

    def __repr__(self) -> str:
        fields = ", ".join(f"{key}={getattr(self, key)!r}" for key in self._fields)
        return f"{type(self).__name__}({fields})"

    @property
    def args(self) -> tuple[str, ...]:
        """The signal's arguments as the test shell prints them."""
        return tuple(getattr(self, key) for key in self._fields)

    def text(self) -> str:
        """The canonical signal text, e.g. ``<LAVA_SIGNAL_ENDTC pwd>``."""
        return f"<LAVA_SIGNAL_{self.name} {' '.join(self.args)}>"


class StartRun(Signal):
    """STARTRUN: a test definition starts running (``run`` like ``0_smoke-tests``, ``uuid``)."""

    __slots__ = _fields = ("run", "uuid")
    name: ClassVar[str] = "STARTRUN"
    run: str
    uuid: str


class EndRun(Signal):
    """ENDRUN: the test definition finished (all its steps ran)."""

    __slots__ = _fields = ("run", "uuid")
    name: ClassVar[str] = "ENDRUN"
    run: str
    uuid: str


class StartCase(Signal):
    """STARTTC: ``lava-test-case NAME --shell`` starts its command."""

    __slots__ = _fields = ("case",)
    name: ClassVar[str] = "STARTTC"
    case: str


class EndCase(Signal):
    """ENDTC: the command of ``lava-test-case NAME --shell`` returned."""

    __slots__ = _fields = ("case",)
    name: ClassVar[str] = "ENDTC"
    case: str


class CaseResult(Signal):
    """TESTCASE: a test case result, with an optional measurement (a float) and units."""

    __slots__ = _fields = ("case", "result", "measurement", "units")
    _defaults: ClassVar[dict[str, object]] = {"measurement": None, "units": None}
    name: ClassVar[str] = "TESTCASE"
    case: str
    result: str
    measurement: float | None
    units: str | None

    @property
    def args(self) -> tuple[str, ...]:
        args = [f"TEST_CASE_ID={self.case}", f"RESULT={self.result}"]
        if self.units is not None:
            args.append(f"UNITS={self.units}")
        if self.measurement is not None:
            args.append(f"MEASUREMENT={format_number(self.measurement)}")
        return tuple(args)


class SetStart(Signal):
    """TESTSET START: the following cases belong to test set ``set``."""

    __slots__ = _fields = ("set",)
    name: ClassVar[str] = "TESTSET"
    set: str

    @property
    def args(self) -> tuple[str, ...]:
        return ("START", self.set)


class SetStop(Signal):
    """TESTSET STOP: the current test set ends."""

    __slots__ = ()
    name: ClassVar[str] = "TESTSET"

    @property
    def args(self) -> tuple[str, ...]:
        return ("STOP",)


class Reference(Signal):
    """TESTREFERENCE: a test case result that points to a URL."""

    __slots__ = _fields = ("case", "result", "reference")
    name: ClassVar[str] = "TESTREFERENCE"
    case: str
    result: str
    reference: str


class Raise(Signal):
    """TESTRAISE: the test asks to stop the job with a TestError carrying ``message``."""

    __slots__ = _fields = ("message",)
    name: ClassVar[str] = "TESTRAISE"
    message: str


class Event(Signal):
    """TESTEVENT: an event to log (lvl ``event``) with ``message``."""

    __slots__ = _fields = ("message",)
    name: ClassVar[str] = "TESTEVENT"
    message: str


class Feedback(Signal):
    """TESTFEEDBACK: MultiNode feedback from another namespace (no effect in Pumice)."""

    __slots__ = _fields = ("namespace",)
    name: ClassVar[str] = "TESTFEEDBACK"
    namespace: str


class RunnerExit(Signal):
    """``<LAVA_TEST_RUNNER EXIT>``: lava-test-runner finished the stage."""

    __slots__ = ()
    name: ClassVar[str] = "RUNNER_EXIT"

    def text(self) -> str:
        return "<LAVA_TEST_RUNNER EXIT>"


class InstallFail(Signal):
    """``<LAVA_TEST_RUNNER INSTALL_FAIL>``: a definition's install step failed."""

    __slots__ = ()
    name: ClassVar[str] = "RUNNER_INSTALL_FAIL"

    def text(self) -> str:
        return "<LAVA_TEST_RUNNER INSTALL_FAIL>"


_RESULT_CHOICES = "|".join(RESULTS)


def _words(name: str, args: str, count: int, what: str, text: str) -> list[str]:
    words = args.split()
    if len(words) != count:
        got = f"{len(words)}: {' '.join(words)}" if words else "none"
        raise SignalError(f"malformed signal {text!r}: {name} takes {what}; got {got}")
    return words


def _check_result(name: str, result: str, text: str) -> None:
    if result not in RESULTS:
        raise SignalError(f"malformed signal {text!r}: {name} result {result!r} is not one of {', '.join(RESULTS)}")


def _keywords(name: str, words: list[str], allowed: tuple[str, ...], text: str) -> dict[str, str]:
    values: dict[str, str] = {}
    for word in words:
        key, sep, value = word.partition("=")
        key = key.upper()
        if not sep:
            raise SignalError(
                f"malformed signal {text!r}: {word!r} is not KEY=VALUE (test case names must not contain whitespace)"
            )
        if key not in allowed:
            raise SignalError(f"malformed signal {text!r}: unknown {name} key {key!r}; known: {', '.join(allowed)}")
        if key in values:
            raise SignalError(f"malformed signal {text!r}: {key} given twice")
        values[key] = value
    return values


def _case_result(args: str, text: str) -> CaseResult:
    values = _keywords("TESTCASE", args.split(), ("TEST_CASE_ID", "RESULT", "MEASUREMENT", "UNITS"), text)
    if not values.get("TEST_CASE_ID"):
        raise SignalError(f"malformed signal {text!r}: TESTCASE needs TEST_CASE_ID=<name>")
    if "RESULT" not in values:
        raise SignalError(f"malformed signal {text!r}: TESTCASE needs RESULT={_RESULT_CHOICES}")
    _check_result("TESTCASE", values["RESULT"], text)
    measurement = None
    if "MEASUREMENT" in values:
        try:
            measurement = float(values["MEASUREMENT"])
        except ValueError:
            measurement = math.nan
        if not math.isfinite(measurement):
            raise SignalError(
                f"malformed signal {text!r}: MEASUREMENT {values['MEASUREMENT']!r} is not a finite number"
            )
    return CaseResult(values["TEST_CASE_ID"], values["RESULT"], measurement, values.get("UNITS") or None)


def _reference(args: str, text: str) -> Reference:
    words = args.split()
    if words and words[0].upper().startswith("TEST_CASE_ID="):
        values = _keywords("TESTREFERENCE", words, ("TEST_CASE_ID", "RESULT", "REFERENCE"), text)
        missing = [key for key in ("TEST_CASE_ID", "RESULT", "REFERENCE") if not values.get(key)]
        if missing:
            raise SignalError(f"malformed signal {text!r}: TESTREFERENCE needs {', '.join(missing)}")
        words = [values["TEST_CASE_ID"], values["RESULT"], values["REFERENCE"]]
    else:
        words = _words("TESTREFERENCE", args, 3, "3 arguments: test case name, result, URL", text)
    _check_result("TESTREFERENCE", words[1], text)
    return Reference(*words)


def _test_set(args: str, text: str) -> Signal:
    words = args.split()
    action = words[0].upper() if words else ""
    if action == "START" and len(words) == 2:
        return SetStart(words[1])
    if action == "STOP" and len(words) == 1:
        return SetStop()
    raise SignalError(f"malformed signal {text!r}: TESTSET takes 'START <name>' or 'STOP'")


def _message(name: str, args: str, text: str) -> str:
    message = " ".join(args.split())
    if not message:
        raise SignalError(f"malformed signal {text!r}: {name} needs a message")
    return message


def parse_signal(text: str) -> Signal:
    """Parse the first signal in ``text`` (a SIGNAL_RE match, possibly with text around it).

    Raises SignalError naming the fault: no signal, an unknown name, missing or extra
    arguments, a result outside RESULTS, a non-numeric MEASUREMENT.
    """
    match = SIGNAL_PATTERN.search(text)
    if match is None:
        raise SignalError(f"no LAVA signal in {text!r}")
    return _from_match(match)


def _from_match(match: re.Match[str]) -> Signal:
    text = match.group(0)
    runner = match.group("lava_runner")
    if runner is not None:
        if runner == "EXIT":
            return RunnerExit()
        if runner == "INSTALL_FAIL":
            return InstallFail()
        raise SignalError(f"unknown signal {text!r}: LAVA_TEST_RUNNER takes EXIT or INSTALL_FAIL")
    name = match.group("lava_signal")
    args = match.group("lava_args") or ""
    if name in ("STARTRUN", "ENDRUN"):
        run, uuid = _words(name, args, 2, "2 arguments: test run name, uuid", text)
        return StartRun(run, uuid) if name == "STARTRUN" else EndRun(run, uuid)
    if name in ("STARTTC", "ENDTC"):
        (case,) = _words(name, args, 1, "1 argument: the test case name", text)
        return StartCase(case) if name == "STARTTC" else EndCase(case)
    if name == "TESTCASE":
        return _case_result(args, text)
    if name == "TESTSET":
        return _test_set(args, text)
    if name == "TESTREFERENCE":
        return _reference(args, text)
    if name == "TESTRAISE":
        return Raise(_message(name, args, text))
    if name == "TESTEVENT":
        return Event(_message(name, args, text))
    if name == "TESTFEEDBACK":
        (namespace,) = _words(name, args, 1, "1 argument: the namespace", text)
        return Feedback(namespace)
    raise SignalError(
        f"unknown signal {text!r}; known: STARTRUN, ENDRUN, STARTTC, ENDTC, TESTCASE, "
        "TESTSET, TESTREFERENCE, TESTRAISE, TESTEVENT, TESTFEEDBACK, LAVA_TEST_RUNNER"
    )


def scan(text: str, errors: list[SignalError] | None = None) -> list[Signal]:
    """Every signal in ``text`` (a whole console log), in order.

    A malformed signal raises SignalError, unless ``errors`` is given: then it is appended
    there and skipped, so one bad line does not hide the rest of a log.
    """
    signals = []
    for match in SIGNAL_PATTERN.finditer(text):
        try:
            signals.append(_from_match(match))
        except SignalError as exc:
            if errors is None:
                raise
            errors.append(exc)
    return signals


class TestRunParser:
    """Turn the signals of one test action into Results.

    ``feed(signal, at)`` takes one signal (``at``: when it was seen, in seconds, e.g.
    ``time.monotonic()`` or ``results.log.dt_seconds(record.dt)``; optional) and returns the
    results it completes:

    - TESTCASE / TESTREFERENCE -> a result in suite = the test run name as LAVA names it
      (``0_smoke-tests``: the definition's index in the test action, "_", its name), in the
      current test set, with measurement and units (units only with a measurement, as LAVA),
      duration from STARTTC/ENDTC when both were timed; a reference goes to extra.reference;
    - ENDRUN -> ``lava``/<run name> pass, with the run's duration and extra.uuid;
    - a run that does not end (a failing step under ``set -e``, TESTRAISE, the runner exiting,
      the next STARTRUN, or ``finish()``) -> ``lava``/<run name> fail, as LAVA marks an
      unfinished test run failed.

    Case, set and units text from the board goes through ``clean_name()`` (control characters
    become ``_ctrl-char_``). State for the caller: ``raised`` (the TESTRAISE message: raise a
    TestError), ``events`` (TESTEVENT messages), ``exited`` (runner exit seen),
    ``install_failed``, ``errors`` (malformed signals seen by ``feed_text``).
    """

    __test__ = False  # not a pytest test class, despite the name

    def __init__(self, job: str, level: str) -> None:
        self.job = job
        self.level = level
        self.run: str | None = None
        self.uuid: str | None = None
        self.set: str | None = None
        self.raised: str | None = None
        self.exited = False
        self.install_failed = False
        self.events: list[str] = []
        self.errors: list[SignalError] = []
        self._run_at: float | None = None
        self._case_at: dict[str, float] = {}
        self._case_duration: dict[str, float] = {}

    def feed(self, signal: Signal, at: float | None = None) -> list[Result]:
        """Consume one signal; return the results it completes (often none).

        Raises SignalError for a result signal outside a test run (no STARTRUN before it).
        """
        if isinstance(signal, CaseResult | Reference):
            return [self._case(signal)]
        if isinstance(signal, EndRun):
            results = self._close_run(at) if self.run is not None and self.run != signal.run else []
            duration = at - self._run_at if at is not None and self._run_at is not None else None
            results.append(self._result(LAVA_SUITE, signal.run, "pass", duration=duration, extra={"uuid": signal.uuid}))
            self._reset_run()
            return results
        if isinstance(signal, StartRun):
            results = self._close_run(at)
            self.run, self.uuid, self._run_at = signal.run, signal.uuid, at
            return results
        if isinstance(signal, EndCase):
            started = self._case_at.pop(signal.case, None)
            if at is not None and started is not None:
                self._case_duration[signal.case] = at - started
        elif isinstance(signal, StartCase):
            if at is not None:
                self._case_at[signal.case] = at
        elif isinstance(signal, SetStart):
            self.set = clean_name(signal.set)
        elif isinstance(signal, SetStop):
            self.set = None
        elif isinstance(signal, Event):
            self.events.append(signal.message)
        elif isinstance(signal, Raise):
            self.raised = signal.message
            return self._close_run(at)
        elif isinstance(signal, RunnerExit):
            self.exited = True
            return self._close_run(at)
        elif isinstance(signal, InstallFail):
            self.install_failed = True
        return []

    def feed_text(self, text: str, at: float | None = None) -> list[Result]:
        """Scan console text for signals and feed them all (all seen at ``at``).

        Malformed signals, and result signals outside a run, are collected in ``errors``.
        """
        results: list[Result] = []
        for signal in scan(text, self.errors):
            try:
                results.extend(self.feed(signal, at))
            except SignalError as exc:
                self.errors.append(exc)
        return results

    def finish(self, at: float | None = None) -> list[Result]:
        """End of the test action: a run still open is reported failed."""
        return self._close_run(at)

    def _case(self, signal: CaseResult | Reference) -> Result:
        if self.run is None:
            raise SignalError(f"{signal.text()!r} outside a test run: no STARTRUN before it")
        duration = self._case_duration.pop(signal.case, None)
        if isinstance(signal, Reference):
            return self._result(
                self.run,
                signal.case,
                signal.result,
                set=self.set,
                duration=duration,
                extra={"reference": signal.reference},
            )
        measured = signal.measurement is not None
        return self._result(
            self.run,
            signal.case,
            signal.result,
            set=self.set,
            duration=duration,
            measurement=signal.measurement,
            units=clean_name(signal.units) if measured and signal.units else None,
        )

    def _close_run(self, at: float | None) -> list[Result]:
        if self.run is None:
            return []
        duration = at - self._run_at if at is not None and self._run_at is not None else None
        result = self._result(
            LAVA_SUITE, self.run, "fail", duration=duration, extra={"uuid": self.uuid} if self.uuid else {}
        )
        self._reset_run()
        return [result]

    def _reset_run(self) -> None:
        self.run = self.uuid = self._run_at = self.set = None
        self._case_at.clear()
        self._case_duration.clear()

    def _result(self, suite: str, case: str, result: str, duration: float | None = None, **fields) -> Result:
        if duration is not None:
            duration = round(max(duration, 0.0), 3)
        return Result(
            job=self.job,
            level=self.level,
            suite=clean_name(suite),
            case=clean_name(case),
            result=result,
            duration=duration,
            **fields,
        )
