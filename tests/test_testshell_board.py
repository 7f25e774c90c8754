"""A built overlay run for real: lava-test-runner in a busybox chroot (as on a busybox board) and
under dash, checking the exact console signals and that parameters arrive unchanged."""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from agent.overlay import TestDefinition, build_overlay, results_path, stage_command
from results.signals import SIGNAL_PATTERN

BUSYBOX = shutil.which("busybox")
DASH = shutil.which("dash")
CHROOT = shutil.which("chroot") or shutil.which("chroot", path="/usr/sbin:/sbin")

#: values that a naive quoting would break: quotes, $, backquotes, backslashes, newlines, globs
NASTY = {
    "QUOTES": "it's \"quoted\" ''",
    "DOLLARS": "$HOME ${PATH} $(id -u) $1 $$",
    "BACKTICKS": "`echo injected` `",
    "NEWLINES": "line one\nline two\n\n",
    "BACKSLASHES": "a\\b\\\\c\\n\\",
    "MIXED": "-n *.sh ; rm -rf / # \t tab é ü \u2603 '\"`$\\",
}


def smoke_definition() -> dict:
    """Passing, failing, measured cases, a test set, a reference and parameters."""
    return {
        "metadata": {
            "format": "Lava-Test Test Definition 1.0",
            "name": "smoke",
            "description": "the test shell's own smoke test",
        },
        "params": {"GREETING": "from-definition", "KEPT": "default"},
        "run": {
            "steps": [
                "lava-test-case pass-case --shell true",
                "lava-test-case fail-case --shell false",
                "lava-test-set start perf",
                "lava-test-case latency --result pass --measurement 42.5 --units ms",
                "lava-test-set stop",
                "lava-test-reference report --result pass --reference http://example.com/report.html",
                'lava-test-case greeting --shell test "$GREETING" = from-job',
                'lava-test-case kept --shell test "$KEPT" = default',
                "lava-test-case awk --shell \"echo a b | awk '{print $2}' | grep -qx b\"",
                'echo "<LAVA_SIGNAL_TESTCASE TEST_CASE_ID=echoed RESULT=skip>"',
                "printf unterminated",
            ]
        },
    }


def stages() -> list[list[TestDefinition]]:
    broken = {
        "metadata": {"name": "broken"},
        "run": {"steps": ["lava-test-case before --result pass", "false", "lava-test-case never --result pass"]},
    }
    installed = {
        "metadata": {"name": "installed"},
        "install": {"deps": ["fio"], "steps": ["echo ok > installed.txt"]},
        "run": {"steps": ["lava-test-case install-ran --shell grep -qx ok installed.txt"]},
    }
    failed_install = {
        "metadata": {"name": "failed-install"},
        "install": {"steps": ["exit 3"]},
        "run": {"steps": ["lava-test-case never --result pass"]},
    }
    later = {"metadata": {"name": "later"}, "run": {"steps": ["lava-test-case later-case --result pass"]}}
    return [
        [
            TestDefinition("smoke", smoke_definition(), parameters={"GREETING": "from-job"}),
            TestDefinition("broken", broken),
            TestDefinition("installed", installed),
            TestDefinition("failed-install", failed_install),
        ],
        [TestDefinition("later", later)],
    ]


EXPECTED_STAGE_0 = [
    "<LAVA_SIGNAL_STARTRUN 0_smoke 7_0.0>",
    "<LAVA_SIGNAL_STARTTC pass-case>",
    "<LAVA_SIGNAL_ENDTC pass-case>",
    "<LAVA_SIGNAL_TESTCASE TEST_CASE_ID=pass-case RESULT=pass>",
    "<LAVA_SIGNAL_STARTTC fail-case>",
    "<LAVA_SIGNAL_ENDTC fail-case>",
    "<LAVA_SIGNAL_TESTCASE TEST_CASE_ID=fail-case RESULT=fail>",
    "<LAVA_SIGNAL_TESTSET START perf>",
    "<LAVA_SIGNAL_TESTCASE TEST_CASE_ID=latency RESULT=pass UNITS=ms MEASUREMENT=42.5>",
    "<LAVA_SIGNAL_TESTSET STOP>",
    "<LAVA_SIGNAL_TESTREFERENCE report pass http://example.com/report.html>",
    "<LAVA_SIGNAL_STARTTC greeting>",
    "<LAVA_SIGNAL_ENDTC greeting>",
    "<LAVA_SIGNAL_TESTCASE TEST_CASE_ID=greeting RESULT=pass>",
    "<LAVA_SIGNAL_STARTTC kept>",
    "<LAVA_SIGNAL_ENDTC kept>",
    "<LAVA_SIGNAL_TESTCASE TEST_CASE_ID=kept RESULT=pass>",
    "<LAVA_SIGNAL_STARTTC awk>",
    "<LAVA_SIGNAL_ENDTC awk>",
    "<LAVA_SIGNAL_TESTCASE TEST_CASE_ID=awk RESULT=pass>",
    "<LAVA_SIGNAL_TESTCASE TEST_CASE_ID=echoed RESULT=skip>",
    "<LAVA_SIGNAL_ENDRUN 0_smoke 7_0.0>",
    # a failing step ends the definition under set -e: no ENDRUN, and the runner goes on
    "<LAVA_SIGNAL_STARTRUN 1_broken 7_0.1>",
    "<LAVA_SIGNAL_TESTCASE TEST_CASE_ID=before RESULT=pass>",
    "<LAVA_SIGNAL_STARTRUN 2_installed 7_0.2>",
    "<LAVA_SIGNAL_STARTTC install-ran>",
    "<LAVA_SIGNAL_ENDTC install-ran>",
    "<LAVA_SIGNAL_TESTCASE TEST_CASE_ID=install-ran RESULT=pass>",
    "<LAVA_SIGNAL_ENDRUN 2_installed 7_0.2>",
    "<LAVA_TEST_RUNNER INSTALL_FAIL>",
    "<LAVA_TEST_RUNNER EXIT>",
]
EXPECTED_STAGE_1 = [
    "<LAVA_SIGNAL_STARTRUN 4_later 7_1.4>",
    "<LAVA_SIGNAL_TESTCASE TEST_CASE_ID=later-case RESULT=pass>",
    "<LAVA_SIGNAL_ENDRUN 4_later 7_1.4>",
    "<LAVA_TEST_RUNNER EXIT>",
]


@dataclass
class Board:
    """Where an overlay goes and how to run a shell command on it, as the agent would type it."""

    root: Path  # build_overlay's dest
    results_dir: str  # lava_test_results_dir for build_overlay and stage_command
    host_path: Path  # where /lava-<job> of the board is on this machine
    command: list[str]  # the shell, to which the console line is appended
    env: dict[str, str]

    def run(self, line: str, timeout: float = 60) -> str:
        """Run ``line`` with stderr on stdout (one console), return what the console showed."""
        done = subprocess.run(
            [*self.command, line + " 2>&1"], capture_output=True, text=True, env=self.env, timeout=timeout
        )
        assert done.stderr == "", done.stderr
        return done.stdout

    def build(self, stages: list[list[TestDefinition]], environment: dict | None = None) -> Path:
        """Lay out job 7's overlay with these test actions on the board; return its top."""
        return build_overlay(self.root, "7", stages, environment, results_dir=self.results_dir)

    def run_stage(self, stage: int) -> str:
        """Type the agent's command for test action ``stage`` of job 7; return the console."""
        return self.run(stage_command("7", stage, self.results_dir))


def busybox_root(root: Path) -> None:
    """A minimal busybox system in ``root``: the static busybox, its applet links, /dev/null."""
    (root / "bin").mkdir(parents=True)
    shutil.copy2(BUSYBOX, root / "bin" / "busybox")
    applets = subprocess.run(
        [str(root / "bin" / "busybox"), "--list-full"], capture_output=True, text=True, check=True, timeout=30
    ).stdout.split()
    for applet in applets:
        link = root / applet
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.exists():
            link.symlink_to("/bin/busybox")
    (root / "dev").mkdir()
    os.mknod(root / "dev" / "null", 0o666 | 0o020000, os.makedev(1, 3))
    (root / "dev" / "null").chmod(0o666)
    (root / "tmp").mkdir(mode=0o1777)


def _busybox_board(tmp_path: Path) -> Board:
    if BUSYBOX is None or CHROOT is None:
        pytest.skip("busybox (busybox-static) and chroot are needed")
    if os.geteuid() != 0:
        pytest.skip("chroot and mknod need root")
    root = tmp_path / "root"
    busybox_root(root)
    return Board(
        root,
        "/lava-%s",
        root / "lava-7",
        [CHROOT, str(root), "/bin/sh", "-c"],
        {"PATH": "/bin:/sbin:/usr/bin:/usr/sbin", "HOME": "/", "SHELL": "/bin/sh"},
    )


def _dash_board(tmp_path: Path) -> Board:
    if DASH is None:
        pytest.skip("dash is not installed")
    board = tmp_path / "board"
    board.mkdir()
    # The overlay at its real path on this machine: dest "/" and a results dir under tmp_path.
    return Board(
        Path("/"),
        f"{board}/lava-%s",
        board / "lava-7",
        [DASH, "-c"],
        {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "SHELL": DASH},
    )


@pytest.fixture(params=["busybox-chroot", "dash"])
def board(request, tmp_path: Path) -> Board:
    return _busybox_board(tmp_path) if request.param == "busybox-chroot" else _dash_board(tmp_path)


def signals_of(console: str) -> list[str]:
    """Every signal on the console, in order, as the agent's regex sees them."""
    return [match.group(0) for match in SIGNAL_PATTERN.finditer(console)]


def test_runner_prints_each_signal_once_in_order(board: Board):
    top = board.build(stages())
    assert top == board.host_path
    console = board.run_stage(0)
    assert signals_of(console) == EXPECTED_STAGE_0, console
    # every signal on a line of its own, even after output without a newline
    for line in console.splitlines():
        assert not SIGNAL_PATTERN.search(line) or SIGNAL_PATTERN.fullmatch(line), line
    assert "unterminated\n" in console
    # steps are traced; the helpers called from run.sh run in its shell, as functions
    assert "+ lava_test_case pass-case --shell true" in console
    assert "lava-test-runner: 1_broken: run.sh exited with status 1" in console
    assert "install deps: fio: not installed" in console

    console = board.run_stage(1)
    assert signals_of(console) == EXPECTED_STAGE_1, console

    # what the runner recorded, and the list moved aside so that a reboot does not rerun it
    results = board.host_path / "0" / "results"
    runs = {path.name: path for path in results.iterdir()}  # made with the overlay, one a test run
    assert sorted(runs) == ["0_smoke", "1_broken", "2_installed", "3_failed-install"]
    assert (runs["0_smoke"] / "return_code").read_text() == "0\n"
    assert (runs["1_broken"] / "return_code").read_text() == "1\n"
    assert (runs["2_installed"] / "install_return_code").read_text() == "0\n"
    assert (runs["3_failed-install"] / "install_return_code").read_text() == "3\n"
    assert (runs["0_smoke"] / "results" / "latency" / "measurement").read_text() == "42.5\n"
    assert not (board.host_path / "0" / "lava-test-runner.conf").exists()
    assert (board.host_path / "0" / "lava-test-runner.conf-ran").exists()
    console = board.run_stage(0)
    assert signals_of(console) == ["<LAVA_TEST_RUNNER EXIT>"]
    assert "no " in console and "lava-test-runner.conf" in console


def test_helpers_in_run_sh_behave_as_programs(board: Board):
    """lava-test-case & co. called from run.sh run in a subshell of its shell (lava_in_shell), not
    as programs: what they do must not differ, and scripts started by a step still find them."""
    steps = [
        "lava-test-case bad --result maybe || echo \"usage status $?\"",
        "lava-test-case exits --shell 'exit 3'",
        "lava-test-case sets --shell 'clobbered=yes; lava_id=other'",
        'echo "clobbered=${clobbered:-no} lava_me=${lava_me:-unset}"',
        "sh -c 'lava-test-case child --result pass' && command lava-test-set start by-path",
        "lava-test-set stop",
        "set +x",
        "lava-test-case untraced --result skip",
        "echo after-untraced",
        "lava-test-event 'an  event'",
        "lava-test-case stop-here --result pass && false",
        "lava-test-case never --result pass",
    ]
    test = TestDefinition("helpers", {"metadata": {"name": "helpers"}, "run": {"steps": steps}})
    board.build([[test]])
    console = board.run_stage(0)
    assert signals_of(console) == [
        "<LAVA_SIGNAL_STARTRUN 0_helpers 7_0.0>",
        "<LAVA_SIGNAL_STARTTC exits>",
        "<LAVA_SIGNAL_ENDTC exits>",
        "<LAVA_SIGNAL_TESTCASE TEST_CASE_ID=exits RESULT=fail>",
        "<LAVA_SIGNAL_STARTTC sets>",
        "<LAVA_SIGNAL_ENDTC sets>",
        "<LAVA_SIGNAL_TESTCASE TEST_CASE_ID=sets RESULT=pass>",
        "<LAVA_SIGNAL_TESTCASE TEST_CASE_ID=child RESULT=pass>",
        "<LAVA_SIGNAL_TESTSET START by-path>",
        "<LAVA_SIGNAL_TESTSET STOP>",
        "<LAVA_SIGNAL_TESTCASE TEST_CASE_ID=untraced RESULT=skip>",
        "<LAVA_SIGNAL_TESTEVENT an  event>",
        "<LAVA_SIGNAL_TESTCASE TEST_CASE_ID=stop-here RESULT=pass>",
        "<LAVA_TEST_RUNNER EXIT>",
    ], console
    # a usage error names the helper and fails the step, as the program does
    assert "lava-test-case: result 'maybe' is not one of: pass, fail, skip, unknown" in console
    assert "usage status 1" in console
    # the helper's variables and options stay in its subshell
    assert "clobbered=no lava_me=" in console and "lava_me=lava-test-case" not in console
    assert "after-untraced" in console and "+ echo after-untraced" not in console
    assert "lava-test-runner: 0_helpers: run.sh exited with status 1" in console
    results = board.host_path / "0" / "results" / "0_helpers" / "results"
    assert (results / "exits" / "result").read_text() == "fail\n"
    assert (results / "child" / "result").read_text() == "pass\n"


def test_runner_with_a_shell_that_does_not_expand_aliases(tmp_path: Path):
    """SHELL=bash (LAVA's lava_test_sh_cmd): bash expands no alias in a script, so run.sh finds the
    helpers in bin/, as programs; the signals are the same."""
    bash = shutil.which("bash")
    if DASH is None or bash is None:
        pytest.skip("dash and bash are needed")
    board = _dash_board(tmp_path)
    board.env["SHELL"] = bash
    board.build(stages())
    console = board.run_stage(0)
    assert signals_of(console) == EXPECTED_STAGE_0, console
    assert "+ lava-test-case pass-case --shell true" in console


def test_runner_from_relative_paths(board: Board):
    """Typed by hand from the overlay's directory: relative paths work as the agent's absolute ones."""
    board.build(stages())
    base = results_path("7", board.results_dir)
    console = board.run(f"cd {base} && bin/lava-test-runner ./1/")
    assert signals_of(console) == EXPECTED_STAGE_1, console
    console = board.run(f"cd {base} && bin/lava-test-runner no-such-stage")
    assert signals_of(console) == ["<LAVA_TEST_RUNNER EXIT>"]
    assert "no such stage directory: no-such-stage" in console


def test_raise_stops_the_run(board: Board):
    raising = {
        "metadata": {"name": "raising"},
        "run": {
            "steps": [
                "lava-test-case first --result pass",
                "lava-test-case probe --shell 'echo probing; lava-test-raise probe not found; echo after'",
                "lava-test-case second --result pass",
            ]
        },
    }
    direct = {
        "metadata": {"name": "direct"},
        "run": {
            "steps": [
                "sh -c 'lava-test-raise board on fire; true'",
                "echo still-running",
                "lava-test-case third --result pass",
            ]
        },
    }
    never = {"metadata": {"name": "never"}, "run": {"steps": ["lava-test-case never --result pass"]}}
    board.build([
        [TestDefinition("raising", raising), TestDefinition("never", never)],
        [TestDefinition("direct", direct), TestDefinition("never2", never)],
    ])
    console = board.run_stage(0)
    assert signals_of(console) == [
        "<LAVA_SIGNAL_STARTRUN 0_raising 7_0.0>",
        "<LAVA_SIGNAL_TESTCASE TEST_CASE_ID=first RESULT=pass>",
        "<LAVA_SIGNAL_STARTTC probe>",
        "<LAVA_SIGNAL_TESTRAISE probe not found>",
        "<LAVA_TEST_RUNNER EXIT>",
    ], console
    assert "lava-test-raise was called: not running the remaining tests" in console
    # a raise in a script that carries on: the run stops at the next helper
    console = board.run_stage(1)
    assert signals_of(console) == [
        "<LAVA_SIGNAL_STARTRUN 2_direct 7_1.2>",
        "<LAVA_SIGNAL_TESTRAISE board on fire>",
        "<LAVA_TEST_RUNNER EXIT>",
    ], console
    assert "still-running" in console


def test_parameters_and_environment_arrive_unchanged(board: Board):
    steps = [f'printf %s "${name}" > param-{name}' for name in NASTY]
    steps += [f'printf %s "$ENV_{name}" > env-{name}' for name in NASTY]
    steps += [
        'printf %s "$FALSY-$ZERO-$TRUTHY-$NUMBER" > converted',
        'printf %s "$LAVA_JOB_ID $TESTRUN_ID $UUID" > ids',
        "pwd > cwd",
    ]
    definition = {
        "metadata": {"name": "quoting"},
        "params": {
            **{name: "overridden" for name in NASTY},
            "FALSY": False,
            "ZERO": 0,
            "TRUTHY": True,
            "NUMBER": 2.5,
        },
        "run": {"steps": steps},
    }
    test = TestDefinition("quoting", definition, parameters=dict(NASTY))
    environment = {f"ENV_{name}": value for name, value in NASTY.items()}
    top = board.build([[test]], environment)
    console = board.run_stage(0)
    assert signals_of(console)[-2:] == ["<LAVA_SIGNAL_ENDRUN 0_quoting 7_0.0>", "<LAVA_TEST_RUNNER EXIT>"]
    test_dir = top / "0" / "tests" / "0_quoting"
    for name, value in NASTY.items():
        assert (test_dir / f"param-{name}").read_text(encoding="utf-8") == value, name
        assert (test_dir / f"env-{name}").read_text(encoding="utf-8") == value, name
    # LAVA's conversions: false values are empty, the rest goes through str()
    assert (test_dir / "converted").read_text() == "--True-2.5"
    assert (test_dir / "ids").read_text() == "7 0_quoting 7_0.0"
    board_dir = board.results_dir.replace("%s", "7")
    assert (test_dir / "cwd").read_text() == f"{board_dir}/0/tests/0_quoting\n"
