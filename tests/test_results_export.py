"""JUnit XML, TAP 13 and CSV exports: golden files, and each checked by a reader of its format."""

from __future__ import annotations

import csv
import io
import re
import xml.etree.ElementTree as ET

import pytest
import yaml
from golden import check_golden
from test_results_samples import sample_results

from results.export import CSV_COLUMNS, to_csv, to_junit, to_tap13
from results.record import Result, level_key


def ordered() -> list[Result]:
    return sorted(sample_results(), key=lambda r: level_key(r.level))


def test_golden_exports() -> None:
    results = sample_results()
    check_golden("results/junit.xml", to_junit("42", results))
    check_golden("results/results.tap", to_tap13("42", results))
    check_golden("results/results.csv", to_csv("42", results))


def test_junit_is_valid_xml_with_the_right_counts() -> None:
    text = to_junit("42", sample_results())
    root = ET.fromstring(text.encode("utf-8"))
    assert root.tag == "testsuites" and root.get("name") == "job 42"
    suites = {suite.get("name"): suite for suite in root.findall("testsuite")}
    assert list(suites) == ["lava", "0_smoke-tests", "1_measure", "2_odd<names>"]
    smoke = suites["0_smoke-tests"]
    assert (smoke.get("tests"), smoke.get("failures"), smoke.get("skipped")) == ("5", "1", "2")
    assert root.get("tests") == str(len(sample_results()))
    cases = {case.get("name"): case for case in root.iter("testcase")}
    assert cases["linux-posix-uname"].find("failure") is not None
    assert cases["skipped"].find("skipped").get("message") == "skip"
    assert cases["dns"].find("skipped").get("message") == "result unknown"
    assert cases["dns"].get("classname") == "0_smoke-tests.network"
    assert cases["linux-posix-pwd"].get("time") == "0.012"
    props = {p.get("name"): p.get("value") for p in cases["dd-speed"].iter("property")}
    assert props == {"measurement": "123456.789", "units": "MB/s"}
    assert cases["<script>alert('x')</script>"].get("classname") == "2_odd<names>.=cmd|'/c_calc'!A1"
    assert "\\ufffe" in [name for name in cases if name.startswith("non-BMP")][0]  # forbidden in XML 1.0
    failure = cases["job"].find("failure")
    assert failure.get("type") == "TestError"
    assert failure.get("message") == 'lava-test-raise: "boom"\nsecond line <b>&\\x1b[0m\\x00'
    assert "<script>" not in text and "\x00" not in text and "\x1b" not in text


def check_tap13(text: str) -> list[tuple[bool, int, str, str, dict | None]]:
    """A tiny TAP 13 reader: version, plan, numbered test lines, YAML diagnostic blocks."""
    lines = text.split("\n")
    assert lines.pop() == "", "TAP ends with a newline"
    assert lines[0] == "TAP version 13"
    plan = re.fullmatch(r"1\.\.(\d+)", lines[1])
    assert plan, lines[1]
    tests = []
    i = 2
    while i < len(lines):
        match = re.fullmatch(r"(ok|not ok) (\d+) - ((?:[^#\\]|\\[#\\])*?)(?: # (SKIP|TODO)(?: .*)?)?", lines[i])
        assert match, f"not a TAP test line: {lines[i]!r}"
        assert "\r" not in lines[i]
        diagnostics = None
        if i + 1 < len(lines) and lines[i + 1] == "  ---":
            end = lines.index("  ...", i + 2)
            block = lines[i + 2 : end]
            assert all(line.startswith("  ") for line in block)
            diagnostics = yaml.safe_load("\n".join(line[2:] for line in block))
            i = end
        tests.append((match.group(1) == "ok", int(match.group(2)), match.group(3), match.group(4) or "", diagnostics))
        i += 1
    assert [number for _, number, *_ in tests] == list(range(1, int(plan.group(1)) + 1))
    return tests


def test_tap13_reads_back() -> None:
    results = ordered()
    tests = check_tap13(to_tap13("42", results))
    assert len(tests) == len(results)
    for (ok, _, description, directive, diagnostics), result in zip(tests, results, strict=True):
        expected_ok = result.result in ("pass", "skip")
        assert ok is expected_ok, result
        assert directive == {"skip": "SKIP", "unknown": "TODO"}.get(result.result, "")
        unescaped = re.sub(r"\\([#\\])", r"\1", description)
        assert unescaped.startswith(result.suite + "/")
        if result.measurement is not None:
            assert diagnostics["measurement"] == result.measurement
            assert diagnostics["units"] == result.units
        if result.is_job_result:
            assert diagnostics["error_msg"] == result.extra["error_msg"]


def test_csv_reads_back() -> None:
    results = ordered()
    rows = list(csv.reader(io.StringIO(to_csv("42", results))))
    assert (
        tuple(rows[0])
        == CSV_COLUMNS
        == ("job", "level", "suite", "set", "case", "result", "measurement", "units", "duration")
    )
    assert len(rows) == len(results) + 1
    for row, result in zip(rows[1:], results, strict=True):
        record = dict(zip(CSV_COLUMNS, row, strict=True))
        assert (record["job"], record["level"], record["result"]) == (result.job, result.level, result.result)
        assert record["case"] == result.case
        assert record["measurement"] == ("" if result.measurement is None else record["measurement"])
        if result.measurement is not None:
            assert float(record["measurement"]) == result.measurement
    odd = [dict(zip(CSV_COLUMNS, row, strict=True)) for row in rows if row[4].startswith("<script>")][0]
    assert odd["set"] == "'=cmd|'/c_calc'!A1"  # a spreadsheet must not run it as a formula


def test_exports_refuse_results_of_another_job() -> None:
    for export in (to_junit, to_tap13, to_csv):
        with pytest.raises(ValueError, match="belongs to job 43, not to job 42"):
            export("42", [Result("43", "1", "s", "c", "pass")])


def test_empty_exports() -> None:
    assert ET.fromstring(to_junit("1", [])).get("tests") == "0"
    assert check_tap13(to_tap13("1", [])) == []
    assert to_csv("1", []) == ",".join(CSV_COLUMNS) + "\n"
