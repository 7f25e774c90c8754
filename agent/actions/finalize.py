"""The last action of every job, run also when the job failed or was canceled."""

from __future__ import annotations

from typing import Any

from agent.pipeline import Action
from agent.timeout import Deadline


class FinalizeAction(Action):
    """Power the board off and close its console; always runs."""

    name = "finalize"
    description = "finish the process and cleanup"
    summary = "finalize the job"

    def populate(self, parameters: dict) -> None:
        pipeline = self.child_pipeline(parameters)
        pipeline.add(PowerOff())
        pipeline.add(ReadFeedback())


class PowerOff(Action):
    """Run the device's power_off command, if it has one, and stop the console."""

    name = "power-off"
    description = "discontinue power to device"
    summary = "send power_off command"

    def run(self, connection: Any, deadline: Deadline) -> Any:
        data = self.job.data
        for command in reversed(data.undo_commands):
            from agent.actions.command import run_command

            run_command(self, command, deadline, what="undo")
        data.undo_commands.clear()
        if self.job.power.available("power_off"):
            self.job.power.off(deadline)
        if data.connection is not None:
            data.connection.close()
        return connection


class ReadFeedback(Action):
    """Log what the console still had to say (nothing is lost at the end of a job)."""

    name = "read-feedback"
    description = "Check for messages on all other namespaces"
    summary = "Read from other namespaces"

    def run(self, connection: Any, deadline: Deadline) -> Any:
        data = self.job.data
        if data.connection is not None:
            data.connection.close()
            data.connection = None
        return None
