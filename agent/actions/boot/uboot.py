"""Boot ``method: u-boot``: connect to the board's console, power-cycle it, interrupt U-Boot, type
the device's commands for the job's boot style (``commands: ramdisk``, or a list in the job) with
the deployed files filled in, then wait for the kernel and the job's prompts.

Boot styles: ``ramdisk`` (and any list of commands) is supported; ``nfs``, ``nbd`` and the
secondary-media styles (``usb``, ``sata``...) are refused at validation, as are
``transfer_overlay`` and ``use_bootscript``.
"""

from __future__ import annotations

import voluptuous as v

from agent.actions.boot.bootloader import (
    BootloaderCommandOverlay,
    BootloaderCommandsAction,
    BootloaderInterruptAction,
    BootloaderSession,
    ResetDevice,
)
from agent.actions.boot.login import add_shell_actions, login_schema
from agent.device import Needs
from agent.pipeline import Action, RetryAction, register
from agent.schema import action_base


@register("boot", "u-boot")
class UBootAction(RetryAction):
    """Boot through U-Boot's command line, retried on failure (``failure_retry``)."""

    name = "uboot-action"
    description = "interactive uboot action"
    summary = "pass uboot commands"
    needs = Needs(boot_method="u-boot")

    @classmethod
    def schema(cls) -> dict:
        return {
            **action_base(),
            **login_schema(),
            v.Required("method"): "u-boot",
            v.Required("commands"): v.Any(v.All(str, v.Length(min=1)), [str],
                                          msg="expected the name of the device's boot commands or a list"),
            v.Optional("use_bootscript"): bool,
        }

    def populate(self, parameters: dict) -> None:
        super().populate(parameters)
        session = BootloaderSession("u-boot")
        pipeline = self.child_pipeline(parameters)
        pipeline.add(UBootSecondaryMedia())
        pipeline.add(BootloaderCommandOverlay(session))
        from agent.connections.serial import ConnectDevice  # pexpect and pyserial: not for validation

        pipeline.add(ConnectDevice())
        pipeline.add(UBootCommandsAction(session))

    def validate(self) -> None:
        super().validate()
        if "transfer_overlay" in self.parameters:
            self.errors.append("not implemented: transfer_overlay (Pumice puts the overlay into the "
                               "ramdisk)")
        if self.parameters.get("use_bootscript"):
            self.errors.append("not implemented: use_bootscript")


class UBootSecondaryMedia(Action):
    """Booting a kernel already on the board's media (usb, sata, sd): refused, not built yet."""

    name = "uboot-from-media"
    description = "let uboot know where to find the kernel in the image on secondary media"
    summary = "set uboot strings for deployed media"

    def validate(self) -> None:
        media = self.device.parameters.get("media") or {}
        commands = self.parameters.get("commands")
        if isinstance(commands, str) and commands in media:
            self.errors.append(f"commands {commands!r}: booting from the board's {commands} media is not "
                               "supported by Pumice yet")


class UBootCommandsAction(Action):
    """Power-cycle, interrupt, type the commands, then wait for the kernel and the shell."""

    name = "uboot-commands"
    description = "interactive uboot commands action"
    summary = "uboot commands"

    def __init__(self, session: BootloaderSession) -> None:
        super().__init__()
        self.session = session

    def populate(self, parameters: dict) -> None:
        pipeline = self.child_pipeline(parameters)
        pipeline.add(ResetDevice())
        pipeline.add(BootloaderInterruptAction(self.session))
        pipeline.add(BootloaderCommandsAction(self.session))
        add_shell_actions(pipeline, parameters)
