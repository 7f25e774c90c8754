"""sitegen: golden pages for a fixed set of jobs, escaping, paging, incremental == full, CLI."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from golden import check_golden

from results.bundle import load_bundle
from results.log import LogRecord
from results.logfile import LogFile
from results.store import ArtifactStore
from sitegen import build_site, publish_job
from sitegen.fixtures import JobSpec, make_job, make_store
from sitegen.logpage import render_log
from sitegen.text import log_html, slug, visible
from sitegen.writer import DuplicatePathError, Writer

NOW = "2023-02-01 12:00:00"
SITE = {"instance": "lab-a.example.org", "base_url": "https://lab-a.example.org/", "now": NOW}
GOLDEN_PAGES = (
    "index.html",
    "jobs/index.html",
    "jobs/incomplete.html",
    "jobs/1/index.html",
    "jobs/1/log.html",
    "jobs/2/index.html",
    "jobs/2/log-2.html",
    "jobs/5/index.html",
    "jobs/8/log.html",
    "jobs/2/results.yaml",
    "devices/index.html",
    "devices/qemu-01.html",
    "device-types/index.html",
    "device-types/qemu.html",
    "workers/worker-b.html",
    "suites/index.html",
    "suites/0_smoke-tests.html",
    "suites/1_benchmarks.html",
)


def site_files(site: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(site)): p.read_bytes()
        for p in sorted(site.rglob("*"))
        if p.is_file() and not p.name.startswith(".")
    }


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[ArtifactStore, Path]:
    base = tmp_path_factory.mktemp("site")
    store = make_store(base / "store", 8, cases=12, log_lines=160, nasty=True)
    report = build_site(store.root, base / "site", processes=1, log_page_lines=100, **SITE)
    assert report.errors == [] and report.rendered == 7  # job 6 is personal
    return store, base / "site"


@pytest.mark.parametrize("page", GOLDEN_PAGES)
def test_golden_pages(built: tuple[ArtifactStore, Path], page: str) -> None:
    _store, site = built
    check_golden(f"site/{page.replace('/', '__')}", (site / page).read_text(encoding="utf-8"))


def test_everything_from_a_board_or_a_user_is_escaped(built: tuple[ArtifactStore, Path]) -> None:
    _store, site = built
    pages = {name: data.decode("utf-8") for name, data in site_files(site).items() if name.endswith(".html")}
    assert len(pages) > 30
    for name, text in pages.items():
        # no tag a board or user injected survives, and no raw control character reaches a page
        assert "<script>alert" not in text and "<img src=x" not in text, name
        assert not re.search("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]", text), name
        assert "<script" not in text.replace('<script src="', ""), name
    job = pages["jobs/2/index.html"]
    assert "nasty &lt;script&gt;alert(&#34;job&#34;)&lt;/script&gt; &amp; &#34;2&#34;" in job
    assert "&#34;&gt;&lt;img src=x onerror=alert(1)&gt;" in job  # the submitter
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in job  # a test case name
    assert "\\x00\\x07\\x1b[31mred\\x1b[0m \\x7f\\x85 \\ufffe" in job  # metadata with binary bytes
    log = pages["jobs/2/log.html"] + pages["jobs/2/log-2.html"]
    assert (
        'serial noise: &lt;script&gt;alert("pwned")&lt;/script&gt; &amp; "quotes" \'single\' '
        '<span class="cc">\\x00</span><span class="cc">\\x07</span>red'
    ) in log
    assert "\ufffd" not in job


def test_text_helpers() -> None:
    assert visible("a\x00b\x1bc\x7f\x85\ud800\ufffe") == "a\\x00b\\x1bc\\x7f\\x85\\ud800\\ufffe"
    assert visible("tab\tand\nnewline") == "tab\tand\nnewline"
    assert log_html("<b>&\x1b[1;31mred\x1b[0m\x01") == '&lt;b&gt;&amp;red<span class="cc">\\x01</span>'
    assert slug("qemu-01") == "qemu-01"
    assert slug("a b") != slug("a_b") and "/" not in slug("../../etc/passwd")
    assert slug("..") not in (".", "..") and slug("") and slug("<script>").startswith("_script_")


def test_job_page_content(built: tuple[ArtifactStore, Path]) -> None:
    store, site = built
    page = (site / "jobs/5/index.html").read_text()
    assert "InfrastructureError" in page and 'class="badge incomplete"' in page
    one = (site / "jobs/1/index.html").read_text()
    # the pipeline tree: every action with its level, nested, with durations and timeouts
    assert re.search(r'<tr class="depth-2">\s*<td class="level"><a href="log.html#L\d+">1.1.1</a>', one)
    assert "http-download" in one and "10 min 00 s" in one
    # results link to the line they were reported on, on the right log page
    for href in re.findall(r'href="(log(?:-\d+)?\.html)#L(\d+)"', one):
        text = (site / "jobs/1" / href[0]).read_text()
        assert f'id="L{href[1]}"' in text
    for name in (
        "job.yaml",
        "output.yaml",
        "description.yaml",
        "results.yaml",
        "junit.xml",
        "results.tap",
        "results.csv",
    ):
        assert (site / "jobs/1" / name).stat().st_size > 0 and f'href="{name}"' in one
    assert (site / "jobs/1/output.yaml").read_bytes() == (store.job_dir(1) / "output.yaml").read_bytes()
    bundle = load_bundle((site / "jobs/1/results.yaml").read_text())
    assert bundle.header.url == "https://lab-a.example.org/jobs/1/"
    assert [r.to_dict() for r in bundle.results] == [
        r.to_dict() for r in load_bundle(store.read_file(1, "results.yaml")).results
    ]
    running = (site / "jobs/8/log.html").read_text()  # job 8 is still running: its log tails live
    assert 'data-live="1"' in running and "still running" in running
    assert "data-live" not in (site / "jobs/1/log.html").read_text()


def test_log_pages_have_stable_anchors(built: tuple[ArtifactStore, Path]) -> None:
    store, site = built
    count = len((store.job_dir(2) / "output.yaml").read_text(encoding="utf-8").splitlines())
    ids = []
    for number in range(1, 10):
        page = site / "jobs/2" / ("log.html" if number == 1 else f"log-{number}.html")
        if not page.exists():
            break
        ids += [int(n) for n in re.findall(r'<div id="L(\d+)"', page.read_text())]
    assert ids == list(range(1, count + 1))
    assert not (site / f"jobs/2/log-{number + 1}.html").exists()


def test_lists(built: tuple[ArtifactStore, Path]) -> None:
    _store, site = built
    index = (site / "index.html").read_text()
    assert [int(n) for n in re.findall(r'<td class="num"><a href="jobs/(\d+)/index.html">', index)] == [
        8,
        7,
        5,
        4,
        3,
        2,
        1,
    ]
    assert 'data-health="incomplete"' in index
    incomplete = (site / "jobs/incomplete.html").read_text()
    assert re.findall(r'<tr data-state="(\w+)" data-health="(\w+)">', incomplete) == [("finished", "incomplete")]
    assert "bbb-01" in (site / "devices/index.html").read_text()
    bbb = (site / "devices/bbb-01.html").read_text()
    assert set(re.findall(r'href="../jobs/(\d+)/index.html"', bbb)) == {"3"}  # 6 is personal
    suite = (site / "suites/1_benchmarks.html").read_text()
    assert suite.count("<svg") >= 6 and "<polyline" in suite and "DMIPS" in suite
    data = json.loads((site / "data/jobs.json").read_text())
    assert sorted(j["id"] for j in data["jobs"]) == [1, 2, 3, 4, 5, 7, 8]


def test_incremental_publishing_equals_a_full_build(tmp_path: Path) -> None:
    """Publishing jobs one by one as they finish gives byte for byte the site a full build gives."""
    store = make_store(tmp_path / "store", 7, cases=8, log_lines=60, nasty=True)
    for job_id in store.job_ids():
        report = publish_job(store.root, tmp_path / "published", job_id, **SITE)
        assert report.seconds < 2
    # job 3 changes after its first publish (re-run of the renderer with new meta): publish again
    meta = store.read_meta(3)
    meta["failure_comment"] = "operator note: <b>re-checked</b>"
    store.write_meta(3, meta)
    publish_job(store.root, tmp_path / "published", 3, **SITE)
    build_site(store.root, tmp_path / "full", processes=1, **SITE)
    published, full = site_files(tmp_path / "published"), site_files(tmp_path / "full")
    assert sorted(published) == sorted(full)
    different = [name for name in full if full[name] != published[name]]
    assert different == []


def test_publish_updates_the_lists_a_job_appears_in(tmp_path: Path) -> None:
    store = make_store(tmp_path / "store", 5, cases=6, log_lines=40, nasty=False)
    site = tmp_path / "site"
    build_site(store.root, site, processes=1, **SITE)
    make_job(store, JobSpec(6, "beaglebone-black", "bbb-01", "worker-b", "incomplete", 6, 40))
    before = {name: (site / name).stat().st_mtime_ns for name in ("devices/qemu-01.html", "jobs/1/index.html")}
    started = time.perf_counter()
    publish_job(store.root, site, 6, **SITE)
    assert time.perf_counter() - started < 1.0
    for page in (
        "index.html",
        "jobs/incomplete.html",
        "devices/bbb-01.html",
        "device-types/beaglebone-black.html",
        "workers/worker-b.html",
        "jobs/archive-0.html",
    ):
        assert (
            'href="../jobs/6/index.html"' in (site / page).read_text()
            or 'href="jobs/6/index.html"' in (site / page).read_text()
        ), page
    assert "#6" in (site / "suites/index.html").read_text()
    lava = json.loads((site / "data/suites/lava.json").read_text())  # it failed in boot: no test suites
    assert lava["runs"][0]["id"] == 6
    # pages the job is not on are left alone
    assert {name: (site / name).stat().st_mtime_ns for name in before} == before


def test_incremental_build_rerenders_only_changed_jobs(tmp_path: Path) -> None:
    store = make_store(tmp_path / "store", 6, cases=6, log_lines=40)
    site = tmp_path / "site"
    first = build_site(store.root, site, processes=1, **SITE)
    assert first.rendered == 5
    again = build_site(store.root, site, incremental=True, processes=1, **SITE)
    assert (again.rendered, again.skipped) == (0, 5)
    with store.log(4) as log:  # job 4's log grows
        log.append([LogRecord("2023-01-10T11:00:00.000000", "info", "one more line")])
    shutil.rmtree(store.job_dir(2))  # job 2 is deleted from the store
    third = build_site(store.root, site, incremental=True, processes=1, **SITE)
    assert (third.rendered, third.skipped) == (1, 3)
    assert "one more line" in (site / "jobs/4/log.html").read_text()
    assert not (site / "jobs/2").exists()
    assert 'href="jobs/2/index.html"' not in (site / "index.html").read_text()
    # a full build removes what no job owns any more
    (site / "jobs/77").mkdir()
    (site / "jobs/77/index.html").write_text("stale")
    assert build_site(store.root, site, processes=1, **SITE).removed >= 1
    assert not (site / "jobs/77").exists()


def test_parallel_build_equals_serial_build(tmp_path: Path) -> None:
    store = make_store(tmp_path / "store", 40, cases=4, log_lines=30)
    build_site(store.root, tmp_path / "serial", processes=1, **SITE)
    report = build_site(store.root, tmp_path / "parallel", processes=2, **SITE)
    assert report.errors == [] and report.rendered == 39
    assert site_files(tmp_path / "serial") == site_files(tmp_path / "parallel")


def test_broken_job_is_reported_and_the_rest_is_built(tmp_path: Path) -> None:
    store = make_store(tmp_path / "store", 3, cases=4, log_lines=30)
    (store.job_dir(2) / "results.yaml").write_text("job: '2'\nresults:\n  '1':\n  - {case: x}\n")
    report = build_site(store.root, tmp_path / "site", processes=1, **SITE)
    assert report.rendered == 2 and len(report.errors) == 1
    assert "jobs/2/results.yaml" in report.errors[0] and "line 4" in report.errors[0]


def test_big_log_is_paged_and_fast(tmp_path: Path) -> None:
    path = tmp_path / "output.yaml"
    records = [
        LogRecord(
            f"2023-01-10T10:00:{n % 60:02d}.000000", ("target", "debug", "info")[n % 3], f"line {n} <tag> & stuff"
        )
        for n in range(20000)
    ]
    with LogFile(path) as log:
        log.append(records)
    started = time.perf_counter()
    rendered = render_log(path)
    assert time.perf_counter() - started < 3
    assert rendered.lines == 20000 and len(rendered.pages) == 8
    assert rendered.pages[-1].first == 17501 and rendered.pages[-1].last == 20000
    assert rendered.size == path.stat().st_size


def test_writer_refuses_to_write_a_path_twice(tmp_path: Path) -> None:
    writer = Writer(tmp_path)
    writer.write("a/b.html", "one")
    with pytest.raises(DuplicatePathError, match="a/b.html: written twice"):
        writer.write("a/b.html", "two")
    with pytest.raises(ValueError, match="leaves the site root"):
        writer.write("../x.html", "no")
    assert (tmp_path / "a/b.html").read_text() == "one"


def test_template_overrides(tmp_path: Path) -> None:
    store = make_store(tmp_path / "store", 2, cases=2, log_lines=20)
    templates = tmp_path / "templates"
    templates.mkdir()
    base = (Path(__file__).parent.parent / "sitegen/templates/base.html").read_text()
    (templates / "base.html").write_text(base.replace("<main>", "<main><p>Lab X: call 1234</p>"))
    build_site(store.root, tmp_path / "site", template_dirs=[templates], processes=1, **SITE)
    assert "Lab X: call 1234" in (tmp_path / "site/jobs/1/index.html").read_text()


def test_cli_build(tmp_path: Path) -> None:
    store = make_store(tmp_path / "store", 3, cases=2, log_lines=20)
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "sitegen.cli",
            "build",
            "--store",
            str(store.root),
            "--out",
            str(tmp_path / "site"),
            "--instance",
            "lab-b",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert "3 jobs rendered" in out.stdout
    assert (tmp_path / "site/jobs/3/index.html").exists()
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "sitegen.cli",
            "build",
            "--incremental",
            "--store",
            str(store.root),
            "--out",
            str(tmp_path / "site"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0 and "0 jobs rendered, 3 unchanged" in out.stdout
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "sitegen.cli",
            "build",
            "--store",
            str(tmp_path / "nope"),
            "--out",
            str(tmp_path / "site2"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0 and "0 jobs rendered" in out.stdout


def test_lava_written_log_and_mangled_lines(tmp_path: Path) -> None:
    """A log LAVA itself wrote (yaml.dump escapes like \\e) and a mangled line still render, as text."""
    path = tmp_path / "output.yaml"
    lines = [
        '- {"dt": "2023-01-10T10:00:00.000001", "lvl": "info", "msg": "start: 1 tftp-deploy (timeout 00:10:00)"}',
        '- {"dt": "2023-01-10T10:00:00.000002", "lvl": "target", "msg": "\\e[0;32mOK\\e[0m <b>"}',
        "- this is not a record <i>",
        '- {"dt": "2023-01-10T10:00:00.000003", "lvl": "results", "msg": {"case": "pwd", '
        '"definition": "0_smoke", "result": "pass"}}',
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    rendered = render_log(path)
    rows = rendered.pages[0].rows
    assert rendered.lines == 4 and rendered.start_lines == {"1": 1}
    assert rendered.result_lines == {("0_smoke", "pwd"): [4]}
    assert '<span class="m">OK &lt;b&gt;</span>' in rows  # colours dropped, tags escaped
    assert '<div id="L3" class="error">' in rows and "this is not a record &lt;i&gt;" in rows


def test_republishing_a_job_leaves_no_temporary_file_behind(tmp_path: Path) -> None:
    """The log is published as a hard link of the store's: linking it again over itself (a rename of
    one link over another of the same file does nothing) left .output.yaml.<pid>.tmp in the directory."""
    store = make_store(tmp_path / "store", 2, cases=2, log_lines=20)
    for _ in range(3):
        publish_job(store.root, tmp_path / "site", 1, **SITE)
    left = [p.name for p in (tmp_path / "site/jobs/1").iterdir() if p.name.endswith(".tmp")]
    assert left == []
    assert (tmp_path / "site/jobs/1/output.yaml").read_bytes() == (store.job_dir(1) / "output.yaml").read_bytes()


def test_an_empty_filter_in_a_lab_with_jobs_says_what_it_filtered(tmp_path: Path) -> None:
    store = make_store(tmp_path / "store", 2, cases=2, log_lines=20)
    build_site(store.root, tmp_path / "site", processes=1, **SITE)
    empty = [stem for stem in ("complete", "incomplete", "canceled", "running", "queued")
             if 'class="empty"' in (tmp_path / f"site/jobs/{stem}.html").read_text()]
    assert empty
    for stem in empty:
        text = (tmp_path / f"site/jobs/{stem}.html").read_text()
        assert "No jobs yet." not in text and f"No {stem} jobs." in text
