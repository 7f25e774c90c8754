"""The board's console (agent/connections/console.py): the answer to a shell's cursor-position query.

Busybox's shell asks where the cursor is (ESC [6n) after each prompt and, when no answer has come
by the end of the line typed, sleeps 20 ms. The console answers as a terminal does, but only when
the answer is sure to reach the program that asked before what is typed next.
"""

from __future__ import annotations

import shutil
import sys
import textwrap
from pathlib import Path

import pytest

from agent.connections.console import Console
from agent.timeout import Deadline


class Logger:
    def __init__(self) -> None:
        self.lines: list[str] = []
        self.inputs: list[str] = []

    def target(self, line: str) -> None:
        self.lines.append(line)

    def input(self, text: str) -> None:
        self.inputs.append(text)


#: a program that asks like busybox: prompt, query, then reads one line in raw mode and says
#: exactly which bytes it got. QUERY_AT: "prompt" (with the prompt), "split" (the query in two
#: writes), "late" (after the input has had time to arrive).
ASKER = textwrap.dedent("""\
    import os, sys, time, termios, tty
    tty.setcbreak(0)  # no line discipline: every byte as it comes, no echo
    attrs = termios.tcgetattr(0)
    attrs[3] &= ~termios.ECHO
    termios.tcsetattr(0, termios.TCSANOW, attrs)
    how = sys.argv[1]
    for round in range(2):
        if how == "prompt":
            os.write(1, b"ask> \\x1b[6n")
        elif how == "split":
            os.write(1, b"ask> \\x1b[")
            time.sleep(0.001)
            os.write(1, b"6n")
        else:
            os.write(1, b"ask> ")
            time.sleep(0.3)
            os.write(1, b"\\x1b[6n")
        data = b""
        while not data.endswith(b"\\n"):
            data += os.read(0, 100)
        time.sleep(0.3)  # what else comes (a late answer would)
        import select
        while select.select([0], [], [], 0)[0]:
            data += os.read(0, 100)
        os.write(1, b"got " + repr(data).encode() + b"\\r\\n")
    os.write(1, b"bye\\r\\n")
""")


@pytest.fixture
def asker(tmp_path: Path):
    script = tmp_path / "asker.py"
    script.write_text(ASKER)
    consoles = []

    def start(how: str) -> tuple[Console, Logger]:
        logger = Logger()
        console = Console.spawn_command([sys.executable, str(script), how], logger, name="asker",
                                        prompts=["ask> "])
        consoles.append(console)
        return console, logger

    yield start
    for console in consoles:
        console.close()


def _got(console: Console, deadline: Deadline) -> str:
    assert console.expect([r"got (b'[^\r\n]*')"], deadline) == 0
    return console.match.group(1)


@pytest.mark.parametrize("how", ["prompt", "split"])
def test_the_query_after_a_prompt_is_answered_before_the_line(asker, how: str) -> None:
    console, logger = asker(how)
    deadline = Deadline.after(10)
    assert console.wait_for_prompt(deadline)
    console.sendline("echo one")
    # the column after "ask> ", a row other than 1 (busybox reads ESC [1;5R as Ctrl-F3)
    assert _got(console, deadline) == repr(b"\x1b[24;6Recho one\n")
    assert console.wait_for_prompt(deadline)
    console.sendline("echo two")
    assert _got(console, deadline) == repr(b"\x1b[24;6Recho two\n")
    # the answer is not input the job typed: not logged as such
    assert logger.inputs == ["echo one\n", "echo two\n"]


def test_a_query_after_the_input_is_not_answered(asker) -> None:
    """The program may have read the input already: a late answer would be typed text to it."""
    console, _ = asker("late")
    deadline = Deadline.after(10)
    assert console.wait_for_prompt(deadline)
    console.sendline("echo one")
    assert _got(console, deadline) == repr(b"echo one\n")


def test_no_answer_without_an_expect_since_the_last_input(asker) -> None:
    """Two inputs in a row: the second does not answer a query that followed the first."""
    console, _ = asker("prompt")
    deadline = Deadline.after(10)
    assert console.wait_for_prompt(deadline)
    console.send("ab")
    console.sendline("c")
    assert _got(console, deadline) == repr(b"\x1b[24;6Rabc\n")


@pytest.mark.skipif(not shutil.which("busybox"), reason="busybox-static is not installed (make setup)")
def test_busybox_shell_reads_the_answer_not_the_next_program() -> None:
    """A real busybox ash under a pty: it asks after every prompt; what the console answers must
    reach the shell's line editor, never the command typed next (the terminal would echo a late
    answer to cat as ^[[24;5R, and cat print it)."""
    logger = Logger()
    console = Console.spawn_command(["busybox", "sh"], logger, name="busybox", prompts=["/ # "],
                                    env={"PS1": "/ # ", "PATH": "/usr/bin:/bin", "HOME": "/nonexistent"})
    try:
        deadline = Deadline.after(20)
        assert console.wait_for_prompt(deadline)
        for n in range(5):
            console.sendline(f"echo value-$(({n} * 7))")
            assert console.wait_for_prompt(deadline)
            assert f"value-{n * 7}" in console.before
        console.sendline("cat")
        assert console.expect([r"cat\r+\n"], deadline) == 0  # the shell has read its line: cat reads
        console.sendline("typed-line")
        assert console.expect([r"typed-line\r?\n.*typed-line"], deadline) == 0
        console.sendcontrol("d")
        assert console.wait_for_prompt(deadline)
        text = "\n".join(logger.lines) + console.before
        assert "^[" not in text and "24;5R" not in text
    finally:
        console.close()
