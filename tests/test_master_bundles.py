"""Results bundles between masters (issue 5): download from instance A, upload to instance B.

A and B are real ``pumice-master serve`` processes with data directories and databases of their own;
B already has jobs, so A's job ids would collide with B's if the import reused them. Also: ``source``
kept in the database through every meta.yaml rewrite, and the schema migration that added it.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml
from support.master import build_lab, job_text, stop_server

from master import jobs, publish
from master.client import ApiError, Client
from master.db import close_database, connection, db
from master.migrations import LATEST, current_version, migrate
from master.models import Job, SchemaVersion
from master.scheduler import Scheduler
from master.users import authenticate
from results.log import LogRecord
from results.record import JOB_LEVEL, Result

ROOT = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def serving(data: Path, database: str | None, instance: str, url: str) -> Iterator[str]:
    """``pumice-master serve`` on a free loopback port; yields its URL, stops it with SIGTERM."""
    port = _free_port()
    command = [sys.executable, "-m", "master.cli", "serve", "--data", str(data), "--http", f"127.0.0.1:{port}",
               "--instance", instance, "--url", url]
    if database:
        command += ["--database", database]
    server = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    master = f"http://127.0.0.1:{port}"
    try:
        client = Client(master, timeout=5)
        deadline = time.monotonic() + 20
        while True:
            try:
                client.call("GET", "/system/version/")
                break
            except OSError:
                client.close()
                if time.monotonic() > deadline or server.poll() is not None:
                    server.kill()
                    pytest.fail(f"pumice-master serve did not come up: {server.communicate(timeout=5)[1]}")
                time.sleep(0.1)
        client.close()
        yield master
    finally:
        server.terminate()
        try:
            _, err = server.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            raise
        assert server.returncode == 0, err


RESULTS = [
    Result(job="0", level=JOB_LEVEL, suite="lava", case="job", result="pass"),
    Result(job="0", level="1.1", suite="lava", case="http-download", result="pass", duration=0.25,
           extra={"size": 1024}),
    Result(job="0", level="3.1", suite="0_smoke", case="boot-time", result="pass", measurement=3.5, units="s",
           set="timing"),
    Result(job="0", level="3.1", suite="0_smoke", case="always-fail", result="fail"),
    Result(job="0", level="3.1", suite="0_smoke", case="skipped", result="skip"),
]


def run_job(name: str, results: list[Result], health: str = "Complete") -> int:
    """Submit a job as alice and play the agent's part to its end (in this process), then publish
    its pages as the master does when a job finishes."""
    [job_id] = jobs.submit_job(job_text(name), authenticate_user("alice"))
    assert job_id in [job for job, _ in Scheduler().loop_once()]
    jobs.job_started(job_id)
    jobs.append_logs(job_id, [LogRecord("2024-01-01T10:00:00.000000", "target", "hello from the board")])
    jobs.append_results(job_id, [Result(**{**r.to_dict(), "job": str(job_id)}) for r in results])
    jobs.job_finished(job_id, health)
    publish.publish_pages(job_id)
    return job_id


_tokens: dict[str, str] = {}


def authenticate_user(name: str):
    return authenticate(f"Token {_tokens[name]}")


def make_instance(data: Path, database: str | None, name: str, url: str, jobs: list[list[Result]]) -> dict[str, str]:
    """A lab in ``data`` with a finished job for each list of results; returns its tokens (the
    database is closed after, for a master process to open)."""
    lab = build_lab(data, database, name=name, url=url)
    _tokens.clear()
    _tokens.update(lab.tokens)
    with connection():
        for number, results in enumerate(jobs):
            run_job(f"{name} job {number}", results)
    close_database()
    return dict(lab.tokens)


def _cases(client: Client, job_id: int) -> list[dict]:
    rows = client.call("GET", f"/jobs/{job_id}/tests/")["results"]
    for row in rows:
        assert row.pop("job") == str(job_id)
    return rows


def test_bundle_moves_between_masters(tmp_path: Path, database_url: str | None) -> None:
    tokens_a = make_instance(tmp_path / "a", None, "lab-a", "http://a.example/", [RESULTS])
    source_job = 1
    # B already has jobs 1..3: an import that kept A's id would collide
    tokens_b = make_instance(tmp_path / "b", database_url, "lab-b", "http://b.example/", [RESULTS[:1]] * 3)

    with serving(tmp_path / "a", None, "lab-a", "http://a.example/") as url_a, \
            serving(tmp_path / "b", database_url, "lab-b", "http://b.example/") as url_b:
        a = Client(url_a, tokens_a["bob"])
        b = Client(url_b, tokens_b["bob"])
        bundle = a.results(source_job)
        header = yaml.safe_load(bundle)["source"]
        assert header["instance"] == "lab-a" and header["url"] == "http://a.example/jobs/1/"
        # the API gives the very bundle the site publishes (same uuid: recognised on upload)
        site_bundle = tmp_path / "a" / "site" / "jobs" / str(source_job) / "results.yaml"
        assert site_bundle.read_text() == bundle

        reply = b.upload_bundle(bundle)
        assert reply["created"] is True
        new_id = reply["job"]
        assert new_id == 4, "the imported job takes B's next id"
        assert reply["url"] == "http://b.example/jobs/4/"
        assert reply["source"] == {"instance": "lab-a", "url": "http://a.example/jobs/1/", "job": "1",
                                   "uuid": header["uuid"]}
        # the results match, in the database (API) as in the source
        assert _cases(b, new_id) == _cases(a, source_job)
        suites = {s["name"]: (s["pass"], s["fail"], s["skip"])
                  for s in b.call("GET", f"/jobs/{new_id}/suites/")["results"]}
        assert suites == {"lava": (2, 0, 0), "0_smoke": (1, 1, 1)}
        record = b.job(new_id)
        assert (record["state"], record["health"], record["submitter"]) == ("Finished", "Complete", "bob")
        assert record["source"] == reply["source"]
        # B's own jobs are untouched
        assert [b.job(n)["name"] for n in (1, 2, 3)] == ["lab-b job 0", "lab-b job 1", "lab-b job 2"]
        assert [len(_cases(b, n)) for n in (1, 2, 3)] == [1, 1, 1]

        # uploading it again gives the same job, not a second copy
        again = b.upload_bundle(bundle)
        assert (again["job"], again["created"]) == (new_id, False)
        status, _, _ = b.request("POST", "/bundles/", body=bundle, content_type="application/yaml")
        assert status == 200
        assert b.call("GET", "/jobs/")["count"] == 4

        # published at once on B's site, with the link to its source; meta.yaml keeps it
        page = tmp_path / "b" / "site" / "jobs" / str(new_id) / "index.html"
        assert page.exists() and "always-fail" in page.read_text()
        meta = yaml.safe_load((tmp_path / "b" / "store" / "jobs" / str(new_id) / "meta.yaml").read_text())
        assert meta["source"]["uuid"] == header["uuid"] and meta["state"] == "Finished"

        # refusals: no token, not a bundle (with the line), an imported job cannot be resubmitted
        error = _refused(lambda: Client(url_b).upload_bundle(bundle), 401)
        assert "needs a token" in error.message
        error = _refused(lambda: b.upload_bundle("job: '1'\nresults:\n  '1.1':\n  - {suite: [\n"), 400)
        assert "invalid results bundle" in error.message and error.faults[0]["line"] == 5
        error = _refused(lambda: b.upload_bundle("job: '1'\nresults: {}\n"), 400)
        assert "no source uuid" in error.message
        error = _refused(lambda: b.call("POST", f"/jobs/{new_id}/resubmit/"), 409)
        assert "imported from http://a.example/jobs/1/" in error.message
        a.close()
        b.close()

        # the same through the command line client
        saved = tmp_path / "bundle.yaml"
        env = {**os.environ, "PUMICE_CONFIG": str(tmp_path / "none.yaml")}
        env.pop("PUMICE_URL", None)
        env.pop("PUMICE_TOKEN", None)

        def pumice(*args: str) -> subprocess.CompletedProcess:
            return subprocess.run([sys.executable, "-m", "master.client", *args], cwd=ROOT, env=env,
                                  capture_output=True, text=True, timeout=60)

        done = pumice("--url", url_a, "bundle", "download", str(source_job), "-o", str(saved))
        assert done.returncode == 0, done.stderr
        assert saved.read_text() == bundle
        done = pumice("--url", url_b, "--token", tokens_b["alice"], "bundle", "upload", str(saved))
        assert done.returncode == 0, done.stderr
        assert done.stdout == f"job {new_id}: this bundle from http://a.example/jobs/1/ was imported before: " \
                              f"http://b.example/jobs/{new_id}/\n"
        done = pumice("--url", url_a, "bundle", "download", str(source_job))
        assert done.returncode == 0 and done.stdout == bundle
        broken = tmp_path / "broken.yaml"
        broken.write_text(bundle.replace("results:", "results: [", 1))
        done = pumice("--url", url_b, "--token", tokens_b["alice"], "bundle", "upload", str(broken))
        assert done.returncode == 3 and "invalid results bundle" in done.stderr and "line" in done.stderr


def test_cli_upload_creates_a_job(tmp_path: Path) -> None:
    tokens_a = make_instance(tmp_path / "a", None, "lab-a", "", [RESULTS[:1], RESULTS])
    tokens_b = make_instance(tmp_path / "b", None, "lab-b", "", [RESULTS[:2]])
    with serving(tmp_path / "a", None, "lab-a", "") as url_a, serving(tmp_path / "b", None, "lab-b", "") as url_b:
        env = {**os.environ, "PUMICE_URL": url_b, "PUMICE_TOKEN": tokens_b["alice"],
               "PUMICE_CONFIG": str(tmp_path / "none.yaml")}

        def pumice(*args: str) -> subprocess.CompletedProcess:
            done = subprocess.run([sys.executable, "-m", "master.client", *args], cwd=ROOT, env=env,
                                  capture_output=True, text=True, timeout=60)
            assert done.returncode == 0, done.stderr
            return done

        saved = tmp_path / "job2.yaml"
        pumice("--url", url_a, "--token", tokens_a["bob"], "bundle", "download", "2", "-o", str(saved))
        # no --url on either master: the bundle names A's site by its default, B prints no job URL
        assert pumice("bundle", "upload", str(saved)).stdout == "job 2 imported from http://lab-a/jobs/2/\n"
        b = Client(url_b)
        assert b.job(2)["source"]["job"] == "2" and b.job(2)["submitter"] == "alice"
        assert b.job(1)["source"] is None
        assert len(b.call("GET", "/jobs/2/tests/")["results"]) == len(RESULTS)
        b.close()


def _refused(call, status: int) -> ApiError:
    with pytest.raises(ApiError) as info:
        call()
    assert info.value.status == status, info.value.describe()
    return info.value


# ---- source survives every state change; the migration that added it ----


def test_source_is_written_through(tmp_path: Path, database_url: str | None) -> None:
    lab = build_lab(tmp_path / "data", database_url)
    _tokens.clear()
    _tokens.update(lab.tokens)
    source = {"instance": "elsewhere", "url": "http://elsewhere/jobs/9/", "job": "9", "uuid": "x"}
    with connection():
        [job_id] = jobs.submit_job(job_text("carried"), authenticate_user("alice"))
        Job.update(source=source).where(Job.id == job_id).execute()
        jobs.write_meta([job_id])
        Scheduler().loop_once()
        assert lab.instance.store.read_meta(job_id)["source"] == source
        jobs.job_started(job_id)
        assert lab.instance.store.read_meta(job_id)["source"] == source
        jobs.job_finished(job_id, "Complete")
        meta = lab.instance.store.read_meta(job_id)
        assert (meta["state"], meta["source"]) == ("Finished", source)
        assert jobs.show_job(job_id, None)["source"] == source


def test_migration_adds_the_source_column(tmp_path: Path, database_url: str | None) -> None:
    lab = build_lab(tmp_path / "data", database_url)
    _tokens.clear()
    _tokens.update(lab.tokens)
    with connection():
        assert current_version() == LATEST >= 2
        # a database of the previous release: no jobs.source, schema version 1
        db.execute_sql("ALTER TABLE jobs DROP COLUMN source")
        SchemaVersion.delete().where(SchemaVersion.version >= 2).execute()
        assert "source" not in {c.name for c in db.get_columns("jobs")}
        applied = migrate()
        assert applied[0][0] == 2 and current_version() == LATEST
        assert "source" in {c.name for c in db.get_columns("jobs")}
        [job_id] = jobs.submit_job(job_text("after migration"), authenticate_user("alice"))
        assert jobs.show_job(job_id, None)["source"] is None


# ---- live tail: a running job's pages ----


def _wait_for(predicate, what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def test_running_job_is_published_with_a_live_log(tmp_path: Path) -> None:
    from master.server import MasterServer

    lab = build_lab(tmp_path / "data", None)
    store, site = lab.instance.store, lab.instance.site_dir
    server = MasterServer("127.0.0.1", 0, scheduler_interval=3600, publish_site=True).start()
    try:
        client = Client(server.url, lab.tokens["alice"])
        [job_id] = client.submit(job_text("live"))
        _wait_for(lambda: client.job(job_id)["state"] == "Scheduled", "the job to be scheduled")
        with connection():
            jobs.job_started(job_id)
        # the log exists from the start, so the running job's page links it
        assert (store.job_dir(job_id) / "output.yaml").exists()
        log_page = site / "jobs" / str(job_id) / "log.html"
        _wait_for(log_page.exists, "the running job's pages")
        assert 'data-live="1"' in log_page.read_text()
        assert "Running" in (site / "jobs" / str(job_id) / "index.html").read_text()
        with connection():
            jobs.append_logs(job_id, [LogRecord("2024-01-01T10:00:00.000000", "target", "a line from the board")])
        # the site's output.yaml is the store's log (a hard link): appended lines show at once
        assert "a line from the board" in (site / "jobs" / str(job_id) / "output.yaml").read_text()
        with connection():
            jobs.job_finished(job_id, "Complete")
        _wait_for(lambda: 'data-live="1"' not in log_page.read_text(), "the finished job's pages")
        client.close()
    finally:
        stop_server(server)
        close_database()
