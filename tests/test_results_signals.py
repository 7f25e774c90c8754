"""Console signals: regex, parser, errors, and the test run parser over a recorded console.

``golden/results/console-lava-test-shell.txt`` is a real console recording (a pty, so CRLF
line ends and a terminal query escape): LAVA 2023.01's own test shell helpers
(``lava-test-runner``, ``lava-test-case``...) run by busybox ash over three definitions built
like LAVA's run.sh (``set -e``/``set -x``), one of them failing half-way. Paths were rewritten
to /lava-7. It is test input, never regenerated.
"""

from __future__ import annotations

import re
from datetime import datetime, timedelta

import pexpect
import pytest
from golden import GOLDEN_DIR, check_golden

from results.bundle import dump_bundle
from results.log import LogRecord, dt_seconds
from results.logfile import LogFile
from results.record import Result
from results.signals import (
    SIGNAL_PATTERN,
    SIGNAL_RE,
    SIGNAL_RE_BYTES,
    CaseResult,
    EndCase,
    EndRun,
    Event,
    Feedback,
    InstallFail,
    Raise,
    Reference,
    RunnerExit,
    SetStart,
    SetStop,
    Signal,
    SignalError,
    StartCase,
    StartRun,
    TestRunParser,
    parse_signal,
    scan,
)

TRANSCRIPT = GOLDEN_DIR / "results" / "console-lava-test-shell.txt"

SIGNALS = [
    ("<LAVA_SIGNAL_STARTRUN 0_smoke-tests 7_1.4.2.1>", StartRun("0_smoke-tests", "7_1.4.2.1"), "STARTRUN"),
    ("<LAVA_SIGNAL_ENDRUN 0_smoke-tests 7_1.4.2.1>", EndRun("0_smoke-tests", "7_1.4.2.1"), "ENDRUN"),
    ("<LAVA_SIGNAL_STARTTC linux-posix-pwd>", StartCase("linux-posix-pwd"), "STARTTC"),
    ("<LAVA_SIGNAL_ENDTC linux-posix-pwd>", EndCase("linux-posix-pwd"), "ENDTC"),
    ("<LAVA_SIGNAL_TESTCASE TEST_CASE_ID=pwd RESULT=pass>", CaseResult("pwd", "pass"), "TESTCASE"),
    (
        "<LAVA_SIGNAL_TESTCASE TEST_CASE_ID=dd RESULT=fail UNITS=MB/s MEASUREMENT=12.5>",
        CaseResult("dd", "fail", 12.5, "MB/s"),
        "TESTCASE",
    ),
    (
        "<LAVA_SIGNAL_TESTCASE TEST_CASE_ID=n RESULT=skip UNITS=items>",
        CaseResult("n", "skip", None, "items"),
        "TESTCASE",
    ),
    (
        "<LAVA_SIGNAL_TESTCASE TEST_CASE_ID=m RESULT=unknown MEASUREMENT=-3>",
        CaseResult("m", "unknown", -3.0),
        "TESTCASE",
    ),
    ("<LAVA_SIGNAL_TESTSET START network>", SetStart("network"), "TESTSET"),
    ("<LAVA_SIGNAL_TESTSET STOP>", SetStop(), "TESTSET"),
    (
        "<LAVA_SIGNAL_TESTREFERENCE kernel-log pass http://example.org/log?a=1&b=2>",
        Reference("kernel-log", "pass", "http://example.org/log?a=1&b=2"),
        "TESTREFERENCE",
    ),
    ("<LAVA_SIGNAL_TESTRAISE setup failed: no network>", Raise("setup failed: no network"), "TESTRAISE"),
    ("<LAVA_SIGNAL_TESTEVENT boot-done>", Event("boot-done"), "TESTEVENT"),
    ("<LAVA_SIGNAL_TESTFEEDBACK server>", Feedback("server"), "TESTFEEDBACK"),
    ("<LAVA_TEST_RUNNER EXIT>", RunnerExit(), "RUNNER_EXIT"),
    ("<LAVA_TEST_RUNNER INSTALL_FAIL>", InstallFail(), "RUNNER_INSTALL_FAIL"),
]


@pytest.mark.parametrize(("text", "expected", "name"), SIGNALS, ids=[s[0] for s in SIGNALS])
def test_every_signal_parses_and_prints_back(text: str, expected: Signal, name: str) -> None:
    signal = parse_signal(text)
    assert signal == expected and type(signal) is type(expected)
    assert signal.name == name
    assert signal.text() == text
    assert parse_signal(signal.text()) == signal
    assert re.fullmatch(SIGNAL_RE, text)


def test_signals_are_immutable_values() -> None:
    signal = CaseResult("a", "pass")
    assert signal == CaseResult(case="a", result="pass", measurement=None)
    assert len({signal, CaseResult("a", "pass")}) == 1
    assert StartRun("a", "b") != EndRun("a", "b") and not isinstance(EndRun("a", "b"), StartRun)
    with pytest.raises(AttributeError, match="immutable"):
        signal.case = "b"
    with pytest.raises(TypeError, match="missing the argument 'uuid'"):
        StartRun("a")
    assert repr(signal) == "CaseResult(case='a', result='pass', measurement=None, units=None)"


def test_accepted_variants() -> None:
    assert parse_signal("<LAVA_SIGNAL_TESTCASE RESULT=pass test_case_id=x measurement=1e3 units=ms>") == CaseResult(
        "x", "pass", 1000.0, "ms"
    )
    # The key=value reference form (older helpers and our own docs used it).
    assert parse_signal("<LAVA_SIGNAL_TESTREFERENCE TEST_CASE_ID=k RESULT=fail REFERENCE=http://x/?q=1>") == Reference(
        "k", "fail", "http://x/?q=1"
    )
    assert parse_signal("<LAVA_SIGNAL_TESTRAISE  spaced   words >") == Raise("spaced words")
    assert parse_signal("<LAVA_SIGNAL_ENDRUN 1_a 9_3.1\r>") == EndRun("1_a", "9_3.1")
    assert parse_signal("<LAVA_SIGNAL_TESTSET start lower>") == SetStart("lower")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("<LAVA_SIGNAL_TESTCASE TEST_CASE_ID=x>", r"TESTCASE needs RESULT=pass\|fail\|skip\|unknown"),
        ("<LAVA_SIGNAL_TESTCASE RESULT=pass>", r"TESTCASE needs TEST_CASE_ID=<name>"),
        (
            "<LAVA_SIGNAL_TESTCASE TEST_CASE_ID=x RESULT=PASS>",
            r"result 'PASS' is not one of pass, fail, skip, unknown",
        ),
        (
            "<LAVA_SIGNAL_TESTCASE TEST_CASE_ID=x RESULT=pass MEASUREMENT=fast>",
            r"MEASUREMENT 'fast' is not a finite number",
        ),
        ("<LAVA_SIGNAL_TESTCASE TEST_CASE_ID=x RESULT=pass MEASUREMENT=nan>", r"not a finite number"),
        (
            "<LAVA_SIGNAL_TESTCASE TEST_CASE_ID=two words RESULT=pass>",
            r"'words' is not KEY=VALUE \(test case names must not contain whitespace\)",
        ),
        ("<LAVA_SIGNAL_TESTCASE TEST_CASE_ID=x RESULT=pass COLOR=red>", r"unknown TESTCASE key 'COLOR'"),
        ("<LAVA_SIGNAL_TESTCASE TEST_CASE_ID=x RESULT=pass RESULT=fail>", r"RESULT given twice"),
        (
            "<LAVA_SIGNAL_STARTRUN 0_smoke>",
            r"STARTRUN takes 2 arguments: test run name, uuid; got 1: 0_smoke",
        ),
        ("<LAVA_SIGNAL_ENDRUN>", r"ENDRUN takes 2 arguments.*; got none"),
        ("<LAVA_SIGNAL_STARTTC a b>", r"STARTTC takes 1 argument"),
        ("<LAVA_SIGNAL_TESTSET START>", r"TESTSET takes 'START <name>' or 'STOP'"),
        ("<LAVA_SIGNAL_TESTSET PAUSE x>", r"TESTSET takes"),
        ("<LAVA_SIGNAL_TESTREFERENCE x pass>", r"TESTREFERENCE takes 3 arguments"),
        ("<LAVA_SIGNAL_TESTREFERENCE x good http://x>", r"TESTREFERENCE result 'good' is not one of"),
        ("<LAVA_SIGNAL_TESTREFERENCE TEST_CASE_ID=x RESULT=pass>", r"TESTREFERENCE needs REFERENCE"),
        ("<LAVA_SIGNAL_TESTRAISE>", r"TESTRAISE needs a message"),
        ("<LAVA_SIGNAL_TESTEVENT   >", r"TESTEVENT needs a message"),
        ("<LAVA_SIGNAL_BOGUS x>", r"unknown signal.*known: STARTRUN"),
        ("<LAVA_TEST_RUNNER START>", r"LAVA_TEST_RUNNER takes EXIT or INSTALL_FAIL"),
        ("no signal here", r"no LAVA signal"),
    ],
)
def test_malformed_signals_say_what_is_wrong(text: str, message: str) -> None:
    with pytest.raises(SignalError, match=message) as caught:
        parse_signal(text)
    if "signal" in text:
        assert repr(text) in str(caught.value) or text in str(caught.value)


def test_regex_finds_signals_anywhere_but_never_across_lines() -> None:
    text = (
        "noise<LAVA_SIGNAL_STARTTC a>more <LAVA_SIGNAL_ENDTC a>\r\n"
        "<8>[   18.794011] <LAVA_SIGNAL_TESTCASE TEST_CASE_ID=a RESULT=pass>\r\n"
        "<0><LAVA_SIGNAL_TESTEVENT a<b>\n"
        "<LAVA_SIGNAL_TESTCASE TEST_CASE_ID=split\nRESULT=pass>\n"
        "<LAVA_SIGNAL_ENDRUN 0_x\n 1_2>\n"
        "+ echo LAVA_SIGNAL_TESTCASE without bracket\n"
        "<LAVA_TEST_RUNNER EXIT>\r\n"
    )
    assert [m.group(0) for m in SIGNAL_PATTERN.finditer(text)] == [
        "<LAVA_SIGNAL_STARTTC a>",
        "<LAVA_SIGNAL_ENDTC a>",
        "<LAVA_SIGNAL_TESTCASE TEST_CASE_ID=a RESULT=pass>",
        "<LAVA_SIGNAL_TESTEVENT a<b>",
        "<LAVA_TEST_RUNNER EXIT>",
    ]
    for match in SIGNAL_PATTERN.finditer(text):
        assert "\n" not in match.group(0)
    assert scan(text) == [StartCase("a"), EndCase("a"), CaseResult("a", "pass"), Event("a<b"), RunnerExit()]


def test_scan_collects_malformed_signals_when_asked() -> None:
    text = "<LAVA_SIGNAL_STARTTC x>\n<LAVA_SIGNAL_TESTCASE TEST_CASE_ID=x>\n<LAVA_SIGNAL_ENDTC x>\n"
    with pytest.raises(SignalError):
        scan(text)
    errors: list[SignalError] = []
    assert scan(text, errors) == [StartCase("x"), EndCase("x")]
    assert len(errors) == 1 and "RESULT" in str(errors[0])


def test_pexpect_matches_signals_from_a_real_process() -> None:
    script = (
        "printf 'boot noise\\r\\n<LAVA_SIGNAL_STARTTC pwd>\\r\\n/root\\r\\n<LAVA_SIGNAL_ENDTC pwd>\\r\\n'; "
        "printf '<LAVA_SIGNAL_TESTCASE TEST_CASE_ID=pwd RESULT=pass>\\r\\n<LAVA_TEST_RUNNER EXIT>\\r\\n'"
    )
    for pattern, encoding in ((SIGNAL_RE, "utf-8"), (SIGNAL_RE_BYTES, None)):
        child = pexpect.spawn("/bin/sh", ["-c", script], encoding=encoding, timeout=10)
        seen = []
        while child.expect([pattern, pexpect.EOF]) == 0:
            text = child.match.group(0)
            seen.append(parse_signal(text if isinstance(text, str) else text.decode()))
        child.close()
        assert seen == [StartCase("pwd"), EndCase("pwd"), CaseResult("pwd", "pass"), RunnerExit()]


def transcript_lines() -> list[str]:
    return TRANSCRIPT.read_bytes().decode("utf-8").split("\n")


def parse_transcript() -> tuple[TestRunParser, list[Result]]:
    parser = TestRunParser(job="7", level="3.1")
    results = []
    for number, line in enumerate(transcript_lines()):
        results += parser.feed_text(line, at=number * 0.5)  # a line every half second
    results += parser.finish()
    return parser, results


def test_golden_test_run_parser_over_a_recorded_console() -> None:
    parser, results = parse_transcript()
    check_golden("results/console-results.yaml", dump_bundle("7", results))
    by_case = {(r.suite, r.case): r for r in results}
    assert [r.case for r in results if r.suite == "0_smoke-tests"] == [
        "linux-posix-pwd",
        "linux-posix-uname",
        "linux-posix-false",
        "linux-posix-sleep",
        "skipped-case",
        "ping-localhost",
        "dns",
        "kernel-log",
        "kmsg-probed",
    ]
    assert by_case["0_smoke-tests", "linux-posix-false"].result == "fail"
    assert by_case["0_smoke-tests", "linux-posix-pwd"].duration == 1.0  # STARTTC..ENDTC: 2 lines
    assert by_case["0_smoke-tests", "skipped-case"].duration is None
    assert by_case["0_smoke-tests", "ping-localhost"].set == "network"
    assert by_case["0_smoke-tests", "dns"].set == "network" and by_case["0_smoke-tests", "dns"].result == "unknown"
    assert by_case["0_smoke-tests", "kernel-log"].set is None
    assert by_case["0_smoke-tests", "kernel-log"].extra == {"reference": "http://example.org/dmesg.txt?job=7"}
    dd = by_case["1_measure", "dd-speed"]
    assert (dd.measurement, dd.units) == (123456.789, "MB/s")
    assert by_case["1_measure", "count"].units is None  # units without a measurement: dropped, as LAVA
    run = by_case["lava", "0_smoke-tests"]
    assert run.result == "pass" and run.extra == {"uuid": "7_1.4.2.1"} and run.duration > 0
    assert by_case["lava", "1_measure"].result == "pass"
    # The third definition stopped at a failing step (set -e): no ENDRUN, so its run fails.
    assert by_case["2_broken", "before-abort"].result == "pass"
    assert by_case["lava", "2_broken"].result == "fail"
    assert ("2_broken", "never-reached") not in by_case
    assert parser.exited and parser.events == ["boot-done"] and parser.raised is None
    assert [str(e).split(":")[0] for e in parser.errors] == [
        "malformed signal '<LAVA_SIGNAL_TESTCASE TEST_CASE_ID=no-result>'",
        "malformed signal '<LAVA_SIGNAL_TESTCASE TEST_CASE_ID=odd RESULT=maybe>'",
    ]
    assert all(r.job == "7" and r.level == "3.1" for r in results)


def test_parser_over_the_console_logged_as_records(tmp_path) -> None:
    """The master's path: console lines logged as ``target`` records, re-parsed from the log."""
    base = datetime(2023, 1, 10, 10, 0, 0)
    log = LogFile(tmp_path / "output.yaml")
    log.append(
        LogRecord(
            (base + timedelta(seconds=number * 0.5)).isoformat(timespec="microseconds"),
            "target",
            line.rstrip("\r"),
        )
        for number, line in enumerate(transcript_lines())
    )
    parser = TestRunParser(job="7", level="3.1")
    results = []
    for record in log.records():
        if record.lvl == "target":
            results += parser.feed_text(record.msg, at=dt_seconds(record.dt))
    results += parser.finish()
    assert results == parse_transcript()[1]


def test_parser_raise_new_run_and_orphans() -> None:
    parser = TestRunParser(job="1", level="2.1")
    assert parser.feed(StartRun("0_a", "1_2.1.1"), at=10.0) == []
    assert parser.feed(SetStart("s1")) == []
    # A new STARTRUN while a run is open: the open run failed (LAVA would lose it silently).
    failed = parser.feed(StartRun("1_b", "1_2.1.2"), at=12.0)
    assert failed == [Result("1", "2.1", "lava", "0_a", "fail", duration=2.0, extra={"uuid": "1_2.1.1"})]
    assert parser.set is None
    assert parser.feed(CaseResult("c", "pass")) == [Result("1", "2.1", "1_b", "c", "pass")]
    raised = parser.feed(Raise("no network"), at=15.5)
    assert parser.raised == "no network"
    assert raised == [Result("1", "2.1", "lava", "1_b", "fail", duration=3.5, extra={"uuid": "1_2.1.2"})]
    assert parser.finish() == []
    with pytest.raises(SignalError, match="outside a test run: no STARTRUN before it"):
        parser.feed(CaseResult("late", "pass"))
    assert parser.feed_text("<LAVA_SIGNAL_TESTCASE TEST_CASE_ID=late RESULT=pass>") == []
    assert len(parser.errors) == 1
    assert parser.feed(InstallFail()) == [] and parser.install_failed


def test_parser_cleans_board_names() -> None:
    parser = TestRunParser(job="1", level="3")
    parser.feed(StartRun("0_x", "u"))
    parser.feed(SetStart("set\x1b"))
    (result,) = parser.feed(CaseResult("case\x07", "pass", 1.0, "m\x7fs"))
    assert (result.case, result.set, result.units) == ("case_ctrl-char_", "set_ctrl-char_", "m_ctrl-char_s")
