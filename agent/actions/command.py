"""The ``command`` action: run one of the device's user commands on the worker."""

from __future__ import annotations

import shlex
from typing import Any

import voluptuous as v

from agent.errors import InfrastructureError
from agent.pipeline import Action, register
from agent.schema import action_base
from agent.timeout import Deadline


def run_command(action: Action, command: str, deadline: Deadline, what: str = "command") -> None:
    """Run ``command`` on the worker, log its output, raise InfrastructureError when it fails."""
    import subprocess

    from agent.process import die_with_parent

    action.logger.info(f"{what}: {command}")
    try:
        done = subprocess.run(shlex.split(command), capture_output=True, text=True, errors="replace",
                              timeout=max(deadline.remaining(), 0.01), preexec_fn=die_with_parent,
                              stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise action.timed_out(command) from None
    except OSError as exc:
        raise InfrastructureError(f"{what} cannot run: {command}: {exc.strerror}") from None
    for line in (done.stdout + done.stderr).splitlines():
        action.logger.debug(f">> {line}")
    if done.returncode:
        raise InfrastructureError(f"{what} failed with exit status {done.returncode}: {command}")


@register("command", "command")
class CommandAction(Action):
    """Run a user command from the device dictionary (``user_commands``); its ``undo`` runs at
    the end of the job."""

    name = "user-command"
    description = "execute one of the commands listed by the admin"
    summary = "execute commands"

    @classmethod
    def schema(cls) -> dict:
        return {**action_base(), v.Required("name"): str}

    def validate(self) -> None:
        name = self.parameters.get("name")
        known = self.device.commands.users
        if name not in known:
            self.errors.append(f"unknown user command {name!r}; known: {', '.join(sorted(known)) or 'none'}")

    def run(self, connection: Any, deadline: Deadline) -> Any:
        entry = self.device.commands.users[self.parameters["name"]]
        if entry.undo:
            self.job.data.undo_commands.append(entry.undo)
        run_command(self, entry.do, deadline)
        return connection
