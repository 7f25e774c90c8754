"""Power control of a board: a tiny interface, the backend that runs the device's commands, and a
fake that records what was asked (tests run an action's logic without a board)."""

from __future__ import annotations

import shlex
from typing import Protocol

from agent.device import Commands
from agent.errors import InfrastructureError
from agent.timeout import Deadline


class Power(Protocol):
    """What a power backend offers: on, off, reset, each before a deadline."""

    def on(self, deadline: Deadline) -> None: ...

    def off(self, deadline: Deadline) -> None: ...

    def reset(self, deadline: Deadline) -> None: ...

    def available(self, operation: str) -> bool:
        """Whether ``operation`` (power_on, power_off, hard_reset) can be done."""


class CommandPower:
    """Power through the device's ``power_on``/``power_off``/``hard_reset`` commands (a PDU client,
    a relay script, a QEMU starter). ``hard_reset`` falls back to off then on."""

    def __init__(self, commands: Commands, logger=None, env: dict | None = None) -> None:
        self.commands = commands
        self.logger = logger
        self.env = env

    def available(self, operation: str) -> bool:
        if operation == "hard_reset":
            return bool(self.commands.hard_reset) or (bool(self.commands.power_on) and bool(self.commands.power_off))
        return bool(getattr(self.commands, operation))

    def on(self, deadline: Deadline) -> None:
        self._run("power_on", deadline)

    def off(self, deadline: Deadline) -> None:
        self._run("power_off", deadline)

    def reset(self, deadline: Deadline) -> None:
        if self.commands.hard_reset:
            self._run("hard_reset", deadline)
        else:
            self.off(deadline)
            self.on(deadline)

    def _run(self, operation: str, deadline: Deadline) -> None:
        import subprocess

        from agent.process import die_with_parent

        for command in getattr(self.commands, operation):
            self.logger.info(f"{operation}: {command}")
            try:
                done = subprocess.run(shlex.split(command), capture_output=True, text=True, env=self.env,
                                      timeout=max(deadline.remaining(), 0.01), errors="replace",
                                      preexec_fn=die_with_parent, stdin=subprocess.DEVNULL)
            except subprocess.TimeoutExpired:
                raise InfrastructureError(f"{operation} command timed out: {command}") from None
            except OSError as exc:
                raise InfrastructureError(f"{operation} command cannot run: {command}: {exc.strerror}") from None
            for line in (done.stdout + done.stderr).splitlines():
                self.logger.debug(f">> {line}")
            if done.returncode:
                raise InfrastructureError(f"{operation} command failed with exit status "
                                          f"{done.returncode}: {command}")


class FakePower:
    """A power control that records each operation (``calls``) and does nothing else; ``fail``
    (operation -> message) makes an operation raise InfrastructureError as a failed PDU would, and
    ``on_call`` (operation -> callable) lets a test act on it (start a fake console's boot)."""

    OPERATIONS = ("power_on", "power_off", "hard_reset")

    def __init__(self, operations: tuple[str, ...] = OPERATIONS, fail: dict[str, str] | None = None,
                 on_call: dict | None = None) -> None:
        self.operations = operations
        self.fail = dict(fail or {})
        self.on_call = dict(on_call or {})
        self.calls: list[str] = []

    def available(self, operation: str) -> bool:
        return operation in self.operations

    def on(self, deadline: Deadline) -> None:
        self._do("power_on")

    def off(self, deadline: Deadline) -> None:
        self._do("power_off")

    def reset(self, deadline: Deadline) -> None:
        self._do("hard_reset")

    def _do(self, operation: str) -> None:
        self.calls.append(operation)
        if operation in self.fail:
            raise InfrastructureError(f"{operation} command failed: {self.fail[operation]}")
        if operation in self.on_call:
            self.on_call[operation]()
