"""Result records: one test case (or one pipeline action) outcome of a job.

A result is identified by its job id, its level (the pipeline position of the action that
produced it, as LAVA prints it: ``1``, ``1.2``, ``2.4.1``) and its case.

Names we accept (suite, case, set): any non-empty text without whitespace or control
characters. LAVA 2023.01 documents that "whitespace is not allowed in test case name" and its
server replaces control characters in case names by ``_ctrl-char_``; ``clean_name()`` does the
same for names coming from a board, so a strange name never loses a result. Everything else
(``<script>``, quotes, ``/``, non-ASCII) is kept, and escaped where it is shown. (LAVA's server
also drops a test set whose name is not URL-safe; we keep it, as any other name.) The suite of
a test definition's results is its test run name, ``0_smoke-tests``: LAVA 2023.01 prefixes
the definition's index in the test action and keeps that prefix in the suite name.

Conventions of the reserved ``lava`` suite (built by ``action_result()`` and ``job_result()``):

- one result per pipeline action: suite ``lava``, case = the action name, level = the
  action's level, ``extra = {"duration": "0.12", "level": "1.2", "timeout": 300, ...}``
  (``duration`` is also set as a number);
- one result per test run (test definition), case = the run name (``0_smoke-tests``);
- the final job result: suite ``lava``, case ``job``, level ``JOB_LEVEL`` ("0", which no action
  uses: pipeline levels start at 1), result pass|fail, extra may hold ``error_type`` and
  ``error_msg``.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from results.log import LogRecord

RESULTS = ("pass", "fail", "skip", "unknown")

LAVA_SUITE = "lava"
JOB_CASE = "job"
JOB_LEVEL = "0"

# Patterns as text: re compiles each on first use and caches it (compiling the classes with
# surrogates costs ~1 ms at import, and a job that is only validated creates no result).
_LEVEL = r"\d+(?:\.\d+)*\Z"
# Whitespace (str.isspace), C0/DEL/C1 controls and lone surrogates are refused in names.
_BAD_NAME = r"[\s\x00-\x1f\x7f-\x9f\ud800-\udfff]"
_CTRL = r"[\x00-\x1f\x7f-\x9f\ud800-\udfff]"
# Result fields in the order they are written (bundle, to_dict).
FIELDS = ("job", "level", "suite", "case", "result", "measurement", "units", "set", "duration", "extra")
#: the keys of a ``lvl: results`` log record, LAVA's shape (``definition`` is the suite)
RECORD_KEYS = ("definition", "case", "result", "level", "measurement", "units", "set", "duration", "extra")


def level_key(level: str) -> tuple[int, ...]:
    """Sort key for level strings: numeric per component, so "1.2" < "1.10" < "2"."""
    return tuple(int(part) for part in level.split("."))


def check_name(kind: str, name: Any, case: Any = None) -> None:
    """Raise ValueError unless ``name`` is an acceptable suite/case/set name (see module doc)."""
    where = f" of case {case!r}" if case is not None and kind != "case" else ""
    if not isinstance(name, str) or not name:
        raise ValueError(f"{kind}{where} must be a non-empty string, got {name!r}")
    bad = re.search(_BAD_NAME, name)
    if bad:
        raise ValueError(
            f"{kind} {name!r}{where} contains {bad.group()!r}: names may not contain whitespace or control characters"
        )


def clean_name(name: str) -> str:
    """A name from a board made acceptable the way LAVA's server does it: surrounding
    whitespace stripped, control characters replaced by ``_ctrl-char_``, inner whitespace by
    ``_``. Returns "unnamed" for an empty name."""
    name = re.sub(_CTRL, "_ctrl-char_", name.strip())
    name = re.sub(r"\s", "_", name)
    return name or "unnamed"


def format_number(value: float) -> str:
    """A measurement or duration as text: shortest exact form, ``99.0`` written ``99``."""
    text = repr(float(value))
    return text[:-2] if text.endswith(".0") else text


def _number(kind: str, value: Any, case: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(f"{kind} of case {case!r} must be a number, got {value!r}")
    try:
        number = float(value)
    except ValueError:
        raise ValueError(f"{kind} of case {case!r} must be a number, got {value!r}") from None
    if not math.isfinite(number):
        raise ValueError(f"{kind} of case {case!r} must be a finite number, got {value!r}")
    return number


@dataclass(frozen=True)
class Result:
    """One result of a job. Validated on creation; a clear ValueError names what is wrong.

    ``measurement``/``duration`` accept numbers or numeric strings and are stored as floats;
    ``duration`` is in seconds; ``extra`` holds JSON-like data (strings, numbers, lists...).
    """

    job: str
    level: str
    suite: str
    case: str
    result: str
    measurement: float | None = None
    units: str | None = None
    set: str | None = None
    duration: float | None = None
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_name("case", self.case)
        if self.result not in RESULTS:
            raise ValueError(f"result of case {self.case!r} is {self.result!r}; allowed: {', '.join(RESULTS)}")
        check_name("suite", self.suite, self.case)
        if not isinstance(self.job, str) or not self.job:
            if isinstance(self.job, int) and not isinstance(self.job, bool):
                object.__setattr__(self, "job", str(self.job))
            else:
                raise ValueError(f"job of case {self.case!r} must be a job id, got {self.job!r}")
        if not isinstance(self.level, str) or not re.match(_LEVEL, self.level):
            raise ValueError(
                f"level of case {self.case!r} is {self.level!r}; a level is dotted numbers like 1, 1.2 or 2.4.1"
            )
        if self.suite == LAVA_SUITE and self.case == JOB_CASE and self.level != JOB_LEVEL:
            raise ValueError(f"the lava/job result belongs at level {JOB_LEVEL} (JOB_LEVEL), not {self.level!r}")
        if self.set is not None:
            check_name("set", self.set, self.case)
        if self.units is not None and not isinstance(self.units, str):
            raise ValueError(f"units of case {self.case!r} must be text, got {self.units!r}")
        if self.units is not None and re.search(_CTRL, self.units):
            raise ValueError(f"units of case {self.case!r} contain control characters: {self.units!r}")
        object.__setattr__(self, "measurement", _number("measurement", self.measurement, self.case))
        duration = _number("duration", self.duration, self.case)
        if duration is not None and duration < 0:
            raise ValueError(f"duration of case {self.case!r} must not be negative, got {duration!r}")
        object.__setattr__(self, "duration", duration)
        if not isinstance(self.extra, dict):
            raise ValueError(f"extra of case {self.case!r} must be a mapping, got {self.extra!r}")

    def to_dict(self) -> dict[str, Any]:
        """The result as plain data in FIELDS order, leaving out fields that are None or empty."""
        data: dict[str, Any] = {}
        for name in FIELDS:
            value = getattr(self, name)
            if value is not None and value != {} and value != "":
                data[name] = value
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any], job: str | None = None) -> Result:
        """Build a result from ``to_dict()`` data; ``job`` fills in (or must match) the job id.

        Unknown keys are refused, so a typo in an uploaded bundle is reported, not dropped.
        """
        if not isinstance(data, dict):
            raise ValueError(f"a result must be a mapping, got {data!r}")
        unknown = set(data) - set(FIELDS)
        if unknown:
            raise ValueError(
                f"unknown result field(s) {', '.join(sorted(map(str, unknown)))}; allowed: {', '.join(FIELDS)}"
            )
        missing = [name for name in ("level", "suite", "case", "result") if name not in data]
        if missing:
            raise ValueError(f"result {data!r} lacks {', '.join(missing)}")
        values = dict(data)
        if job is not None:
            if "job" in values and str(values["job"]) != str(job):
                raise ValueError(f"result of case {values['case']!r} belongs to job {values['job']!r}, not {job!r}")
            values["job"] = str(job)
        elif "job" not in values:
            raise ValueError(f"result of case {values['case']!r} has no job id")
        values["extra"] = values.get("extra") or {}
        for name in ("job", "level"):  # YAML may hand us a number: 12, or 1.2 if unquoted
            if isinstance(values[name], int | float) and not isinstance(values[name], bool):
                values[name] = str(values[name])
        return cls(**values)

    def to_record(self) -> dict[str, Any]:
        """The ``msg`` of this result's ``lvl: results`` log record, in LAVA's shape: ``definition``
        for the suite, the duration as text with two decimals, the job result's ``error_type`` and
        ``error_msg`` beside its result rather than in ``extra``."""
        msg: dict[str, Any] = {"definition": self.suite, "case": self.case, "result": self.result,
                               "level": self.level}
        if self.measurement is not None:
            msg["measurement"] = self.measurement
        if self.units:
            msg["units"] = self.units
        if self.set:
            msg["set"] = self.set
        if self.duration is not None:
            msg["duration"] = f"{self.duration:.2f}"
        if self.extra:
            if self.is_job_result:
                msg.update(self.extra)
            else:
                msg["extra"] = self.extra
        return msg

    @classmethod
    def from_record(cls, msg: Any, job: int | str) -> Result:
        """The result of a ``lvl: results`` log record of job ``job``, written by
        :meth:`to_record` or by LAVA. Keys outside RECORD_KEYS (the ``error_type`` and
        ``error_msg`` of ``lava/job``) go to ``extra``; a record without a level
        (``lava/validate``) gets JOB_LEVEL; a case name from a board is cleaned
        (:func:`clean_name`). Raises ValueError for a record that is not a valid result."""
        if not isinstance(msg, dict):
            raise ValueError(f"a results record is a mapping, not {type(msg).__name__}")
        raw_extra = msg.get("extra")
        extra = dict(raw_extra) if isinstance(raw_extra, dict) else {}
        if raw_extra is not None and not isinstance(raw_extra, dict):
            extra["extra"] = raw_extra
        for key, value in msg.items():
            if key not in RECORD_KEYS:
                extra[str(key)] = value
        level = msg.get("level")
        return cls(job=str(job), level=JOB_LEVEL if level in (None, "") else str(level),
                   suite=str(msg.get("definition") or LAVA_SUITE), case=clean_name(str(msg.get("case") or "")),
                   result=str(msg.get("result")), measurement=msg.get("measurement"), units=msg.get("units"),
                   set=msg.get("set"), duration=msg.get("duration"), extra=extra)

    @property
    def is_job_result(self) -> bool:
        """True for the job's final result (suite lava, case job)."""
        return self.suite == LAVA_SUITE and self.case == JOB_CASE


def action_result(
    job: str, level: str, name: str, result: str, duration: float, timeout: float | None = None, **extra: Any
) -> Result:
    """The ``lava`` suite result of one pipeline action (the convention in the module doc)."""
    data: dict[str, Any] = {"duration": f"{duration:.2f}", "level": level}
    if timeout is not None:
        data["timeout"] = int(timeout) if float(timeout).is_integer() else timeout
    data.update(extra)
    return Result(
        job=job, level=level, suite=LAVA_SUITE, case=name, result=result, duration=round(duration, 2), extra=data
    )


def job_result(job: str, result: str, error_type: str | None = None, error_msg: str | None = None) -> Result:
    """The job's final ``lava``/``job`` result (pass or fail), at level JOB_LEVEL."""
    if result not in ("pass", "fail"):
        raise ValueError(f"the job result is {result!r}; allowed: pass, fail")
    extra = {}
    if error_type:
        extra["error_type"] = error_type
    if error_msg:
        extra["error_msg"] = error_msg
    return Result(job=job, level=JOB_LEVEL, suite=LAVA_SUITE, case=JOB_CASE, result=result, extra=extra)


def results_in_lines(job_id: int | str, lines: Iterable[str]) -> list[Result]:
    """The results of the ``results`` records among ``output.yaml`` lines, in order. Invalid ones
    are logged and skipped (deterministically: the same lines always give the same results)."""
    found: list[Result] = []
    for line in lines:
        if "results" not in line:
            continue
        try:
            record = LogRecord.from_line(line)
        except ValueError:
            continue
        if record.lvl != "results":
            continue
        try:
            found.append(Result.from_record(record.msg, job_id))
        except (ValueError, TypeError) as exc:
            logging.getLogger("pumice.results").warning("job %s: results record skipped (%s): %s", job_id, exc,
                                                       line[:200])
    return found
