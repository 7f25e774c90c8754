"""Boot ``method: qemu``: start the device's QEMU with the job's images; its stdio is the console."""

from __future__ import annotations

import shlex
from typing import Any

import voluptuous as v

from agent.actions.boot.login import add_shell_actions, login_schema
from agent.errors import InfrastructureError, JobError
from agent.pipeline import Action, RetryAction, register
from agent.schema import action_base
from agent.timeout import Deadline


def qemu_parameters(device: dict) -> dict:
    methods = ((device.get("actions") or {}).get("boot") or {}).get("methods") or {}
    return (methods.get("qemu") or {}).get("parameters") or {}


@register("boot", "qemu")
class BootQEMUImageAction(RetryAction):
    """Boot a QEMU board with the downloaded images, retried on failure."""

    name = "boot-image-retry"
    description = "boot image with retry"
    summary = "boot with retry"

    @classmethod
    def schema(cls) -> dict:
        return {
            **action_base(),
            **login_schema(),
            v.Required("method"): "qemu",
            v.Optional("connection"): "serial",
            v.Optional("media"): "tmpfs",
            v.Optional("docker"): dict,
        }

    @classmethod
    def accepts(cls, device: dict, params: dict) -> str | None:
        methods = ((device.get("actions") or {}).get("boot") or {}).get("methods") or {}
        if "qemu" not in methods:
            return "the device has no 'qemu' boot method"
        return None

    def populate(self, parameters: dict) -> None:
        super().populate(parameters)
        pipeline = self.child_pipeline(parameters)
        pipeline.add(BootQemuRetry())
        add_shell_actions(pipeline, self.job, parameters)

    def validate(self) -> None:
        super().validate()
        if "docker" in self.parameters:
            self.errors.append("boot qemu 'docker' is not supported by Pumice")


class BootQemuRetry(RetryAction):
    """Retry wrapper for starting QEMU."""

    name = "boot-qemu-image"
    description = "boot image using QEMU command line"
    summary = "boot QEMU image"

    def populate(self, parameters: dict) -> None:
        super().populate(parameters)
        self.child_pipeline(parameters).add(CallQemuAction())


class CallQemuAction(Action):
    """Start QEMU: the device's command, options and extra, then each image's ``image_arg``."""

    name = "execute-qemu"
    description = "call qemu to boot the image"
    summary = "execute qemu to boot the image"
    timeout_exception = InfrastructureError

    def base_command(self) -> list[str]:
        params = qemu_parameters(self.job.device)
        command = [str(params.get("command") or "")]
        for option in list(params.get("options") or []) + list(params.get("extra") or []):
            command += shlex.split(str(option))
        return command

    def image_args(self) -> dict[str, str]:
        """image key -> its ``image_arg`` from the deploy blocks before this boot."""
        args = {}
        for params in self.job.checked_blocks("deploy"):
            images = params.get("images")
            for key, image in (images.items() if isinstance(images, dict) else ()):
                if isinstance(image, dict) and image.get("image_arg"):
                    args[key] = image["image_arg"]
        return args

    def validate(self) -> None:
        params = qemu_parameters(self.job.device)
        command = str(params.get("command") or "").strip()
        if not command or command.endswith("-"):
            known = ", ".join(self.job.device.get("available_architectures") or []) or "see the device type"
            self.errors.append("the device's qemu command names no architecture: set 'arch' in the job's "
                               f"context or in the device dictionary (known: {known})")
        else:
            self.require_tool(command)
        for key, arg in self.image_args().items():
            if "{" + key + "}" not in arg:
                self.errors.append(f"images.{key}.image_arg {arg!r} does not use {{{key}}}")

    def run(self, connection: Any, deadline: Deadline) -> Any:
        if self.job.state.connection is not None:  # a retry: stop the previous attempt first
            self.job.state.connection.close()
            self.job.state.connection = None
        command = self.base_command()
        downloads = self.job.state.downloads
        for key, arg in self.image_args().items():
            if key not in downloads:
                raise JobError(f"image {key!r} has an image_arg but was not deployed")
            command += shlex.split(arg.replace("{" + key + "}", shlex.quote(str(downloads[key]))))
        command += self.job.state.qemu_extra
        self.logger.info(f"boot command: {shlex.join(command)}")
        from agent.connections.console import DEFAULT_MAXREAD, Console

        constants = self.job.device.get("constants") or {}
        maxread = int(constants.get("spawn_maxread") or DEFAULT_MAXREAD)
        delays = self.job.device.get("character_delays") or {}
        console = Console.spawn_command(command, self.logger, name="qemu", maxread=maxread,
                                        env=self.job.env or None,
                                        character_delay=float(delays.get("test", 0)) / 1000.0)
        self.job.state.connection = console
        self.results["command"] = command[0]
        return console

    def cleanup(self, connection: Any) -> None:
        if self.job.state.connection is not None:
            self.job.state.connection.close()
