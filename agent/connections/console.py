"""The board's console: a pexpect session whose output is logged line by line as ``target``."""

from __future__ import annotations

import contextlib
import re
import signal
import time
from typing import Any

import pexpect

from agent.errors import InfrastructureError
from agent.timeout import Deadline

# pexpect reads at most this much per call; LAVA's devices set spawn_maxread (default 4092)
DEFAULT_MAXREAD = 4092
# C0 controls other than tab/newline, DEL and C1 make unreadable log lines; they are kept, escaped,
# by the log record, but terminal escape sequences are stripped as noise
_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")
#: A terminal's "where is the cursor?" query (VT100 device status report 6). Busybox's shell sends
#: it after each prompt and, when no answer has come by the end of the line typed, sleeps 20 ms so
#: that a late answer does not show as garbage: 20 ms for every line typed at the board.
CURSOR_QUERY = "\x1b[6n"
#: The row given in answers: any but 1 (busybox reads "ESC [ 1 ; 5 R" as Ctrl-F3, not as an answer).
CURSOR_ROW = 24


#: what pexpect's sendcontrol sends for the characters that are not letters
_CONTROL = {"@": 0, "`": 0, "[": 27, "\\": 28, "]": 29, "^": 30, "_": 31, "?": 127}


def control_character(char: str) -> str:
    """The character Ctrl-``char`` types (as pexpect's sendcontrol), for spawns that are no pty."""
    char = char.lower()
    return chr(ord(char) - ord("a") + 1 if "a" <= char <= "z" else _CONTROL[char])


class LineLogger:
    """pexpect's ``logfile_read``: turns console output into one ``target`` record per line."""

    def __init__(self, logger) -> None:
        self.logger = logger
        self.partial = ""

    def write(self, data: str) -> None:
        text = self.partial + data
        *lines, self.partial = text.split("\n")
        for line in lines:
            self.logger.target(_ANSI.sub("", line).rstrip("\r"))
        if len(self.partial) > 4096:  # a console that never sends a newline
            self.flush_partial()

    def flush(self) -> None:
        """pexpect calls this after every read: a partial line waits for its end."""

    def flush_partial(self) -> None:
        """Log the line in progress (a prompt, the last words before an expect returns)."""
        if self.partial:
            self.logger.target(_ANSI.sub("", self.partial).rstrip("\r"))
            self.partial = ""


class Console:
    """A console (serial line, telnet, QEMU stdio) behind pexpect, with the job's prompts."""

    def __init__(self, spawn: pexpect.spawn, logger, name: str = "console",
                 prompts: list[str] | None = None, character_delay: float = 0.0) -> None:
        self.spawn = spawn
        self.logger = logger
        self.name = name
        self.prompts = list(prompts or [])
        self.character_delay = character_delay
        self.lines = LineLogger(logger)
        spawn.logfile_read = self.lines
        # pexpect sleeps 0.1 ms after each read, to read more at a time: the reads block in
        # select() already, and each sleep delays the job
        spawn.delayafterread = None
        self.closed = False
        # an expect has returned since the last input: what the board sends now answers that input
        self._matched = False

    @classmethod
    def spawn_command(cls, argv: list[str], logger, name: str, env: dict | None = None,
                      maxread: int = DEFAULT_MAXREAD, cwd: str | None = None, **kwargs: Any) -> Console:
        """Start ``argv`` on a pty, in ``cwd`` (default: ours), and talk to it (QEMU -nographic, telnet,
        a connection command)."""
        from agent.process import die_with_parent

        try:
            spawn = pexpect.spawn(argv[0], argv[1:], encoding="utf-8", codec_errors="replace",
                                  maxread=maxread, env=env, cwd=cwd, dimensions=(24, 250),
                                  preexec_fn=die_with_parent, searchwindowsize=None)
        except pexpect.ExceptionPexpect as exc:
            raise InfrastructureError(f"cannot start {argv[0]}: {exc}") from None
        # pexpect sleeps 0.05 s before each send (against password echo on slow logins) and
        # 0.1 s before each close and after each kill "for slow systems": close() below waits for
        # the process itself, and a send waits for nothing, so the sleeps are pure job overhead
        # (0.05 s for every line typed at the board)
        spawn.delaybeforesend = None
        for holder in (spawn, spawn.ptyproc):
            holder.delayafterclose = 0
            holder.delayafterterminate = 0
        return cls(spawn, logger, name, **kwargs)

    # -- writing ---------------------------------------------------------------------------------------
    def sendline(self, line: str = "", delay: float | None = None) -> None:
        self.lines.flush_partial()
        self.logger.input(line + "\n")
        self._send(line + "\n", delay)

    def send(self, text: str, delay: float | None = None, log: bool = True) -> None:
        if log:
            self.logger.input(text)
        self._send(text, delay)

    def sendcontrol(self, char: str) -> None:
        self.logger.input(f"^{char.upper()}")
        try:
            self._answer_cursor_query()
            self.spawn.sendcontrol(char)
        except OSError as exc:
            raise InfrastructureError(f"{self.name}: cannot write to the console: {exc}") from None

    def _send(self, text: str, delay: float | None) -> None:
        delay = self.character_delay if delay is None else delay
        try:
            self._answer_cursor_query()
            if delay:
                for char in text:
                    self.spawn.send(char)
                    time.sleep(delay)
            else:
                self.spawn.send(text)
        except OSError as exc:
            raise InfrastructureError(f"{self.name}: cannot write to the console: {exc}") from None

    def _answer_cursor_query(self) -> None:
        """Before typing: answer the board's cursor-position query, as a terminal does, when it is
        the last thing the board sent after what the last expect waited for (busybox's shell asks
        right after its prompt). The shell is then reading its next line: the answer reaches it
        first and spares it its 20 ms wait.

        A query seen only after an input is never answered: the board may have read that input
        already, and a late answer would reach the next program as typed text. A query not yet
        here when the input is ready is not waited for: the shell then waits its 20 ms, as it
        does without a terminal.
        """
        if not self._matched:
            return
        self._matched = False
        pending = self.spawn.buffer
        if pending != CURSOR_QUERY and CURSOR_QUERY.startswith(pending):  # nothing yet, or a part
            pending += self._read_ready(0.01 if pending else 0)  # the rest of a query is on its way
        if not pending.endswith(CURSOR_QUERY):
            return
        line = pending[: -len(CURSOR_QUERY)]
        if "\n" not in line and "\r" not in line:
            line = (self.before + (self.spawn.after if isinstance(self.spawn.after, str) else "") + line)
        column = len(_ANSI.sub("", re.split(r"[\r\n]", line)[-1])) + 1
        self.spawn.send(f"\x1b[{CURSOR_ROW};{column}R")

    def _read_ready(self, wait: float) -> str:
        """What the board has sent that no expect has read yet, waiting up to ``wait`` seconds for
        the first of it; kept in pexpect's buffer for the next expect, as an expect would."""
        text = ""
        try:
            while True:
                text += self.spawn.read_nonblocking(self.spawn.maxread, timeout=wait)
                wait = 0
        except (pexpect.TIMEOUT, pexpect.EOF):  # EOF: the next expect reports it
            pass
        if text:
            self.spawn.buffer = self.spawn.buffer + text
        return text

    # -- reading ---------------------------------------------------------------------------------------
    def expect(self, patterns: list, deadline: Deadline, timeout: float | None = None) -> int | None:
        """Index of the first pattern seen before the deadline (or ``timeout``), None on timeout.

        A closed console (the process died, the link dropped) is an InfrastructureError.
        """
        wait = deadline.remaining() if timeout is None else deadline.within(timeout)
        try:
            index = self.spawn.expect(list(patterns), timeout=wait)
        except pexpect.TIMEOUT:
            return None
        except pexpect.EOF:
            self.lines.flush_partial()
            raise InfrastructureError(f"{self.name}: the console connection closed"
                                      f"{self._exit_detail()}") from None
        self._matched = True
        return index

    def expect_exact(self, patterns: list, deadline: Deadline) -> int | None:
        try:
            index = self.spawn.expect_exact(list(patterns), timeout=deadline.remaining())
        except pexpect.TIMEOUT:
            return None
        except pexpect.EOF:
            raise InfrastructureError(f"{self.name}: the console connection closed") from None
        self._matched = True
        return index

    def wait_for_prompt(self, deadline: Deadline) -> bool:
        """True when one of the prompts shows before the deadline."""
        if not self.prompts:
            raise InfrastructureError("no prompts to wait for")
        found = self.expect(self.prompts, deadline) is not None
        self.lines.flush_partial()
        return found

    @property
    def before(self) -> str:
        return self.spawn.before or ""

    @property
    def match(self):
        return self.spawn.match

    def _exit_detail(self) -> str:
        try:
            self.spawn.wait()
        except pexpect.ExceptionPexpect:
            return ""
        if self.spawn.exitstatus is not None:
            return f" ({self.spawn.args[0].decode() if isinstance(self.spawn.args[0], bytes) else ''} " \
                   f"exited with status {self.spawn.exitstatus})"
        if self.spawn.signalstatus is not None:
            return f" (killed by signal {self.spawn.signalstatus})"
        return ""

    # -- closing ---------------------------------------------------------------------------------------
    def close(self, grace: float = 2.0) -> None:
        """Stop the console's process: SIGTERM, then SIGKILL after ``grace`` seconds; return once it
        is gone. (The process itself exits: QEMU in ~6 ms, no guest shutdown is waited for.)"""
        if self.closed:
            return
        self.closed = True
        self.lines.flush_partial()
        spawn = self.spawn
        if spawn.isalive() and not self._stop(signal.SIGTERM, grace):
            self._stop(signal.SIGKILL, grace)
        with contextlib.suppress(pexpect.ExceptionPexpect):
            spawn.close(force=True)

    def _stop(self, signum: int, seconds: float) -> bool:
        """Send ``signum`` to the console's process: True once it is gone, False after ``seconds``.

        The wait is on a pidfd (Linux 5.3), which wakes up as the process exits; without one, the
        process is looked at soon, then less often (processes exit within milliseconds)."""
        import os
        import select

        try:
            pidfd = os.pidfd_open(self.spawn.pid)
        except OSError:  # an older kernel
            pidfd = None
        try:
            self.spawn.kill(signum)
            end = time.monotonic() + seconds
            pause = 0.001
            while self.spawn.isalive():
                left = end - time.monotonic()
                if left <= 0:
                    return False
                if pidfd is None:
                    time.sleep(min(left, pause))
                    pause = min(pause * 2, 0.05)
                else:
                    select.select([pidfd], [], [], left)
            return True
        finally:
            if pidfd is not None:
                os.close(pidfd)


class PortConsole(Console):
    """A console on a spawn that is no process of ours (a serial port, a fake board): closing it
    closes the spawn, there is nothing to stop."""

    def close(self, grace: float = 2.0) -> None:
        if self.closed:
            return
        self.closed = True
        self.lines.flush_partial()
        self.spawn.close()
