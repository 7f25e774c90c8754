"""After a kernel starts: wait for the prompt (logging in if asked), check the shell, export the
device's environment. Shared by every boot method that ends at a shell."""

from __future__ import annotations

import shlex
from typing import Any

import voluptuous as v

from agent.errors import JobError
from agent.pipeline import Action, BuildContext, Pipeline
from agent.timeout import Deadline

#: kernel messages that mean the boot has failed for good
KERNEL_FAILURES = [
    r"Kernel panic - not syncing",
    r"end Kernel panic",
]


def prompt_list(parameters: dict) -> list[str]:
    """The block's ``prompts`` as a list (a block of a method Pumice lacks may hold anything)."""
    prompts = parameters.get("prompts") or []
    if isinstance(prompts, str):
        return [prompts]
    return [prompt for prompt in prompts if isinstance(prompt, str)] if isinstance(prompts, list) else []


def boot_prompts(context: BuildContext, parameters: dict) -> list[str]:
    """The prompts of the boot block being built: its own, else those of the last boot before it
    (a second boot of the same board in a job usually omits them)."""
    own = prompt_list(parameters)
    if own:
        return own
    for params in reversed(context.boots_before):
        if prompt_list(params):
            return prompt_list(params)
    return []


def login_schema() -> dict:
    """The boot block keys about prompts and logging in."""
    return {
        v.Optional("prompts"): v.Any(v.All(str, v.Length(min=1)), [v.All(str, v.Length(min=1))]),
        v.Optional("auto_login"): {
            v.Required("login_prompt"): v.All(str, v.Length(min=1)),
            v.Required("username"): str,
            v.Optional("password_prompt"): str,
            v.Optional("password"): str,
            v.Optional("login_commands"): [str],
        },
        v.Optional("transfer_overlay"): {
            v.Required("download_command"): str,
            v.Required("unpack_command"): str,
            v.Optional("transfer_method"): str,
        },
        v.Optional("parameters"): {
            v.Optional("kernel-start-message"): str,
            v.Optional("shutdown-message"): str,
        },
        v.Optional("soft_reboot"): v.Any(str, [str]),
    }


def add_shell_actions(pipeline: Pipeline, parameters: dict) -> None:
    """What follows the boot itself: login when the job gives prompts, then the shell checks."""
    tests = pipeline.context.tests_after
    prompts = boot_prompts(pipeline.context, parameters)
    if prompts or tests:  # without prompts, LoginAction.validate says they are missing
        pipeline.add(AutoLoginAction(prompts))
        if tests:
            pipeline.add(ExpectShellSession())
            pipeline.add(ExportDeviceEnvironment())


class AutoLoginAction(Action):
    """Wait for the job's prompts (logging in first when ``auto_login`` says how)."""

    name = "auto-login-action"
    description = "automatically login after boot using job parameters and checking for messages."
    summary = "Auto-login after boot with support for kernel messages."

    def __init__(self, prompts: list[str]) -> None:
        super().__init__()
        self.prompts = prompts

    def populate(self, parameters: dict) -> None:
        self.child_pipeline(parameters).add(LoginAction(self.prompts))

    def validate(self) -> None:
        super().validate()
        login = self.parameters.get("auto_login") or {}
        if "password" in login and "password_prompt" not in login:
            # LAVA accepts it and sends no password: so do we, and say so
            self.logger.warning("auto_login: a 'password' without 'password_prompt' is not sent (as in LAVA)")


class LoginAction(Action):
    """The real login: kernel messages, login prompt, then a shell prompt."""

    name = "login-action"
    description = "Real login action."
    summary = "Login after boot."

    def __init__(self, prompts: list[str]) -> None:
        super().__init__()
        self.prompts = prompts

    def validate(self) -> None:
        if not self.prompts:
            self.errors.append("'prompts' is missing: the boot action needs the board's shell prompts "
                               "to know when it is ready for the test that follows")

    def run(self, connection: Any, deadline: Deadline) -> Any:
        if connection is None:
            raise JobError("no console to log in on: the boot did not connect")
        self.job.while_booting()
        prompts = self.prompts
        connection.prompts = prompts
        start = kernel_start_message(self.job, self.parameters)
        if start:
            self._wait(connection, [start], deadline, f"the kernel to start ({start!r})")
        login = self.parameters.get("auto_login") or {}
        if login:
            self._wait(connection, [login["login_prompt"]], deadline, "the login prompt")
            connection.sendline(login["username"])
            if login.get("password_prompt"):
                self._wait(connection, [login["password_prompt"]], deadline, "the password prompt")
                connection.sendline(login.get("password", ""))
        self._wait(connection, prompts, deadline, f"the prompt {' or '.join(map(repr, prompts))}")
        for command in login.get("login_commands") or []:
            connection.sendline(command)
            self._wait(connection, prompts, deadline, "the prompt after a login command")
        self.logger.info("the board is at a shell prompt")
        return connection

    def _wait(self, connection, patterns: list[str], deadline: Deadline, what: str) -> None:
        index = connection.expect(list(patterns) + KERNEL_FAILURES, deadline)
        connection.lines.flush_partial()
        if index is None:
            raise self.timed_out(f"waiting for {what}")
        if index >= len(patterns):
            raise JobError(f"the kernel failed while waiting for {what}: {KERNEL_FAILURES[index - len(patterns)]}")


def kernel_start_message(job, parameters: dict) -> str | None:
    """What the kernel prints first (LAVA's ``kernel-start-message``: the job's boot parameters,
    else the device constant), so a board stuck before Linux fails with a clear message."""
    value = (parameters.get("parameters") or {}).get("kernel-start-message")
    if value is None:
        value = job.device.constant("kernel-start-message")
    return value or None


class ExpectShellSession(Action):
    """Check that the shell answers before tests are typed into it."""

    name = "expect-shell-connection"
    description = "Wait for a shell"
    summary = "Expect a shell prompt"

    def run(self, connection: Any, deadline: Deadline) -> Any:
        connection.sendline("")
        if not connection.wait_for_prompt(deadline):
            raise self.timed_out("the shell did not answer")
        return connection


class ExportDeviceEnvironment(Action):
    """Export the device's and the job's environment variables in the board's shell."""

    name = "export-device-env"
    description = "Exports environment variables to the device"
    summary = "Exports environment variables action"

    def run(self, connection: Any, deadline: Deadline) -> Any:
        from agent.actions.deploy.overlay import environment_of

        for key, value in environment_of(self.job).items():
            connection.sendline(f"export {key}={shlex.quote(value)}")
            if not connection.wait_for_prompt(deadline):
                raise self.timed_out(f"exporting {key}")
        return connection
