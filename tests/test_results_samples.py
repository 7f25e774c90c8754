"""Sample records shared by the results/ tests (import from here), with a sanity test."""

from __future__ import annotations

from results.record import Result, action_result, job_result

# Messages a board or a user can produce: every one must survive every format.
NASTY = [
    "",
    "plain text",
    "  leading and trailing spaces  ",
    "tab\there",
    "lone\rcarriage return",
    "crlf\r\nline",
    "newline\nin the middle",
    "C0 \x00\x01\x07\x08\x0b\x0c\x1b[31mred\x1b[0m\x1f",
    "DEL \x7f and C1 \x80\x85\x9f",
    "non-characters \ufffe \uffff and BOM \ufeff",
    "line/paragraph separators \u2028 \u2029",
    "non-BMP 😀 \U0001f600 \U0010ffff",
    "lone surrogates \ud800 \udfff",
    "<script>alert('x')</script>",
    "quotes \" ' ` and backslashes \\ \\\\ \\n \\u0041",
    "YAML syntax: - [a, b] {c: d} & * ! | > % @ ` # comment",
    "key: value",
    "- item",
    "'single' \"double\"",
    "null",
    "~",
    "yes",
    "1.10",
    "0x1F",
    '=HYPERLINK("http://x")',
    "é ü ß 中文 العربية",
    "\x00",
    " ",
    "end with backslash \\",
    '{"dt": "fake"}',
]


def sample_results(job: str = "42") -> list[Result]:
    """A realistic job: pipeline action results, test runs with sets and measurements, odd names."""
    return [
        action_result(job, "1", "tftp-deploy", "pass", 2.3456, 300),
        action_result(job, "1.1", "download-retry", "pass", 1.2, 300),
        action_result(job, "1.2", "prepare-tftp-overlay", "pass", 0.5, 300, namespace="common"),
        action_result(job, "1.10", "deploy-device-env", "pass", 0.01, 300),
        action_result(job, "2", "uboot-action", "pass", 25.0, 600),
        action_result(job, "2.4.1", "auto-login-action", "pass", 7.25, 120),
        Result(job, "3.1", "0_smoke-tests", "linux-posix-pwd", "pass", duration=0.012),
        Result(job, "3.1", "0_smoke-tests", "linux-posix-uname", "fail"),
        Result(job, "3.1", "0_smoke-tests", "skipped", "skip"),
        Result(job, "3.1", "0_smoke-tests", "dns", "unknown", set="network"),
        Result(job, "3.1", "0_smoke-tests", "ping", "pass", set="network", duration=1.0),
        Result(job, "3.1", "1_measure", "boot-time", "pass", measurement=4.25, units="seconds"),
        Result(job, "3.1", "1_measure", "dd-speed", "pass", measurement=123456.789, units="MB/s"),
        Result(job, "3.1", "1_measure", "load", "fail", measurement=-0.5, units="load"),
        Result(job, "3.1", "1_measure", "bottles", "pass", measurement=99, units="bottles"),
        Result(
            job,
            "3.1",
            "1_measure",
            "kernel-log",
            "pass",
            extra={"reference": "http://example.org/a?b=1&c=<2>"},
        ),
        Result(job, "3.1", "2_odd<names>", "<script>alert('x')</script>", "fail", set="=cmd|'/c_calc'!A1"),
        Result(job, "3.1", "2_odd<names>", "quotes\"'`#\\", "pass", units='µs"', measurement=1e-7),
        Result(job, "3.1", "2_odd<names>", "non-BMP😀中文\ufffe", "skip"),
        action_result(job, "3.1", "lava-test-shell", "fail", 61.0, 3600),
        job_result(job, "fail", "TestError", 'lava-test-raise: "boom"\nsecond line <b>&\x1b[0m\x00'),
    ]


def test_samples_are_valid_results() -> None:
    results = sample_results()
    assert len({(r.level, r.suite, r.case) for r in results}) == len(results)
    assert results[-1].is_job_result and results[-1].level == "0"
    assert all(r.job == "42" for r in results)
