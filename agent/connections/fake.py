"""A scripted console, next to the real ones (labgrid ships fakes too): an action's logic runs
against it without a board or QEMU.

A :class:`FakeSpawn` is a pexpect spawn whose "board" is a script: output queued with delays
(:meth:`~FakeSpawn.emit`), possibly as garbage bytes or line noise, that reads hand
out once it is due; rules that answer what is typed (:meth:`~FakeSpawn.on_input`), with
text or with a callable that may queue more output or cancel what was queued under a tag (an
interrupted autoboot). :func:`fake_console` wraps it in a :class:`~agent.connections.console.Console`,
so actions read and write it as they do a serial line. Scripted bootloader consoles (U-Boot,
depthcharge, barebox) are built from these pieces in the tests.
"""

from __future__ import annotations

import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import pexpect
from pexpect.spawnbase import SpawnBase

from agent.connections.console import DEFAULT_MAXREAD, PortConsole, control_character

#: what a rule answers: text or bytes to print, or a callable given the input and the spawn (that
#: returns False when it does not answer after all: the next rule may)
Reply = str | bytes | Callable[[str, "FakeSpawn"], bool | None]


@dataclass
class _Chunk:
    at: float
    data: bytes
    tag: str | None = None


@dataclass
class _Rule:
    pattern: re.Pattern
    reply: Reply
    once: bool
    #: match what is typed before its newline (an interrupt key, a control character)
    immediate: bool
    delay: float
    used: bool = field(default=False)


def line_noise(size: int, seed: int = 0) -> bytes:
    """``size`` bytes of what a wrong baud rate or a loose wire prints (no newlines)."""
    generator = random.Random(seed)
    return bytes(generator.choice([b for b in range(256) if b not in (10, 13)]) for _ in range(size))


class FakeSpawn(SpawnBase):
    """A pexpect spawn over a scripted board: output is queued (:meth:`emit`), input is recorded in
    ``typed`` and answered by rules (:meth:`on_input`); ``echo`` prints what is typed, as a board's
    console does. Closing it (or :meth:`hang_up`) reads as EOF once the queued output is read."""

    def __init__(self, name: str = "fake", maxread: int = DEFAULT_MAXREAD, echo: bool = False) -> None:
        super().__init__(timeout=30, maxread=maxread, searchwindowsize=None, encoding="utf-8",
                         codec_errors="replace")
        self.name = name
        self.args = [name]
        self.echo = echo
        #: every complete line typed (without its newline), and every character typed
        self.typed: list[str] = []
        self.raw: list[str] = []
        self.closed = False
        self.hung_up = False
        self._queue: list[_Chunk] = []
        self._rules: list[_Rule] = []
        self._line = ""
        #: when the last queued chunk is due: delays add up from it
        self._last = time.monotonic()

    # -- the script ---------------------------------------------------------------------------------------
    def emit(self, data: str | bytes, delay: float = 0.0, tag: str | None = None) -> FakeSpawn:
        """Queue ``data`` (text, or bytes as they come off the wire) ``delay`` seconds after the
        output queued before it (or after now, when that is past); ``tag`` names it for :meth:`cancel`."""
        start = max(self._last, time.monotonic())
        self._last = start + delay
        self._queue.append(_Chunk(self._last, data.encode() if isinstance(data, str) else bytes(data), tag))
        return self

    def cancel(self, tag: str) -> None:
        """Drop the queued output tagged ``tag`` that has not been read yet (an interrupted autoboot)."""
        self._queue = [chunk for chunk in self._queue if chunk.tag != tag]
        self._last = max([chunk.at for chunk in self._queue], default=time.monotonic())

    def on_input(self, pattern: str, reply: Reply, once: bool = False, immediate: bool = False,
                 delay: float = 0.0) -> FakeSpawn:
        """Answer typed input that matches ``pattern`` (a regex, searched in each line typed; with
        ``immediate``, in what is typed so far, before any newline): print ``reply`` after ``delay``
        seconds, or call it with the input and this spawn. The first matching rule answers."""
        self._rules.append(_Rule(re.compile(pattern), reply, once, immediate, delay))
        return self

    def hang_up(self) -> None:
        """The link drops: EOF after what is queued is read."""
        self.hung_up = True

    # -- pexpect's side -------------------------------------------------------------------------------------
    def read_nonblocking(self, size: int = 1, timeout: float | None = -1) -> str:
        if self.closed:
            raise pexpect.EOF(f"{self.name} is closed")
        if timeout == -1:
            timeout = self.timeout
        now = time.monotonic()
        if not self._queue:
            if self.hung_up:
                self.flag_eof = True
                raise pexpect.EOF(f"{self.name}: the board hung up")
            if timeout:
                time.sleep(timeout)
            raise pexpect.TIMEOUT("Timeout exceeded.")
        wait = self._queue[0].at - now
        if wait > 0:
            if timeout is not None and wait > timeout:
                time.sleep(max(timeout, 0))
                raise pexpect.TIMEOUT("Timeout exceeded.")
            time.sleep(wait)
        data = b""
        now = time.monotonic()
        while self._queue and self._queue[0].at <= now and len(data) < size:
            chunk = self._queue[0]
            take = chunk.data[: size - len(data)]
            data += take
            if len(take) == len(chunk.data):
                self._queue.pop(0)
            else:
                chunk.data = chunk.data[len(take):]
        text = self._decoder.decode(data, final=False)
        self._log(text, "read")
        return text

    def send(self, s: str) -> int:
        s = self._coerce_send_string(s)
        if self.closed:
            raise OSError(f"{self.name} is closed")
        self._log(s, "send")
        self.raw.append(s)
        if self.echo:
            self.emit(s.replace("\n", "\r\n"))
        for char in s:
            if char in "\r\n":
                line, self._line = self._line, ""
                self.typed.append(line)
                self._answer(line, immediate=False)
            else:
                self._line += char
                self._answer(self._line, immediate=True)
        return len(s)

    def sendline(self, s: str = "") -> int:
        return self.send(s + self.linesep)

    def sendcontrol(self, char: str) -> int:
        return self.send(control_character(char))

    def _answer(self, text: str, immediate: bool) -> None:
        for rule in self._rules:
            if rule.immediate != immediate or (rule.once and rule.used) or not rule.pattern.search(text):
                continue
            if callable(rule.reply):
                if rule.reply(text, self) is False:
                    continue
            else:
                self.emit(rule.reply, delay=rule.delay)
            rule.used = True
            if immediate:
                self._line = ""  # a key that was answered is consumed, as a bootloader reads it
            return

    def isalive(self) -> bool:
        return not self.closed and not (self.hung_up and not self._queue)

    def close(self, force: bool = True) -> None:
        self.closed = True


class FakeConsole(PortConsole):
    """A console on a :class:`FakeSpawn`."""

    def _exit_detail(self) -> str:
        return f" ({self.spawn.name} hung up)" if self.spawn.hung_up else ""


def fake_console(logger, spawn: FakeSpawn | None = None, **kwargs) -> FakeConsole:
    """A console on ``spawn`` (a new, empty script by default), logging to ``logger``."""
    spawn = spawn or FakeSpawn()
    return FakeConsole(spawn, logger, spawn.name, **kwargs)
