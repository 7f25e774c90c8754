"""What every interactive bootloader boot does (U-Boot today): fill the job's values into the
device's boot commands, power-cycle the board, interrupt the bootloader, type the commands.

The actions of one boot share a :class:`BootloaderSession` (the commands to type, whether the
bootloader prompt is already showing), handed to them when the boot builds its pipeline.

Also the boot ``method: bootloader`` (``bootloader: u-boot``, ``commands: [...]``): stop at the
bootloader's prompt after the job's own commands, for interactive tests of the bootloader.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import voluptuous as v

from agent.actions.deploy.tftp import boot_command
from agent.device import BootMethod, DeviceConfig, Needs
from agent.errors import InfrastructureError, JobError
from agent.pipeline import Action, RetryAction, register
from agent.schema import action_base
from agent.timeout import Deadline

#: how LAVA names the bootloaders in messages
DISPLAY_NAMES = {"u-boot": "U-Boot"}
#: placeholders that need a kernel type (``kernel.type`` in the deploy) to be filled
NEEDS_KERNEL_TYPE = ("{BOOTX}", "{KERNEL_ADDR}", "{RAMDISK_ADDR}", "{DTB_ADDR}", "{TEE_ADDR}")
#: placeholders of boot styles Pumice does not build yet -> what they stand for
UNSUPPORTED = {
    "{NFSROOTFS}": "an NFS root filesystem", "{NFS_SERVER_IP}": "an NFS root filesystem",
    "{NBDSERVERIP}": "an NBD root", "{NBDSERVERPORT}": "an NBD root",
    "{ROOT}": "a root filesystem on secondary media", "{ROOT_PART}": "a root filesystem on secondary media",
    "{PRESEED_CONFIG}": "an installer preseed file", "{PRESEED_LOCAL}": "an installer preseed file",
}
#: every placeholder a command may carry (an unfilled one left in a command is an error)
PLACEHOLDERS = ("{SERVER_IP}", "{KERNEL}", "{RAMDISK}", "{INITRD}", "{DTB}", "{TEE}", "{LAVA_MAC}",
                *NEEDS_KERNEL_TYPE, *UNSUPPORTED)
#: LAVA's soft reboot commands when neither job nor device names one
REBOOT_COMMANDS = ["reboot", "reboot -n", "reboot -nf"]
_MAC = r"(?i)([0-9A-F]{2}[:-]){5}[0-9A-F]{2}"


@dataclass
class BootloaderSession:
    """What the actions of one bootloader boot hand to each other."""

    method: str
    #: the commands to type, placeholders filled in (set by bootloader-overlay)
    commands: list[str] = field(default_factory=list)
    #: the bootloader prompt already shows (no interrupt was needed)
    at_prompt: bool = False

    @property
    def display(self) -> str:
        return DISPLAY_NAMES.get(self.method, self.method)


def substitute(commands: list[str], values: dict[str, str | None]) -> list[str]:
    """LAVA's substitution: each placeholder with a value is replaced; a command that uses a
    placeholder without a value is dropped (``tftp {TEE_ADDR} {TEE}`` when there is no tee)."""
    parsed = []
    for line in commands:
        for key, value in values.items():
            if value:
                line = line.replace(key, value)
            elif key in line:
                line = None
                break
        if line is not None:
            parsed.append(line)
    return parsed


def dispatcher_ip(job) -> str:
    """The worker's address as the board sees it: ``dispatcher_ip`` of the dispatcher
    configuration, else the address of the interface that holds the default route."""
    configured = job.dispatcher.get("dispatcher_ip")
    if configured:
        return str(configured)
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))  # no packet is sent: this only picks the route
            return probe.getsockname()[0]
        except OSError:
            raise InfrastructureError("cannot tell the worker's IP address for {SERVER_IP}: set "
                                      "dispatcher_ip in the dispatcher configuration") from None


def discard_pending(connection) -> None:
    """Read (and log) what the console already holds: output from before a reset must not match
    what the new boot is waited for."""
    import pexpect  # only when a board boots: validation stays light

    for _ in range(16):
        try:
            connection.spawn.expect([pexpect.TIMEOUT], timeout=0)
        except pexpect.EOF:
            return
        if not connection.spawn.before:
            break
    connection.lines.flush_partial()


def last_output(connection) -> str:
    """What the board printed since the last match, for an error message: its last line, a note
    that it printed nothing, or that what it printed is not text (line noise, a wrong baud rate)."""
    text = connection.before or ""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        return "the board printed nothing"
    unreadable = sum(1 for char in text if char == "\ufffd" or not (char.isprintable() or char in "\r\n\t"))
    if unreadable > len(text) * 0.3:
        return (f"the board printed {len(text)} characters of unreadable output "
                "(line noise, a wrong baud rate?)")
    return f"the board's last line: {lines[-1][-200:]!r}"


class BootloaderCommandOverlay(Action):
    """Fill the job's values into the boot commands: the files placed by the deploy, the load
    addresses and ``bootX`` command of the kernel type, the server address."""

    name = "bootloader-overlay"
    description = "substitute job data into bootloader command list"
    summary = "replace placeholders with job data"

    def __init__(self, session: BootloaderSession) -> None:
        super().__init__()
        self.session = session
        self.commands: list[str] = []
        self.deploy: dict = {}

    def populate(self, parameters: dict) -> None:
        self.deploy = self.context.deploy_before

    @property
    def kernel_type(self) -> str | None:
        kernel = self.deploy.get("kernel")
        return kernel.get("type") if isinstance(kernel, dict) else None

    def validate(self) -> None:
        method = self.session.method
        commands = self.parameters.get("commands")
        if isinstance(commands, list):
            self.commands = [str(command) for command in commands]
        else:
            device_method = self.device.boot_methods.get(method) or BootMethod(method)
            if commands not in device_method.entries:
                self.errors.append(f"commands {commands!r} are not among the device's {method} boot "
                                   f"commands; known: {', '.join(device_method.command_sets()) or 'none'}")
                return
            found = device_method.commands(commands)
            if found is None:
                self.errors.append(f"the device's {method} '{commands}' entry has no commands")
                return
            self.commands = found
        text = "\n".join(self.commands)
        used = [key for key in UNSUPPORTED if key in text]
        if used:
            what = sorted({UNSUPPORTED[key] for key in used})
            name = repr(commands) if isinstance(commands, str) else "(inline)"
            self.errors.append(f"not implemented: commands {name} boot from {' and '.join(what)} "
                               f"({', '.join(used)})")
        if not self.kernel_type and any(key in text for key in NEEDS_KERNEL_TYPE):
            self.errors.append("the boot commands use the kernel's load address or bootX command: the deploy "
                               "must give the kernel's type (kernel.type: image, zimage or uimage)")
        files = [key for key in ("{KERNEL}", "{RAMDISK}", "{DTB}", "{TEE}") if key in text]
        if files and not self.deploy:
            self.errors.append(f"the boot commands load files ({', '.join(files)}) but no deploy comes "
                               "before this boot")
        mac = self.device.boot_parameters(method).get("lava_mac")
        if mac and not re.fullmatch(_MAC, str(mac)):
            self.errors.append(f"lava_mac {mac!r} is not a MAC address")

    def substitutions(self) -> dict[str, str | None]:
        """Placeholder -> value for this job (None: the command that uses it is dropped)."""
        device = self.device
        files = self.job.data.tftp_files
        text = "\n".join(self.commands)
        values: dict[str, str | None] = {
            "{SERVER_IP}": dispatcher_ip(self.job) if "{SERVER_IP}" in text else None,
            "{DTB}": files.get("dtb"),
            "{RAMDISK}": files.get("ramdisk"),
            "{INITRD}": files.get("ramdisk"),
            "{KERNEL}": files.get("kernel"),
            "{TEE}": files.get("tee"),
            "{LAVA_MAC}": device.boot_parameters(self.session.method).get("lava_mac"),
        }
        if self.kernel_type:
            command = boot_command(self.kernel_type, device)
            addresses = device.parameters.get(command) or {}
            kernel, dtb, tee = addresses.get("kernel"), addresses.get("dtb"), addresses.get("tee")
            ramdisk = addresses.get("ramdisk")
            # without a U-Boot header the ramdisk's size is unknown to bootX: LAVA passes none
            if "ramdisk" not in files or (self.session.method == "u-boot"
                                          and device.deploy_parameters.get("add_header") != "u-boot"):
                ramdisk = "-"
            first = tee if "tee" in files else kernel
            values.update({"{BOOTX}": f"{command} {first} {ramdisk} {dtb}", "{KERNEL_ADDR}": kernel,
                           "{DTB_ADDR}": dtb, "{RAMDISK_ADDR}": ramdisk, "{TEE_ADDR}": tee})
            self.results.update({"kernel_addr": kernel, "dtb_addr": dtb, "ramdisk_addr": ramdisk,
                                 "tee_addr": tee})
        values.update({key: None for key in UNSUPPORTED})
        return values

    def run(self, connection: Any, deadline: Deadline) -> Any:
        inline = isinstance(self.parameters.get("commands"), list)
        if inline and self.parameters.get("method") == self.session.method:
            self.logger.warning("Using boot commands supplied in the job definition, "
                                "NOT the device configuration")
        values = self.substitutions()
        parsed = substitute(self.commands, values)
        for line in parsed:
            left = [key for key in PLACEHOLDERS if key in line]
            if left:
                raise JobError(f"boot command {line!r}: nothing to fill {', '.join(left)} with")
        self.session.commands = parsed
        self.logger.debug("substitutions:")
        for key in sorted(values):
            if values[key]:
                self.logger.debug(f"- {key}: {values[key]}")
        self.logger.info("Parsed boot commands:")
        for line in parsed:
            self.logger.info(f"- {line}")
        return connection


class ResetDevice(Action):
    """Power-cycle the board: the PDU (hard reset, or off then on), else a reboot typed on its shell."""

    name = "reset-device"
    description = "reboot or power-cycle the device"
    summary = "reboot the device"

    def populate(self, parameters: dict) -> None:
        pipeline = self.child_pipeline(parameters)
        pipeline.add(PDUReboot() if self.job.power.available("hard_reset") else SendRebootCommands())


class PDUReboot(Action):
    """Run the device's hard reset (or power off then on)."""

    name = "pdu-reboot"
    description = "issue commands to a PDU to power cycle a device"
    summary = "hard reboot using PDU"
    timeout_exception = InfrastructureError

    def run(self, connection: Any, deadline: Deadline) -> Any:
        if connection is not None:
            discard_pending(connection)
        self.job.power.reset(deadline)
        self.results["status"] = "success"
        return connection


class SendRebootCommands(Action):
    """Reboot a board that has no power control by typing reboot on its shell."""

    name = "send-reboot-commands"
    description = "Issue a reboot command on the device"
    summary = "Issue a reboot command on the device"

    def run(self, connection: Any, deadline: Deadline) -> Any:
        if connection is None:
            raise InfrastructureError("the device has no power control and no console to type a reboot on")
        commands = self.parameters.get("soft_reboot") or self.device.commands.soft_reboot
        if not commands:
            self.logger.warning("No soft reboot command defined in the test job. Using defaults.")
            commands = REBOOT_COMMANDS
        commands = [commands] if isinstance(commands, str) else list(commands)
        message = self.parameters.get("parameters", {}).get("shutdown-message") or \
            self.device.constant("shutdown-message")
        discard_pending(connection)
        for command in commands:
            connection.sendline(command)
        if connection.expect([message], deadline, timeout=self.connection_timeout) is None:
            raise JobError(f"Soft reboot failed: no {message!r} after {', '.join(commands)}")
        self.results["commands"] = commands
        return connection


class BootloaderInterruptAction(Action):
    """Stop the bootloader's autoboot: wait for its interrupt prompt and send the interrupt
    character (or control characters); with ``needs_interrupt: false`` wait for its prompt."""

    name = "bootloader-interrupt"
    description = "interrupt bootloader"
    summary = "interrupt bootloader to get an interactive shell"
    timeout_exception = InfrastructureError

    def __init__(self, session: BootloaderSession) -> None:
        super().__init__()
        self.session = session

    def settings(self) -> dict[str, Any]:
        device, method = self.device, self.session.method
        params = device.boot_parameters(method)
        return {
            "bootloader_prompt": params.get("bootloader_prompt"),
            "interrupt_prompt": params.get("interrupt_prompt",
                                           device.method_constant(method, "interrupt-prompt")),
            "needs_interrupt": params.get("needs_interrupt", True),
            "interrupt_newline": device.method_constant(method, "interrupt-newline", True),
            "interrupt_char": params.get("interrupt_char",
                                         device.method_constant(method, "interrupt-character")),
            "interrupt_ctrl_list": params.get("interrupt_ctrl_list",
                                              device.method_constant(method, "interrupt_ctrl_list")) or [],
        }

    def validate(self) -> None:
        settings = self.settings()
        if not settings["bootloader_prompt"]:
            self.errors.append(f"the device's {self.session.method} parameters have no bootloader_prompt")
        if settings["needs_interrupt"] and not settings["interrupt_prompt"]:
            self.errors.append(f"the device has no {self.session.method} interrupt prompt (interrupt_prompt)")

    def run(self, connection: Any, deadline: Deadline) -> Any:
        if connection is None:
            raise InfrastructureError(f"{self.name} started without a console connection")
        settings = self.settings()
        self.session.at_prompt = False
        if not settings["needs_interrupt"]:
            self.logger.info("Not interrupting bootloader, waiting for bootloader prompt")
            self._wait(connection, settings["bootloader_prompt"], "the bootloader prompt", deadline)
            self.session.at_prompt = True
            return connection
        self._wait(connection, settings["interrupt_prompt"], "the interrupt prompt", deadline)
        if settings["interrupt_ctrl_list"]:
            for char in settings["interrupt_ctrl_list"]:
                connection.sendcontrol(char)
        elif settings["interrupt_newline"]:
            connection.sendline(settings["interrupt_char"] or "")
        else:
            connection.send(settings["interrupt_char"] or "")
        return connection

    def _wait(self, connection, pattern: str, what: str, deadline: Deadline) -> None:
        if connection.expect([pattern], deadline) is None:
            connection.lines.flush_partial()
            raise self.timed_out(f"waiting for {what} {pattern!r}: {last_output(connection)} since the reset")
        connection.lines.flush_partial()


class BootloaderCommandsAction(Action):
    """Type the boot commands at the bootloader prompt, one per prompt; a bootloader error
    message ends the boot, the last command must bring the final message (``Starting kernel``)."""

    name = "bootloader-commands"
    description = "send commands to bootloader"
    summary = "interactive bootloader"
    timeout_exception = InfrastructureError

    def __init__(self, session: BootloaderSession, expect_final: bool = True) -> None:
        super().__init__()
        self.session = session
        self.expect_final = expect_final

    def run(self, connection: Any, deadline: Deadline) -> Any:
        if connection is None:
            raise InfrastructureError(f"{self.name} started without a console connection")
        device, method = self.device, self.session.method
        params = device.boot_parameters(method)
        prompt = str(params["bootloader_prompt"])
        errors = [str(message) for message in device.method_constant(method, "error-messages", []) or []]
        final = params.get("boot_message") or device.method_constant(method, "final-message")
        delay = device.boot_character_delay
        name = self.session.display
        if not self.session.at_prompt:
            # right after an interrupt the prompt comes at once: anything else is the autoboot going on
            signs = errors + ([final] if final else [])
            index = self._wait(connection, [prompt] + signs, deadline, f"the bootloader prompt {prompt!r}")
            if index:
                seen = self._matched(connection)
                raise InfrastructureError(f"{name} was not interrupted: it went on with its autoboot and "
                                          f"printed {seen!r} before its prompt {prompt!r}")
        commands = self.session.commands
        for number, line in enumerate(commands, start=1):
            connection.sendline(line, delay=delay)
            last = number == len(commands)
            if last and self.expect_final and not final:
                break  # no final message to wait for: the login action waits for the kernel
            # the last command brings the final message; without a boot (method: bootloader), the
            # prompt again, so that its output is logged and its errors caught before a test types
            expected = final if last and self.expect_final else prompt
            what = f"{'the final message' if expected == final else 'the bootloader prompt'} {expected!r} " \
                   f"after {line!r}"
            index = self._wait(connection, [expected] + errors, deadline, what)
            if index:
                raise InfrastructureError(f"{name} error after {line!r}: {self._matched(connection)!r}")
        self.session.at_prompt = not self.expect_final
        return connection

    def _wait(self, connection, patterns: list[str], deadline: Deadline, what: str) -> int:
        index = connection.expect(patterns, deadline, timeout=self.connection_timeout)
        connection.lines.flush_partial()
        if index is None:
            if deadline.expired():
                raise self.timed_out(f"waiting for {what}")
            raise InfrastructureError(f"{self.name}: no {what} within {self.connection_timeout:.0f} s "
                                      f"(connection timeout); {last_output(connection)}")
        return index

    @staticmethod
    def _matched(connection) -> str:
        match = connection.match
        return match.group(0).strip() if match is not None and hasattr(match, "group") else "?"


@register("boot", "bootloader")
class BootBootloaderRetry(RetryAction):
    """Power-cycle the board and stop at its bootloader's prompt after typing the job's commands
    (``method: bootloader``, ``bootloader: u-boot``), retried on failure."""

    name = "boot-bootloader-retry"
    description = "boot to bootloader with retry"
    summary = "boot bootloader retry"
    needs = Needs(boot_method_key="bootloader")

    @classmethod
    def schema(cls) -> dict:
        from agent.actions.boot.login import login_schema

        boot_keys = {key: value for key, value in login_schema().items()
                     if str(key) in ("prompts", "parameters", "soft_reboot")}
        return {**action_base(), **boot_keys, v.Required("method"): "bootloader",
                v.Required("bootloader"): str, v.Required("commands"): [str],
                v.Optional("use_bootscript"): bool}

    @classmethod
    def accepts(cls, device: DeviceConfig, params: dict) -> str | None:
        refusal = super().accepts(device, params)
        if refusal:
            return refusal
        if params["bootloader"] not in DISPLAY_NAMES:
            return f"bootloader {params['bootloader']!r} is not supported; known: {', '.join(DISPLAY_NAMES)}"
        return None

    def populate(self, parameters: dict) -> None:
        super().populate(parameters)
        session = BootloaderSession(parameters["bootloader"])
        pipeline = self.child_pipeline(parameters)
        pipeline.add(BootloaderCommandOverlay(session))
        pipeline.add(BootBootloaderAction(session))

    def validate(self) -> None:
        super().validate()
        if self.parameters.get("use_bootscript"):
            self.errors.append("not implemented: use_bootscript")


class BootBootloaderAction(Action):
    """Connect, power-cycle, interrupt, type the commands; the bootloader prompt stays."""

    name = "boot-bootloader"
    description = "boot to bootloader"
    summary = "boot bootloader"

    def __init__(self, session: BootloaderSession) -> None:
        super().__init__()
        self.session = session

    def populate(self, parameters: dict) -> None:
        from agent.connections.serial import ConnectDevice

        pipeline = self.child_pipeline(parameters)
        pipeline.add(ConnectDevice())
        pipeline.add(ResetDevice())
        pipeline.add(BootloaderInterruptAction(self.session))
        pipeline.add(BootloaderCommandsAction(self.session, expect_final=False))

    def run(self, connection: Any, deadline: Deadline) -> Any:
        connection = super().run(connection, deadline)
        prompt = self.device.boot_parameters(self.session.method).get("bootloader_prompt")
        connection.prompts = [str(prompt)]  # what an interactive test waits for
        return connection
