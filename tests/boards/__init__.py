"""Test fixtures for the emulated arm64 lab board: its serial cable and power switch
(``board.py``), a real ``ser2net`` in front of the serial adaptor, and the device dictionary a lab
would write for it.

``start_board(uboot, directory)`` returns a running :class:`Arm64Board`; ``board.stop()`` ends
every process it started (the cable, ser2net, a powered QEMU). The pytest fixtures
``arm64_board`` and ``board`` are in ``tests/conftest.py``.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
BOARD_PY = HERE / "board.py"
ROOT = HERE.parent.parent
#: QEMU machine of the board: the same as the one its device tree was dumped from
MACHINE = ["-machine", "virt", "-cpu", "cortex-a57", "-m", "512"]
SER2NET_CONFIG = """\
%YAML 1.1
---
# ser2net in front of the board's serial adaptor, as in a lab (one connection per board)
connection: &{name}
  accepter: telnet(rfc2217),tcp,127.0.0.1,{port}
  enable: on
  options:
    kickolduser: true
  connector: serialdev,{tty},115200n81,local
"""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _preexec() -> None:
    from agent.process import die_with_parent

    die_with_parent()


def wait_until(predicate, timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise TimeoutError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)


@dataclass
class Arm64Board:
    """A running emulated board: where it lives and the lab services in front of it."""

    directory: Path
    tftp_root: Path
    port: int
    #: the directory of its images (U-Boot, kernel, ramdisk, dtb): jobs read them as file:// URLs
    images: Path
    name: str = "arm64-01"
    processes: list[subprocess.Popen] = field(default_factory=list)

    @property
    def tty(self) -> Path:
        """The serial adaptor (a pty, like /dev/ttyUSB0)."""
        return self.directory / "ttyUSB0"

    def command(self, *words: str) -> str:
        """A command line that runs board.py on this board (for the device dictionary)."""
        return " ".join([sys.executable, str(BOARD_PY), str(self.directory), *words])

    def dictionary(self, connection: str = "telnet", extra: str = "") -> str:
        """The device dictionary: power through board.py, the console through ser2net + telnet
        (``connection="telnet"``) or the adaptor opened directly with pyserial (``"serial"``)."""
        connect = {"telnet": f"telnet 127.0.0.1 {self.port}",
                   "serial": f"serial://{self.tty}?baudrate=115200"}[connection]
        return "\n".join([
            "{% extends 'qemu-arm64-uboot.jinja2' %}",
            f"{{% set connection_command = '{connect}' %}}",
            f"{{% set power_on_command = '{self.command('on')}' %}}",
            f"{{% set power_off_command = '{self.command('off')}' %}}",
            f"{{% set hard_reset_command = '{self.command('reset')}' %}}",
            extra,
        ])

    def device(self, connection: str = "telnet", extra: str = "", context: dict | None = None) -> dict:
        """The device configuration rendered from :meth:`dictionary` with Pumice's templates."""
        from master.devicetypes import DeviceTypes

        config = DeviceTypes().device_config(self.dictionary(connection, extra), context=context)
        config.setdefault("hostname", self.name)
        return config

    def dispatcher(self, *dirs: Path) -> dict:
        """The worker configuration for jobs on this board (TFTP root shared with QEMU); its file
        policy lets jobs read the board's images and files under ``dirs``."""
        from conftest import allowing

        return allowing([self.images, *dirs], tftp_root=str(self.tftp_root), dispatcher_ip="10.0.2.2")

    # -- state and faults ------------------------------------------------------------------------------
    def qemu_pid(self) -> int | None:
        """The pid of the powered board's QEMU, or None when it is off."""
        from boards.board import alive

        try:
            pid = int((self.directory / "qemu.pid").read_text())
        except (OSError, ValueError):
            return None
        return pid if alive(pid) else None

    def powered(self) -> bool:
        return self.qemu_pid() is not None

    def fault(self, *words: str) -> str:
        """Tell the cable to misbehave (``deaf on``, ``mute on``, ``scramble on``, ``garble 200``,
        ``noise on``)."""
        done = subprocess.run([sys.executable, str(BOARD_PY), str(self.directory), "fault", *words],
                              capture_output=True, text=True, timeout=10)
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout.strip()

    def status(self) -> dict:
        done = subprocess.run([sys.executable, str(BOARD_PY), str(self.directory), "status"],
                              capture_output=True, text=True, timeout=10, check=True)
        return json.loads(done.stdout)

    def set_dead(self, dead: bool) -> None:
        """A board that never powers on: the PDU answers, the board stays silent."""
        path = self.directory / "faults.json"
        if dead:
            path.write_text(json.dumps({"dead": True}))
        else:
            path.unlink(missing_ok=True)

    def heal(self) -> None:
        """Undo every fault: restart a killed cable or ser2net, clear the cable's modes."""
        self.set_dead(False)
        for proc in list(self.processes):
            if proc.poll() is not None:
                self.processes.remove(proc)
                restart = self.start_cable if proc.args[-1] == "cable" else self.start_ser2net
                restart()
        for name in ("deaf", "mute", "noise", "scramble"):
            self.fault(name, "off")

    def kill(self, service: str) -> None:
        """Kill a lab service in front of the board: ``cable`` (the adaptor is unplugged) or
        ``ser2net``; :meth:`heal` starts it again."""
        for proc in self.processes:
            if (proc.args[-1] == "cable") == (service == "cable") and proc.poll() is None:
                proc.kill()
                proc.wait(5)

    def power_off(self) -> None:
        subprocess.run([sys.executable, str(BOARD_PY), str(self.directory), "off"],
                       capture_output=True, timeout=30, check=True)

    # -- lab services --------------------------------------------------------------------------------
    def start_cable(self) -> subprocess.Popen:
        for stale in ("control.sock", "ttyUSB0"):  # left by a killed cable: wait for the new ones
            (self.directory / stale).unlink(missing_ok=True)
        log = open(self.directory / "cable.log", "ab")  # noqa: SIM115 (kept by the child)
        proc = subprocess.Popen([sys.executable, str(BOARD_PY), str(self.directory), "cable"],
                                stdin=subprocess.DEVNULL, stdout=log, stderr=log, preexec_fn=_preexec)
        self.processes.append(proc)
        wait_until(lambda: (self.directory / "control.sock").exists() and self.tty.exists()
                   or proc.poll() is not None, 10, "the serial cable daemon")
        if proc.poll() is not None:
            raise RuntimeError(f"the cable daemon exited: {(self.directory / 'cable.log').read_text()}")
        return proc

    def start_ser2net(self) -> subprocess.Popen:
        config = self.directory / "ser2net.yaml"
        config.write_text(SER2NET_CONFIG.format(name=self.name, port=self.port, tty=self.tty))
        log = open(self.directory / "ser2net.log", "ab")  # noqa: SIM115 (kept by the child)
        argv = ["ser2net", "-n", "-u", "-c", str(config), "-P", str(self.directory / "ser2net.pid")]
        proc = subprocess.Popen(argv,
                                stdin=subprocess.DEVNULL, stdout=log, stderr=log, preexec_fn=_preexec)
        self.processes.append(proc)

        def listening() -> bool:
            if proc.poll() is not None:
                return True
            with socket.socket() as sock:
                return sock.connect_ex(("127.0.0.1", self.port)) == 0

        wait_until(listening, 10, "ser2net to listen")
        if proc.poll() is not None:
            raise RuntimeError(f"ser2net exited: {(self.directory / 'ser2net.log').read_text()}")
        return proc

    def stop(self) -> None:
        """Power the board off and stop the cable and ser2net: nothing is left running."""
        with contextlib.suppress(Exception):
            self.power_off()
        pid = self.qemu_pid()
        if pid is not None:  # power_off failed: do not leave a QEMU behind anyway
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        for proc in reversed(self.processes):
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)
        self.processes.clear()


def start_board(uboot: Path, directory: Path, tftp_root: Path | None = None,
                ser2net: bool = True) -> Arm64Board:
    """Set up a board in ``directory`` (U-Boot ``uboot`` as its BIOS) and start its lab services."""
    directory.mkdir(parents=True, exist_ok=True)
    tftp_root = tftp_root or directory / "tftp"
    tftp_root.mkdir(parents=True, exist_ok=True)
    board = Arm64Board(directory=directory, tftp_root=tftp_root, port=free_port(), images=uboot.parent)
    qemu = ["qemu-system-aarch64", *MACHINE, "-bios", str(uboot),
            "-netdev", f"user,id=net0,tftp={tftp_root}", "-device", "virtio-net-device,netdev=net0"]
    (directory / "board.json").write_text(json.dumps({"qemu": qemu, "tftp_root": str(tftp_root)}))
    try:
        board.start_cable()
        if ser2net:
            board.start_ser2net()
    except BaseException:
        board.stop()
        raise
    return board


# --- jobs on the board --------------------------------------------------------------------------

#: a LAVA-format U-Boot ramdisk job for the board; @KERNEL@, @RAMDISK@, @DTB@ are image URLs
RAMDISK_JOB = """\
device_type: qemu-arm64-uboot
job_name: arm64 u-boot ramdisk smoke
timeouts:
  job: {minutes: 5}
  action: {minutes: 2}
  actions:
    bootloader-interrupt: {seconds: 40}
visibility: public
actions:
- deploy:
    to: tftp
    kernel: {url: '@KERNEL@', type: image}
    ramdisk: {url: '@RAMDISK@', compression: gz}
    dtb: {url: '@DTB@'}
- boot:
    method: u-boot
    commands: ramdisk
    prompts: ['/ # ']
- test:
    timeout: {minutes: 2}
    definitions:
    - from: inline
      name: smoke
      path: inline/smoke.yaml
      repository:
        metadata: {format: Lava-Test Test Definition 1.0, name: smoke}
        run:
          steps:
          - lava-test-case arch --shell test "$(uname -m)" = aarch64
          - lava-test-case overlay --shell test -d /lava-$LAVA_JOB_ID
"""


def ramdisk_job(images, **replace: str) -> str:
    """:data:`RAMDISK_JOB` for ``images`` (the dut_images.arm64 fixture); ``replace`` maps more
    placeholders (or any text) to their values."""
    values = {"@KERNEL@": images.kernel.as_uri(), "@RAMDISK@": images.ramdisk.as_uri(),
              "@DTB@": images.dtb.as_uri()}
    text = RAMDISK_JOB
    for key, value in [*replace.items(), *values.items()]:  # the caller's text may hold placeholders
        text = text.replace(key, value)
    return text


@dataclass
class JobRun:
    """What ``pumice-run`` left: exit status, stderr, the output directory and the job's records."""

    returncode: int
    stderr: str
    output: Path
    duration: float

    @property
    def log(self) -> list:
        from results.log import read_log

        return list(read_log(self.output / "output.yaml"))

    def results(self) -> dict:
        """(suite, case) -> Result of the job's bundle."""
        from results.bundle import load_bundle

        bundle = load_bundle((self.output / "results.yaml").read_text())
        return {(r.suite, r.case): r for r in bundle.results}

    def job_result(self) -> dict:
        """The ``lava/job`` result record (result, error_type, error_msg)."""
        for record in self.log:
            msg = record.msg if record.lvl == "results" else {}
            if msg.get("definition") == "lava" and msg.get("case") == "job":
                return record.msg
        raise AssertionError("no lava/job result in the log")

    def targets(self) -> list[str]:
        return [record.msg for record in self.log if record.lvl == "target"]

    def explain(self) -> str:
        """The end of the log, for assertion messages."""
        lines = (self.output / "output.yaml").read_text(errors="replace").splitlines()
        return self.stderr + "\n".join(lines[-60:])


class JobProcess:
    """A ``pumice-run`` started in the background (to act on the board while the job runs)."""

    def __init__(self, argv: list[str], output: Path) -> None:
        self.output = output
        self.start = time.monotonic()
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                     cwd=ROOT, preexec_fn=_preexec)

    def wait_for_log(self, text: str, timeout: float = 120) -> None:
        """Wait until the job's log holds ``text`` (the job still running)."""
        log = self.output / "output.yaml"

        def seen() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"the job ended before {text!r} showed: {self.proc.stderr.read()}")
            return log.exists() and text in log.read_text(errors="replace")

        wait_until(seen, timeout, f"{text!r} in the job's log")

    def wait(self, timeout: float = 300) -> JobRun:
        _, stderr = self.proc.communicate(timeout=timeout)
        return JobRun(self.proc.returncode, stderr, self.output, time.monotonic() - self.start)


def start_job(board: Arm64Board, job_text: str, workdir: Path, connection: str = "telnet", job_id: str = "1",
              extra: str = "", device: dict | None = None, dispatcher: dict | None = None) -> JobProcess:
    """Start ``job_text`` on ``board`` with ``pumice-run`` (a subprocess, like lava-run)."""
    import yaml

    workdir.mkdir(parents=True, exist_ok=True)
    job = workdir / f"job-{job_id}.yaml"
    job.write_text(job_text)
    device_file = workdir / f"device-{job_id}.yaml"
    device_file.write_text(yaml.safe_dump(device or board.device(connection, extra)))
    dispatcher_file = workdir / f"dispatcher-{job_id}.yaml"
    dispatcher_file.write_text(yaml.safe_dump(dispatcher or board.dispatcher()))
    output = workdir / f"out-{job_id}"
    return JobProcess([sys.executable, "-m", "agent.run", "--device", str(device_file), "--dispatcher",
                       str(dispatcher_file), "--output-dir", str(output), "--job-id", job_id, str(job)],
                      output)


def run_job(board: Arm64Board, job_text: str, workdir: Path, timeout: float = 300, **options) -> JobRun:
    """Run ``job_text`` on ``board`` with ``pumice-run`` to its end (options: see :func:`start_job`)."""
    return start_job(board, job_text, workdir, **options).wait(timeout)


def processes(name: str, containing: str = "") -> list[str]:
    """Running processes (not zombies) of command ``name`` whose command line contains
    ``containing``: what a job must not leave behind (other tests' processes do not match)."""
    from boards.board import alive

    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().rstrip(b"\0").split(b"\0")
        except OSError:
            continue
        line = " ".join(arg.decode(errors="replace") for arg in argv)
        command = os.path.basename(argv[0].decode(errors="replace"))
        if command == name and containing in line and alive(int(proc.name)):
            found.append(f"{proc.name}: {line}")
    return found
