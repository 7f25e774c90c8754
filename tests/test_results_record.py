"""Result records: validation with clear errors, dict round trip, the lava suite conventions."""

from __future__ import annotations

import dataclasses

import pytest
from test_results_samples import sample_results

from results.record import (
    JOB_LEVEL,
    RESULTS,
    Result,
    action_result,
    clean_name,
    format_number,
    job_result,
    level_key,
)


def test_results_are_lavas() -> None:
    assert RESULTS == ("pass", "fail", "skip", "unknown")


def test_to_dict_omits_empty_fields_and_from_dict_restores() -> None:
    result = Result("7", "3.1", "0_smoke-tests", "pwd", "pass")
    assert result.to_dict() == {
        "job": "7",
        "level": "3.1",
        "suite": "0_smoke-tests",
        "case": "pwd",
        "result": "pass",
    }
    for result in sample_results():
        data = result.to_dict()
        assert list(data) == [
            name
            for name in (
                "job",
                "level",
                "suite",
                "case",
                "result",
                "measurement",
                "units",
                "set",
                "duration",
                "extra",
            )
            if name in data
        ]
        assert Result.from_dict(data) == result
        del data["job"]
        assert Result.from_dict(data, job="42") == result


def test_numbers_are_normalised() -> None:
    result = Result(12, "1", "s", "c", "pass", measurement="4.50", duration=2)
    assert result.job == "12" and result.measurement == 4.5 and result.duration == 2.0
    assert Result.from_dict({"job": 3, "level": 1.2, "suite": "s", "case": "c", "result": "pass"}).level == "1.2"


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"result": "PASS"}, r"result of case 'c' is 'PASS'; allowed: pass, fail, skip, unknown"),
        ({"result": None}, r"allowed: pass, fail, skip, unknown"),
        ({"case": "two words"}, r"case 'two words' contains ' ': names may not contain whitespace"),
        ({"case": ""}, r"case must be a non-empty string"),
        ({"case": "bell\x07"}, r"contains '\\x07'"),
        ({"suite": "a\tb"}, r"suite 'a\\tb' of case 'c' contains"),
        ({"set": "x y"}, r"set 'x y' of case 'c' contains"),
        ({"level": "1.x"}, r"level of case 'c' is '1.x'; a level is dotted numbers like 1, 1.2 or 2.4.1"),
        ({"level": ""}, r"a level is dotted numbers"),
        ({"measurement": "fast"}, r"measurement of case 'c' must be a number, got 'fast'"),
        ({"measurement": float("nan")}, r"must be a finite number"),
        ({"measurement": True}, r"must be a number"),
        ({"duration": -1}, r"duration of case 'c' must not be negative"),
        ({"units": "m\ns"}, r"units of case 'c' contain control characters"),
        ({"extra": ["x"]}, r"extra of case 'c' must be a mapping"),
        ({"job": ""}, r"job of case 'c' must be a job id"),
        ({"suite": "lava", "case": "job", "level": "4"}, r"the lava/job result belongs at level 0"),
    ],
)
def test_validation_errors_name_the_case_and_what_is_allowed(fields: dict, message: str) -> None:
    values = {"job": "1", "level": "1", "suite": "s", "case": "c", "result": "pass", **fields}
    with pytest.raises(ValueError, match=message):
        Result(**values)


def test_from_dict_errors() -> None:
    with pytest.raises(ValueError, match="unknown result field.*bogus"):
        Result.from_dict({"job": "1", "level": "1", "suite": "s", "case": "c", "result": "pass", "bogus": 1})
    with pytest.raises(ValueError, match="lacks level, result"):
        Result.from_dict({"job": "1", "suite": "s", "case": "c"})
    with pytest.raises(ValueError, match="belongs to job '2', not '1'"):
        Result.from_dict({"job": "2", "level": "1", "suite": "s", "case": "c", "result": "pass"}, job="1")
    with pytest.raises(ValueError, match="has no job id"):
        Result.from_dict({"level": "1", "suite": "s", "case": "c", "result": "pass"})


def test_names_keep_what_is_only_odd() -> None:
    for name in ("<script>", "quotes\"'`", "中文😀", "a/b", "=cmd", "\ufffe", "1.10"):
        assert Result("1", "1", name, name, "pass", set=name).case == name


def test_clean_name_does_what_lavas_server_does() -> None:
    assert clean_name("  ok  ") == "ok"
    assert clean_name("a\x1bb") == "a_ctrl-char_b"
    assert clean_name("two words") == "two_words"
    assert clean_name("") == "unnamed"
    Result("1", "1", "s", clean_name("x\x00 y\x7f\x85"), "pass")


def test_level_key_sorts_numerically() -> None:
    levels = ["2", "1.10", "0", "1.2", "10", "1", "2.4.1"]
    assert sorted(levels, key=level_key) == ["0", "1", "1.2", "1.10", "2", "2.4.1", "10"]


def test_format_number() -> None:
    assert [format_number(x) for x in (99.0, 4.25, -0.5, 1e-7, 123456.789, 0)] == [
        "99",
        "4.25",
        "-0.5",
        "1e-07",
        "123456.789",
        "0",
    ]


def test_lava_suite_helpers() -> None:
    action = action_result("9", "1.2", "http-download", "pass", 0.1234, 300, namespace="common")
    assert action.suite == "lava" and action.case == "http-download" and action.level == "1.2"
    assert action.duration == 0.12
    assert action.extra == {"duration": "0.12", "level": "1.2", "timeout": 300, "namespace": "common"}
    final = job_result("9", "fail", "InfrastructureError", "power on failed")
    assert final.level == JOB_LEVEL == "0" and final.is_job_result
    assert final.extra == {"error_type": "InfrastructureError", "error_msg": "power on failed"}
    assert job_result("9", "pass").extra == {}
    with pytest.raises(ValueError, match="the job result is 'skip'; allowed: pass, fail"):
        job_result("9", "skip")


def test_log_records_become_results() -> None:
    """A ``lvl: results`` record, as pumice-run or LAVA writes it, read back as a Result."""
    case = Result.from_record({"definition": "0_smoke", "case": "boot-time", "result": "pass", "level": "3.1",
                               "measurement": 1.5, "units": "s", "set": "net", "duration": "0.25",
                               "extra": {"k": "v"}}, 5)
    assert (case.job, case.level, case.suite, case.case, case.result) == ("5", "3.1", "0_smoke", "boot-time", "pass")
    assert (case.measurement, case.units, case.set, case.duration, case.extra) == (1.5, "s", "net", 0.25, {"k": "v"})
    job = Result.from_record({"definition": "lava", "case": "job", "result": "fail", "level": "0",
                              "error_type": "Job", "error_msg": "boom"}, 5)
    assert job.is_job_result and job.extra == {"error_type": "Job", "error_msg": "boom"}
    # pumice-run's validate result has no level
    assert Result.from_record({"definition": "lava", "case": "validate", "result": "pass"}, 5).level == JOB_LEVEL
    # a case name from a board with spaces is cleaned as LAVA's server does
    assert Result.from_record({"definition": "x", "case": "a b", "result": "pass", "level": "1"}, 5).case == "a_b"
    assert Result.from_record({"definition": "x", "case": "c", "result": "pass", "level": "1",
                               "extra": "odd"}, 5).extra == {"extra": "odd"}
    with pytest.raises(ValueError, match="result of case 'c' is 'maybe'"):
        Result.from_record({"definition": "x", "case": "c", "result": "maybe", "level": "1"}, 5)
    with pytest.raises(ValueError, match="a results record is a mapping, not list"):
        Result.from_record(["pass"], 5)


def test_results_round_trip_through_log_records() -> None:
    """to_record writes LAVA's shape (the job result's error beside it, the duration as text with
    two decimals); from_record reads every kind of result back, the same but for that rounding."""
    results = [
        *sample_results("9"),
        action_result("9", "1.2", "http-download", "pass", 0.1234, 300, namespace="common"),
        job_result("9", "fail", "InfrastructureError", "power on failed"),
        Result("9", "3.1", "lava", "0_smoke", "pass", duration=1.234, extra={"uuid": "9_1.0"}),
    ]
    for result in results:
        duration = None if result.duration is None else round(result.duration, 2)
        assert Result.from_record(result.to_record(), "9") == dataclasses.replace(result, duration=duration)
    assert job_result("9", "fail", "Job", "boom").to_record() == {
        "definition": "lava", "case": "job", "result": "fail", "level": "0", "error_type": "Job", "error_msg": "boom"}
    assert results[-1].to_record() == {"definition": "lava", "case": "0_smoke", "result": "pass", "level": "3.1",
                                       "duration": "1.23", "extra": {"uuid": "9_1.0"}}
