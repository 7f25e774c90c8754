"""`pumice-run` on a real emulated board: QEMU x86_64 booting the Debian kernel + busybox initramfs."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import allowing

from results.bundle import load_bundle
from results.log import read_log

DATA = Path(__file__).parent / "data"
pytestmark = pytest.mark.qemu


def render_device(dictionary: str) -> dict:
    from master.devicetypes import DeviceTypes

    return DeviceTypes().device_config(dictionary, context={"arch": "amd64"})


@pytest.fixture
def board(dut_images, http_server, tmp_path: Path):
    """A served kernel and ramdisk, the device YAML, and a way to write jobs for them."""
    kernel = http_server.root / "vmlinuz"
    ramdisk = http_server.root / "initramfs.cpio.gz"
    shutil.copyfile(dut_images.amd64.kernel, kernel)
    shutil.copyfile(dut_images.amd64.ramdisk, ramdisk)
    device = tmp_path / "qemu01.yaml"
    device.write_text(yaml.safe_dump(render_device((DATA / "qemu-amd64.jinja2").read_text())))
    # the job's scratch files (and so QEMU's command line) under tmp_path: the tests find its QEMU
    (tmp_path / "work").mkdir()
    dispatcher = tmp_path / "dispatcher.yaml"
    dispatcher.write_text(yaml.safe_dump(allowing(addresses=[http_server.address], tmp_dir=str(tmp_path / "work"))))

    def job(text: str | None = None, **replace: str) -> Path:
        text = text or (DATA / "smoke-job.yaml").read_text()
        values = {
            "@KERNEL_URL@": http_server.url("vmlinuz"),
            "@KERNEL_SHA256@": hashlib.sha256(kernel.read_bytes()).hexdigest(),
            "@RAMDISK_URL@": http_server.url("initramfs.cpio.gz"),
        }
        values.update(replace)
        for key, value in values.items():
            text = text.replace(key, value)
        path = tmp_path / f"job-{len(list(tmp_path.glob('job-*')))}.yaml"
        path.write_text(text)
        return path

    class Board:
        pass

    b = Board()
    b.device, b.job, b.root = device, job, tmp_path
    b.args = ["--device", str(device), "--dispatcher", str(dispatcher)]
    return b


def pumice_run(
    board, job: Path, *extra: str, timeout: float = 240
) -> tuple[subprocess.CompletedProcess, Path]:
    out = board.root / f"out-{job.stem}"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "agent.run",
            *board.args,
            "--output-dir",
            str(out),
            "--job-id",
            "42",
            *extra,
            str(job),
        ],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return done, out


def results_by_case(out: Path) -> dict:
    bundle = load_bundle((out / "results.yaml").read_text())
    return {(r.suite, r.case): r for r in bundle.results}


def lava_job_result(out: Path) -> dict:
    for record in read_log(out / "output.yaml"):
        if (
            record.lvl == "results"
            and record.msg.get("definition") == "lava"
            and record.msg.get("case") == "job"
        ):
            return record.msg
    raise AssertionError("no lava/job result in the log")


def test_smoke_job_completes_on_the_board(board) -> None:
    done, out = pumice_run(board, board.job())
    assert done.returncode == 0, done.stderr + (out / "output.yaml").read_text()[-5000:]
    results = results_by_case(out)
    level = results[("0_smoke", "always-pass")].level
    assert level == "3.1"
    assert results[("0_smoke", "always-pass")].result == "pass"
    assert results[("0_smoke", "always-fail")].result == "fail"
    measured = results[("0_smoke", "boot-time")]
    assert (measured.result, measured.measurement, measured.units) == ("pass", 1.5, "s")
    assert results[("0_smoke", "loopback")].set == "networking"
    assert results[("0_smoke", "uname")].set is None
    assert results[("1_parsed", "case-one")].result == "pass"
    assert results[("1_parsed", "case-two")].result == "fail"
    assert results[("lava", "job")].result == "pass"
    bundle = load_bundle((out / "results.yaml").read_text())
    lava = {(r.case, r.level): r for r in bundle.results if r.suite == "lava"}
    # apply-overlay-guest holds LAVA's level though the overlay goes into the ramdisk
    for name, lvl in [("deployimages", "1"), ("apply-overlay-guest", "1.2"), ("http-download", "1.4.1"),
                      ("http-download", "1.5.1"), ("append-overlays", "1.5.2"), ("execute-qemu", "2.1.1"),
                      ("lava-test-shell", "3.1"),
                      ("power-off", "4.1")]:
        action = lava[(name, lvl)]
        assert action.result == "pass", action
        assert "timeout" in action.extra and action.duration is not None
    # timeouts: the deploy block's 1 minute wins over the job's action default of 2
    description = yaml.safe_load((out / "description.yaml").read_text())
    assert description["pipeline"][0]["timeout"] == 60
    # the board's output is in the log, as target lines
    targets = [r.msg for r in read_log(out / "output.yaml") if r.lvl == "target"]
    assert any("<LAVA_SIGNAL_TESTCASE TEST_CASE_ID=always-pass RESULT=pass>" in t for t in targets)
    assert any(t.strip() == "x86_64" for t in targets)


def test_two_deploys_number_test_runs_across_the_job(board) -> None:
    """deploy, boot, test; deploy, boot, test: each boot runs its own test action from its own
    overlay, and the test runs are numbered across the job (0_first, 1_second), as in LAVA."""
    job = yaml.safe_load(board.job().read_text())
    deploy, boot, test = job["actions"]
    first, second = test["test"]["definitions"]
    first["name"], second["name"] = "first", "second"
    job["actions"] = [deploy, boot, {"test": {**test["test"], "definitions": [first]}},
                      deploy, boot, {"test": {**test["test"], "definitions": [second]}}]
    path = board.root / "two-deploys.yaml"
    path.write_text(yaml.safe_dump(job, sort_keys=False))
    done, out = pumice_run(board, path)
    assert done.returncode == 0, done.stderr + (out / "output.yaml").read_text()[-5000:]
    results = results_by_case(out)
    assert results[("0_first", "always-pass")].level == "3.1"
    assert results[("1_second", "case-one")].result == "pass"
    assert results[("1_second", "case-two")].level == "6.1"
    assert not {suite for suite, _ in results} - {"lava", "0_first", "1_second"}
    runs = [r.msg["case"] for r in read_log(out / "output.yaml")
            if r.lvl == "results" and r.msg.get("definition") == "lava" and r.msg["case"].endswith(("first", "second"))]
    assert runs == ["0_first", "1_second"]  # the second boot runs its own stage only


def test_checksum_mismatch_is_a_job_error(board) -> None:
    done, out = pumice_run(board, board.job(**{"@KERNEL_SHA256@": "0" * 64}))
    assert done.returncode == 1
    result = lava_job_result(out)
    assert result["error_type"] == "Job"
    assert "sha256 checksum mismatch" in result["error_msg"]
    # the board never booted: description.yaml (deferred to the boot) is written all the same
    assert yaml.safe_load((out / "description.yaml").read_text())["pipeline"]


def test_unreachable_url_is_an_infrastructure_error(board, http_server) -> None:
    # the worker's policy lets the job try port 9 of the worker itself (nothing listens there)
    dispatcher = board.root / "dispatcher-port-9.yaml"
    config = allowing(addresses=[http_server.address, "127.0.0.1:9"], tmp_dir=str(board.root / "work"))
    dispatcher.write_text(yaml.safe_dump(config))
    done, out = pumice_run(board, board.job(**{"@RAMDISK_URL@": "http://127.0.0.1:9/nothing.cpio.gz"}),
                           "--dispatcher", str(dispatcher))
    assert done.returncode == 1
    result = lava_job_result(out)
    assert result["error_type"] == "Infrastructure"
    assert "127.0.0.1:9" in result["error_msg"]


def test_missing_file_is_a_job_error(board, http_server) -> None:
    done, out = pumice_run(board, board.job(**{"@RAMDISK_URL@": http_server.url("missing.cpio.gz")}))
    assert done.returncode == 1
    result = lava_job_result(out)
    assert result["error_type"] == "Job" and "HTTP 404" in result["error_msg"]


def test_board_that_never_shows_the_prompt_times_out(board) -> None:
    text = (DATA / "smoke-job.yaml").read_text().replace("- '/ # '", "- 'never-this-prompt'")
    text = text.replace(
        "    timeout:\n      minutes: 1\n    method: qemu",
        "    timeout:\n      seconds: 15\n    method: qemu",
    )
    start = time.monotonic()
    done, out = pumice_run(board, board.job(text))
    assert done.returncode == 1
    assert time.monotonic() - start < 60
    result = lava_job_result(out)
    assert result["error_type"] == "Job"
    assert "timed out" in result["error_msg"] and "never-this-prompt" in result["error_msg"]
    assert not qemu_processes(out)


def test_malformed_and_unknown_keys_are_refused(board) -> None:
    bad = board.job("device_type: qemu\njob_name: [unclosed\n")
    done, out = pumice_run(board, bad)
    assert done.returncode == 1 and "invalid YAML" in done.stderr and "line" in done.stderr
    text = (
        (DATA / "smoke-job.yaml")
        .read_text()
        .replace("    media: tmpfs\n", "    media: tmpfs\n    colour: blue\n")
    )
    done, out = pumice_run(board, board.job(text))
    assert done.returncode == 1
    assert "actions[1].boot.colour" in done.stderr and "unknown key" in done.stderr
    assert lava_job_result(out)["error_type"] == "Job"


def test_missing_prompts_are_refused(board) -> None:
    text = (DATA / "smoke-job.yaml").read_text().replace("    prompts:\n    - '/ # '\n", "")
    done, out = pumice_run(board, board.job(text), "--validate")
    assert done.returncode == 1
    assert "'prompts' is missing" in done.stderr


def qemu_processes(out: Path) -> list[str]:
    found = subprocess.run(["pgrep", "-af", "qemu-system"], capture_output=True, text=True).stdout
    return [line for line in found.splitlines() if str(out.parent / "work") in line]


def test_sigterm_cancels_and_leaves_no_qemu(board) -> None:
    job = board.job()
    out = board.root / "out-cancel"
    proc = subprocess.Popen(
        [sys.executable, "-m", "agent.run", *board.args, "--output-dir", str(out), str(job)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # wait until the board is booting
        log = out / "output.yaml"
        if log.exists() and "execute-qemu" in log.read_text():
            break
        time.sleep(0.1)
    else:
        proc.kill()
        pytest.fail("QEMU never started")
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 2
    result = lava_job_result(out)
    assert result["error_type"] == "Canceled"
    assert not qemu_processes(out)
    names = [r.msg.get("case") for r in read_log(out / "output.yaml") if r.lvl == "results"]
    assert "power-off" in names


def test_sigkill_of_the_runner_takes_qemu_with_it(board) -> None:
    job = board.job()
    out = board.root / "out-kill"
    proc = subprocess.Popen(
        [sys.executable, "-m", "agent.run", *board.args, "--output-dir", str(out), str(job)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not qemu_processes(out):
        time.sleep(0.1)
    assert qemu_processes(out), "QEMU never started"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and qemu_processes(out):
        time.sleep(0.1)
    assert not qemu_processes(out)
