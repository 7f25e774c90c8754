"""Master (SQLite) + agent as separate processes on loopback, jobs submitted with curl, run on a
real QEMU board: enrolment and CURVE (the default) and faults (master killed, agent killed, link
cut for 30 s) with nothing lost and nothing doubled."""

from __future__ import annotations

import hashlib
import shutil
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from support.broker import ProcessLab, running_process_lab, wait_for

from results.logfile import LogFile
from results.record import results_in_lines

DATA = Path(__file__).parent / "data"
pytestmark = pytest.mark.qemu


@pytest.fixture
def board_files(dut_images, http_server) -> dict[str, str]:
    """The served kernel and ramdisk of the amd64 board, as the smoke job's placeholders."""
    images = (("vmlinuz", dut_images.amd64.kernel), ("initramfs.cpio.gz", dut_images.amd64.ramdisk))
    for name, source in images:
        if not (http_server.root / name).exists():
            shutil.copyfile(source, http_server.root / name)
    return {"@KERNEL_URL@": http_server.url("vmlinuz"),
            "@KERNEL_SHA256@": hashlib.sha256((http_server.root / "vmlinuz").read_bytes()).hexdigest(),
            "@RAMDISK_URL@": http_server.url("initramfs.cpio.gz")}


def smoke_job(root: Path, files: dict[str, str]) -> Path:
    text = (DATA / "smoke-job.yaml").read_text()
    for key, value in files.items():
        text = text.replace(key, value)
    path = root / f"job-{len(list(root.glob('job-*')))}.yaml"
    path.write_text(text)
    return path


def long_job(root: Path, files: dict[str, str], ticks: int) -> Path:
    """The smoke job with one test that logs a result and a line every second, ``ticks`` times."""
    job = yaml.safe_load(smoke_job(root, files).read_text())
    job["job_name"] = "long ticking job"
    test = job["actions"][2]["test"]
    test["timeout"] = {"minutes": 3}
    test["definitions"] = [{
        "from": "inline", "name": "ticks", "path": "inline/ticks.yaml",
        "repository": {"metadata": {"format": "Lava-Test Test Definition 1.0", "name": "ticks",
                                    "description": "a slow test"},
                       "run": {"steps": [f"for i in $(seq 1 {ticks}); do lava-test-case tick-$i --result "
                                         "pass; echo \"line $i of the long test\"; sleep 1; done"]}},
    }]
    path = root / "long-job.yaml"
    path.write_text(yaml.safe_dump(job, sort_keys=False))
    return path


@pytest.fixture
def plab(tmp_path: Path, http_server) -> Iterator[ProcessLab]:
    for lab in running_process_lab(tmp_path):
        lab.allow(http_server.address)  # the board's files
        yield lab


def wait_for_log(lab: ProcessLab, job_id: int, text: str, timeout: float = 120) -> None:
    wait_for(lambda: any(text in line for line in lab.log_lines(job_id)), timeout,
             f"{text!r} in the log of job {job_id}", interval=0.3)


def check_nothing_lost(lab: ProcessLab, job_id: int, spool: Path) -> list[str]:
    """The master's log equals the agent's output.yaml line for line; the master's results are the
    results records of that log, each once."""
    local = LogFile(spool / "jobs" / str(job_id) / "output.yaml").read()
    assert lab.log_lines(job_id) == local
    tests = lab.api("GET", f"/jobs/{job_id}/tests/")["results"]
    got = [(r["suite"], r["case"], r["result"], r["level"]) for r in tests]
    assert got == [(r.suite, r.case, r.result, r.level) for r in results_in_lines(job_id, local)]
    return local


def test_curl_job_runs_on_the_board_through_master_and_agent(plab: ProcessLab, board_files) -> None:
    agent = plab.start_agent()
    job_id = plab.submit(smoke_job(plab.root, board_files))
    job = plab.wait_job(job_id)
    assert (job["health"], job["device"], job["worker"]) == ("Complete", "qemu01", "w1"), job
    local = check_nothing_lost(plab, job_id, plab.root / "spool-w1")
    tests = plab.api("GET", f"/jobs/{job_id}/tests/")["results"]
    cases = {(r["suite"], r["case"]): r["result"] for r in tests}
    assert cases[("0_smoke", "always-pass")] == "pass" and cases[("0_smoke", "always-fail")] == "fail"
    assert cases[("lava", "job")] == "pass"
    assert any("Linux version" in line for line in local)
    # the store holds the whole job: its log with the line index, the pipeline, the bundle
    store = plab.data / "store" / "jobs" / str(job_id)
    assert (store / "output.idx").stat().st_size == 8 * len(local)
    assert yaml.safe_load((store / "description.yaml").read_text())["pipeline"]
    assert "always-fail" in (store / "results.yaml").read_text()
    assert "job 1: started on qemu01" in plab.agent_log(agent)


def test_master_killed_mid_job_and_restarted(plab: ProcessLab, board_files) -> None:
    plab.start_agent()
    job_id = plab.submit(long_job(plab.root, board_files, ticks=20))
    wait_for_log(plab, job_id, "tick-5")
    plab.stop_master(signal.SIGKILL)
    time.sleep(2)  # the agent keeps running the job and spooling its log
    plab.start_master()
    job = plab.wait_job(job_id)
    assert job["health"] == "Complete", job
    local = check_nothing_lost(plab, job_id, plab.root / "spool-w1")
    assert sum('"case": "tick-' in line for line in local) == 20


def test_agent_killed_mid_job_and_restarted(plab: ProcessLab, board_files) -> None:
    agent = plab.start_agent()
    job_id = plab.submit(long_job(plab.root, board_files, ticks=30))
    wait_for_log(plab, job_id, "tick-5")
    agent.kill()
    agent.wait(10)
    time.sleep(1)
    agent = plab.start_agent()
    job = plab.wait_job(job_id, 120)
    assert job["health"] == "Incomplete", job
    assert job["failure_comment"].startswith(
        "Infrastructure: pumice-agent was restarted while the job ran on qemu01"), job
    local = check_nothing_lost(plab, job_id, plab.root / "spool-w1")
    assert "Infrastructure error: pumice-agent was restarted" in local[-1]
    assert plab.api("GET", "/devices/qemu01/")["health"] == "Unknown"
    # no QEMU of the killed job is left behind
    assert not [p for p in Path("/proc").glob("[0-9]*/cmdline")
                if str(plab.root / "work") in p.read_text(errors="replace")]
    # the device is Unknown but its type has no health check: the next job still runs
    assert plab.wait_job(plab.submit(smoke_job(plab.root, board_files)))["health"] == "Complete"


def test_link_cut_for_30_seconds_mid_job(plab: ProcessLab, board_files) -> None:
    plab.start_agent()
    job_id = plab.submit(long_job(plab.root, board_files, ticks=45))
    wait_for_log(plab, job_id, "tick-3")
    plab.master.send_signal(signal.SIGSTOP)  # the master hears nothing and says nothing for 30 s
    try:
        time.sleep(30)
    finally:
        plab.master.send_signal(signal.SIGCONT)
    job = plab.wait_job(job_id, 120)
    assert job["health"] == "Complete", job
    local = check_nothing_lost(plab, job_id, plab.root / "spool-w1")
    assert sum('"case": "tick-' in line for line in local) == 45
    log = plab.master_log.read_text()
    assert "worker w1 silent for" not in log or "worker w1 connected" in log


def test_enrolled_agent_runs_a_job_over_curve(plab: ProcessLab, board_files, http_server) -> None:
    """workers add -> join token -> pumice-agent --join -> a job runs over CURVE."""
    printed = plab.cli("workers", "add", "box2")
    token = next(line.split()[-1] for line in printed.splitlines() if line.startswith("join token: "))
    plab.cli("devices", "update", "qemu01", "--worker", "box2")
    plab.allow(http_server.address, worker="box2")
    agent = plab.start_agent("box2", "--join", token, "--url", plab.url)
    job_id = plab.submit(smoke_job(plab.root, board_files))
    job = plab.wait_job(job_id)
    assert (job["health"], job["worker"]) == ("Complete", "box2"), job
    check_nothing_lost(plab, job_id, plab.root / "spool-box2")
    log = plab.agent_log(agent)
    assert "enrolled as worker box2" in log and "with CURVE encryption" in log
    registered = plab.api("GET", "/workers/box2/certificate/")["public_key"]
    assert registered in (plab.root / "spool-box2" / "keys" / "box2.key").read_text()
