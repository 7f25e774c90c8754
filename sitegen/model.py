"""The load phase of a site build: what the pages show, read from the artifact store only.

A :class:`JobView` is one job with everything its own pages need (meta, definition, results, the pipeline
as rows). :func:`job_summary` reduces it to the small JSON-able record that lists (index, device, worker,
suite pages) are made of; those summaries are kept in the site's ``data/`` so that publishing one job
does not have to reload every other job.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from results.bounded import load_data
from results.bundle import Bundle, load_bundle
from results.fastyaml import SafeLoader as _Loader
from results.record import RESULTS, Result
from results.store import ArtifactStore
from sitegen.text import parse_time

log = logging.getLogger("pumice.sitegen")

# Health values that mean the job is over (LAVA's names, compared lowercase).
FINISHED_STATES = ("finished",)
HEALTHS = ("complete", "incomplete", "canceled", "unknown")
STATES = ("submitted", "scheduling", "scheduled", "running", "canceling", "finished")
# The raw files published next to each job page, in the order the page lists them.
RAW_FILES = ("job.yaml", "output.yaml", "results.yaml", "description.yaml")


class SiteError(Exception):
    """A store or site problem the user can act on (the message says what and where)."""


@dataclass
class ActionRow:
    """One action of the job's pipeline, flattened for the tree table (depth = nesting level)."""

    level: str
    name: str
    description: str
    summary: str
    timeout: float | None
    depth: int
    klass: str = ""
    result: str = ""
    duration: float | None = None
    log_line: int | None = None  # 1-based line of "start: <level> <name>" in the log, when found


@dataclass
class JobView:
    """Everything one job's pages are made of."""

    id: int
    meta: dict
    definition: str | None = None
    bundle: Bundle | None = None
    results: list[Result] = field(default_factory=list)
    description: list | None = None
    log_path: Path | None = None
    stamp: str = ""
    #: the job's notify callbacks and emails with their attempts (the master's notifications.yaml)
    notifications: list = field(default_factory=list)

    @property
    def name(self) -> str:
        return str(self.meta.get("name") or self.meta.get("description") or f"job {self.id}")

    @property
    def state(self) -> str:
        return str(self.meta.get("state") or "unknown").lower()

    @property
    def health(self) -> str:
        return str(self.meta.get("health") or "unknown").lower()

    @property
    def finished(self) -> bool:
        return self.state in FINISHED_STATES

    def job_result(self) -> Result | None:
        """The final ``lava``/``job`` result (it decides Complete/Incomplete), if the bundle has one."""
        for result in self.results:
            if result.suite == "lava" and result.case == "job":
                return result
        return None

    def job_metadata(self) -> dict:
        """The ``metadata:`` block of the job definition (what the submitter tagged the job with).
        The definition is a user's: it is read within the limits of what users send (a job stored
        before they were enforced may hold an alias bomb), and none on a page if it is over one."""
        if not self.definition:
            return {}
        try:
            data = load_data(self.definition)
        except yaml.YAMLError:
            return {}
        meta = data.get("metadata") if isinstance(data, dict) else None
        return meta if isinstance(meta, dict) else {}


def is_public(meta: dict) -> bool:
    """Only public jobs go on the static site: it has no login, so personal/group jobs stay off it."""
    return str(meta.get("visibility") or "public").lower() == "public"


def _stamp(job_dir: Path) -> str:
    """What changes when a job's files change (sizes and mtimes): lets ``--incremental`` skip the rest.

    One short string per job, so that ``data/jobs.json`` stays quick to read and write."""
    parts = []
    for name in ("meta.yaml", "job.yaml", "results.yaml", "description.yaml", "output.yaml"):
        try:
            st = (job_dir / name).stat()
        except FileNotFoundError:
            parts.append("-")
            continue
        parts.append(f"{st.st_size}:{st.st_mtime_ns}")
    return " ".join(parts)


def job_stamp(store: ArtifactStore, job_id: int) -> str:
    """The change stamp of one job in the store (see :func:`_stamp`)."""
    return _stamp(store.job_dir(job_id))


def load_job(store: ArtifactStore, job_id: int) -> JobView:
    """Read one job from the store; a missing or broken file is reported with its path."""
    job_dir = store.job_dir(job_id)
    meta_path = job_dir / "meta.yaml"
    if not meta_path.exists():
        raise SiteError(f"{meta_path}: no such file (job {job_id} has no meta.yaml in the store)")
    try:
        # the same file store.read_meta() reads, with libyaml: a full build reads thousands of them
        meta = _yaml_load(meta_path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise SiteError(f"{meta_path}: not valid YAML: {exc}") from exc
    if not isinstance(meta, dict):
        raise SiteError(f"{meta_path}: expected a mapping of job fields, got {type(meta).__name__}")
    job = JobView(id=int(job_id), meta=meta, stamp=_stamp(job_dir))
    job.definition = store.read_file(job_id, "job.yaml")
    bundle_text = store.read_file(job_id, "results.yaml")
    if bundle_text:
        try:
            job.bundle = load_bundle(bundle_text)
        except Exception as exc:  # the loader's own error names the line; add the file
            raise SiteError(f"{job_dir / 'results.yaml'}: {exc}") from exc
        job.results = list(job.bundle.results)
    description = _yaml_file(store, job_id, "description.yaml", _yaml_load)
    if description is not None:
        job.description = _pipeline_of(description)
    log_path = job_dir / "output.yaml"
    job.log_path = log_path if log_path.exists() else None
    # the master's record of the job's notify callbacks and emails (within the limits: it holds URLs)
    notifications = _yaml_file(store, job_id, "notifications.yaml", load_data)
    job.notifications = notifications if isinstance(notifications, list) else []
    return job


def _yaml_file(store: ArtifactStore, job_id: int, name: str, load: Any) -> Any:
    """One of the job's YAML files parsed with ``load`` (None when it is absent or empty)."""
    text = store.read_file(job_id, name)
    if not text:
        return None
    try:
        return load(text)
    except yaml.YAMLError as exc:
        raise SiteError(f"{store.job_dir(job_id) / name}: not valid YAML: {exc}") from exc


def load_results(store: ArtifactStore, job_id: int) -> JobView | None:
    """A job's meta and results only (what its place in the test-case history needs); None when it
    is not a public job with readable files (its render reports why)."""
    job_dir = store.job_dir(job_id)
    try:
        meta = _yaml_load((job_dir / "meta.yaml").read_text(encoding="utf-8"))
        if not isinstance(meta, dict) or not is_public(meta):
            return None
        job = JobView(id=int(job_id), meta=meta)
        bundle_text = store.read_file(job_id, "results.yaml")
        if bundle_text:
            job.results = list(load_bundle(bundle_text).results)
        return job
    except Exception:  # the render of this job names the problem
        return None


def _yaml_load(text: str) -> object:
    """safe_load with libyaml when it can (10x faster); PyYAML's own parser for what libyaml refuses
    (an escaped lone surrogate that PyYAML itself wrote, for example)."""
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError:
        if _Loader is yaml.SafeLoader:
            raise
        return yaml.safe_load(text)


def _pipeline_of(description: object) -> list | None:
    """The list of top-level actions in a description (a bare list, or LAVA's ``{pipeline: [...]}``)."""
    if isinstance(description, list):
        return description
    if isinstance(description, dict) and isinstance(description.get("pipeline"), list):
        return description["pipeline"]
    return None


def _level_key(level: str) -> tuple:
    parts = []
    for part in str(level).split("."):
        parts.append((0, int(part), "") if part.isdigit() else (1, 0, part))
    return tuple(parts)


def pipeline_rows(job: JobView, start_lines: dict[str, int] | None = None) -> list[ActionRow]:
    """The pipeline as table rows, in order, each with its result and duration from the ``lava`` suite.

    Per-action results are suite "lava" cases whose ``extra.level`` is the action's level (LAVA's
    convention); a job without a description still gets rows built from those results alone.
    """
    by_level: dict[str, Result] = {}
    for result in job.results:
        if result.suite == "lava" and result.case != "job":
            level = str((result.extra or {}).get("level") or result.level or "")
            if level:
                by_level.setdefault(level, result)
    rows: list[ActionRow] = []

    def walk(actions: list, depth: int) -> None:
        for action in actions:
            if not isinstance(action, dict):
                continue
            level = str(action.get("level", ""))
            rows.append(_row(action, level, depth, by_level.get(level), start_lines))
            children = action.get("pipeline")
            if isinstance(children, list):
                walk(children, depth + 1)

    if job.description:
        walk(job.description, 0)
    else:
        for level in sorted(by_level, key=_level_key):
            result = by_level[level]
            rows.append(_row({"name": result.case}, level, level.count("."), result, start_lines))
    return rows


def _row(action: dict, level: str, depth: int, result: Result | None, start_lines: dict[str, int] | None) -> ActionRow:
    timeout = action.get("timeout")
    extra = (result.extra or {}) if result else {}
    duration = result.duration if result and result.duration is not None else extra.get("duration")
    if timeout is None and extra.get("timeout") is not None:
        timeout = extra.get("timeout")
    return ActionRow(
        level=level,
        name=str(action.get("name", "")),
        description=str(action.get("description") or ""),
        summary=str(action.get("summary") or ""),
        timeout=_float(timeout),
        depth=depth,
        klass=str(action.get("class") or ""),
        result=result.result if result else "",
        duration=_float(duration),
        log_line=(start_lines or {}).get(level),
    )


def _float(value: object) -> float | None:
    try:
        return float(value) if value not in (None, "") else None  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None


def result_counts(results: list[Result]) -> dict[str, int]:
    """How many results of each kind (pass/fail/skip/unknown), test suites only (not ``lava``)."""
    counts = Counter(r.result for r in results if r.suite != "lava")
    return {name: counts.get(name, 0) for name in RESULTS}


def suite_names(results: list[Result]) -> list[str]:
    """The job's suites in first-seen order."""
    return list(dict.fromkeys(r.suite for r in results))


def duration_seconds(meta: dict) -> float | None:
    """The run time from start to end, when both are known."""
    start, end = parse_time(meta.get("start_time")), parse_time(meta.get("end_time"))
    if start and end:
        return max(0.0, (end - start).total_seconds())
    return None


def _plain(value: object) -> object:
    """Meta values as JSON can hold them (datetimes as ISO strings)."""
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return str(value)


def job_summary(job: JobView) -> dict:
    """The record a job contributes to the lists (index, device, worker... pages) and to ``data/jobs.json``."""
    meta = job.meta
    job_result = job.job_result()
    failure = meta.get("failure_comment") or ""
    if not failure and job_result is not None and job_result.result == "fail":
        failure = str((job_result.extra or {}).get("error_msg") or "")
    source = meta.get("source")
    return {
        "id": job.id,
        "name": job.name,
        "state": job.state,
        "health": job.health,
        "device": _plain(meta.get("device")),
        "device_type": _plain(meta.get("device_type")),
        "worker": _plain(meta.get("worker")),
        "submitter": _plain(meta.get("submitter")),
        "submit_time": _plain(meta.get("submit_time")),
        "start_time": _plain(meta.get("start_time")),
        "end_time": _plain(meta.get("end_time")),
        "duration": duration_seconds(meta),
        "tags": _plain(meta.get("tags") or []),
        "health_check": bool(meta.get("health_check")),
        "failure": str(failure),
        "counts": result_counts(job.results),
        "suites": [s for s in suite_names(job.results)],
        "source": _plain(source) if source else None,
        "stamp": job.stamp,
    }


def suite_entry(job: JobView, suite: str) -> dict:
    """One job's run of one suite, as the suite history page needs it."""
    cases = [[r.set or "", r.case, r.result, r.measurement, r.units or ""] for r in job.results if r.suite == suite]
    counts = Counter(c[2] for c in cases)
    return {
        "id": job.id,
        "time": _plain(job.meta.get("end_time") or job.meta.get("start_time") or job.meta.get("submit_time")),
        "device": _plain(job.meta.get("device")),
        "device_type": _plain(job.meta.get("device_type")),
        "health": job.health,
        "counts": {name: counts.get(name, 0) for name in RESULTS},
        "cases": cases,
    }
