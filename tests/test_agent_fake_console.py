"""U-Boot's boot logic on a scripted console and a fake power control, without a board or QEMU:
the interrupt, the commands, ``failure_retry`` and the timeouts. (The QEMU board tests run the
real path.) Also the fake console itself: prompts, delays, line noise, garbage bytes, answers."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
import yaml

from agent.connections.fake import FakeSpawn, fake_console, line_noise
from agent.job import load_job
from agent.logger import JobLogger
from agent.power import FakePower
from agent.timeout import Deadline

DEVICE = {
    "hostname": "fake-01", "device_type": "fake-uboot",
    "commands": {"connect": "telnet 127.0.0.1 7001", "hard_reset": "pdu reboot 1", "power_off": "pdu off 1"},
    "actions": {
        "deploy": {"methods": {"tftp": None}},
        "boot": {"connections": {"serial": None}, "methods": {"u-boot": {
            "parameters": {"bootloader_prompt": "=>", "interrupt_prompt": "Hit any key to stop autoboot",
                           "interrupt_char": " ", "boot_message": "Starting kernel"},
            "ramdisk": {"commands": ["setenv serverip {SERVER_IP}", "tftp 0x40000000 kernel", "bootm"]}}}},
    },
    "constants": {"u-boot": {"interrupt-newline": True,
                             "error-messages": ["Wrong Image Format", "Retry count exceeded"]}},
    "timeouts": {"connection": {"seconds": 2}},
}

JOB = """\
device_type: fake-uboot
job_name: u-boot on a fake console
timeouts: {job: {minutes: 1}, action: {seconds: 20}}
visibility: public
actions:
- boot:
    method: u-boot
    commands: ramdisk
    prompts: ['/ # ']
    failure_retry: %(retry)d
    timeout: {seconds: %(boot_timeout)d}
"""

BANNER = "\r\nU-Boot 2023.01 (fake)\r\n\r\nDRAM:  1 GiB\r\n"


class FakeUBoot:
    """A scripted U-Boot: each reset prints its banner and counts down; a key stops the autoboot
    (which otherwise boots Linux from flash); each command typed at ``=>`` is answered by
    ``answers`` (``bootm`` starts the kernel and a shell by default)."""

    def __init__(self, spawn: FakeSpawn, interrupt_after: float = 0.05, autoboot: float = 0.5,
                 failures: int = 0, failure: str = "Wrong Image Format for bootm command",
                 broken: bool = False, silent: bool = False) -> None:
        self.spawn = spawn
        self.interrupt_after = interrupt_after
        self.autoboot = autoboot
        self.failures = failures
        self.failure = failure
        self.broken = broken
        self.silent = silent
        self.resets = 0
        self.counting_down = False
        spawn.on_input(".", self.interrupted, immediate=True)
        spawn.on_input(r"^setenv|^tftp", "\r\n=> ")
        spawn.on_input(r"^bootm", self.bootm)
        spawn.on_input(r"^$", "\r\n/ # ")

    def reset(self) -> None:
        self.resets += 1
        self.spawn.cancel("autoboot")
        if self.silent:  # no power, a wrong port
            return
        if self.broken:  # a wrong baud rate: only noise
            self.spawn.emit(line_noise(300, seed=self.resets), delay=0.01, tag="autoboot")
            return
        self.counting_down = True
        self.spawn.emit(BANNER, delay=0.01, tag="autoboot")
        self.spawn.emit("Hit any key to stop autoboot:  1 ", delay=self.interrupt_after, tag="autoboot")
        self.spawn.emit("\r\nStarting kernel from flash ...\r\n", delay=self.autoboot, tag="autoboot")

    def interrupted(self, key: str, spawn: FakeSpawn) -> bool:
        if not self.counting_down:
            return False  # a key typed at the prompt: part of a command
        self.counting_down = False
        spawn.cancel("autoboot")
        spawn.emit("\r\n=> ")
        return True

    def bootm(self, line: str, spawn: FakeSpawn) -> None:
        if self.failures:
            self.failures -= 1
            spawn.emit(f"\r\n{self.failure}\r\n=> ")
            return
        spawn.emit("\r\n## Booting kernel\r\nStarting kernel ...\r\n\r\n")
        spawn.emit("[    0.000000] Linux version 6.1.0 (fake)\r\n", delay=0.02)
        spawn.emit("\r\n/ # ", delay=0.02)


def run_job(tmp_path: Path, board_options: dict | None = None, retry: int = 1, boot_timeout: int = 20,
            power: FakePower | None = None):
    spawn = FakeSpawn("ttyUSB0", echo=True)
    board = FakeUBoot(spawn, **(board_options or {}))
    power = power or FakePower(on_call={"hard_reset": board.reset})
    logger = JobLogger(tmp_path / "output.yaml")
    console = fake_console(logger, spawn, prompts=["/ # "])
    job = load_job(JOB % {"retry": retry, "boot_timeout": boot_timeout}, DEVICE, job_id="7", logger=logger,
                   dispatcher={"dispatcher_ip": "192.0.2.10"}, on_worker=False, power=power, console=console)
    health = job.run()
    logger.close()
    records = yaml.safe_load((tmp_path / "output.yaml").read_text())
    return job, health, board, power, spawn, records


def messages(records: list[dict], level: str | None = None) -> list:
    return [record["msg"] for record in records if level is None or record["lvl"] == level]


def test_uboot_is_interrupted_and_boots_to_the_shell(tmp_path: Path) -> None:
    job, health, board, power, spawn, records = run_job(tmp_path)
    assert health == "Complete", messages(records, "error")
    assert power.calls == ["hard_reset", "power_off"]
    assert board.resets == 1
    assert spawn.raw[0] == " \n"  # the interrupt character, with a newline (interrupt-newline)
    assert spawn.typed[1:4] == ["setenv serverip 192.0.2.10", "tftp 0x40000000 kernel", "bootm"]
    assert "Starting kernel from flash ...\r" not in messages(records, "target")
    assert "the board is at a shell prompt" in messages(records, "info")


def test_a_bootloader_error_is_retried_with_a_new_power_cycle(tmp_path: Path) -> None:
    job, health, board, power, spawn, records = run_job(tmp_path, {"failures": 1}, retry=2)
    assert health == "Complete", messages(records, "error")
    assert board.resets == 2 and power.calls == ["hard_reset", "hard_reset", "power_off"]
    warnings = messages(records, "warning")
    assert any("uboot-action failed: U-Boot error after 'bootm': 'Wrong Image Format'" in w and "(1/2), retrying" in w
               for w in warnings), warnings
    [boot] = [r for r in job.results if r.case == "uboot-action"]
    assert boot.result == "pass" and boot.extra.get("retries") == 1


def test_failure_retry_gives_up_after_its_attempts(tmp_path: Path) -> None:
    job, health, board, power, spawn, records = run_job(tmp_path, {"failures": 5}, retry=3)
    assert health == "Incomplete"
    assert board.resets == 3
    assert (job.error.error_type, str(job.error)) == ("Infrastructure",
                                                      "U-Boot error after 'bootm': 'Wrong Image Format'")


@pytest.mark.parametrize(("board", "said"), [
    ({"broken": True}, r"the board printed \d+ characters of unreadable output \(line noise, a wrong baud rate\?\)"),
    ({"silent": True}, "the board printed nothing"),
    ({"interrupt_after": 3.0}, "the board's last line: 'DRAM:  1 GiB'"),
])
def test_an_interrupt_prompt_that_never_comes_times_out(tmp_path: Path, board: dict, said: str) -> None:
    job, health, fake, power, spawn, records = run_job(tmp_path, board, boot_timeout=1)
    assert health == "Incomplete"
    assert job.error.error_type == "Infrastructure"
    assert re.fullmatch(r"bootloader-interrupt timed out after 00:00:01 \(waiting for the interrupt prompt "
                        f"'Hit any key to stop autoboot': {said} since the reset\\)", str(job.error)), str(job.error)


def test_a_failing_power_control_is_an_infrastructure_error(tmp_path: Path) -> None:
    power = FakePower(fail={"hard_reset": "PDU unreachable"})
    job, health, board, power, spawn, records = run_job(tmp_path, power=power)
    assert health == "Incomplete"
    assert (job.error.error_type, str(job.error)) == ("Infrastructure", "hard_reset command failed: PDU unreachable")
    assert board.resets == 0 and power.calls == ["hard_reset", "power_off"]


# --- the fake console itself -------------------------------------------------------------------------


def test_fake_console_delays_garbage_and_answers(tmp_path: Path) -> None:
    logger = JobLogger(tmp_path / "output.yaml")
    spawn = FakeSpawn().emit("login: ", delay=0.2)
    spawn.on_input("^root$", "Password: ").on_input("secret", "\r\n# ", once=True)
    console = fake_console(logger, spawn, prompts=["# "])
    started = time.monotonic()
    assert console.expect(["login: "], Deadline.after(0.1, "early")) is None  # not printed yet
    assert console.expect(["login: "], Deadline.after(2, "login")) == 0
    assert time.monotonic() - started >= 0.2
    console.sendline("root")
    assert console.expect(["Password: "], Deadline.after(2, "password")) == 0
    console.sendline("secret")
    assert console.wait_for_prompt(Deadline.after(2, "prompt"))
    spawn.emit(b"\xff\xfe garbage \x00\x1b[31m\r\nok\r\n")
    assert console.expect(["ok"], Deadline.after(2, "ok")) == 0
    spawn.hang_up()
    with pytest.raises(Exception, match="console connection closed.*hung up"):
        console.expect(["never"], Deadline.after(2, "eof"))
    console.close()
    logger.close()
    assert spawn.typed == ["root", "secret"]
