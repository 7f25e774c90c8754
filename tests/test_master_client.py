"""``pumice``, the user's client: submit --wait with a live log, show, cancel, logs, results, config."""

from __future__ import annotations

import io
import threading
import time
from pathlib import Path

import pytest
import yaml
from support.master import build_lab, job_text, stop_server

from master import client as pumice
from master import jobs
from master.db import close_database, connection
from master.models import Job
from master.server import MasterServer
from master.states import JobState
from results.log import LogRecord
from results.record import Result


@pytest.fixture
def master(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    lab = build_lab(tmp_path / "data", None)
    server = MasterServer("127.0.0.1", 0, scheduler_interval=3600, publish_site=False).start()
    config = tmp_path / "pumice.yaml"
    config.write_text(yaml.safe_dump({"url": server.url, "token": lab.tokens["alice"]}))
    monkeypatch.setenv("PUMICE_CONFIG", str(config))
    monkeypatch.delenv("PUMICE_URL", raising=False)
    monkeypatch.delenv("PUMICE_TOKEN", raising=False)
    try:
        yield server, lab
    finally:
        stop_server(server)
        close_database()


def fake_agent(job_id: int, health: str = "Complete", stop: threading.Event | None = None) -> None:
    """What the broker will do for a real agent: start, stream a log and results, end."""
    deadline = time.monotonic() + 10
    with connection():
        while getattr(Job.get_or_none(Job.id == job_id), "state", None) != JobState.SCHEDULED:
            assert time.monotonic() < deadline, "the job was never scheduled"
            time.sleep(0.01)
        jobs.job_started(job_id)
        for n in range(3):
            jobs.append_logs(job_id, [LogRecord(f"2024-01-01T10:00:0{n}.000000", "info", f"step {n}"),
                                      LogRecord(f"2024-01-01T10:00:0{n}.500000", "target", f"console {n}")])
            time.sleep(0.15)
        jobs.append_results(job_id, [Result(job=str(job_id), level="3.1", suite="0_smoke", case="uname",
                                            result="pass")])
        jobs.job_finished(job_id, health, None if health == "Complete" else "boot failed",
                          None if health == "Complete" else "Job")


def test_submit_wait_streams_the_log(master, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    job_file = tmp_path / "job.yaml"
    job_file.write_text(job_text("waited"))
    with connection():
        next_id = (Job.select().count()) + 1
    agent = threading.Thread(target=fake_agent, args=(next_id,))
    agent.start()
    status = pumice.main(["submit", "--wait", "--poll", "0.05", "--timeout", "20", str(job_file)])
    agent.join(20)
    out = capsys.readouterr().out
    assert status == 0, out
    assert f"job {next_id} submitted" in out
    for n in range(3):
        assert f"info     step {n}" in out and f"\nconsole {n}\n" in out
    assert f"== job {next_id}: Running on qemu0" in out
    assert out.rstrip().endswith(f"== job {next_id}: Finished on qemu01, Complete") or \
        out.rstrip().endswith(f"== job {next_id}: Finished on qemu02, Complete")
    assert out.index("step 0") < out.index("step 2") < out.index("Finished")


def test_wait_exit_status_follows_job_health(master, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    server, lab = master
    client = pumice.Client(server.url, lab.tokens["alice"])
    [job_id] = client.submit(job_text())
    agent = threading.Thread(target=fake_agent, args=(job_id, "Incomplete"))
    agent.start()
    assert pumice.main(["logs", "--follow", "--poll", "0.05", "--timeout", "20", str(job_id)]) == 1
    agent.join(20)
    assert "Incomplete" in capsys.readouterr().out
    client.close()


def test_show_cancel_logs_results(master, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    server, lab = master
    job_file = tmp_path / "job.yaml"
    job_file.write_text(job_text("shown"))
    assert pumice.main(["submit", str(job_file)]) == 0
    job_id = int(capsys.readouterr().out.strip())
    assert pumice.main(["show", str(job_id)]) == 0
    out = capsys.readouterr().out
    assert "name            : shown" in out and "submitter       : alice" in out
    assert pumice.main(["show", "--yaml", str(job_id)]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["id"] == job_id

    with connection():
        jobs.append_logs(job_id, [LogRecord("2024-01-01T10:00:00.000000", "info", "hello <there>")])
        jobs.append_results(job_id, [Result(job=str(job_id), level="3.1", suite="0_smoke", case="c1",
                                            result="fail")])
    assert pumice.main(["logs", str(job_id)]) == 0
    assert capsys.readouterr().out == "10:00:00 info     hello <there>\n"
    assert pumice.main(["logs", "--raw", str(job_id)]) == 0
    assert LogRecord.from_line(capsys.readouterr().out).msg == "hello <there>"
    assert pumice.main(["results", "--format", "junit", str(job_id)]) == 0
    assert "<testcase" in capsys.readouterr().out

    assert pumice.main(["cancel", str(job_id)]) == 0
    assert f"job {job_id}: Canceling" in capsys.readouterr().out
    # another user may not cancel it; the error is printed, exit status 3
    assert pumice.main(["--token", lab.tokens["bob"], "cancel", str(job_id)]) == 3
    assert "error (403)" in capsys.readouterr().err


def test_refused_submission_prints_faults(master, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    job_file = tmp_path / "bad.yaml"
    job_file.write_text(job_text().replace("method: qemu", "method: foo"))
    assert pumice.main(["submit", str(job_file)]) == 3
    err = capsys.readouterr().err
    assert "error (400): invalid job definition" in err
    assert "actions[1].boot.method (line 20): unknown boot method 'foo'" in err
    assert pumice.main(["validate", str(job_file)]) == 3
    assert "actions[1].boot.method (line 20)" in capsys.readouterr().out


def test_configuration_precedence(master, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    server, lab = master
    # the environment wins over the file, options over the environment
    monkeypatch.setenv("PUMICE_TOKEN", "wrong-token")
    assert pumice.main(["show", "1"]) == 3
    assert "invalid token" in capsys.readouterr().err
    assert pumice.main(["--token", lab.tokens["bob"], "logs", "1"]) in (0, 3)
    monkeypatch.setenv("PUMICE_URL", "http://127.0.0.1:1")
    assert pumice.main(["show", "1"]) == 3
    assert "cannot reach the master at http://127.0.0.1:1" in capsys.readouterr().err
    monkeypatch.setenv("PUMICE_CONFIG", "/nonexistent.yaml")
    monkeypatch.delenv("PUMICE_URL")
    assert pumice.main(["show", "1"]) == 3
    assert "no master URL" in capsys.readouterr().err


def test_status_line_on_a_terminal(master) -> None:
    server, lab = master
    client = pumice.Client(server.url, lab.tokens["alice"])
    [job_id] = client.submit(job_text())

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    out = Tty()
    agent = threading.Thread(target=fake_agent, args=(job_id,))
    agent.start()
    job = pumice.wait_for(client, job_id, poll=0.05, out=out, timeout=20)
    agent.join(20)
    assert job["health"] == "Complete"
    text = out.getvalue()
    # the status line is redrawn in reverse video under the log, and cleared before each log chunk
    assert "\r\033[K\033[7m job" in text and "console 2" in text
    assert text.endswith(f"\033[7m job {job_id}: Finished on {job['device']}, Complete \033[0m\n")
    client.close()
