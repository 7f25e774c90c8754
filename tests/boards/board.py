#!/usr/bin/env python3
"""The emulated arm64 lab board: its serial cable, its power switch, and faults to inject.

A real lab board has a USB serial adaptor that exists whether the board is powered or not, and a
PDU outlet. This script gives QEMU's ``virt`` arm64 machine (U-Boot as its BIOS, TFTP from QEMU's
user network) the same shape, in a board directory ``DIR`` written by the test fixture::

    DIR/board.json      {"qemu": [argv without console options], "tftp_root": ...}
    DIR/ttyUSB0         symlink to the pty the agent (pyserial) or ser2net opens: the adaptor
    DIR/console.sock    where a powered board's QEMU plugs its serial port (the cable daemon listens)
    DIR/control.sock    fault injection (the cable daemon listens)
    DIR/qemu.pid        the powered board's QEMU
    DIR/faults.json     power faults, e.g. {"dead": true}: the PDU works, the board stays silent

Commands (each a lab tool the device dictionary names)::

    board.py DIR cable                 the serial cable daemon (runs until killed)
    board.py DIR on|off|reset          the PDU: start or stop the board's QEMU
    board.py DIR fault NAME [VALUE]    tell the cable: deaf on|off (the board hears nothing),
                                       mute on|off (the host hears nothing), scramble on|off (the
                                       host hears noise: a wrong baud rate), garble N (N bytes of
                                       line noise now), noise on|off (a burst at every power-on)
    board.py DIR status                the cable's state as JSON

Only the standard library: the script runs under any Python 3.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import selectors
import signal
import socket
import subprocess
import sys
import time
import tty
from pathlib import Path

#: what a garble burst is made of: line noise, bytes that are not UTF-8, stray escape sequences
NOISE = bytes(range(0, 32)) + bytes(range(0x7F, 0x100)) + b"\x1b[2J\x1b[6n=>$#"
#: how long power-off waits for QEMU to go before it kills it
OFF_GRACE = 5.0


def log(message: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {message}", file=sys.stderr, flush=True)


def noise(count: int) -> bytes:
    return bytes(random.choice(NOISE) for _ in range(count))


# --- the cable ----------------------------------------------------------------------------------


class Cable:
    """Relays bytes between the adaptor's pty (host side) and the board's QEMU (board side)."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.deaf = False  # host -> board bytes dropped (a broken TX wire)
        self.mute = False  # board -> host bytes dropped (the console stopped)
        self.noise = False  # a garble burst each time the board powers on
        self.scramble = False  # every byte from the board arrives as noise (a wrong baud rate)
        self.board: socket.socket | None = None
        self.from_board = 0
        self.dropped = 0
        self.host_attached = False
        self.master, slave = os.openpty()
        tty.setraw(slave)
        self.pts = os.ttyname(slave)
        os.close(slave)  # the adaptor is opened by ser2net or pyserial, never held by the cable
        os.set_blocking(self.master, False)
        self.sel = selectors.DefaultSelector()
        self.console = self._listen("console.sock")
        self.control = self._listen("control.sock")
        link = self.dir / "ttyUSB0"
        link.unlink(missing_ok=True)
        link.symlink_to(self.pts)

    def _listen(self, name: str) -> socket.socket:
        path = self.dir / name
        path.unlink(missing_ok=True)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(str(path))
        sock.listen(4)
        self.sel.register(sock, selectors.EVENT_READ)
        return sock

    def run(self) -> None:
        while True:
            self._probe_host()
            timeout = None if self.host_attached else 0.05
            for key, _ in self.sel.select(timeout):
                sock = key.fileobj
                if sock is self.console:
                    self._plug_board()
                elif sock is self.control:
                    self._control()
                elif sock is self.master:
                    self._from_host()
                elif sock is self.board:
                    self._from_board()

    # A pty master reads EIO while nobody has the slave open: that is "no one on the adaptor".
    def _probe_host(self) -> None:
        if self.host_attached:
            return
        try:
            data = os.read(self.master, 4096)
        except BlockingIOError:
            data = b""
        except OSError as exc:
            if exc.errno == errno.EIO:
                return
            raise
        self.host_attached = True
        log("the adaptor was opened")
        self.sel.register(self.master, selectors.EVENT_READ)
        if data:
            self._to_board(data)

    def _detach_host(self) -> None:
        if not self.host_attached:
            return
        self.host_attached = False
        log("the adaptor was closed")
        self.sel.unregister(self.master)

    def _from_host(self) -> None:
        if not self.host_attached:  # detached earlier in this round of events
            return
        try:
            data = os.read(self.master, 4096)
        except BlockingIOError:
            return
        except OSError as exc:
            if exc.errno == errno.EIO:
                self._detach_host()
                return
            raise
        self._to_board(data)

    def _to_board(self, data: bytes) -> None:
        if self.board is None or self.deaf:
            return  # an unpowered (or deaf) board hears nothing
        with contextlib.suppress(OSError):
            self.board.sendall(data)

    def _plug_board(self) -> None:
        conn, _ = self.console.accept()
        if self.board is not None:  # a new power-on replaces the old QEMU's link
            self._unplug_board()
        self.board = conn
        log("the board powered on")
        self.sel.register(conn, selectors.EVENT_READ)
        if self.noise:
            self._to_host(noise(64))

    def _unplug_board(self) -> None:
        log("the board powered off")
        self.sel.unregister(self.board)
        self.board.close()
        self.board = None

    def _from_board(self) -> None:
        if self.board is None:
            return
        try:
            data = self.board.recv(4096)
        except OSError:
            data = b""
        if not data:  # QEMU went away: power off
            self._unplug_board()
            return
        self.from_board += len(data)
        if self.scramble:
            data = noise(len(data))
        if not self.mute:
            self._to_host(data)

    def _to_host(self, data: bytes) -> None:
        # a write succeeds even when the adaptor was just closed (the bytes would wait for the next
        # opener) and the poll for an opener runs only every 50 ms: a read tells, so read first
        if self.host_attached:
            self._from_host()
        else:
            self._probe_host()
        if not self.host_attached:
            self.dropped += len(data)  # nobody on the adaptor: the bytes are lost, as on a real line
            return
        try:
            os.write(self.master, data)
        except BlockingIOError:
            self.dropped += len(data)
        except OSError as exc:
            if exc.errno != errno.EIO:
                raise
            self._detach_host()

    def _control(self) -> None:
        conn, _ = self.control.accept()
        with conn:
            try:
                conn.settimeout(2)
                words = conn.recv(1024).decode().split()
                try:
                    reply = self.command(words)
                except (ValueError, IndexError) as exc:
                    reply = f"error: {exc}"
                log(f"control: {' '.join(words)} -> {reply}")
                conn.sendall(reply.encode() + b"\n")
            except OSError as exc:  # a client that went away must not take the cable down
                log(f"control: {exc}")

    def command(self, words: list[str]) -> str:
        name = words[0]
        if name in ("deaf", "mute", "noise", "scramble"):
            setattr(self, name, words[1] == "on")
            return "ok"
        if name == "garble":
            self._to_host(noise(int(words[1])))
            return "ok"
        if name == "status":
            return json.dumps({"host_attached": self.host_attached, "board": self.board is not None,
                               "from_board": self.from_board, "dropped": self.dropped, "deaf": self.deaf,
                               "mute": self.mute, "noise": self.noise, "scramble": self.scramble,
                               "pts": self.pts})
        raise ValueError(f"unknown cable command {name!r}; known: deaf, mute, noise, scramble, garble, "
                         "status")


def cable(directory: Path) -> int:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    Cable(directory).run()
    return 0


def control(directory: Path, words: list[str]) -> str:
    """Send one command to the cable daemon and return its answer."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        sock.connect(str(directory / "control.sock"))
        sock.sendall(" ".join(words).encode())
        return sock.makefile().readline().strip()


# --- the power switch ---------------------------------------------------------------------------


def qemu_pid(directory: Path) -> int | None:
    """The pid of the powered board's QEMU, or None when the board is off."""
    try:
        pid = int((directory / "qemu.pid").read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if alive(pid) else None


def alive(pid: int) -> bool:
    """True when ``pid`` runs (a zombie waiting for init to reap it does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def power_on(directory: Path) -> int:
    config = json.loads((directory / "board.json").read_text())
    faults_file = directory / "faults.json"
    faults = json.loads(faults_file.read_text()) if faults_file.exists() else {}
    if faults.get("dead"):
        print("PDU: outlet on")  # the PDU answers; the board itself never comes up
        return 0
    if qemu_pid(directory) is not None:
        print("PDU: outlet already on")
        return 0
    argv = list(config["qemu"]) + [
        "-chardev", f"socket,id=con0,path={directory / 'console.sock'}", "-serial", "chardev:con0",
        "-display", "none", "-monitor", "none",
        "-daemonize", "-pidfile", str(directory / "qemu.pid"),
    ]  # fmt: skip
    with open(directory / "qemu.log", "ab") as log:
        done = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, timeout=30)
    if done.returncode:
        tail = (directory / "qemu.log").read_text(errors="replace").strip().splitlines()[-1:]
        print(f"PDU: the board did not start: {' '.join(tail)}", file=sys.stderr)
        return 1
    print("PDU: outlet on")
    return 0


def power_off(directory: Path) -> int:
    pid = qemu_pid(directory)
    if pid is not None:
        os.kill(pid, signal.SIGTERM)
        end = time.monotonic() + OFF_GRACE
        while qemu_pid(directory) == pid and time.monotonic() < end:
            time.sleep(0.02)
        if qemu_pid(directory) == pid:
            os.kill(pid, signal.SIGKILL)
            while qemu_pid(directory) == pid:
                time.sleep(0.02)
    (directory / "qemu.pid").unlink(missing_ok=True)
    print("PDU: outlet off")
    return 0


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    directory, command = Path(argv[0]).resolve(), argv[1]
    if command == "cable":
        return cable(directory)
    if command == "on":
        return power_on(directory)
    if command == "off":
        return power_off(directory)
    if command == "reset":
        power_off(directory)
        return power_on(directory)
    if command in ("fault", "status"):
        answer = control(directory, argv[2:] if command == "fault" else ["status"])
        print(answer)
        return 1 if answer.startswith("error") else 0
    print(f"board.py: unknown command {command!r}; known: cable, on, off, reset, fault, status",
          file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
