"""The callback payload against the one LAVA's own code builds for the same job.

LAVA 2023.01's ``TestJob.create_job_data`` (lava_scheduler_app/models.py) and ``export_testcase``
(lava_results_app/utils.py) are read from Debian's lava-server package (``apt-get download``,
unpacked into ``$PUMICE_CACHE/lava-server``; the test skips, saying so, when it cannot be fetched).
Only those functions and the constants they use are taken out of the source (``ast``) and run on a
stand-in for LAVA's job and test-case rows holding the values of a job that ran here; nothing of
LAVA is kept in the project. Both payloads must then agree key for key and value for value, except
for what Pumice documents as different: ``health_check`` (LAVA adds it in 2025.02), no ``token`` in
the body (LAVA removed it in 2024.05) and the redacted ``secrets:`` in the definition.
"""

from __future__ import annotations

import ast
import contextlib
import datetime as _dt
import decimal
import json
import os
import subprocess
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import yaml
from test_notify import nlab, notify_job, run_job  # noqa: F401  (nlab is a fixture)

from master import jobdata, models
from master.db import connection

CACHE = Path(os.environ.get("PUMICE_CACHE") or "~/.cache/pumice").expanduser() / "lava-server"
PACKAGE = "lava-server=2023.01-2"
SITE = CACHE / "root" / "usr" / "lib" / "python3" / "dist-packages"


@pytest.fixture(scope="session")
def lava_source() -> Path:
    if not (SITE / "lava_scheduler_app" / "models.py").exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        try:
            subprocess.run(["apt-get", "download", PACKAGE], cwd=CACHE, check=True, capture_output=True, timeout=300)
            [deb] = CACHE.glob("lava-server_*.deb")
            subprocess.run(["dpkg-deb", "-x", str(deb), str(CACHE / "root")], check=True, timeout=120)
        except (subprocess.SubprocessError, OSError, ValueError) as exc:
            pytest.skip(f"Debian's {PACKAGE} cannot be fetched (apt-get download): {exc}")
    return SITE


def _take(path: Path, wanted: set[str], class_name: str | None, namespace: dict[str, Any]) -> dict[str, Any]:
    """Run the named functions (and, in ``class_name``, every plain constant assignment) of the file
    in ``namespace``: LAVA's code, nothing around it (no Django)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    body = tree.body
    if class_name:
        body = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == class_name).body
    picked: list[ast.stmt] = []
    for node in body:
        if isinstance(node, ast.FunctionDef) and node.name in wanted:
            node.decorator_list = []
            picked.append(node)
        elif class_name and isinstance(node, ast.Assign) and all(
                isinstance(t, ast.Name | ast.Tuple) for t in node.targets) and isinstance(
                node.value, ast.Tuple | ast.Call | ast.Constant) and not (
                isinstance(node.value, ast.Call) and getattr(node.value.func, "id", "") != "range"):
            picked.append(node)
    exec(compile(ast.Module(body=picked, type_ignores=[]), str(path), "exec"), namespace)  # noqa: S102
    return namespace


def _lava(site: Path) -> SimpleNamespace:
    utils = _take(site / "lava_results_app" / "utils.py", {"export_testcase"}, None,
                  {"contextlib": contextlib, "os": os, "yaml": yaml, "yaml_load": yaml.full_load})
    testjob = _take(site / "lava_scheduler_app" / "models.py",
                    {"create_job_data", "get_legacy_status", "get_legacy_status_display"}, "TestJob",
                    {"contextlib": contextlib, "export_testcase": utils["export_testcase"],
                     # lava_common.compat.yaml_dump: yaml.dump with (C)Dumper
                     "yaml_dump": lambda data, *a, **k: yaml.dump(data, *a, Dumper=yaml.SafeDumper, **k)})
    testjob["TestJob"] = SimpleNamespace(**{k: v for k, v in testjob.items() if k.isupper()})
    return SimpleNamespace(utils=utils, testjob=testjob)


def _stand_in(lava: SimpleNamespace, job: models.Job, log: str, metadata: list) -> Any:
    """LAVA's TestJob row for ``job`` (the fields create_job_data reads), with LAVA's methods."""
    ns = lava.testjob
    states = {name: number for number, name in ns["STATE_CHOICES"]}
    healths = {name: number for number, name in ns["HEALTH_CHOICES"]}
    suites = []
    for suite in models.TestSuite.select().where(models.TestSuite.job == job.id).order_by(models.TestSuite.id):
        cases = []
        for case in models.TestCase.select().where(models.TestCase.suite == suite.id).order_by(models.TestCase.id):
            cases.append(SimpleNamespace(
                name=case.name, suite=SimpleNamespace(job_id=job.id, name=suite.name), result_code=case.result,
                measurement=None if case.measurement is None else decimal.Decimal(case.measurement).quantize(
                    decimal.Decimal("1.0000000000")),
                units=case.units or "", id=case.id, logged=case.logged.replace(tzinfo=_dt.UTC),
                start_log_line=None, end_log_line=None,
                action_metadata=jobdata.case_metadata(case, suite.name),
                get_absolute_url=lambda case=case: f"/results/testcase/{case.id}"))
        suites.append(SimpleNamespace(name=suite.name, testcase_set=SimpleNamespace(all=lambda cases=cases: cases)))

    def aware(value: _dt.datetime | None) -> _dt.datetime | None:
        return value.replace(tzinfo=_dt.UTC) if value else None

    row = type("TestJob", (), {
        "create_job_data": ns["create_job_data"], "get_legacy_status": ns["get_legacy_status"],
        "get_legacy_status_display": ns["get_legacy_status_display"],
        "get_state_display": lambda self: dict(ns["STATE_CHOICES"])[self.state],
        "get_health_display": lambda self: dict(ns["HEALTH_CHOICES"])[self.health],
        "get_metadata_dict": lambda self: metadata,
    })()
    device = models.Device.get_by_id(job.actual_device_id)
    row.__dict__.update(
        pk=job.id, state=states[job.state], health=healths[job.health], submit_time=aware(job.submit_time),
        start_time=aware(job.start_time), end_time=aware(job.end_time),
        submitter=models.User.get_by_id(job.submitter_id), failure_comment=job.failure_comment, priority=job.priority,
        description=job.name, actual_device_id=device.hostname, definition=job.definition,
        testsuite_set=SimpleNamespace(all=lambda: suites))
    ns["logs_instance"] = SimpleNamespace(read=lambda _job: log)
    return row


def test_the_payload_is_lavas_create_job_data_key_for_key(nlab, lava_source: Path) -> None:  # noqa: F811
    lava = _lava(lava_source)
    with connection():
        text = notify_job({"criteria": {"status": "finished"}, "callback": {"url": "http://127.0.0.1:9/"}},
                          extra="metadata:\n  kernel.version: 6.1.0\n  build: 42\n")
        job_id = run_job(text, nlab.user("alice"), health="Incomplete")
        job = models.Job.get_by_id(job_id)
        ours = jobdata.job_data(job, logs=True, results=True)
        row = _stand_in(lava, job, ours["log"], ours["metadata"])
        theirs = row.create_job_data(token="s3cret", output=True, results=True)
    assert set(theirs) - set(ours) == {"token"} and set(ours) - set(theirs) == {"health_check"}
    for key in theirs:
        if key in ("token", "results"):
            continue
        assert ours[key] == theirs[key], key
    assert set(ours["results"]) == set(theirs["results"])
    for suite, text in theirs["results"].items():
        assert yaml.safe_load(ours["results"][suite]) == yaml.safe_load(text), suite
        assert ours["results"][suite] == text  # the very YAML text
    json.dumps(ours)  # what the sender posts
