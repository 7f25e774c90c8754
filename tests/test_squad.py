"""A real SQUAD (1.98 from PyPI, in a virtualenv of its own) drives a live master through LAVA's
interfaces, without a line changed on its side: its LAVA backend submits over XML-RPC, its listener
falls back from the ``/ws/`` websocket to the ZeroMQ socket ``scheduler.get_publisher_event_socket``
names and receives the finished event, then it fetches ``job_details``, the results (suites, then
each suite in pages of 500) and the log from ``/scheduler/job/<id>/log_file/plain``. Its own SQLite
database; no Celery broker, so its tasks run eagerly (the fetch runs inside the listener).

SQUAD is installed once into ``$PUMICE_CACHE/squad-venv`` (default ``~/.cache/pumice``); the test
skips, saying so, only when it cannot be installed (no route to PyPI).
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.master import job_text
from test_lava_clients import Live, live_master

SQUAD_VERSION = "1.98"
CACHE = Path(os.environ.get("PUMICE_CACHE") or "~/.cache/pumice").expanduser()
VENV = CACHE / "squad-venv"
DRIVER = Path(__file__).parent / "data" / "squad_driver.py"
pytestmark = pytest.mark.timeout(1200)


@pytest.fixture(scope="session")
def squad_python() -> Path:
    python = VENV / "bin" / "python"
    check = [str(python), "-c", f"import squad, sys; sys.exit(squad.version.__version__ != {SQUAD_VERSION!r})"]
    if python.exists() and subprocess.run(check, capture_output=True, timeout=60).returncode == 0:
        return python
    try:
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True, capture_output=True, timeout=300)
        done = subprocess.run([str(python), "-m", "pip", "install", "-q", f"squad=={SQUAD_VERSION}"],
                              capture_output=True, text=True, timeout=1200)
    except (subprocess.SubprocessError, OSError) as exc:
        pytest.skip(f"squad {SQUAD_VERSION} cannot be installed into {VENV}: {exc}")
    if done.returncode != 0:
        pytest.skip(f"squad {SQUAD_VERSION} cannot be installed into {VENV} (no route to PyPI?): "
                    f"{done.stderr.strip()[-500:]}")
    return python


@pytest.fixture
def live(tmp_path: Path) -> Iterator[Live]:
    with live_master(tmp_path, None) as master:
        yield master


def lines_of(process: subprocess.Popen) -> queue.Queue:
    """The process's output lines, read in a thread (so that every wait has a timeout)."""
    lines: queue.Queue = queue.Queue()

    def read() -> None:
        for line in process.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=read, daemon=True).start()
    return lines


def next_json(lines: queue.Queue, timeout: float, log: Path) -> dict:
    while True:
        try:
            line = lines.get(timeout=timeout)
        except queue.Empty:
            pytest.fail(f"SQUAD said nothing for {timeout} s; its log:\n{log.read_text()[-4000:]}")
        if line is None:
            pytest.fail(f"SQUAD exited; its log:\n{log.read_text()[-4000:]}")
        if line.startswith("{"):
            return json.loads(line)


def test_squad_submits_hears_the_end_and_fetches_results_and_log(live: Live, squad_python: Path,
                                                                  tmp_path: Path) -> None:
    home = tmp_path / "squad"
    home.mkdir()
    job_file = tmp_path / "job.yaml"
    job_file.write_text(job_text("squad-submitted") + "metadata:\n  kernel.version: 6.1.0\n")
    env = {"PATH": os.environ.get("PATH", ""), "HOME": str(home), "XDG_DATA_HOME": str(home),
           "DATABASE": f"ENGINE=django.db.backends.sqlite3:NAME={home / 'squad.db'}",
           "SQUAD_STORAGE_DIR": str(home / "storage"), "SECRET_KEY": "pumice-test", "SQUAD_LOG_LEVEL": "INFO"}
    log = tmp_path / "squad.log"
    with open(log, "w") as stderr:
        process = subprocess.Popen([str(squad_python), str(DRIVER), live.url, "alice", live.lab.tokens["alice"],
                                    str(job_file)], env=env, stdout=subprocess.PIPE, stderr=stderr, text=True)
    try:
        lines = lines_of(process)
        job_id = next_json(lines, 180, log)["job_id"]
        live.run(job_id)  # the scheduler and the agent: the job ends, its events go out
        fetched = next_json(lines, 150, log)
    finally:
        process.kill()
        process.wait(30)
    assert fetched["fetched"] and fetched["status"] == "Complete", (fetched, log.read_text()[-3000:])
    assert fetched["tests"] == {"smoke/uname": "pass"}
    assert fetched["metrics"] == {"smoke/boot-time": [2.5, "s"]}
    assert "console says hi" in fetched["log"]
    assert fetched["started_at"] != "None" and fetched["ended_at"] != "None"
