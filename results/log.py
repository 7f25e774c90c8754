"""Log records in LAVA's ``output.yaml`` shape: one flow mapping a line.

A line looks like what LAVA 2023.01 writes::

    - {"dt": "2023-01-10T10:00:00.123456", "lvl": "info", "msg": "start: 1 tftp-deploy"}

We write it as JSON (a JSON object is a YAML flow mapping) with the few characters that YAML
refuses or folds escaped, so that one encoder gives both a fast writer (``json``) and a line any
YAML loader reads back to the same record. LAVA's own lines (``yaml.dump`` in flow style with
double quotes, which may use YAML-only escapes such as ``\\e`` or ``\\U0001f600``) are read
through a YAML fallback.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterator
from datetime import UTC, datetime
from json.encoder import encode_basestring
from os import PathLike
from typing import Any, NamedTuple

LEVELS = ("debug", "info", "warning", "error", "exception", "results", "target", "input", "feedback", "event")

# Characters json.dumps(ensure_ascii=False) leaves raw but YAML will not read back as they
# were: DEL and C1 controls (the reader rejects them), NEL/LS/PS (line breaks that a quoted
# scalar folds), U+FEFF (a BOM), U+FFFE/U+FFFF (non-characters): JSON's \uXXXX escape means
# the same in YAML double-quoted scalars. Lone surrogates are not text at all (UTF-8 cannot
# hold them, libyaml refuses their escapes): they become U+FFFD, as a "replace" decode does.
_YAML_UNSAFE = re.compile("[\x7f-\x9f\u2028\u2029\ufeff\ufffe\uffff\ud800-\udfff]")

_encode_string = encode_basestring  # a str as a JSON string, non-ASCII kept (C speed)
_encode_json = json.JSONEncoder(
    ensure_ascii=False, allow_nan=False, check_circular=False, separators=(", ", ": ")
).encode


# YAML 1.1 reads a number in exponent form as a float only with a dot ("1.0e-07"); JSON writes
# "1e-07". Tokens: a whole JSON string (left alone) or such a number (given its ".0"); the
# latter as text, compiled (and cached) by re when a line first needs it.
_EXPONENT_HINT = re.compile(r"\de[-+]\d")
_STRING_OR_EXPONENT = r'"(?:[^"\\]|\\.)*"|(?<![\d.])(-?\d+)(e[-+]\d+)'


def _dot_exponent(match: re.Match[str]) -> str:
    return match.group() if match.group(1) is None else f"{match.group(1)}.0{match.group(2)}"


def _escape_unsafe(match: re.Match[str]) -> str:
    code = ord(match.group())
    return "\ufffd" if 0xD800 <= code <= 0xDFFF else f"\\u{code:04x}"


def encode_value(value: Any) -> str:
    """One JSON value on one line that also reads back unchanged as YAML.

    Strings, numbers, booleans, None, lists and string-keyed dicts keep their value (lone
    surrogates in strings become U+FFFD); anything
    JSON cannot hold (a set, bytes, NaN...) is written as its ``str()`` instead of failing, so
    a log record or a result's extra never breaks the writer.
    """
    try:
        text = _encode_json(value)
    except (TypeError, ValueError):
        text = _encode_json(_jsonable(value))
    if _YAML_UNSAFE.search(text):
        text = _YAML_UNSAFE.sub(_escape_unsafe, text)
    if _EXPONENT_HINT.search(text):
        text = re.sub(_STRING_OR_EXPONENT, _dot_exponent, text)
    return text


def _jsonable(value: Any) -> Any:
    """A JSON-encodable copy of ``value``: unknown types and non-finite floats become strings."""
    if isinstance(value, str | bool | int | None):
        return value
    if isinstance(value, float):
        return value if value == value and value not in (float("inf"), float("-inf")) else str(value)
    if isinstance(value, dict):
        return {str(key): _jsonable(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(item) for item in value]
    return str(value)


class LogRecord(NamedTuple):
    """One log record: UTC timestamp ``dt``, level ``lvl`` (one of LEVELS) and message ``msg``.

    ``msg`` is text for most levels, a dict for ``results`` records and may be any JSON-like
    value. The level is not checked here (reading a foreign log must not fail on a new level).
    A named tuple (immutable, compact) rather than a dataclass: it is built in a fraction of the
    time at import, which every ``pumice-run`` pays.
    """

    dt: str
    lvl: str
    msg: str | dict | list

    def to_line(self) -> str:
        """The record as one ``output.yaml`` line, newline included (valid YAML and JSON-ish)."""
        msg = self.msg
        if type(msg) is str and type(self.dt) is str and type(self.lvl) is str:
            # The common case (console and dispatcher text), 4x faster than encoding a dict.
            line = (
                f'- {{"dt": {_encode_string(self.dt)}, "lvl": {_encode_string(self.lvl)}, '
                f'"msg": {_encode_string(msg)}}}\n'
            )
            return _YAML_UNSAFE.sub(_escape_unsafe, line) if _YAML_UNSAFE.search(line) else line
        return "- " + encode_value({"dt": self.dt, "lvl": self.lvl, "msg": msg}) + "\n"

    @classmethod
    def from_line(cls, line: str) -> LogRecord:
        """Parse one ``output.yaml`` line (ours or LAVA's); raises ValueError on anything else."""
        text = line.strip()
        if not text.startswith("- "):
            raise ValueError(f"not a log record line (must start with '- '): {_preview(line)}")
        try:
            data = json.loads(text[2:])
        except ValueError:
            data = _yaml_record(text, line)
        if not isinstance(data, dict) or not {"dt", "lvl", "msg"} <= data.keys():
            raise ValueError(f"not a log record (needs dt, lvl and msg): {_preview(line)}")
        dt = data["dt"]
        if isinstance(dt, datetime):  # an unquoted timestamp in a hand-written line
            dt = dt.isoformat(timespec="microseconds")
        return cls(str(dt), str(data["lvl"]), data["msg"])


def _yaml_record(text: str, line: str) -> Any:
    import yaml  # only for lines JSON cannot read (LAVA's own escapes); keeps imports cheap

    from results.fastyaml import SafeLoader

    try:
        data = yaml.load(text, Loader=SafeLoader)
    except yaml.YAMLError as exc:
        raise ValueError(f"not a valid log record line ({exc.__class__.__name__}): {_preview(line)}") from None
    if not isinstance(data, list) or len(data) != 1:
        raise ValueError(f"not a log record line (one '- {{...}}' item expected): {_preview(line)}")
    return data[0]


def _preview(line: str, limit: int = 120) -> str:
    return repr(line if len(line) <= limit else line[:limit] + "...")


def now_dt() -> str:
    """The current UTC time as LAVA writes ``dt``: ISO 8601, no time zone, microseconds always."""
    return datetime.now(UTC).replace(tzinfo=None).isoformat(timespec="microseconds")


def dt_seconds(dt: str) -> float:
    """A record's ``dt`` as POSIX seconds (UTC), for durations between records."""
    return datetime.fromisoformat(dt).replace(tzinfo=UTC).timestamp()


def parse_log(text: str) -> list[LogRecord]:
    """Every record of an ``output.yaml`` text. Blank lines are skipped; a last line without
    its newline that does not parse (a write torn by a crash) is dropped; any other bad line
    raises ValueError naming its line number."""
    lines = text.split("\n")
    torn = lines.pop() if lines else ""
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(LogRecord.from_line(line))
        except ValueError as exc:
            raise ValueError(f"line {number}: {exc}") from None
    if torn.strip():
        with contextlib.suppress(ValueError):  # a torn write: the record was never complete
            records.append(LogRecord.from_line(torn))
    return records


def read_log(path: str | PathLike[str]) -> Iterator[LogRecord]:
    """Iterate over the records of an ``output.yaml`` file (same rules as parse_log)."""
    # newline="\n": split on LF only, as the writer does (a raw CR inside a line stays there)
    with open(path, encoding="utf-8", errors="replace", newline="\n") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                record = LogRecord.from_line(line)
            except ValueError as exc:
                if not line.endswith("\n"):
                    return  # only the last line can lack its newline: a torn write
                raise ValueError(f"{path}:{number}: {exc}") from None
            yield record
