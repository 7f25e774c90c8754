"""Results as JUnit XML, TAP version 13 and CSV, for CI systems and spreadsheets.

Results are written in level order (as in the bundle), each format escaping what it must:

- JUnit: one ``<testsuite>`` per suite (in order of first appearance), ``<testcase
  name=case classname=suite[.set]>``; ``fail`` -> ``<failure>``, ``skip`` -> ``<skipped>``,
  ``unknown`` -> ``<skipped message="result unknown">`` (JUnit has no such state and it is not
  a failure in LAVA either); measurement, units, set and a reference go to ``<properties>``.
  Characters XML 1.0 forbids (most C0 controls, U+FFFE/U+FFFF, lone surrogates) are written
  as visible ``\\xNN``/``\\uNNNN`` text; the rest is escaped by the XML writer.
- TAP 13: ``ok N - suite/case``; skip -> ``# SKIP``, unknown -> ``not ok .. # TODO result
  unknown``; a YAML diagnostics block (``---`` .. ``...``) carries measurement, units,
  duration, set, and the error of a failed job. ``#`` and ``\\`` in descriptions are escaped
  with a backslash, control characters as visible escapes.
- CSV: the columns of ``CSV_COLUMNS``, RFC 4180 quoting by the csv module. A text cell that
  a spreadsheet would run as a formula (starting with ``= + - @``, tab or CR) gets a leading
  ``'`` (OWASP's advice); numbers are left alone.
"""

from __future__ import annotations

import csv
import io
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterable

from results.log import encode_value
from results.record import Result, format_number, level_key

CSV_COLUMNS = ("job", "level", "suite", "set", "case", "result", "measurement", "units", "duration")

_XML_FORBIDDEN = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff\ufeff\ufffe\uffff]")


def _visible(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def _xml_text(value: object) -> str:
    return _XML_FORBIDDEN.sub(_visible, str(value))


def _ordered(results: Iterable[Result]) -> list[Result]:
    return sorted(results, key=lambda result: level_key(result.level))  # stable within a level


def _check_job(job: str, results: list[Result]) -> None:
    for result in results:
        if result.job != str(job):
            raise ValueError(f"result {result.suite}/{result.case} belongs to job {result.job}, not to job {job}")


def to_junit(job: str, results: Iterable[Result]) -> str:
    """JUnit XML for the job's results (see the module doc for the mapping)."""
    ordered = _ordered(results)
    _check_job(job, ordered)
    suites: dict[str, list[Result]] = {}
    for result in ordered:
        suites.setdefault(result.suite, []).append(result)
    root = ET.Element("testsuites", name=_xml_text(f"job {job}"))
    totals = {"tests": 0, "failures": 0, "skipped": 0}
    for suite, cases in suites.items():
        element = ET.SubElement(root, "testsuite", name=_xml_text(suite))
        counts = {"tests": len(cases), "failures": 0, "errors": 0, "skipped": 0}
        time = 0.0
        for result in cases:
            classname = f"{suite}.{result.set}" if result.set else suite
            case = ET.SubElement(element, "testcase", name=_xml_text(result.case), classname=_xml_text(classname))
            if result.duration is not None:
                case.set("time", format_number(result.duration))
                time += result.duration
            properties = [
                (name, getattr(result, name))
                for name in ("measurement", "units", "set")
                if getattr(result, name) is not None
            ]
            if "reference" in result.extra:
                properties.append(("reference", result.extra["reference"]))
            if properties:
                holder = ET.SubElement(case, "properties")
                for name, value in properties:
                    text = format_number(value) if isinstance(value, float) else value
                    ET.SubElement(holder, "property", name=name, value=_xml_text(text))
            if result.result == "fail":
                counts["failures"] += 1
                failure = ET.SubElement(case, "failure", message="fail", type="fail")
                error = result.extra.get("error_msg")
                if error is not None:
                    failure.set("type", _xml_text(result.extra.get("error_type", "fail")))
                    failure.set("message", _xml_text(error))
                    failure.text = _xml_text(error)
            elif result.result in ("skip", "unknown"):
                counts["skipped"] += 1
                message = "skip" if result.result == "skip" else "result unknown"
                ET.SubElement(case, "skipped", message=message)
        for name, value in counts.items():
            element.set(name, str(value))
        element.set("time", format_number(round(time, 3)))
        for name in totals:
            totals[name] += counts[name]
    for name, value in totals.items():
        root.set(name, str(value))
    ET.indent(root)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"


_TAP_ESCAPE = re.compile(r"[\\#]")


def _tap_text(value: str) -> str:
    return _TAP_ESCAPE.sub(lambda match: "\\" + match.group(), _CONTROL.sub(_visible, value))


def to_tap13(job: str, results: Iterable[Result]) -> str:
    """TAP version 13 for the job's results (see the module doc for the mapping)."""
    ordered = _ordered(results)
    _check_job(job, ordered)
    out = ["TAP version 13", f"1..{len(ordered)}"]
    for number, result in enumerate(ordered, 1):
        description = _tap_text(f"{result.suite}/{result.case}")
        if result.result == "pass":
            line = f"ok {number} - {description}"
        elif result.result == "skip":
            line = f"ok {number} - {description} # SKIP"
        elif result.result == "unknown":
            line = f"not ok {number} - {description} # TODO result unknown"
        else:
            line = f"not ok {number} - {description}"
        out.append(line)
        diagnostics = {}
        if result.measurement is not None:
            diagnostics["measurement"] = result.measurement
            if result.units is not None:
                diagnostics["units"] = result.units
        if result.duration is not None:
            diagnostics["duration"] = result.duration
        if result.set is not None:
            diagnostics["set"] = result.set
        for key in ("error_type", "error_msg", "reference"):
            if key in result.extra:
                diagnostics[key] = result.extra[key]
        if diagnostics:
            out.append("  ---")
            # JSON scalars are YAML flow scalars: every value stays on its one line
            out.extend(f"  {key}: {encode_value(value)}" for key, value in diagnostics.items())
            out.append("  ...")
    return "\n".join(out) + "\n"


_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def _csv_text(value: str | None) -> str:
    if value is None:
        return ""
    return "'" + value if value.startswith(_FORMULA_START) else value


def to_csv(job: str, results: Iterable[Result]) -> str:
    """CSV with the header CSV_COLUMNS, one row a result."""
    ordered = _ordered(results)
    _check_job(job, ordered)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for result in ordered:
        writer.writerow(
            [
                _csv_text(result.job),
                result.level,
                _csv_text(result.suite),
                _csv_text(result.set),
                _csv_text(result.case),
                result.result,
                "" if result.measurement is None else format_number(result.measurement),
                _csv_text(result.units),
                "" if result.duration is None else format_number(result.duration),
            ]
        )
    return buffer.getvalue()
