"""Boot ``method: qemu``: start the device's QEMU with the job's images; its stdio is the console."""

from __future__ import annotations

import posixpath
import shlex
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import voluptuous as v

from agent.actions.boot.login import add_shell_actions, login_schema
from agent.actions.deploy.guest import GUEST_IMAGE, guest_drive
from agent.device import DeviceConfig, Needs, as_device
from agent.errors import InfrastructureError, JobError
from agent.pipeline import Action, RetryAction, register
from agent.policy import PolicyRefusal
from agent.qemu_policy import PLACEHOLDER_ROOT, Part, Verdict, judge, refusals
from agent.schema import action_base
from agent.timeout import Deadline

if TYPE_CHECKING:
    from agent.job import Job


def split(text: str) -> list[str]:
    """``text`` split as a shell would (as LAVA does); unbalanced quotes leave it whole (QEMU then
    refuses it)."""
    try:
        return shlex.split(text)
    except ValueError:
        return [text]


def device_arguments(device: DeviceConfig) -> tuple[str, list[str]]:
    """The device's QEMU program and its arguments: ``options`` then ``extra``, each split."""
    params = device.boot_parameters("qemu")
    arguments: list[str] = []
    for key in ("options", "extra"):
        values = params.get(key) or []
        for option in values if isinstance(values, list) else [values]:
            arguments += split(str(option))
    return str(params.get("command") or ""), arguments


def image_args(definition: Mapping) -> dict[str, tuple[str, tuple]]:
    """image key -> its ``image_arg`` and that one's YAML path, from the job's deploy blocks."""
    found = {}
    actions = definition.get("actions")
    for index, block in enumerate(actions if isinstance(actions, list) else []):
        params = block.get("deploy") if isinstance(block, dict) else None
        images = params.get("images") if isinstance(params, dict) else None
        for key, image in (images if isinstance(images, dict) else {}).items():
            if isinstance(image, dict) and image.get("image_arg"):
                found[key] = (str(image["image_arg"]), ("actions", index, "deploy", "images", key, "image_arg"))
    return found


def boots_qemu(definition: Mapping) -> bool:
    """Whether the job has a ``boot: method: qemu`` block."""
    actions = definition.get("actions")
    return any(isinstance(block, dict) and isinstance(block.get("boot"), dict)
               and block["boot"].get("method") == "qemu" for block in (actions if isinstance(actions, list) else []))


def command_line(definition: Mapping, device: DeviceConfig, root: str, files: Mapping[str, str] | None = None,
                 extra: Sequence[str] | None = None) -> tuple[str, list[Part]]:
    """The QEMU program and the parts of its command line, by author (:class:`agent.qemu_policy.Part`):
    the device's options and extra, each ``image_arg`` with ``files`` (image key -> deployed file;
    default, before anything is deployed: ``{key}`` itself, a file in QEMU's working directory
    ``root``), then ``extra`` from the deploy actions (default: the guest disk of the test overlay)."""
    program, arguments = device_arguments(device)
    parts = [Part(tuple(arguments), ("context",))]
    for key, (arg, path) in image_args(definition).items():
        file = "{" + key + "}" if files is None else files.get(key)
        if file is not None:
            parts.append(Part(tuple(split(arg.replace("{" + key + "}", shlex.quote(str(file))))), path, job=True))
    if extra is None:
        extra = guest_drive(device, posixpath.join(root, GUEST_IMAGE))
    parts.append(Part(tuple(extra), ("context",)))
    return program, parts


def command_verdict(definition: Mapping, device: Mapping | DeviceConfig, device_own: Mapping | DeviceConfig | None,
                    root: str, files: Mapping[str, str] | None = None, extra: Sequence[str] | None = None,
                    resolve: bool = False) -> Verdict:
    """The worker's file policy on the job's QEMU command line (:mod:`agent.qemu_policy`):
    ``device_own`` is the device's configuration rendered without the job's context (None: the
    device configuration is all the device's own, as in a standalone run). The master calls it with
    the rendered YAML (mappings)."""
    program, parts = command_line(definition, as_device(device), root, files, extra)
    own = None if device_own is None else as_device(device_own)
    return judge(program, parts, *own_arguments(own, root), root, resolve)


def own_arguments(device_own: DeviceConfig | None, root: str) -> tuple[str | None, list[str] | None]:
    """The QEMU program and arguments of the device's own configuration (None, None: all is its own)."""
    if device_own is None:
        return None, None
    program, arguments = device_arguments(device_own)
    return program, arguments + guest_drive(device_own, posixpath.join(root, GUEST_IMAGE))


def policy_refusals(job: Job) -> list[tuple[tuple, str]]:
    """(YAML path, refusal) for the job's QEMU command line under its worker's file policy, before
    anything is deployed (files are placeholders; symlinks resolved on the worker)."""
    if not boots_qemu(job.definition):
        return []
    verdict = command_verdict(job.definition, job.device, job.device_own, PLACEHOLDER_ROOT, resolve=True)
    return refusals(verdict, job.policy, resolve=True)


@register("boot", "qemu")
class BootQEMUImageAction(RetryAction):
    """Boot a QEMU board with the downloaded images, retried on failure."""

    name = "boot-image-retry"
    description = "boot image with retry"
    summary = "boot with retry"
    needs = Needs(boot_method="qemu")

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

    def populate(self, parameters: dict) -> None:
        super().populate(parameters)
        pipeline = self.child_pipeline(parameters)
        pipeline.add(BootQemuRetry())
        add_shell_actions(pipeline, parameters)

    def validate(self) -> None:
        super().validate()
        if "docker" in self.parameters:
            self.errors.append("not implemented: boot qemu 'docker'")


class BootQemuRetry(RetryAction):
    """Retry wrapper for starting QEMU."""

    name = "boot-qemu-image"
    description = "boot image using QEMU command line"
    summary = "boot QEMU image"

    def populate(self, parameters: dict) -> None:
        super().populate(parameters)
        self.child_pipeline(parameters).add(CallQemuAction())


class CallQemuAction(Action):
    """Start QEMU: the device's command, options and extra, then each image's ``image_arg``, once
    the worker's file policy has judged the command line (agent.qemu_policy)."""

    name = "execute-qemu"
    description = "call qemu to boot the image"
    summary = "execute qemu to boot the image"
    timeout_exception = InfrastructureError

    def validate(self) -> None:
        params = self.device.boot_parameters("qemu")
        command = str(params.get("command") or "").strip()
        if not command or command.endswith("-"):
            known = ", ".join(self.device.available_architectures) or "see the device type"
            self.errors.append("the device's qemu command names no architecture: set 'arch' in the job's "
                               f"context or in the device dictionary (known: {known})")
        else:
            self.require_tool(command)

    def run(self, connection: Any, deadline: Deadline) -> Any:
        if self.job.data.connection is not None:  # a retry: stop the previous attempt first
            self.job.data.connection.close()
            self.job.data.connection = None
        downloads = self.job.data.downloads
        for key in image_args(self.job.definition):
            if key not in downloads:
                raise JobError(f"image {key!r} has an image_arg but was not deployed")
        # the command line as it will run, judged once more (defence in depth): the deployed files
        # are real now, with their symlinks and what the disk images name
        root = str(self.job.workdir)
        files = {key: str(path) for key, path in downloads.items()}
        program, parts = command_line(self.job.definition, self.device, root, files, self.job.data.qemu_extra)
        verdict = judge(program, parts, *own_arguments(self.job.device_own, root), root, resolve=True)
        for _, message in refusals(verdict, self.job.policy, resolve=True):
            raise PolicyRefusal(message)
        command = [program] + [token for part in parts for token in part.tokens]
        self.logger.info(f"boot command: {shlex.join(command)}")
        from agent.connections.console import DEFAULT_MAXREAD, Console

        maxread = int(self.device.constant("spawn_maxread") or DEFAULT_MAXREAD)
        console = Console.spawn_command(command, self.logger, name="qemu", maxread=maxread,
                                        env=self.job.env or None, cwd=root,
                                        character_delay=self.device.test_character_delay)
        self.job.data.connection = console
        self.results["command"] = command[0]
        return console

    def cleanup(self, connection: Any) -> None:
        if self.job.data.connection is not None:
            self.job.data.connection.close()
