"""Faults of a real lab on the emulated arm64 board: each ends the job Incomplete (or Canceled) with a
precise message within its timeouts, the board is powered off, nothing is left running, and the
next job on the device runs to Complete."""

from __future__ import annotations

import signal

import pytest
from boards import processes, ramdisk_job, run_job, start_job

pytestmark = pytest.mark.qemu

#: a test that runs long enough to be cut: the console faults happen while it sleeps
LONG_TEST = "          - lava-test-case wait --shell sleep 60\n          - lava-test-case overlay"
#: short timeouts for the waits a fault leaves without an answer
SHORT = {"bootloader-interrupt: {seconds: 40}": "bootloader-interrupt: {seconds: 10}",
         "    timeout: {minutes: 2}\n    definitions:": "    timeout: {seconds: 15}\n    definitions:"}


def assert_incomplete(run, error_type: str, *message: str) -> dict:
    """The job ended Incomplete with ``error_type`` and every piece of ``message`` in its error."""
    assert run.returncode == 1, run.explain()
    result = run.job_result()
    assert result["result"] == "fail"
    assert result["error_type"] == error_type, result
    for piece in message:
        assert piece in result["error_msg"], result["error_msg"]
    return result


def assert_off_and_clean(board, run) -> None:
    assert not board.powered(), "the board was left powered on"
    powers = [r.msg for r in run.log if r.lvl == "info" and str(r.msg).startswith("power_off: ")]
    assert powers, "power_off did not run"
    assert list(board.tftp_root.iterdir()) == [], "the job's TFTP directory was left behind"
    assert processes("telnet", str(board.port)) == []


def next_job_completes(board, images, tmp_path, connection: str = "telnet") -> None:
    board.heal()
    run = run_job(board, ramdisk_job(images), tmp_path / "next", connection=connection, job_id="2")
    assert run.returncode == 0, run.explain()
    assert run.results()[("0_smoke", "arch")].result == "pass"
    assert not board.powered()


def test_missing_tftp_file(board, dut_images, tmp_path):
    """The worker puts the files where the board's TFTP server does not look: U-Boot's
    'File not found' ends the boot at once, naming the command."""
    elsewhere = tmp_path / "other-tftp-root"
    elsewhere.mkdir()
    dispatcher = {**board.dispatcher(), "tftp_root": str(elsewhere)}
    run = run_job(board, ramdisk_job(dut_images.arm64), tmp_path, dispatcher=dispatcher)
    result = assert_incomplete(run, "Infrastructure", "U-Boot error after 'tftp 0x40400000 pumice-1-",
                               "/kernel/Image': 'File not found'")
    assert run.duration < 60, result
    assert list(elsewhere.iterdir()) == []  # cleaned up there too
    assert_off_and_clean(board, run)
    next_job_completes(board, dut_images.arm64, tmp_path)


def test_autoboot_never_interrupted(board, dut_images, tmp_path):
    """The board does not hear the agent (a broken TX line): U-Boot goes on with its autoboot."""
    board.fault("deaf", "on")
    run = run_job(board, ramdisk_job(dut_images.arm64), tmp_path)
    assert_incomplete(run, "Infrastructure", "U-Boot was not interrupted: it went on with its autoboot and "
                      "printed 'File not found' before its prompt '=>'")
    assert_off_and_clean(board, run)
    next_job_completes(board, dut_images.arm64, tmp_path)


def test_board_never_powers_on(board, dut_images, tmp_path):
    board.set_dead(True)
    job = ramdisk_job(dut_images.arm64, **SHORT)
    run = run_job(board, job, tmp_path)
    assert_incomplete(run, "Infrastructure", "bootloader-interrupt timed out after 00:00:10",
                      "waiting for the interrupt prompt 'Hit any key to stop autoboot': the board printed "
                      "nothing since the reset")
    assert run.duration < 40
    assert_off_and_clean(board, run)
    next_job_completes(board, dut_images.arm64, tmp_path)


def test_garbled_console(board, dut_images, tmp_path):
    """Every byte arrives as noise (a wrong baud rate): no prompt ever matches, the wait ends at
    its timeout with what the board said; the noise is logged, escaped."""
    board.fault("scramble", "on")
    run = run_job(board, ramdisk_job(dut_images.arm64, **SHORT), tmp_path)
    assert_incomplete(run, "Infrastructure", "bootloader-interrupt timed out after 00:00:10",
                      "characters of unreadable output (line noise, a wrong baud rate?) since the reset")
    assert run.targets(), "the noise was not logged"
    assert_off_and_clean(board, run)
    next_job_completes(board, dut_images.arm64, tmp_path)


def test_line_noise_does_not_break_a_job(board, dut_images, tmp_path):
    """Bursts of noise at power-on and during the test: the job still completes."""
    board.fault("noise", "on")
    pause = {"          - lava-test-case overlay": "          - lava-test-case pause --shell sleep 2\n"
                                                   "          - lava-test-case overlay"}
    job = start_job(board, ramdisk_job(dut_images.arm64, **pause), tmp_path)
    job.wait_for_log("TEST_CASE_ID=arch")
    board.fault("garble", "300")
    run = job.wait()
    assert run.returncode == 0, run.explain()
    assert run.results()[("0_smoke", "overlay")].result == "pass"
    assert not board.powered()


@pytest.mark.parametrize("connection", ["telnet", "serial"])
def test_console_dies_mid_test(board, dut_images, tmp_path, connection):
    """ser2net dies (telnet), or the USB serial adaptor goes away (pyserial), while a test runs."""
    job = start_job(board, ramdisk_job(dut_images.arm64, **{"          - lava-test-case overlay": LONG_TEST}),
                    tmp_path, connection=connection)
    job.wait_for_log("<LAVA_SIGNAL_STARTTC wait>")
    board.kill("ser2net" if connection == "telnet" else "cable")
    run = job.wait(timeout=60)
    assert run.duration < 60
    what = "telnet: the console connection closed" if connection == "telnet" else "went away"
    assert_incomplete(run, "Infrastructure", what)
    assert run.results()[("0_smoke", "arch")].result == "pass"  # the results before the fault are kept
    assert_off_and_clean(board, run)
    next_job_completes(board, dut_images.arm64, tmp_path, connection)


def test_console_stops_mid_test(board, dut_images, tmp_path):
    """The console goes silent (no EOF): the test ends at its own timeout."""
    long_test = {**SHORT, "          - lava-test-case overlay": LONG_TEST}
    job = start_job(board, ramdisk_job(dut_images.arm64, **long_test), tmp_path)
    job.wait_for_log("<LAVA_SIGNAL_STARTTC wait>")
    board.fault("mute", "on")
    run = job.wait(timeout=90)
    assert_incomplete(run, "Job", "lava-test-shell timed out after 00:00:15")
    assert_off_and_clean(board, run)
    next_job_completes(board, dut_images.arm64, tmp_path)


def test_cancel_powers_the_board_off(board, dut_images, tmp_path):
    job = start_job(board, ramdisk_job(dut_images.arm64), tmp_path)
    job.wait_for_log("start: 2.4.3 bootloader-commands")
    job.proc.send_signal(signal.SIGTERM)
    run = job.wait(timeout=60)
    assert run.returncode == 2, run.explain()
    assert run.job_result()["error_type"] == "Canceled"
    assert_off_and_clean(board, run)


def test_killed_runner_leaves_no_console_client(board, dut_images, tmp_path):
    """pumice-run killed outright: its telnet dies with it; the board stays on (nobody switched it
    off, as in a lab) and the next job's hard reset takes it from there."""
    job = start_job(board, ramdisk_job(dut_images.arm64), tmp_path)
    job.wait_for_log("start: 2.4.3 bootloader-commands")
    job.proc.send_signal(signal.SIGKILL)
    job.proc.wait(10)
    from boards import wait_until

    wait_until(lambda: not processes("telnet", str(board.port)), 5, "the runner's telnet to go")
    assert board.powered()
    for left in board.tftp_root.iterdir():  # only a live runner cleans its TFTP directory up
        __import__("shutil").rmtree(left)
    next_job_completes(board, dut_images.arm64, tmp_path)
