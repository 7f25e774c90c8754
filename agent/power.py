"""Power control of a board: a tiny interface, and the backend that runs the device's commands."""

from __future__ import annotations

import shlex
from typing import Protocol

from agent.errors import InfrastructureError
from agent.timeout import Deadline


class Power(Protocol):
    """What a power backend offers: on, off, reset, each before a deadline."""

    def on(self, deadline: Deadline) -> None: ...

    def off(self, deadline: Deadline) -> None: ...

    def reset(self, deadline: Deadline) -> None: ...


def command_list(value: str | list | None) -> list[str]:
    """A device ``commands:`` entry is one command or a list of them."""
    if not value:
        return []
    return [str(value)] if isinstance(value, str) else [str(item) for item in value]


class CommandPower:
    """Power through the device's ``power_on``/``power_off``/``hard_reset`` commands (a PDU client,
    a relay script, a QEMU starter). ``hard_reset`` falls back to off then on."""

    def __init__(self, commands: dict, logger, env: dict | None = None) -> None:
        self.commands = commands or {}
        self.logger = logger
        self.env = env

    def available(self, operation: str) -> bool:
        if operation == "hard_reset":
            return bool(self.commands.get("hard_reset")) or (
                bool(self.commands.get("power_on")) and bool(self.commands.get("power_off")))
        return bool(self.commands.get(operation))

    def on(self, deadline: Deadline) -> None:
        self._run("power_on", deadline)

    def off(self, deadline: Deadline) -> None:
        self._run("power_off", deadline)

    def reset(self, deadline: Deadline) -> None:
        if self.commands.get("hard_reset"):
            self._run("hard_reset", deadline)
        else:
            self.off(deadline)
            self.on(deadline)

    def _run(self, operation: str, deadline: Deadline) -> None:
        import subprocess

        from agent.process import die_with_parent

        for command in command_list(self.commands.get(operation)):
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
