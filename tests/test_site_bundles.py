"""Bundles: a job's bundle downloaded from instance A's site imports into instance B as a new job."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from results.bundle import load_bundle
from results.imports import BundleImportError, find_import, import_bundle, read_bundle
from sitegen import build_site, publish_job
from sitegen.bundles import bundle_uuid
from sitegen.fixtures import make_store


@pytest.fixture()
def two_instances(tmp_path: Path):
    a = make_store(tmp_path / "a/store", 4, cases=8, log_lines=60, nasty=True)
    b = make_store(tmp_path / "b/store", 3, cases=4, log_lines=30, nasty=False)
    build_site(a.root, tmp_path / "a/site", instance="lab-a", base_url="https://a.example.org/", processes=1)
    return a, b, tmp_path


def test_bundle_round_trip_between_instances(two_instances) -> None:
    a, b, tmp = two_instances
    downloaded = (tmp / "a/site/jobs/2/results.yaml").read_text(encoding="utf-8")
    header_lines = downloaded.splitlines()[:4]
    uuid = bundle_uuid("lab-a", 2, a.read_meta(2)["submit_time"])
    assert header_lines == [
        "# Pumice results bundle",
        "# instance: lab-a",
        "# job: https://a.example.org/jobs/2/",
        f"# uuid: {uuid}",
    ]
    assert sorted(b.job_ids()) == [1, 2, 3]

    imported = import_bundle(b.root, downloaded, submitter="bob")
    assert imported.created and imported.job_id == 4  # B's own jobs 1-3 are untouched
    assert sorted(b.job_ids()) == [1, 2, 3, 4]
    meta = b.read_meta(4)
    assert meta["source"] == {"instance": "lab-a", "url": "https://a.example.org/jobs/2/", "job": "2", "uuid": uuid}
    assert meta["health"] == "complete" and meta["state"] == "finished" and meta["submitter"] == "bob"

    original = load_bundle(a.read_file(2, "results.yaml")).results
    copied = load_bundle(b.read_file(4, "results.yaml")).results
    strip = [{k: v for k, v in r.to_dict().items() if k != "job"} for r in original]
    assert [{k: v for k, v in r.to_dict().items() if k != "job"} for r in copied] == strip
    assert {r.job for r in copied} == {"4"}
    assert any(r.case == "<script>alert(1)</script>" for r in copied)

    # uploading the same bundle again does not make a second job
    again = import_bundle(b.root, downloaded)
    assert (again.job_id, again.created) == (4, False)
    assert find_import(b, uuid) == 4

    # B publishes it: a job page that links back to its source, and a bundle naming B as source
    publish_job(b.root, tmp / "b/site", 4, instance="lab-b", base_url="https://b.example.org/")
    page = (tmp / "b/site/jobs/4/index.html").read_text(encoding="utf-8")
    assert "Imported bundle from <strong>lab-a</strong>" in page
    assert 'href="https://a.example.org/jobs/2/"' in page
    b_bundle = load_bundle((tmp / "b/site/jobs/4/results.yaml").read_text(encoding="utf-8"))
    assert b_bundle.header.instance == "lab-b" and b_bundle.header.url == "https://b.example.org/jobs/4/"
    assert b_bundle.header.uuid != uuid
    # and it travels back to A as a new job there, too
    back = import_bundle(a.root, (tmp / "b/site/jobs/4/results.yaml").read_text(encoding="utf-8"))
    assert back.created and back.job_id == 5


def test_the_master_can_choose_the_job_id(two_instances) -> None:
    a, b, tmp = two_instances
    text = (tmp / "a/site/jobs/3/results.yaml").read_text(encoding="utf-8")
    _bundle, info = read_bundle(text)
    assert info.job == "3" and info.instance == "lab-a"
    imported = import_bundle(b, text, job_id=42)
    assert imported.job_id == 42 and b.read_meta(42)["id"] == 42
    with pytest.raises(BundleImportError, match="job 42 already has results"):
        import_bundle(b, (tmp / "a/site/jobs/1/results.yaml").read_text(encoding="utf-8"), job_id=42)


def test_concurrent_uploads_of_one_bundle_make_one_job(two_instances) -> None:
    _a, b, tmp = two_instances
    text = (tmp / "a/site/jobs/1/results.yaml").read_text(encoding="utf-8")
    outcomes = []
    threads = [threading.Thread(target=lambda: outcomes.append(import_bundle(b, text))) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert len(outcomes) == 6  # no upload failed
    created = [o for o in outcomes if o.created]
    assert len(created) == 1 and {o.job_id for o in outcomes} == {created[0].job_id}
    assert sorted(b.job_ids()) == [1, 2, 3, created[0].job_id]  # no half-made job left behind


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("job: '1'\nresults: {}\n", "no source uuid"),
        (
            "# Pumice results bundle\njob: '1'\nsource: {instance: x, url: y, uuid: not-a-uuid}\nresults: {}\n",
            "is not a UUID",
        ),
        ("job: '1'\nresults:\n  '1':\n  - {suite: s, case: c, result: maybe}\n", "line 4"),
        ("just text", "not a results bundle"),
    ],
)
def test_bad_bundles_are_refused_with_a_reason(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(BundleImportError, match=message):
        import_bundle(tmp_path / "store", text)
    assert not (tmp_path / "store/jobs").exists() or not any((tmp_path / "store/jobs").iterdir())
