"""Test-case history: the marks of a job's cases against the previous comparable run (pure), and the
site: the job page marks a case that flips, its case page shows the strip, full build = publishing."""

from __future__ import annotations

import re
from pathlib import Path

from results.bundle import dump_bundle, load_bundle
from results.record import Result
from sitegen import build_site, publish_job
from sitegen.fixtures import make_store
from sitegen.history import (
    FIXED,
    NEW_FAILURE,
    SEP,
    STILL_FAILING,
    case_marks,
    compare_runs,
    definition_name,
    run_of,
)

SITE = {"instance": "lab-a.example.org", "now": "2024-01-01 00:00:00"}


def key(case: str) -> str:
    return f"smoke{SEP}{SEP}{case}"


def run(job_id: int, **cases: str) -> dict:
    return run_of(job_id, None, "complete",
                  [Result(job=str(job_id), level="3.1", suite="0_smoke", case=c, result=r) for c, r in cases.items()])


def test_history_is_keyed_by_the_definition_name_not_its_position() -> None:
    assert definition_name("0_smoke-tests") == definition_name("2_smoke-tests") == "smoke-tests"
    assert definition_name("lava") == "lava" and definition_name("10_") == "10_"
    assert run(1, a="pass")["cases"] == run_of(1, None, "complete", [
        Result(job="1", level="4.1", suite="3_smoke", case="a", result="pass")])["cases"]


def test_new_failure_fixed_and_still_failing_against_the_previous_comparable_run() -> None:
    runs = [run(1, a="pass", b="fail", c="fail", d="pass"), run(2, a="pass", b="fail", c="pass", d="pass"),
            run(3, a="fail", b="fail", c="fail", d="pass")]
    series = {"runs": list(reversed(runs))}
    assert case_marks(series, runs[0]) == (None, {})
    previous, marks = case_marks(series, runs[2])
    assert previous == 2
    assert marks == {key("a"): (NEW_FAILURE, 3), key("b"): (STILL_FAILING, 1), key("c"): (NEW_FAILURE, 3)}
    assert case_marks(series, runs[1])[1] == {key("b"): (STILL_FAILING, 1), key("c"): (FIXED, 2)}


def test_compare_names_regressions_fixes_and_measurement_deltas() -> None:
    before = run_of(1, None, "complete", [
        Result(job="1", level="3.1", suite="0_smoke", case="a", result="pass"),
        Result(job="1", level="3.1", suite="0_smoke", case="b", result="fail"),
        Result(job="1", level="3.1", suite="1_bench", case="boot", result="pass", measurement=10.0, units="s"),
        Result(job="1", level="3.1", suite="1_bench", case="gone", result="pass")])
    after = run_of(2, None, "complete", [
        Result(job="2", level="3.1", suite="0_smoke", case="a", result="fail"),
        Result(job="2", level="3.1", suite="0_smoke", case="b", result="pass"),
        Result(job="2", level="3.1", suite="1_bench", case="boot", result="pass", measurement=12.5, units="s"),
        Result(job="2", level="3.1", suite="1_bench", case="new", result="skip")])
    diff = compare_runs(before, after)
    assert diff["regressions"] == [key("a")] and diff["fixes"] == [key("b")] and diff["still_failing"] == []
    assert diff["deltas"] == [(f"bench{SEP}{SEP}boot", 10.0, 12.5, 2.5, 25.0, "s")]
    assert diff["added"] == [f"bench{SEP}{SEP}new"] and diff["removed"] == [f"bench{SEP}{SEP}gone"]


def flip(store, job_id: int, name: str, case: str, result: str) -> None:
    """Give job ``job_id`` the name ``name`` and set ``case`` of its first test suite to ``result``."""
    meta = store.read_meta(job_id)
    meta["name"] = name
    meta["device_type"] = "qemu"
    store.write_meta(job_id, meta)
    bundle = store.read_file(job_id, "results.yaml")
    results = [r if (r.suite == "0_smoke-tests" and r.case != case) or r.suite != "0_smoke-tests"
               else Result(**{**r.__dict__, "result": result}) for r in load_bundle(bundle).results]
    assert any(r.case == case for r in results)
    store.write_file(job_id, "results.yaml", dump_bundle(str(job_id), results))


def history_store(root: Path):
    store = make_store(root, 4, cases=8, log_lines=40, nasty=False)
    flip(store, 1, "nightly", "linux-posix-pwd", "pass")
    flip(store, 2, "nightly", "linux-posix-pwd", "fail")
    return store


def test_a_case_that_flips_is_a_new_failure_on_the_job_page_and_on_its_case_page(tmp_path: Path) -> None:
    store = history_store(tmp_path / "store")
    build_site(store.root, tmp_path / "site", processes=1, **SITE)
    page = (tmp_path / "site/jobs/2/index.html").read_text()
    row = re.search(r'<tr class="r-fail" data-mark="new failure">.*?</tr>', page, re.S)
    assert row and "linux-posix-pwd" in row.group(0)
    assert 'id="compared"' in page and 'href="../../jobs/1/index.html">#1</a>' in page
    href = re.search(r'<a href="\.\./\.\./(cases/[^"#]+)#([^"]+)">linux-posix-pwd</a>', row.group(0))
    case_page = (tmp_path / "site" / href.group(1)).read_text()
    case_row = re.search(rf'<tr id="{href.group(2)}">.*?</tr>', case_page, re.S).group(0)
    assert "linux-posix-pwd" in case_row and "failing since" in case_row
    strip = re.findall(r'<a class="(\w+)" href="[./]*jobs/(\d+)/index.html"', case_row)
    assert strip == [("pass", "1"), ("fail", "2")]
    assert "data-mark" not in (tmp_path / "site/jobs/1/index.html").read_text()  # nothing to compare with
    assert not (tmp_path / "site/jobs/1/compare.html").exists()
    compare = (tmp_path / "site/jobs/2/compare.html").read_text()
    regressions = re.search(r'<table class="list cards" id="regressions">.*?</table>', compare, re.S).group(0)
    assert "linux-posix-pwd" in regressions and 'id="fixes"' not in compare


def test_publishing_jobs_one_by_one_gives_the_full_builds_history(tmp_path: Path) -> None:
    store = history_store(tmp_path / "store")
    for job_id in store.job_ids():
        publish_job(store.root, tmp_path / "published", job_id, **SITE)
    build_site(store.root, tmp_path / "full", processes=1, **SITE)
    full = sorted(p.relative_to(tmp_path / "full") for p in (tmp_path / "full").glob("cases/**/*.html"))
    published = sorted(p.relative_to(tmp_path / "published") for p in (tmp_path / "published").glob("cases/**/*.html"))
    assert full == published and full
    for path in [*full, Path("jobs/2/index.html")]:
        assert (tmp_path / "full" / path).read_text() == (tmp_path / "published" / path).read_text(), path
