"""Reaching a board's serial console: the device's connection command (``telnet`` to ser2net,
``conmux-console``, ...) or the serial port itself, opened with pyserial.

The device says which in ``commands.connect`` (LAVA's ``connection_command``), or in
``commands.connections`` with one entry tagged ``primary``:

- a command line: run on a pty, like LAVA (``telnet 127.0.0.1 7001``);
- ``serial:///dev/ttyUSB0?baudrate=115200``: the serial port on this worker (a USB serial adaptor
  on a Raspberry Pi), opened with pyserial; ``baudrate`` defaults to 115200;
- ``rfc2217://host:port`` or ``socket://host:port``: a remote serial port through pyserial.

Either way the connection is a :class:`~agent.connections.console.Console`, so every action reads
and writes it the same way.
"""

from __future__ import annotations

import os
import re
import shlex
from typing import Any
from urllib.parse import parse_qs, urlparse

import pexpect
from pexpect.spawnbase import SpawnBase

from agent.connections.console import DEFAULT_MAXREAD, Console, PortConsole, control_character
from agent.device import DeviceConfig
from agent.errors import InfrastructureError
from agent.pipeline import Action
from agent.timeout import Deadline

#: connection URL schemes opened with pyserial instead of being run as commands
SERIAL_SCHEMES = ("serial", "rfc2217", "socket")
DEFAULT_BAUDRATE = 115200
#: what a connection client prints once it is connected (checked so a refused connection fails
#: at connect-device, with the client's own words, not later as a silent board)
CONNECTED = {"telnet": r"Escape character is '[^']*'\."}


def is_serial_url(connect: str) -> bool:
    """True when ``connect`` names a serial port for pyserial rather than a command to run."""
    return urlparse(connect.strip()).scheme in SERIAL_SCHEMES and "://" in connect


def connect_command(device: DeviceConfig) -> str:
    """The device's primary connection: ``commands.connect``, else the ``commands.connections``
    entry tagged ``primary``. Raises InfrastructureError saying what is missing."""
    commands = device.commands
    if commands.connect:
        return commands.connect
    connections = commands.connections
    for name, (connect, tags) in connections.items():
        if "primary" in tags:
            if not connect:
                raise InfrastructureError(f"commands.connections.{name} has no 'connect' command")
            return connect
    if connections:
        raise InfrastructureError("none of the device's commands.connections is tagged 'primary'; "
                                  f"found: {', '.join(connections)}")
    raise InfrastructureError("the device has no console connection: set connection_command in its "
                              "dictionary (commands.connect: a command like 'telnet HOST PORT' or a "
                              "serial:///dev/ttyUSB0 URL)")


def serial_settings(url: str) -> tuple[str, int]:
    """(pyserial URL or device path, baud rate) of a connection URL; ValueError when malformed."""
    parsed = urlparse(url)
    query = parse_qs(parsed.query)
    unknown = set(query) - {"baudrate"}
    if unknown:
        raise ValueError(f"{url}: unknown option {', '.join(sorted(unknown))}; known: baudrate")
    try:
        baudrate = int(query.get("baudrate", [DEFAULT_BAUDRATE])[0])
    except ValueError:
        raise ValueError(f"{url}: baudrate must be a number") from None
    if parsed.scheme == "serial":
        if not parsed.path.startswith("/") or parsed.netloc:
            raise ValueError(f"{url}: a serial URL names a device path: serial:///dev/ttyUSB0")
        return parsed.path, baudrate
    if not parsed.hostname or not parsed.port:
        raise ValueError(f"{url}: a {parsed.scheme} URL needs a host and a port")
    return f"{parsed.scheme}://{parsed.hostname}:{parsed.port}", baudrate


class SerialSpawn(SpawnBase):
    """pexpect over a pyserial port (a local tty, RFC 2217 or a raw socket): expect, send and the
    logfile work as on a process's pty. A port that goes away (an unplugged adaptor, a closed
    socket) reads as EOF."""

    def __init__(self, port, name: str, maxread: int = DEFAULT_MAXREAD) -> None:
        super().__init__(timeout=30, maxread=maxread, searchwindowsize=None, encoding="utf-8",
                         codec_errors="replace")
        self.port = port
        self.name = name
        self.args = [name]
        self.closed = False

    def read_nonblocking(self, size: int = 1, timeout: float | None = -1) -> str:
        import serial

        if self.closed:
            raise pexpect.EOF(f"{self.name} is closed")
        if timeout == -1:
            timeout = self.timeout
        try:
            self.port.timeout = timeout  # None blocks, 0 polls
            data = self.port.read(1)
            if not data:
                raise pexpect.TIMEOUT("Timeout exceeded.")
            waiting = self.port.in_waiting
            if waiting:
                self.port.timeout = 0
                data += self.port.read(min(waiting, size - 1))
        except serial.SerialException as exc:  # the port went away (pyserial: "returned no data")
            self.flag_eof = True
            raise pexpect.EOF(f"{self.name}: {exc}") from None
        text = self._decoder.decode(data, final=False)
        self._log(text, "read")
        return text

    def send(self, s: str) -> int:
        s = self._coerce_send_string(s)
        self._log(s, "send")
        data = self._encoder.encode(s, final=False)
        self.port.write(data)  # SerialException is an OSError: Console reports it
        return len(data)

    def sendline(self, s: str = "") -> int:
        return self.send(s + self.linesep)

    def sendcontrol(self, char: str) -> int:
        return self.send(control_character(char))

    def isalive(self) -> bool:
        return not self.closed and self.port.is_open

    def close(self, force: bool = True) -> None:
        if not self.closed:
            self.closed = True
            self.port.close()


class SerialConsole(PortConsole):
    """A console on a serial port opened by the agent itself."""

    @classmethod
    def open(cls, url: str, logger, name: str = "serial", maxread: int = DEFAULT_MAXREAD,
             **kwargs: Any) -> SerialConsole:
        """Open the port of connection URL ``url``; InfrastructureError when it cannot be opened."""
        import serial

        try:
            target, baudrate = serial_settings(url)
        except ValueError as exc:
            raise InfrastructureError(str(exc)) from None
        if target.startswith("/") and not os.path.exists(target):
            raise InfrastructureError(f"the serial port {target} does not exist (is the adaptor plugged "
                                      "into this worker?)")
        try:
            port = serial.serial_for_url(target, baudrate=baudrate, timeout=0, exclusive=True) \
                if target.startswith("/") else serial.serial_for_url(target, baudrate=baudrate, timeout=0)
        except (serial.SerialException, OSError, ValueError) as exc:
            raise InfrastructureError(f"cannot open the serial port {target}: {exc}") from None
        # bytes that waited in the adaptor belong to whatever ran before this job
        port.reset_input_buffer()
        return cls(SerialSpawn(port, target, maxread=maxread), logger, name, **kwargs)

    def _exit_detail(self) -> str:
        return f" ({self.spawn.name} went away)"


class ConnectDevice(Action):
    """Open the board's console with the device's connection command or serial port, or keep the
    one already open."""

    name = "connect-device"
    description = "use the configured command to connect serial to the device"
    summary = "run connection command"
    timeout_exception = InfrastructureError

    def validate(self) -> None:
        if "serial" not in self.device.boot_connections:
            self.errors.append("the device is not configured for a serial connection "
                               "(actions.boot.connections has no 'serial')")
        try:
            connect = connect_command(self.device)
        except InfrastructureError as exc:
            self.errors.append(str(exc))
            return
        if is_serial_url(connect):
            try:
                serial_settings(connect)
            except ValueError as exc:
                self.errors.append(str(exc))
            return
        try:
            argv = shlex.split(connect)
        except ValueError as exc:
            self.errors.append(f"cannot parse the connection command {connect!r}: {exc}")
            return
        if not argv:
            self.errors.append("the device's connection command is empty")
            return
        self.require_tool(argv[0], why="the device's connection command")

    def run(self, connection: Any, deadline: Deadline) -> Any:
        data = self.job.data
        current = data.connection
        if current is not None and not current.closed and current.spawn.isalive():
            self.logger.debug("Already connected")
            return current
        if current is not None:
            self.logger.warning("Dead connection, reconnecting")
            current.close()
            data.connection = None
        connect = connect_command(self.device)
        maxread = int(self.device.constant("spawn_maxread") or DEFAULT_MAXREAD)
        options = {"maxread": maxread, "character_delay": self.device.test_character_delay}
        self.logger.info(f"{self.name}: connecting to the device using '{connect}'")
        if is_serial_url(connect):
            console = SerialConsole.open(connect, self.logger, **options)
        else:
            argv = shlex.split(connect)
            console = Console.spawn_command(argv, self.logger, name=os.path.basename(argv[0]),
                                            env=self.job.env or None, **options)
            data.connection = console  # from here on, finalize closes it whatever happens
            self._wait_connected(console, argv, deadline)
        data.connection = console
        return console

    def _wait_connected(self, console: Console, argv: list[str], deadline: Deadline) -> None:
        banner = CONNECTED.get(os.path.basename(argv[0]))
        if banner is None:
            return
        wait = min(self.connection_timeout, deadline.remaining())
        try:
            index = console.spawn.expect([banner, pexpect.EOF], timeout=wait)
        except pexpect.TIMEOUT:
            raise InfrastructureError(f"'{shlex.join(argv)}' did not connect within {wait:.0f} s") from None
        console.lines.flush_partial()
        if index == 1:
            said = " ".join(line.strip() for line in (console.before or "").splitlines() if line.strip())
            said = re.sub(r"\s+", " ", said)[-300:]
            raise InfrastructureError(f"the connection command '{shlex.join(argv)}' failed"
                                      f"{console._exit_detail()}" + (f": {said}" if said else ""))
