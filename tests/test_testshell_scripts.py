"""The test shell helpers (agent/testshell), run for real under dash and busybox ash."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from results.signals import SIGNAL_PATTERN, CaseResult, Reference, SetStart, SetStop, parse_signal

TESTSHELL = Path(__file__).resolve().parent.parent / "agent" / "testshell"
BUSYBOX = shutil.which("busybox")
DASH = shutil.which("dash")

SHELLS = [
    pytest.param(
        [DASH] if DASH else None,
        id="dash",
        marks=pytest.mark.skipif(DASH is None, reason="dash is not installed"),
    ),
    pytest.param(
        [BUSYBOX, "sh"] if BUSYBOX else None,
        id="busybox-ash",
        marks=pytest.mark.skipif(BUSYBOX is None, reason="busybox is not installed"),
    ),
]


@pytest.fixture(params=SHELLS)
def helper(request, tmp_path: Path):
    """Run one helper script under the shell of the parameter: helper(name, *args) -> result."""
    shell = request.param

    def run(
        name: str, *args: str, env: dict[str, str] | None = None, timeout: float = 20
    ) -> subprocess.CompletedProcess:
        environ = {"PATH": f"{TESTSHELL}:/usr/bin:/bin", "LAVA_RESULT_DIR": str(tmp_path / "run")}
        environ.update(env or {})
        # Output through files, not pipes: a background process keeps a pipe open after the
        # helper returns, as it keeps the board's console.
        with open(tmp_path / "stdout", "w+") as out, open(tmp_path / "stderr", "w+") as err:
            done = subprocess.run(
                [*shell, str(TESTSHELL / name), *args],
                stdout=out,
                stderr=err,
                env=environ,
                timeout=timeout,
                cwd=tmp_path,
            )
            out.seek(0)
            err.seek(0)
            return subprocess.CompletedProcess(done.args, done.returncode, out.read(), err.read())

    run.result_dir = tmp_path / "run"
    return run


def signal_lines(stdout: str) -> list[str]:
    return [line for line in stdout.splitlines() if line.startswith("<LAVA_")]


def test_case_shell_pass_and_fail(helper):
    done = helper("lava-test-case", "uname-ok", "--shell", "echo", "hello", "&&", "true")
    assert done.returncode == 0, done.stderr
    assert done.stdout == (
        "<LAVA_SIGNAL_STARTTC uname-ok>\nhello\n\n<LAVA_SIGNAL_ENDTC uname-ok>\n"
        "<LAVA_SIGNAL_TESTCASE TEST_CASE_ID=uname-ok RESULT=pass>\n"
    )
    done = helper("lava-test-case", "bad", "--shell", "test -d /nonexistent")
    # a failing command is a failed case, not a failed helper (run.sh goes on, as in LAVA)
    assert done.returncode == 0
    assert signal_lines(done.stdout)[-1] == "<LAVA_SIGNAL_TESTCASE TEST_CASE_ID=bad RESULT=fail>"
    assert (helper.result_dir / "results" / "bad" / "result").read_text() == "fail\n"


def test_case_shell_command_is_evaluated(helper):
    """Quotes, pipes and $ in the command work as in LAVA's eval; exit ends the command only."""
    done = helper("lava-test-case", "pipe", "--shell", "echo 'a  b' c | awk '{print $2}'; echo $TEST_CASE_ID")
    assert done.stdout.splitlines()[1:3] == ["b", "pipe"]
    done = helper("lava-test-case", "exits", "--shell", "exit 3")
    assert signal_lines(done.stdout) == [
        "<LAVA_SIGNAL_STARTTC exits>",
        "<LAVA_SIGNAL_ENDTC exits>",
        "<LAVA_SIGNAL_TESTCASE TEST_CASE_ID=exits RESULT=fail>",
    ]


def test_case_output_without_newline_keeps_signal_alone(helper):
    done = helper("lava-test-case", "nonl", "--shell", "printf", "partial")
    assert "partial\n<LAVA_SIGNAL_ENDTC nonl>\n" in done.stdout


@pytest.mark.parametrize(
    ("args", "signal"),
    [
        (["--result", "pass"], "<LAVA_SIGNAL_TESTCASE TEST_CASE_ID=c RESULT=pass>"),
        (
            ["--result", "skip", "--measurement", "42.5", "--units", "ms"],
            "<LAVA_SIGNAL_TESTCASE TEST_CASE_ID=c RESULT=skip UNITS=ms MEASUREMENT=42.5>",
        ),
        (
            ["--units", "MB/s", "--measurement", "-1e3", "--result", "fail"],
            "<LAVA_SIGNAL_TESTCASE TEST_CASE_ID=c RESULT=fail UNITS=MB/s MEASUREMENT=-1e3>",
        ),
        (
            ["--result", "unknown", "--measurement", ".5"],
            "<LAVA_SIGNAL_TESTCASE TEST_CASE_ID=c RESULT=unknown MEASUREMENT=.5>",
        ),
    ],
)
def test_case_result(helper, args, signal):
    done = helper("lava-test-case", "c", *args)
    assert done.returncode == 0, done.stderr
    assert done.stdout == signal + "\n"
    parsed = parse_signal(done.stdout)
    assert isinstance(parsed, CaseResult) and parsed.case == "c"


def test_case_records_fields(helper):
    helper("lava-test-case", "m", "--result", "pass", "--measurement", "3", "--units", "s")
    folder = helper.result_dir / "results" / "m"
    assert {p.name: p.read_text() for p in folder.iterdir()} == {
        "result": "pass\n",
        "measurement": "3\n",
        "units": "s\n",
    }


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "missing TEST_CASE_ID"),
        ([""], "TEST_CASE_ID is empty"),
        (["name"], "needs --shell COMMAND or --result RESULT"),
        (["two words", "--result", "pass"], "contains a blank"),
        (["tab\there", "--result", "pass"], "contains a blank"),
        (["line\nbreak", "--result", "pass"], "contains a blank"),
        (["carriage\rreturn", "--result", "pass"], "contains a blank"),
        (["a<b", "--result", "pass"], "contains a blank, '<' or '>'"),
        (["a=b", "--result", "pass"], "contains '='"),
        (["c", "--result", "passed"], "result 'passed' is not one of: pass, fail, skip, unknown"),
        (["c", "--result"], "--result needs a value"),
        (["c", "--measurement", "5"], "--result must be given"),
        (["c", "--result", "pass", "--measurement", "fast"], "--measurement 'fast' is not a number"),
        (["c", "--result", "pass", "--measurement", "1.2.3"], "is not a number"),
        (["c", "--result", "pass", "--measurement", "1e"], "is not a number"),
        (["c", "--result", "pass", "--units", "m s"], "--units 'm s' contains a blank"),
        (["c", "--result", "pass", "--colour", "red"], "unknown option '--colour'"),
        (["c", "--shell"], "--shell needs a command"),
    ],
)
def test_case_usage_errors(helper, args, message):
    done = helper("lava-test-case", *args)
    assert done.returncode != 0
    assert done.stdout == ""  # no signal at all
    assert message in done.stderr
    assert "usage: lava-test-case" in done.stderr


def test_test_set(helper):
    assert helper("lava-test-set", "start", "network").stdout == "<LAVA_SIGNAL_TESTSET START network>\n"
    assert parse_signal("<LAVA_SIGNAL_TESTSET START network>") == SetStart("network")
    done = helper("lava-test-set", "stop")
    assert done.stdout == "<LAVA_SIGNAL_TESTSET STOP>\n" and parse_signal(done.stdout) == SetStop()
    for args, message in [
        ((), "missing start or stop"),
        (("start",), "start needs a NAME"),
        (("start", "a", "b"), "one word"),
        (("begin", "x"), "unknown command 'begin'"),
    ]:
        done = helper("lava-test-set", *args)
        assert done.returncode != 0 and done.stdout == "" and message in done.stderr


def test_test_reference(helper):
    done = helper("lava-test-reference", "dmesg", "--result", "pass", "--reference", "http://h/x?a=1")
    assert done.stdout == "<LAVA_SIGNAL_TESTREFERENCE dmesg pass http://h/x?a=1>\n"
    assert parse_signal(done.stdout) == Reference("dmesg", "pass", "http://h/x?a=1")
    for args, message in [
        (("x", "--result", "pass"), "--reference must be given"),
        (("x", "--reference", "u"), "--result must be given"),
        (("x", "--result", "ok", "--reference", "u"), "result 'ok'"),
    ]:
        done = helper("lava-test-reference", *args)
        assert done.returncode != 0 and done.stdout == "" and message in done.stderr


def test_test_event_and_feedback(helper):
    assert helper("lava-test-event", "flash done").stdout == "<LAVA_SIGNAL_TESTEVENT flash done>\n"
    assert helper("lava-test-event", "a<b>\nc").stdout == "<LAVA_SIGNAL_TESTEVENT a b  c>\n"
    done = helper("lava-test-event", "two", "args")
    assert done.returncode != 0 and "exactly one MESSAGE" in done.stderr
    assert helper("lava-test-feedback", "--namespace", "host").stdout == "<LAVA_SIGNAL_TESTFEEDBACK host>\n"


def test_raise_stops_later_helpers(helper):
    done = helper("lava-test-raise", "disk", "not", "found")
    assert done.returncode == 1
    assert done.stdout == "\n<LAVA_SIGNAL_TESTRAISE disk not found>\n"
    assert (helper.result_dir / "raised").read_text() == "disk not found\n"
    later = helper("lava-test-case", "after", "--result", "pass")
    assert later.returncode != 0 and later.stdout == ""
    assert "lava-test-raise stopped this test run" in later.stderr
    assert helper("lava-test-raise").returncode != 0


def test_raise_inside_shell_case(helper):
    done = helper("lava-test-case", "probe", "--shell", "lava-test-raise no probe")
    assert done.returncode != 0
    assert signal_lines(done.stdout) == ["<LAVA_SIGNAL_STARTTC probe>", "<LAVA_SIGNAL_TESTRAISE no probe>"]


def test_lava_test_shell_records_status(helper, tmp_path: Path):
    out = tmp_path / "out"
    done = helper("lava-test-shell", "--output_dir", str(out), "sh", "-c", 'echo "$LAVA_RESULT_DIR"; exit 4')
    assert done.returncode == 4
    assert done.stdout == f"{out}\n"
    assert (out / "return_code").read_text() == "4\n"
    assert helper("lava-test-shell", "sh").returncode != 0


def test_background_process(helper, tmp_path: Path):
    """The command keeps running after the helper returns; stop ends it and what it started."""
    marker = tmp_path / "ticks"
    sleeper = tmp_path / "sleeper"
    done = helper(
        "lava-background-process-start",
        "ticker",
        "--cmd",
        f"echo tick >> {marker}; sleep 30 & echo $! > {sleeper}; wait",
    )
    assert done.returncode == 0, done.stderr
    pid = int((helper.result_dir / "results" / "ticker" / "pid").read_text())
    sleep_pid = None
    try:
        deadline = time.monotonic() + 10
        while not sleeper.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert marker.read_text() == "tick\n"
        time.sleep(0.1)  # the pid is written
        sleep_pid = int(sleeper.read_text())
        assert _alive(sleep_pid)
        assert helper("lava-background-process-start", "ticker", "--cmd", "true").returncode != 0
        assert helper("lava-background-process-stop", "ticker").returncode == 0
        deadline = time.monotonic() + 10
        while (_alive(pid) or _alive(sleep_pid)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(pid)
        if shutil.which("setsid"):
            assert not _alive(sleep_pid), "the command's own child survived"
    finally:
        for leftover in (pid, sleep_pid):
            if leftover and _alive(leftover):
                os.kill(leftover, 9)
    done = helper("lava-background-process-stop", "ticker")
    assert done.returncode != 0 and "no background process named 'ticker'" in done.stderr


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie does not: the helper's keeper is not our child to reap)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def test_network_and_system_helpers(helper):
    assert helper("lava-echo-ipv4", "lo").stdout == "127.0.0.1\n"
    assert helper("lava-echo-ipv4", "nosuchif0").stdout == ""
    assert helper("lava-target-ip", env={"TARGET_DEVICE_IP": "10.0.0.5"}).stdout == "10.0.0.5\n"
    assert helper("lava-target-mac", env={"TARGET_DEVICE_MAC": "52:54:00:12:34:56"}).stdout == "52:54:00:12:34:56\n"
    build = helper("lava-os-build").stdout.strip()
    assert build and "\n" not in build
    done = helper("lava-install-packages", "iperf3", "fio")
    assert done.returncode == 0 and "iperf3 fio" in done.stdout


def test_scripts_are_posix_and_executable():
    scripts = sorted(p for p in TESTSHELL.iterdir() if p.name.startswith("lava-"))
    for script in scripts:
        if script.name != "lava-common-functions":
            assert os.access(script, os.X_OK), f"{script.name} is not executable"
            assert script.read_text().startswith("#!/bin/sh\n"), script.name
        assert "set -x" not in script.read_text().replace("set +x", ""), script.name
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (apt-get install shellcheck) for the POSIX check")
    done = subprocess.run(
        ["shellcheck", "-s", "sh", "-e", "SC1090,SC1091,SC2317", *map(str, scripts)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout


LAVA_SCRIPTS = Path("/usr/lib/python3/dist-packages/lava_dispatcher/lava_test_shell")


@pytest.mark.skipif(not LAVA_SCRIPTS.is_dir(), reason="lava-dispatcher (Debian 12) is not installed")
@pytest.mark.parametrize(
    "args",
    [
        ["lava-test-case", "pwd", "--shell", "pwd"],
        ["lava-test-case", "false", "--shell", "false"],
        ["lava-test-case", "m", "--result", "pass", "--measurement", "42.5", "--units", "ms"],
        ["lava-test-case", "m", "--units", "MB/s", "--result", "fail"],
        ["lava-test-case", "m", "--measurement", "7", "--result", "skip"],
        ["lava-test-set", "start", "network"],
        ["lava-test-set", "stop"],
        ["lava-test-reference", "dmesg", "--result", "pass", "--reference", "http://example.com/log"],
        ["lava-test-raise", "board", "on", "fire"],
        ["lava-test-event", "flashed"],
        ["lava-test-feedback", "--namespace", "host"],
    ],
)
def test_signals_match_lava_2023_01(tmp_path: Path, args):
    """Side by side with LAVA's own helpers (run from the Debian package, never copied into
    Pumice): the same call prints the same signals."""
    lava_bin = tmp_path / "lava-bin"
    lava_bin.mkdir()
    for script in LAVA_SCRIPTS.iterdir():
        if script.is_file():
            # LAVA writes the interpreter line when it builds its overlay
            (lava_bin / script.name).write_text("#!/bin/sh\n" + script.read_text())
            (lava_bin / script.name).chmod(0o755)

    def signals(bin_dir: Path) -> list[str]:
        env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "LAVA_RESULT_DIR": str(tmp_path / bin_dir.name)}
        done = subprocess.run(
            [str(bin_dir / args[0]), *args[1:]],
            capture_output=True,
            text=True,
            env=env,
            cwd=tmp_path,
            timeout=20,
        )
        return [match.group(0) for match in SIGNAL_PATTERN.finditer(done.stdout)]

    ours = signals(TESTSHELL)
    assert ours
    assert ours == signals(lava_bin)
