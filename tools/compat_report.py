#!/usr/bin/env python3
"""The side-by-side report: how LAVA 2023.01 and Pumice judge the collected jobs.

Prints, per deploy ``to:`` and per boot ``method:``, how many collected jobs use it, how many each
tool accepts, how many of those both accept with matching pipelines, Pumice's "not implemented"
and worker policy refusals, and the disagreements; then every disagreement and pipeline mismatch
with what differs. Reads tests/data/compat (``make compat`` writes it); never runs lava-run.

    .venv/bin/python tools/compat_report.py              # the report
    .venv/bin/python tools/compat_report.py --markdown   # the tables only
    .venv/bin/python tools/compat_report.py --write-readme   # the tables into README
    .venv/bin/python tools/compat_report.py --write-known  # list today's disagreements (then review)
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import Counter, defaultdict
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import compat  # noqa: E402

COLUMNS = ("jobs", "LAVA accepts", "Pumice accepts", "both, same pipeline", "not implemented", "policy",
           "disagree")


def judge_all() -> list[tuple[compat.Comparison, list[str], list[str]]]:
    corpus = compat.corpus_dir()
    judged = []
    for case in compat.load_cases():
        comparison = compat.judge(case, corpus)
        if comparison is not None:
            deploys, boots = compat.job_methods(case.job_path(corpus))
            judged.append((comparison, deploys, boots))
    return judged


def table(judged, what: str, pick) -> list[str]:
    rows: dict[str, Counter] = defaultdict(Counter)
    for comparison, deploys, boots in judged:
        for method in pick(deploys, boots) or ["(none)"]:
            row = rows[method]
            row["jobs"] += 1
            row["LAVA accepts"] += comparison.lava.valid
            row["Pumice accepts"] += comparison.pumice.valid
            row["both, same pipeline"] += comparison.lava.valid and comparison.category == "agree"
            row["not implemented"] += comparison.category == "not-implemented"
            row["policy"] += comparison.category == "policy"
            row["disagree"] += not comparison.agrees
    lines = [f"| {what} | " + " | ".join(COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    for method in sorted(rows, key=lambda m: (-rows[m]["jobs"], m)):
        lines.append(f"| `{method}` | " + " | ".join(str(rows[method][c]) for c in COLUMNS) + " |")
    return lines


def summary(judged) -> list[str]:
    sources = Counter(comparison.case.source for comparison, _, _ in judged)
    categories = Counter(comparison.category for comparison, _, _ in judged)
    total = len(judged)
    agreeing = sum(comparison.agrees for comparison, _, _ in judged)
    return [
        f"{total} jobs (" + ", ".join(f"{source} {count}" for source, count in sorted(sources.items())) + ")",
        f"agree {agreeing}/{total}: " + ", ".join(f"{c} {categories[c]}" for c in compat.CATEGORIES),
    ]


def first_line(text: str, width: int = 160) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= width else line[: width - 3] + "..."


def disagreements(judged) -> list[str]:
    lines = []
    for comparison, _, _ in judged:
        if comparison.agrees:
            continue
        lines.append(f"- {comparison.case.id}: {comparison.category}")
        for detail in comparison.details:
            lines.append(f"    {first_line(detail)}")
    return lines


def _cause(text: str) -> str:
    """A message with its job-specific parts (lines, indexes, levels, quoted values) blanked."""
    text = re.sub(r"\(line \d+\)", "", str(text))
    text = re.sub(r"\[\d+\]", "[N]", text)
    text = re.sub(r"\b\d+(?:\.\d+)+\b", "L", text)
    text = re.sub(r"'[^']*'", "'...'", text)
    return first_line(text, 200)


def causes(judged) -> list[str]:
    """The disagreements' causes, grouped: Pumice's refusals by message, the pipelines' differences
    by what is missing or extra, LAVA's refusals by message; most frequent first."""
    counts: Counter = Counter()
    for comparison, _, _ in judged:
        if comparison.agrees:
            continue
        seen = set()
        for detail in comparison.details:
            if comparison.category == "pipeline-mismatch":
                side, _, rest = detail.partition(": ")
                cause = f"{comparison.category}: {side}: {rest.split()[-1]}"
            else:
                cause = f"{comparison.category}: {_cause(detail)}"
            if cause not in seen:
                seen.add(cause)
                counts[cause] += 1
    return [f"{count:4d} jobs  {cause}" for cause, count in counts.most_common()]


def write_known(judged) -> None:
    """List today's disagreements in known-disagreements.yaml, keeping reviewed reasons."""
    previous = compat.load_known()
    entries = []
    for comparison, _, _ in judged:
        if comparison.agrees:
            continue
        old = previous.get(comparison.case.id) or {}
        reason = old.get("reason") if old.get("category") == comparison.category else None
        entries.append({"job": comparison.case.id, "category": comparison.category,
                        "reason": reason or first_line("; ".join(comparison.details[:3]), 400)})
    header = ("# Jobs where Pumice and LAVA 2023.01 disagree today (tests/test_compat.py): each entry names\n"
              "# the job, the category (tools/compat.py) and why. Reviewed; it only shrinks: a listed job\n"
              "# that agrees, or disagrees differently, fails the test. tools/compat_report.py --write-known\n"
              "# rewrites it from today's results, keeping the reasons of entries whose category is unchanged.\n")
    compat.KNOWN.write_text(header + yaml.safe_dump(entries, sort_keys=False, width=200), encoding="utf-8")
    print(f"{len(entries)} known disagreements written to {compat.KNOWN}", file=sys.stderr)


README = Path(__file__).resolve().parent.parent / "README.md"


def write_readme(markdown: list[str]) -> None:
    """Put today's summary and tables into README's side-by-side section, in place of the old ones
    (from the line that counts the jobs to the next section)."""
    text = README.read_text(encoding="utf-8")
    section = text.index("### Side by side with LAVA")
    start = re.compile(r"^\d+ jobs \(corpus ", re.MULTILINE).search(text, section).start()
    end = text.index("\n## ", start)
    block = "\n".join([f"{markdown[0]}; {markdown[1]}.", *markdown[2:]]).strip()
    README.write_text(text[:start] + block + "\n" + text[end:], encoding="utf-8")
    print(f"README's side-by-side table rewritten ({README})", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--markdown", action="store_true", help="only the summary and the two tables")
    parser.add_argument("--write-known", action="store_true", help="rewrite known-disagreements.yaml")
    parser.add_argument("--write-readme", action="store_true", help="rewrite README's summary and tables")
    options = parser.parse_args(argv)
    judged = judge_all()
    if options.write_known:
        write_known(judged)
        return 0
    out = [*summary(judged), ""]
    out += table(judged, "deploy `to:`", lambda deploys, boots: deploys) + [""]
    out += table(judged, "boot `method:`", lambda deploys, boots: boots)
    if options.write_readme:
        write_readme(out)
        return 0
    if not options.markdown:
        out += ["", "Causes of disagreement (jobs per cause):", *causes(judged)]
        out += ["", "Disagreements (LAVA's errors for pumice-accepts, Pumice's for pumice-refuses, "
                    "the levels each side lacks for pipeline-mismatch):", *disagreements(judged)]
    print("\n".join(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
