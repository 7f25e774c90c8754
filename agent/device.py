"""The device configuration, typed: the YAML a device-type template renders to, parsed once per job.

Strategies read a :class:`DeviceConfig` (commands, power, connections, boot and deploy methods with
their parameters, constants, timeouts), never the raw YAML; each declares what it needs of it
(:class:`Needs`, as labgrid drivers declare their bindings), checked when the job is built. A
malformed configuration (a list where a mapping belongs) is a :class:`ConfigurationError` that names
its YAML path. What is not set reads as empty, as in LAVA.

The configuration also exists without the job's context (``device_own``, see
:mod:`agent.qemu_policy`): the same class parses it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from agent.errors import ConfigurationError

_EMPTY: Mapping[str, Any] = MappingProxyType({})


def _mapping(value: Any, path: str) -> Mapping[str, Any]:
    """``value`` as a mapping (None: empty); ConfigurationError naming ``path`` otherwise."""
    if value is None:
        return _EMPTY
    if not isinstance(value, Mapping):
        raise ConfigurationError(f"device configuration {path}: expected a mapping, got "
                                 f"{type(value).__name__}")
    return value


def command_list(value: str | list | None) -> list[str]:
    """A device ``commands:`` entry is one command or a list of them."""
    if not value:
        return []
    return [str(value)] if isinstance(value, str) else [str(item) for item in value]


@dataclass(frozen=True)
class UserCommand:
    """``commands.users.<name>``: what a ``command`` action runs, and what undoes it at finalize."""

    do: str
    undo: str | None = None


@dataclass(frozen=True)
class Commands:
    """``commands:``: power, console connection, soft reboot and the admin's user commands."""

    power_on: list[str] = field(default_factory=list)
    power_off: list[str] = field(default_factory=list)
    hard_reset: list[str] = field(default_factory=list)
    soft_reboot: list[str] = field(default_factory=list)
    #: ``connect`` (LAVA's connection_command), stripped; "" when not set
    connect: str = ""
    #: ``connections``: name -> (connect command, tags)
    connections: dict[str, tuple[str, list[str]]] = field(default_factory=dict)
    users: dict[str, UserCommand] = field(default_factory=dict)

    @classmethod
    def parse(cls, data: Any, path: str = "commands") -> Commands:
        data = _mapping(data, path)
        connections = {}
        for name, entry in _mapping(data.get("connections"), f"{path}.connections").items():
            entry = _mapping(entry, f"{path}.connections.{name}")
            tags = entry.get("tags") or []
            connections[str(name)] = (str(entry.get("connect") or "").strip(),
                                      [str(tag) for tag in (tags if isinstance(tags, list) else [tags])])
        users = {}
        for name, entry in _mapping(data.get("users"), f"{path}.users").items():
            entry = _mapping(entry, f"{path}.users.{name}")
            if not entry.get("do"):
                raise ConfigurationError(f"device configuration {path}.users.{name}: has no 'do' command")
            users[str(name)] = UserCommand(str(entry["do"]), str(entry["undo"]) if entry.get("undo") else None)
        return cls(power_on=command_list(data.get("power_on")), power_off=command_list(data.get("power_off")),
                   hard_reset=command_list(data.get("hard_reset")),
                   soft_reboot=command_list(data.get("soft_reboot")),
                   connect=str(data.get("connect") or "").strip(), connections=connections, users=users)


@dataclass(frozen=True)
class BootMethod:
    """``actions.boot.methods.<name>``: its ``parameters`` and its named command sets (``ramdisk:
    {commands: [...]}``...), as written."""

    name: str
    parameters: Mapping[str, Any] = field(default_factory=dict)
    entries: Mapping[str, Any] = field(default_factory=dict)

    def command_sets(self) -> list[str]:
        """The names of the method's command sets (the ``commands:`` a u-boot boot may name)."""
        return sorted(key for key, value in self.entries.items() if isinstance(value, Mapping) and "commands" in value)

    def commands(self, name: str) -> list[str] | None:
        """The commands of set ``name`` (None when the entry is no command set or has none)."""
        entry = self.entries.get(name)
        if not isinstance(entry, Mapping) or not entry.get("commands"):
            return None
        return [str(command) for command in entry["commands"]]


@dataclass(frozen=True)
class DeviceConfig:
    """One device's configuration, as its device-type template rendered it."""

    hostname: str | None = None
    device_type: str | None = None
    commands: Commands = field(default_factory=Commands)
    boot_methods: dict[str, BootMethod] = field(default_factory=dict)
    #: ``actions.boot.connections``: the connection kinds the device offers (serial, ssh...)
    boot_connections: frozenset[str] = frozenset()
    #: ``actions.deploy.methods``: method -> its ``parameters``
    deploy_methods: dict[str, Mapping[str, Any]] = field(default_factory=dict)
    #: ``actions.deploy.parameters`` (add_header, mkimage_arch, append_dtb, use_xip)
    deploy_parameters: Mapping[str, Any] = field(default_factory=dict)
    #: ``parameters`` (load addresses by boot command, text_offset, media)
    parameters: Mapping[str, Any] = field(default_factory=dict)
    constants: Mapping[str, Any] = field(default_factory=dict)
    timeouts: Mapping[str, Any] = field(default_factory=dict)
    environment: dict[str, str] = field(default_factory=dict)
    #: ``character_delays`` in seconds: between characters typed at the bootloader, and in tests
    boot_character_delay: float = 0.0
    test_character_delay: float = 0.0
    available_architectures: list[str] = field(default_factory=list)
    #: ``device_info``: the USB devices of the board a LAVA lab passes into an LXC container, as
    #: written (LAVA checks their ids even when no container is used; see lxc-create-udev-rule-action)
    device_info: Any = None

    @classmethod
    def parse(cls, data: Any) -> DeviceConfig:
        """The configuration of the rendered device YAML ``data`` (a mapping; None: empty)."""
        data = _mapping(data, "(top level)")
        actions = _mapping(data.get("actions"), "actions")
        boot = _mapping(actions.get("boot"), "actions.boot")
        deploy = _mapping(actions.get("deploy"), "actions.deploy")
        # a method's entry need not be a mapping (LAVA's templates write ``fastboot: []``): LAVA
        # only asks whether the device has the method until a job uses it
        boot_methods = {}
        for name, entry in _mapping(boot.get("methods"), "actions.boot.methods").items():
            entry = entry if isinstance(entry, Mapping) else _EMPTY
            boot_methods[str(name)] = BootMethod(
                str(name), _mapping(entry.get("parameters"), f"actions.boot.methods.{name}.parameters"), entry)
        deploy_methods = {}
        for name, entry in _mapping(deploy.get("methods"), "actions.deploy.methods").items():
            entry = entry if isinstance(entry, Mapping) else _EMPTY
            deploy_methods[str(name)] = _mapping(entry.get("parameters"), f"actions.deploy.methods.{name}.parameters")
        connections = boot.get("connections") or {}
        delays = _mapping(data.get("character_delays"), "character_delays")
        return cls(
            hostname=data.get("hostname"), device_type=data.get("device_type"),
            commands=Commands.parse(data.get("commands")), boot_methods=boot_methods,
            boot_connections=frozenset(map(str, connections)), deploy_methods=deploy_methods,
            deploy_parameters=_mapping(deploy.get("parameters"), "actions.deploy.parameters"),
            parameters=_mapping(data.get("parameters"), "parameters"),
            constants=_mapping(data.get("constants"), "constants"),
            timeouts=_mapping(data.get("timeouts"), "timeouts"),
            environment={str(k): str(v) for k, v in _mapping(data.get("environment"), "environment").items()},
            boot_character_delay=_seconds(delays.get("boot"), "character_delays.boot"),
            test_character_delay=_seconds(delays.get("test"), "character_delays.test"),
            available_architectures=[str(arch) for arch in data.get("available_architectures") or []],
            device_info=data.get("device_info"))

    def boot_parameters(self, method: str) -> Mapping[str, Any]:
        """``actions.boot.methods.<method>.parameters`` ({} when the device has no such method)."""
        found = self.boot_methods.get(method)
        return found.parameters if found is not None else _EMPTY

    def constant(self, key: str, default: Any = None) -> Any:
        """``constants.<key>`` (``default`` when unset)."""
        value = self.constants.get(key)
        return default if value is None else value

    def method_constant(self, method: str, key: str, default: Any = None) -> Any:
        """``constants.<method>.<key>`` (LAVA's get_constant with a prefix)."""
        section = self.constants.get(method)
        value = section.get(key) if isinstance(section, Mapping) else None
        return default if value is None else value


def _seconds(milliseconds: Any, path: str) -> float:
    try:
        return float(milliseconds or 0) / 1000.0
    except (TypeError, ValueError):
        raise ConfigurationError(f"device configuration {path}: expected milliseconds, got {milliseconds!r}") from None


def as_device(device: Mapping | DeviceConfig | None) -> DeviceConfig:
    """``device`` as a typed configuration (a mapping is parsed; ConfigurationError when malformed)."""
    return device if isinstance(device, DeviceConfig) else DeviceConfig.parse(device)


@dataclass(frozen=True)
class Needs:
    """What a strategy needs of the device, checked when the job is built (labgrid's ``bindings``):
    a boot method, a deploy method. ``boot_method_key`` names the action block key that says which
    boot method (``bootloader: u-boot``); ``why`` replaces the default refusal."""

    boot_method: str | None = None
    boot_method_key: str | None = None
    deploy_method: str | None = None
    why: str | None = None

    def refusal(self, device: DeviceConfig, params: Mapping[str, Any]) -> str | None:
        """Why ``device`` cannot run the action block ``params`` (None: it can)."""
        boot = params.get(self.boot_method_key) if self.boot_method_key else self.boot_method
        if boot is not None and boot not in device.boot_methods:
            return self.why or f"the device has no {boot!r} boot method"
        if self.deploy_method is not None and self.deploy_method not in device.deploy_methods:
            return self.why or f"the device has no {self.deploy_method!r} deploy method"
        return None
