"""Build the static site from an artifact store: in full, incrementally, or one job as it finishes.

Two phases, as in pelican: load a model (jobs from the store, summaries from ``data/``), then render with
a :class:`~sitegen.writer.Writer`. Each job's own pages depend on that job only; lists (index, devices,
device types, workers, suites) are rendered from the small job summaries kept in ``data/jobs.json`` and
the per-suite histories in ``data/suites/``, so publishing one job reads one job from the store.

Site layout (all links are relative, so the site also works from a file system or any static host)::

    index.html                     recent jobs, with state/health filters
    lab/index.html, lab/now.txt    the lab now (sitegen.labnow), republished by the master on every change
    jobs/index.html                all jobs, by id range (jobs/archive-<n>.html) and filter pages
    jobs/<id>/index.html           the job page; log.html, log-2.html... the log
    jobs/<id>/{job,output,results,description}.yaml, junit.xml, results.tap, results.csv
    devices/, device-types/, workers/, suites/   one page per name plus an index.html
    data/jobs.json, data/suites/<suite>.json      the summaries the lists are made of
    static/site.css, static/site.js
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import multiprocessing
import os
import shutil
import socket
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import AbstractContextManager, contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from results.export import to_csv, to_junit, to_tap13
from results.record import RESULTS
from results.store import ArtifactStore
from sitegen.bundles import job_url, site_base_url, site_bundle
from sitegen.history import (
    add_run,
    case_href,
    case_key,
    case_label,
    case_marks,
    compare_runs,
    load_series,
    render_case_pages,
    run_of,
    series_key,
    write_series,
)
from sitegen.labnow import lab_lock, load_lab, render_lab, site_file_lock
from sitegen.logpage import LOG_PAGE_LINES, RenderedLog, log_page_name, page_of_line, render_log
from sitegen.model import (
    HEALTHS,
    JobView,
    SiteError,
    is_public,
    job_stamp,
    job_summary,
    load_job,
    load_results,
    pipeline_rows,
    suite_entry,
)
from sitegen.plot import measurement_plot, result_bars
from sitegen.render import STATIC_DIR, make_environment
from sitegen.text import format_time, slug
from sitegen.widgets import row_cache
from sitegen.writer import Writer

log = logging.getLogger("pumice.sitegen")

RECENT_JOBS = 100  # rows on the index, filter, device, device type and worker pages
ARCHIVE_SIZE = 200  # job ids per archive page (by id, so a new job touches one archive page)
SUITE_HISTORY = 100  # runs kept per suite for its history page and plots
SUITE_RUNS_SHOWN = 30  # of which the runs table lists the latest (the charts show them all)
DATA_VERSION = 2
# Filter pages of the job list: (file stem, label, field, accepted values)
FILTERS = (
    ("complete", "Complete", "health", ("complete",)),
    ("incomplete", "Incomplete", "health", ("incomplete",)),
    ("canceled", "Canceled", "health", ("canceled",)),
    ("running", "Running", "state", ("running", "canceling")),
    ("queued", "Queued", "state", ("submitted", "scheduling", "scheduled")),
)
# Top-level entries of the site that builds own (a full build prunes stale files under these only).
OWNED = ("index.html", "lab", "jobs", "cases", "devices", "device-types", "workers", "suites", "data", "static")
RAW_LABELS = {
    "job.yaml": "job definition",
    "output.yaml": "log (raw)",
    "results.yaml": "results bundle",
    "description.yaml": "pipeline description",
    "junit.xml": "JUnit XML",
    "results.tap": "TAP13",
    "results.csv": "CSV",
}


@dataclass
class SiteConfig:
    """How pages are made: this instance's name and public URL (for bundles), template overrides."""

    instance: str = ""
    base_url: str = ""
    template_dirs: tuple[str, ...] = ()
    now: str | None = None  # the "generated" time in footers; fixed by golden tests
    log_page_lines: int = LOG_PAGE_LINES

    def __post_init__(self) -> None:
        if not self.instance:
            self.instance = socket.getfqdn() or "localhost"
        self.base_url = site_base_url(self.instance, self.base_url)


@dataclass
class Compared:
    """A job against its series: the previous comparable run and each case's mark (see sitegen.history)."""

    series: str
    previous: int | None = None
    marks: dict[str, tuple[str, int]] = field(default_factory=dict)
    #: the previous run itself (its cases), for the "compare with previous run" page
    previous_run: dict | None = None


def job_series(job: JobView) -> str:
    return series_key(job.name, job.meta.get("device_type"))


def job_run(job: JobView) -> dict:
    return run_of(job.id, job.meta.get("end_time") and str(job.meta.get("end_time")), job.health, job.results)


@dataclass
class BuildReport:
    """What a build did: jobs rendered and skipped, pages written, seconds, errors (one per bad job)."""

    rendered: int = 0
    skipped: int = 0
    written: int = 0
    removed: int = 0
    seconds: float = 0.0
    errors: list[str] = field(default_factory=list)


class Site:
    """One site directory being (re)built from one store."""

    def __init__(
        self, store_root: str | os.PathLike, site_root: str | os.PathLike, config: SiteConfig | None = None
    ) -> None:
        self.store = ArtifactStore(store_root)
        self.root = Path(site_root)
        self.config = config or SiteConfig()
        self.env = make_environment(self.config.template_dirs)
        self.writer = Writer(self.root)
        self.generated = self.config.now or format_time(_dt.datetime.now(_dt.UTC))

    # -- pages -------------------------------------------------------------------------------------------

    def page(self, rel: str, template: str, **context: object) -> None:
        """Render ``template`` to ``rel`` (a path under the site root) with links relative to it."""
        text = self.env.get_template(template).render(
            root="../" * rel.count("/"),
            section=rel.split("/")[0] if "/" in rel else "jobs",
            instance=self.config.instance,
            generated=self.generated,
            **context,
        )
        self.writer.write(rel, text)

    def static(self) -> None:
        """Copy the stylesheet and script (user template directories may override them too)."""
        for source in sorted(STATIC_DIR.iterdir()):
            override = [Path(d) / "static" / source.name for d in self.config.template_dirs]
            chosen = next((p for p in override if p.exists()), source)
            self.writer.write(f"static/{source.name}", chosen.read_bytes())

    # -- one job -----------------------------------------------------------------------------------------

    def render_job(self, job: JobView, compared: Compared | None = None) -> tuple[dict, dict[str, dict]]:
        """Write the job's page, log pages and files; return its summary and its run of each suite.

        ``compared``: the job against its series (the previous comparable run, each case's mark)."""
        base = f"jobs/{job.id}"
        rendered = render_log(job.log_path, self.config.log_page_lines) if job.log_path else RenderedLog()
        files = self._job_files(job, base)
        summary = job_summary(job)
        compared = compared or Compared(job_series(job))
        summary["series"] = compared.series
        rows = pipeline_rows(job, rendered.start_lines)
        self.page(
            f"{base}/index.html",
            "job.html",
            job=job,
            s=summary,
            rows=rows,
            suites=self._result_groups(job, rendered, compared),
            compared=compared,
            marked=Counter(mark for mark, _first in compared.marks.values()),
            files=files,
            log=rendered,
            metadata=job.job_metadata(),
            job_result=job.job_result(),
            url=job_url(self.config.base_url, job.id),
            line_href=lambda n: f"{log_page_name(page_of_line(n, self.config.log_page_lines))}#L{n}",
            log_pages=[(p.number, p.first, p.last, log_page_name(p.number)) for p in rendered.pages],
        )
        self._log_pages(job, summary, rendered, base)
        if compared.previous_run is not None:
            self.compare_page(f"{base}/compare.html", compared.previous_run, job_run(job), compared.series)
        self._prune_dir(self.root / base)
        entries = {suite: suite_entry(job, suite) for suite in summary["suites"]}
        return summary, entries

    def compare_page(self, rel: str, before: dict, after: dict, series: str | None = None) -> None:
        """What changed between two runs: regressions, fixes, still failing, measurement deltas."""
        self.page(rel, "compare.html", before=before, after=after, diff=compare_runs(before, after),
                  label=case_label, case_page=(lambda key: case_href(series, key)) if series else None)

    def _job_files(self, job: JobView, base: str) -> list[tuple[str, str]]:
        """Publish the raw files and exports next to the job page; return (file, label) pairs."""
        job_dir = self.store.job_dir(job.id)
        files = []
        for name in ("job.yaml", "output.yaml", "description.yaml"):
            if (job_dir / name).exists():
                self.writer.link(f"{base}/{name}", job_dir / name)
                files.append(name)
        self.writer.write(
            f"{base}/results.yaml",
            site_bundle(job.id, job.results, job.meta, self.config.instance, self.config.base_url),
        )
        files.append("results.yaml")
        job_name = str(job.id)
        for name, export in (("junit.xml", to_junit), ("results.tap", to_tap13), ("results.csv", to_csv)):
            self.writer.write(f"{base}/{name}", export(job_name, job.results))
            files.append(name)
        order = list(RAW_LABELS)
        return [(name, RAW_LABELS[name]) for name in sorted(files, key=order.index)]

    def _result_groups(self, job: JobView, rendered: RenderedLog, compared: Compared) -> list[dict]:
        """Results per suite (test suites first, ``lava`` last), each with the log line it was reported on,
        its case page and its mark against the previous comparable run."""
        seen: Counter = Counter()
        groups: dict[str, dict] = {}
        for result in job.results:
            key = (result.suite, result.case)
            lines = rendered.result_lines.get(key, ())
            line = lines[seen[key]] if seen[key] < len(lines) else None
            seen[key] += 1
            group = groups.setdefault(
                result.suite, {"suite": result.suite, "rows": [], "counts": dict.fromkeys(RESULTS, 0)}
            )
            if result.suite == "lava":
                group["rows"].append((result, line, None, None))
            else:
                ckey = case_key(result)
                group["rows"].append((result, line, compared.marks.get(ckey), case_href(compared.series, ckey)))
            if result.result in group["counts"]:
                group["counts"][result.result] += 1
        return sorted(groups.values(), key=lambda g: g["suite"] == "lava")

    def _log_pages(self, job: JobView, summary: dict, rendered: RenderedLog, base: str) -> None:
        pages = rendered.pages or []
        nav = [(p.number, p.first, p.last, log_page_name(p.number)) for p in pages]
        if not pages:
            self.page(
                f"{base}/log.html",
                "log.html",
                job=job,
                s=summary,
                log=rendered,
                page=None,
                nav=nav,
                rows="",
                levels={},
                live=not job.finished,
                page_lines=self.config.log_page_lines,
            )
            return
        from markupsafe import Markup

        for page in pages:
            is_last = page.number == len(pages)
            self.page(
                f"{base}/{log_page_name(page.number)}",
                "log.html",
                job=job,
                s=summary,
                log=rendered,
                page=page,
                nav=nav,
                rows=Markup(page.rows),  # HTML made by logpage: every message went through log_html
                levels=dict(page.levels),
                live=is_last and not job.finished,
                page_lines=self.config.log_page_lines,
            )

    def _prune_dir(self, directory: Path) -> None:
        """Drop files of an earlier render of this job that this render did not write (fewer log pages)."""
        for path in directory.iterdir():
            if path.is_file() and path not in self.writer.written and not path.name.startswith("."):
                path.unlink()

    def remove_job(self, job_id: int) -> None:
        """Take a job's pages off the site (deleted from the store, or no longer public)."""
        shutil.rmtree(self.root / "jobs" / str(int(job_id)), ignore_errors=True)

    # -- lists -------------------------------------------------------------------------------------------

    def render_lists(
        self,
        jobs: dict[int, dict],
        suites: dict[str, dict],
        lab: dict,
        *,
        devices: Iterable[str] | None = None,
        device_types: Iterable[str] | None = None,
        workers: Iterable[str] | None = None,
        suite_names: Iterable[str] | None = None,
        archives: Iterable[int] | None = None,
        filters: Iterable[str] | None = None,
    ) -> None:
        """Render the list pages; ``None`` for a kind means all of them, an iterable means only those."""
        with row_cache():
            self._render_lists(
                jobs,
                suites,
                lab,
                devices=devices,
                device_types=device_types,
                workers=workers,
                suite_names=suite_names,
                archives=archives,
                filters=filters,
            )

    def _render_lists(
        self,
        jobs: dict[int, dict],
        suites: dict[str, dict],
        lab: dict,
        *,
        devices: Iterable[str] | None,
        device_types: Iterable[str] | None,
        workers: Iterable[str] | None,
        suite_names: Iterable[str] | None,
        archives: Iterable[int] | None,
        filters: Iterable[str] | None,
    ) -> None:
        ordered = [jobs[i] for i in sorted(jobs, reverse=True)]
        lab_devices, lab_types, lab_workers = _lab_tables(lab)
        self.page(
            "index.html",
            "jobs.html",
            title="Recent jobs",
            jobs=ordered[:RECENT_JOBS],
            total=len(ordered),
            filters=FILTERS,
            current="",
            archive_link=True,
        )
        for stem, label, key, values in FILTERS:
            if filters is not None and stem not in filters:
                continue
            chosen = [j for j in ordered if j.get(key) in values]
            self.page(
                f"jobs/{stem}.html",
                "jobs.html",
                title=f"{label} jobs",
                jobs=chosen[:RECENT_JOBS],
                total=len(chosen),
                filters=FILTERS,
                current=stem,
                archive_link=True,
            )
        # archives: id ranges of ARCHIVE_SIZE, newest first
        buckets: dict[int, list[dict]] = defaultdict(list)
        for summary in ordered:
            buckets[summary["id"] // ARCHIVE_SIZE].append(summary)
        bucket_list = sorted(buckets, reverse=True)
        self.page(
            "jobs/index.html",
            "archives.html",
            archives=[
                (
                    b,
                    b * ARCHIVE_SIZE,
                    b * ARCHIVE_SIZE + ARCHIVE_SIZE - 1,
                    len(buckets[b]),
                    Counter(j["health"] for j in buckets[b]),
                )
                for b in bucket_list
            ],
            filters=FILTERS,
            total=len(ordered),
        )
        for bucket in bucket_list if archives is None else [b for b in archives if b in buckets]:
            self.page(
                f"jobs/archive-{bucket}.html",
                "jobs.html",
                title=f"Jobs {bucket * ARCHIVE_SIZE}–{bucket * ARCHIVE_SIZE + ARCHIVE_SIZE - 1}",
                jobs=buckets[bucket],
                total=len(buckets[bucket]),
                filters=FILTERS,
                current="",
                archive_link=True,
            )

        by: dict[str, dict[str, list[dict]]] = {
            "device": defaultdict(list),
            "device_type": defaultdict(list),
            "worker": defaultdict(list),
        }
        for summary in ordered:
            for key, table in by.items():
                if summary.get(key):
                    table[str(summary[key])].append(summary)
        all_devices = sorted(set(lab_devices) | set(by["device"]))
        all_types = sorted(
            set(lab_types)
            | set(by["device_type"])
            | {str(d.get("device_type")) for d in lab_devices.values() if d.get("device_type")}
        )
        all_workers = sorted(
            set(lab_workers)
            | set(by["worker"])
            | {str(d.get("worker")) for d in lab_devices.values() if d.get("worker")}
        )

        def stats(name: str, key: str) -> dict:
            runs = by[key].get(name, [])
            return {"jobs": len(runs), "last": runs[0] if runs else None, "health": Counter(j["health"] for j in runs)}

        def devices_of(key: str, name: str) -> list[str]:
            """The lab's devices whose ``key`` (device_type, worker) is ``name``."""
            return sorted(d for d, info in lab_devices.items() if info.get(key) == name)

        self.page(
            "devices/index.html",
            "devices.html",
            devices=[(name, lab_devices.get(name, {}), stats(name, "device")) for name in all_devices],
        )
        self.page(
            "device-types/index.html",
            "device_types.html",
            device_types=[(name, lab_types.get(name, {}), stats(name, "device_type"), devices_of("device_type", name))
                          for name in all_types],
        )
        self.page(
            "workers/index.html",
            "workers.html",
            workers=[(name, lab_workers.get(name, {}), stats(name, "worker"), devices_of("worker", name))
                     for name in all_workers],
        )
        for name in all_devices if devices is None else [d for d in devices if d]:
            self.page(
                f"devices/{slug(name)}.html",
                "device.html",
                name=name,
                info=lab_devices.get(name, {}),
                jobs=by["device"].get(name, [])[:RECENT_JOBS],
                stats=stats(name, "device"),
            )
        for name in all_types if device_types is None else [d for d in device_types if d]:
            self.page(
                f"device-types/{slug(name)}.html",
                "device_type.html",
                name=name,
                info=lab_types.get(name, {}),
                jobs=by["device_type"].get(name, [])[:RECENT_JOBS],
                stats=stats(name, "device_type"),
                devices=[(d, info) for d, info in sorted(lab_devices.items()) if info.get("device_type") == name],
            )
        for name in all_workers if workers is None else [w for w in workers if w]:
            self.page(
                f"workers/{slug(name)}.html",
                "worker.html",
                name=name,
                info=lab_workers.get(name, {}),
                jobs=by["worker"].get(name, [])[:RECENT_JOBS],
                stats=stats(name, "worker"),
                devices=[(d, info) for d, info in sorted(lab_devices.items()) if info.get("worker") == name],
            )

        suite_runs: dict[str, list[dict]] = defaultdict(list)
        for summary in ordered:
            for suite, counts in summary["suites"].items():
                suite_runs[suite].append(
                    {
                        "id": summary["id"],
                        "counts": counts,
                        "health": summary["health"],
                        "end_time": summary.get("end_time"),
                    }
                )
        self.page(
            "suites/index.html",
            "suites.html",
            suites=[(name, len(suite_runs[name]), suite_runs[name][0]) for name in sorted(suite_runs)],
        )
        for name in sorted(suite_runs) if suite_names is None else [s for s in suite_names if s in suite_runs]:
            history = suites.get(name, {"runs": []})["runs"]
            self.page(
                f"suites/{slug(name)}.html",
                "suite.html",
                name=name,
                runs=history,
                total=len(suite_runs[name]),
                runs_shown=SUITE_RUNS_SHOWN,
                **_suite_charts(history),
            )

    # -- data --------------------------------------------------------------------------------------------

    def load_jobs_data(self) -> dict[int, dict]:
        """The job summaries of the previous build (empty when there is none or it is from another version)."""
        path = self.root / "data" / "jobs.json"
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (FileNotFoundError, ValueError):
            return {}
        if data.get("version") != DATA_VERSION:
            return {}
        return {int(j["id"]): j for j in data.get("jobs", [])}

    def write_jobs_data(self, jobs: dict[int, dict]) -> None:
        payload = {"version": DATA_VERSION, "instance": self.config.instance, "jobs": [jobs[i] for i in sorted(jobs)]}
        self.writer.write("data/jobs.json", json.dumps(payload, separators=(",", ":")))

    def load_suite(self, name: str) -> dict:
        path = self.root / "data" / "suites" / f"{slug(name)}.json"
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (FileNotFoundError, ValueError):
            return {"name": name, "runs": []}

    def write_suite(self, name: str, data: dict) -> None:
        self.writer.write(f"data/suites/{slug(name)}.json", json.dumps(data, separators=(",", ":")))

    def prune(self) -> int:
        """After a full build: delete files under the site's own directories that it did not write."""
        removed = 0
        for top in OWNED:
            path = self.root / top
            if path.is_file():
                if path not in self.writer.written:
                    path.unlink()
                    removed += 1
                continue
            if not path.is_dir():
                continue
            for dirpath, dirnames, filenames in os.walk(path, topdown=False):
                for filename in filenames:
                    file = Path(dirpath) / filename
                    if file not in self.writer.written:
                        file.unlink()
                        removed += 1
                for dirname in dirnames:
                    with suppress(OSError):
                        (Path(dirpath) / dirname).rmdir()  # only succeeds when empty
        return removed


def _lab_tables(lab: dict) -> tuple[dict[str, dict], dict[str, dict], dict[str, dict]]:
    """Devices, device types and workers of lab.yaml by name (a list of mappings or a mapping by name)."""

    def table(value: object, *keys: str) -> dict[str, dict]:
        out: dict[str, dict] = {}
        if isinstance(value, dict):
            for name, info in value.items():
                out[str(name)] = info if isinstance(info, dict) else {}
        elif isinstance(value, list):
            for info in value:
                if isinstance(info, dict):
                    name = next((info[k] for k in keys if info.get(k)), None)
                    if name:
                        out[str(name)] = info
                elif isinstance(info, str):
                    out[info] = {}
        return out

    lab = lab if isinstance(lab, dict) else {}
    return (
        table(lab.get("devices"), "hostname", "name"),
        table(lab.get("device_types") or lab.get("device-types"), "name"),
        table(lab.get("workers"), "hostname", "name"),
    )


def _suite_charts(history: list[dict]) -> dict:
    """The suite page's charts: results per run and one plot per measured case (oldest run first)."""
    runs = list(reversed(history))
    series: dict[tuple[str, str, str], list[tuple[int, float]]] = defaultdict(list)
    latest: dict[tuple[str, str], list] = {}
    for run in runs:
        for set_name, case, result, measurement, units in run["cases"]:
            latest[(set_name, case)] = [run["id"], result, measurement, units]
            if measurement is not None:
                series[(set_name, case, units)].append((run["id"], float(measurement)))
    href = "../jobs/{id}/index.html"
    plots = [
        {
            "set": s,
            "case": c,
            "units": u,
            "svg": measurement_plot(points, u, href),
            "last": points[-1][1],
            "low": min(v for _, v in points),
            "high": max(v for _, v in points),
            "runs": len(points),
        }
        for (s, c, u), points in sorted(series.items())
    ]
    cases = [
        {"set": s, "case": c, "job": v[0], "result": v[1], "measurement": v[2], "units": v[3]}
        for (s, c), v in sorted(latest.items())
    ]
    return {"bars": result_bars(runs, href), "plots": plots, "cases": cases}


def _add_run(history: dict, entry: dict | None, job_id: int) -> dict:
    """Put one job's run into a suite's history (replacing an older render), newest first, bounded."""
    runs = [r for r in history.get("runs", []) if r["id"] != job_id]
    if entry is not None:
        runs.append(entry)
    runs.sort(key=lambda r: r["id"], reverse=True)
    history["runs"] = runs[:SUITE_HISTORY]
    return history


def _series_of_build(site: Site, run_map: Callable, todo: list[int], previous: dict[int, dict], ids: set[int],
                     incremental: bool) -> tuple[dict[str, dict], dict[int, Compared]]:
    """The test-case history of a build: every series with the runs of ``todo`` put in (an
    incremental build starts from the series files of the last one), and each todo job's comparison."""
    runs = [r for r in run_map(_series_run, todo) if r is not None]
    series: dict[str, dict] = {}
    if incremental:
        for summary in previous.values():
            key = summary.get("series")
            if key and key not in series:
                series[key] = load_series(site.root, key)
        for data in series.values():
            for job_id in set(todo) | (set(previous) - ids):
                add_run(data, None, job_id)
    for job_id, key, run, name, device_type in runs:
        data = series.setdefault(key, {"name": name, "device_type": device_type, "runs": []})
        add_run(data, run, job_id)
    compared = {}
    for job_id, key, run, _name, _type in runs:
        previous_id, marks = case_marks(series[key], run)
        compared[job_id] = Compared(key, previous_id, marks, _run_of_series(series[key], previous_id))
    return series, compared


def _run_of_series(series: dict, job_id: int | None) -> dict | None:
    return next((r for r in series.get("runs", []) if r["id"] == job_id), None) if job_id else None


def _summary_with_suite_counts(summary: dict, entries: dict[str, dict]) -> dict:
    summary["suites"] = {suite: entry["counts"] for suite, entry in entries.items()}
    return summary


# -- full and incremental builds --------------------------------------------------------------------------

_WORKER_SITE: Site | None = None


def _init_worker(store_root: str, site_root: str, config: SiteConfig) -> None:
    global _WORKER_SITE
    logging.basicConfig(level=logging.WARNING)
    _WORKER_SITE = Site(store_root, site_root, config)


def _series_run(job_id: int) -> tuple[int, str, dict, str, str] | None:
    """A job's place in the test-case history, read in a worker: (id, series, run), None if it has none."""
    site = _WORKER_SITE
    assert site is not None
    job = load_results(site.store, job_id)
    return None if job is None else (job.id, job_series(job), job_run(job), job.name,
                                     str(job.meta.get("device_type") or ""))


def _render_one(item: tuple[int, Compared | None]) -> tuple[int, dict | None, dict, list[str], str | None]:
    """Render one job in a worker: (id, summary or None when not public, suite entries, paths, error)."""
    job_id, compared = item
    site = _WORKER_SITE
    assert site is not None
    site.writer = Writer(site.root)
    if not (site.store.job_dir(job_id) / "meta.yaml").exists():
        return job_id, None, {}, [], None  # a job directory being created right now: not a job yet
    try:
        job = load_job(site.store, job_id)
        if not is_public(job.meta):
            site.remove_job(job_id)
            return job_id, None, {}, [], None
        summary, entries = site.render_job(job, compared)
    except SiteError as exc:
        return job_id, None, {}, [str(p) for p in site.writer.written], str(exc)
    except Exception as exc:  # one broken job must not stop the build; the report names it
        log.debug("job %s: cannot render", job_id, exc_info=True)
        return job_id, None, {}, [str(p) for p in site.writer.written], f"job {job_id}: {exc!r}"
    return job_id, _summary_with_suite_counts(summary, entries), entries, [str(p) for p in site.writer.written], None


@contextmanager
def _workers(store_root: Path, site_root: Path, config: SiteConfig, count: int, processes: int) -> Iterator:
    """A ``map(func, items)`` over ``count`` items of work: in this process for a few, else in a pool of
    ``processes`` (spawned once for every phase of a build)."""
    if processes <= 1 or count < 32:
        _init_worker(str(store_root), str(site_root), config)
        yield map
        return
    # spawn, not fork: build_site may run inside the master, which has threads and ZeroMQ sockets
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(
        processes, mp_context=context, initializer=_init_worker, initargs=(str(store_root), str(site_root), config)
    ) as pool:
        chunks = max(1, min(64, count // (processes * 8)))
        yield lambda func, items: pool.map(func, items, chunksize=chunks)


def site_lock(site_root: Path) -> AbstractContextManager[None]:
    """Serialise builds and publishes of one site (the master publishes from several threads)."""
    return site_file_lock(site_root, ".pumice-site.lock")


def build_site(
    store_root: str | os.PathLike,
    site_root: str | os.PathLike,
    *,
    incremental: bool = False,
    instance: str = "",
    base_url: str = "",
    template_dirs: Iterable[str] = (),
    now: str | None = None,
    processes: int | None = None,
    log_page_lines: int = LOG_PAGE_LINES,
) -> BuildReport:
    """Build the whole site from the store.

    A full build regenerates every page and removes files no job or list owns any more. An incremental
    build re-renders only jobs whose files changed since the last build (by size and mtime), drops jobs
    that left the store, and re-renders the lists.
    """
    started = time.perf_counter()
    config = SiteConfig(
        instance=instance,
        base_url=base_url,
        template_dirs=tuple(map(str, template_dirs)),
        now=now,
        log_page_lines=log_page_lines,
    )
    site_root = Path(site_root)
    report = BuildReport()
    with site_lock(site_root):
        site = Site(store_root, site_root, config)
        ids = list(site.store.job_ids())
        previous = site.load_jobs_data() if incremental else {}
        jobs: dict[int, dict] = {}
        todo = []
        for job_id in ids:
            old = previous.get(job_id)
            if (
                old is not None
                and old.get("stamp") == job_stamp(site.store, job_id)
                and (site_root / "jobs" / str(job_id) / "index.html").exists()
            ):
                jobs[job_id] = old
                report.skipped += 1
            else:
                todo.append(job_id)
        for gone in set(previous) - set(ids):
            site.remove_job(gone)
        suites: dict[str, dict] = {}
        changed_suites: set[str] = set()
        if incremental:
            for job_id in todo:
                changed_suites.update(previous.get(job_id, {}).get("suites", {}))
            for gone in set(previous) - set(ids):
                changed_suites.update(previous[gone].get("suites", {}))
        processes = processes if processes is not None else (os.cpu_count() or 1)
        workers = _workers(site.store.root, site_root, config, len(todo), processes)
        run_map = workers.__enter__()
        try:
            series, compared = _series_of_build(site, run_map, todo, previous, set(ids), incremental)
            rendered = list(run_map(_render_one, [(job_id, compared.get(job_id)) for job_id in todo]))
        finally:
            workers.__exit__(None, None, None)
        for key, data in series.items():
            write_series(site, key, data)
        touched_series = {c.series for c in compared.values()} | {
            previous[j].get("series") for j in set(previous) - set(ids) if previous[j].get("series")}
        for key in sorted(touched_series if incremental else series):
            if key in series:
                render_case_pages(site, key, series[key])
        for job_id, summary, entries, written, error in rendered:
            site.writer.written.update(Path(p) for p in written)
            if error:
                report.errors.append(error)
                log.error("%s", error)
                continue
            if summary is None:
                continue
            report.rendered += 1
            jobs[job_id] = summary
            for suite, entry in entries.items():
                changed_suites.add(suite)
                history = suites.setdefault(
                    suite, site.load_suite(suite) if incremental else {"name": suite, "runs": []}
                )
                _add_run(history, entry, job_id)
        if incremental:
            for suite in changed_suites - set(suites):  # suites a changed job left: drop its old run
                history = site.load_suite(suite)
                for job_id in todo:
                    _add_run(history, None, job_id)
                suites[suite] = history
            for suite in list(suites):
                for job_id in set(previous) - set(ids):
                    _add_run(suites[suite], None, job_id)
            # suites untouched by this build keep their data file: claim it so nothing prunes it
            all_suites = {s for j in jobs.values() for s in j["suites"]}
            for suite in all_suites - set(suites):
                suites[suite] = site.load_suite(suite)
        for suite, history in suites.items():
            site.write_suite(suite, history)
        site.static()
        site.render_lists(jobs, suites, site.store.read_lab())
        site.write_jobs_data(jobs)
        with lab_lock(site_root):
            lab = load_lab(site)
            if (site_root / "data" / "lab.json").exists():
                site.writer.written.add(site_root / "data" / "lab.json")  # the master's: kept
            render_lab(site, lab)
        if not incremental:
            report.removed = site.prune()
        report.written = len(site.writer.written)
    report.seconds = time.perf_counter() - started
    log.info(
        "site %s: %d jobs rendered, %d unchanged, %d files, %.2f s",
        site_root,
        report.rendered,
        report.skipped,
        report.written,
        report.seconds,
    )
    return report


def publish_job(
    store_root: str | os.PathLike,
    site_root: str | os.PathLike,
    job_id: int,
    *,
    instance: str = "",
    base_url: str = "",
    template_dirs: Iterable[str] = (),
    now: str | None = None,
    log_page_lines: int = LOG_PAGE_LINES,
) -> BuildReport:
    """Publish one job the moment it changes (the master calls this when a job finishes).

    Renders the job's pages and files, then only the lists it appears in: the index and filter pages,
    its archive page, its device, device type and worker pages (old and new, if they changed) and its
    suites' history pages. Reads one job from the store; everything else comes from ``data/``.
    """
    started = time.perf_counter()
    config = SiteConfig(
        instance=instance,
        base_url=base_url,
        template_dirs=tuple(map(str, template_dirs)),
        now=now,
        log_page_lines=log_page_lines,
    )
    site_root = Path(site_root)
    report = BuildReport()
    job_id = int(job_id)
    with site_lock(site_root):
        site = Site(store_root, site_root, config)
        jobs = site.load_jobs_data()
        old = jobs.pop(job_id, None)
        entries: dict[str, dict] = {}
        old_series = (old or {}).get("series")
        if (site.store.job_dir(job_id) / "meta.yaml").exists():
            job = load_job(site.store, job_id)
            if is_public(job.meta):
                key, run = job_series(job), job_run(job)
                series = add_run(load_series(site_root, key), run, job_id)
                series.update(name=job.name, device_type=str(job.meta.get("device_type") or ""))
                previous_id, marks = case_marks(series, run)
                summary, entries = site.render_job(
                    job, Compared(key, previous_id, marks, _run_of_series(series, previous_id)))
                jobs[job_id] = _summary_with_suite_counts(summary, entries)
                write_series(site, key, series)
                render_case_pages(site, key, series, run["cases"])
                report.rendered = 1
            else:
                site.remove_job(job_id)
        else:
            site.remove_job(job_id)
        new_series = (jobs.get(job_id) or {}).get("series")
        if old_series and old_series != new_series:  # the job left a series (renamed, other device type)
            series = add_run(load_series(site_root, old_series), None, job_id)
            write_series(site, old_series, series)
            render_case_pages(site, old_series, series)
        new = jobs.get(job_id)
        touched = [s for s in (old, new) if s]
        suites: dict[str, dict] = {}
        for suite in {name for s in touched for name in s["suites"]}:
            suites[suite] = _add_run(site.load_suite(suite), entries.get(suite), job_id)
            site.write_suite(suite, suites[suite])
        archives_before = {i // ARCHIVE_SIZE for i in jobs if i != job_id} | (
            {job_id // ARCHIVE_SIZE} if old else set()
        )
        archives = {job_id // ARCHIVE_SIZE}
        if {i // ARCHIVE_SIZE for i in jobs} != archives_before:
            archives = None  # a new or vanished archive page: every archive's navigation changes
        if not (site_root / "static" / "site.css").exists():
            site.static()
        if not (site_root / "lab" / "index.html").exists():  # the master's lab publisher keeps it current
            with lab_lock(site_root):
                render_lab(site, load_lab(site))
        site.render_lists(
            jobs,
            suites,
            site.store.read_lab(),
            devices={str(s["device"]) for s in touched if s.get("device")},
            device_types={str(s["device_type"]) for s in touched if s.get("device_type")},
            workers={str(s["worker"]) for s in touched if s.get("worker")},
            suite_names=set(suites),
            archives=archives,
            filters={
                stem
                for stem, _label, key, values in FILTERS
                if any(s.get(key) in values for s in touched) or not (site_root / "jobs" / f"{stem}.html").exists()
            },
        )
        site.write_jobs_data(jobs)
        report.written = len(site.writer.written)
    report.seconds = time.perf_counter() - started
    log.info("published job %d to %s in %.0f ms", job_id, site_root, report.seconds * 1000)
    return report


def publish_lab(
    store_root: str | os.PathLike,
    site_root: str | os.PathLike,
    lab: dict[str, Any],
    *,
    instance: str = "",
    base_url: str = "",
    template_dirs: Iterable[str] = (),
    devices: Iterable[str] = (),
    device_types: Iterable[str] = (),
    workers: Iterable[str] = (),
) -> float:
    """Publish the lab-now page from ``lab`` (and the named device, type and worker pages); return
    the seconds the lab-now page took."""
    started = time.perf_counter()
    config = SiteConfig(instance=instance, base_url=base_url, template_dirs=tuple(map(str, template_dirs)))
    site_root = Path(site_root)
    with lab_lock(site_root):
        site = Site(store_root, site_root, config)
        site.writer.write("data/lab.json", json.dumps(lab, separators=(",", ":"), default=str))
        render_lab(site, lab)
        if not (site_root / "static" / "site.css").exists():  # a new lab: no job published yet
            site.static()
    seconds = time.perf_counter() - started
    devices, device_types, workers = set(devices), set(device_types), set(workers)
    if devices or device_types or workers:
        with site_lock(site_root):
            site = Site(store_root, site_root, config)
            site.render_lists(site.load_jobs_data(), {}, lab, devices=devices, device_types=device_types,
                              workers=workers, suite_names=(), archives=(), filters=())
    log.debug("lab now published in %.0f ms", seconds * 1000)
    return seconds


__all__ = ["HEALTHS", "BuildReport", "Site", "SiteConfig", "build_site", "publish_job", "publish_lab"]
