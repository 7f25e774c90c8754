"""Test-case history: each case across the comparable runs of a job (the same job name on the same
device type), and what a job changed against the previous one ("new failure", "fixed", "still failing").

A *series* is the runs of one job name on one device type, kept newest first in
``data/history/<series>.json`` (at most :data:`HISTORY` runs), each run as its cases'
``[result, measurement, units]`` by *case key*. The key names the test definition as written, not
LAVA's positional ``N_`` prefix (``0_smoke-tests`` and ``2_smoke-tests`` are one definition), then
the set and the case (joined by :data:`SEP`). The ``lava`` suite (one result per action)
has no history here.

:func:`case_marks` is pure: a job's cases against the series, the mark of each and the first job of
a failing streak. :func:`render_case_pages` writes ``cases/<series>/<definition>.html``: for each
case (an anchor of its own), a pass/fail strip over the runs and, when it is measured, its trend.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from results.record import Result
from sitegen.plot import measurement_plot
from sitegen.text import slug

#: runs kept per series (the strip and the trend show them all)
HISTORY = 100
_POSITION_RE = re.compile(r"^\d+_(?=.)")

NEW_FAILURE, FIXED, STILL_FAILING = "new failure", "fixed", "still failing"


def definition_name(suite: str) -> str:
    """The test definition's name without LAVA's positional ``N_`` prefix."""
    return _POSITION_RE.sub("", str(suite))


#: between definition, set and case in a case key (a character no name holds in practice, and safe in JSON)
SEP = "\x1f"


def case_key(result: Result) -> str:
    return f"{definition_name(result.suite)}{SEP}{result.set or ''}{SEP}{result.case}"


def series_key(name: object, device_type: object) -> str:
    """The path of the series of job ``name`` on ``device_type`` (one directory level per name:
    two series never share a path)."""
    return f"{slug(str(name))}/{slug(str(device_type or 'none'))}"


def run_of(job_id: int, time: object, health: str, results: Iterable[Result]) -> dict[str, Any]:
    """One job as a run of its series: its test cases' result, measurement and units by case key
    (a case reported twice keeps its last result)."""
    cases = {case_key(r): [r.result, r.measurement, r.units or ""] for r in results if r.suite != "lava"}
    return {"id": int(job_id), "time": time, "health": health, "cases": cases}


def add_run(series: dict, run: dict | None, job_id: int) -> dict:
    """Put ``run`` into ``series`` in place of any earlier run of ``job_id`` (None: only remove it);
    newest first, at most :data:`HISTORY` runs."""
    runs = [r for r in series.get("runs", []) if r["id"] != job_id]
    if run is not None and run["cases"]:
        runs.append(run)
    runs.sort(key=lambda r: r["id"], reverse=True)
    series["runs"] = runs[:HISTORY]
    return series


def case_marks(series: dict, run: dict) -> tuple[int | None, dict[str, tuple[str, int]]]:
    """The previous comparable run's id and, per case of ``run`` that changed or still fails, its
    mark and the first job of its failing streak (the job that fixed it, for "fixed")."""
    older = [r for r in series.get("runs", []) if r["id"] < run["id"]]  # newest first
    if not older:
        return None, {}
    previous = older[0]
    marks: dict[str, tuple[str, int]] = {}
    for key, (result, *_rest) in run["cases"].items():
        before = previous["cases"].get(key)
        if before is None:
            continue
        if result == "fail" and before[0] == "pass":
            marks[key] = (NEW_FAILURE, run["id"])
        elif result == "pass" and before[0] == "fail":
            marks[key] = (FIXED, run["id"])
        elif result == "fail" and before[0] == "fail":
            first = previous["id"]
            for r in older[1:]:
                case = r["cases"].get(key)
                if case is None or case[0] != "fail":
                    break
                first = r["id"]
            marks[key] = (STILL_FAILING, first)
    return previous["id"], marks


def compare_runs(before: dict, after: dict) -> dict[str, list]:
    """What changed from run ``before`` to run ``after`` (any two runs, comparable or not): cases that
    now fail and passed (regressions), now pass and failed (fixes), fail in both, measurements that
    moved, and cases only one of them has. Each entry names the case by its key."""
    old, new = before.get("cases", {}), after.get("cases", {})
    out: dict[str, list] = {"regressions": [], "fixes": [], "still_failing": [], "deltas": [], "added": [],
                            "removed": sorted(set(old) - set(new))}
    for key in sorted(new):
        if key not in old:
            out["added"].append(key)
            continue
        (was, was_m, units), (now, now_m, _units) = old[key], new[key]
        if now == "fail" and was == "pass":
            out["regressions"].append(key)
        elif now == "pass" and was == "fail":
            out["fixes"].append(key)
        elif now == "fail" and was == "fail":
            out["still_failing"].append(key)
        if was_m is not None and now_m is not None and was_m != now_m:
            change = (now_m - was_m) / abs(was_m) * 100 if was_m else None
            out["deltas"].append((key, was_m, now_m, now_m - was_m, change, units))
    return out


def case_label(key: str) -> tuple[str, str, str]:
    """(definition, set, case) of a case key."""
    definition, test_set, case = key.split(SEP, 2)
    return definition, test_set, case


def definition_href(series: str, definition: str) -> str:
    """The history page of a test definition in ``series``, relative to the site root."""
    return f"cases/{series}/{slug(definition)}.html"


def case_anchor(key: str) -> str:
    """The id of a case on its definition's history page (the set, if any, and the case)."""
    _definition, test_set, case = key.split(SEP, 2)
    return "case-" + (slug(f"{test_set}/{case}") if test_set else slug(case))


def case_href(series: str, key: str) -> str:
    """Where case ``key`` of ``series`` is: its row on its definition's history page (one page per
    definition: publishing a job rewrites one page per definition it ran, not one per case)."""
    return f"{definition_href(series, key.split(SEP, 1)[0])}#{case_anchor(key)}"


def load_series(site_root: Path, key: str) -> dict:
    try:
        return json.loads((site_root / "data" / "history" / f"{key}.json").read_text(encoding="utf-8"))
    except (FileNotFoundError, ValueError):
        return {"runs": []}


def write_series(site: Any, key: str, series: dict) -> None:
    site.writer.write(f"data/history/{key}.json", json.dumps(series, separators=(",", ":"), sort_keys=True))


#: runs shown in each case's strip (the measurement trend shows every run kept)
STRIP_RUNS = 50


def render_case_pages(site: Any, key: str, series: dict, cases: Iterable[str] | None = None) -> None:
    """Write the history pages of the definitions of ``series`` (``cases``: only the definitions of
    those case keys): per case, a pass/fail strip and, when measured, its trend."""
    runs = list(reversed(series.get("runs", [])))  # oldest first
    everything = {c for r in runs for c in r["cases"]}
    definitions = {c.split(SEP, 1)[0] for c in (everything if cases is None else cases)}
    for definition in sorted(definitions):
        rel = definition_href(key, definition)
        href = "../" * rel.count("/") + "jobs/{id}/index.html"
        rows = []
        for case in sorted(c for c in everything if c.split(SEP, 1)[0] == definition):
            strip = [(r["id"], r["cases"][case][0]) for r in runs if case in r["cases"]]
            points = [(r["id"], float(r["cases"][case][1])) for r in runs
                      if case in r["cases"] and r["cases"][case][1] is not None]
            units = next((r["cases"][case][2] for r in runs if case in r["cases"] and r["cases"][case][2]), "")
            _definition, test_set, name = case.split(SEP, 2)
            rows.append({
                "anchor": case_anchor(case), "name": name, "set": test_set, "strip": strip[-STRIP_RUNS:],
                "runs": len(strip), "last": strip[-1][1], "failing_since": failing_since(strip),
                "plot": measurement_plot(points, units, href) if len(points) > 1 else "", "units": units,
            })
        site.page(
            rel,
            "case.html",
            definition=definition,
            job_name=series.get("name", ""),
            device_type=series.get("device_type", ""),
            runs=len(runs),
            cases=rows,
        )


def failing_since(strip: list[tuple[int, str]]) -> int | None:
    """The first job of the failing streak the case is in now (None: its latest run did not fail)."""
    since = None
    for job_id, result in reversed(strip):
        if result != "fail":
            break
        since = job_id
    return since
