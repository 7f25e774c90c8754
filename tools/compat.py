"""The side-by-side validation suite: LAVA 2023.01's verdicts on real job files, and Pumice's.

Shared by ``tools/compat_collect.py`` (collects the jobs), ``tools/compat_lava.py`` (renders the
device configurations and records LAVA's verdicts as golden files), ``tools/compat_report.py``
(the report) and ``tests/test_compat.py`` (the comparison ``make test`` runs).

The data live in ``tests/data/compat`` (see its SOURCES.md):

- ``index.yaml``: one entry per collected job: its ``id``, ``source``, the ``job`` file, the
  ``dictionary`` its device configuration was rendered from and the rendered ``device`` file;
- ``jobs/<source>/...``: the collected job files (the shared LAVA corpus's jobs are read where
  the corpus is, ``corpus:<path>``, never copied);
- ``devices/*.yaml``: device configurations rendered by LAVA's own device-type templates;
- ``lava/<id>.yaml``: LAVA's verdict on each job (``valid`` or ``invalid`` with its errors) and,
  for a valid job, its pipeline (name, level and class of every action, at full depth);
- ``known-disagreements.yaml``: the reviewed list of jobs where Pumice and LAVA disagree today.

The comparison rule (``compare``):

1. Verdicts. LAVA and Pumice must both accept or both refuse a job, except where Pumice refuses
   with "not implemented" in a message (category ``not-implemented``: Pumice names a LAVA feature
   it does not have) or with a worker policy refusal (category ``policy``: the worker's own
   rules, e.g. on file URLs). Other outcomes: ``agree``, ``pumice-refuses`` (LAVA accepts,
   Pumice refuses), ``pumice-accepts`` (LAVA refuses, Pumice accepts), ``pipeline-mismatch``.
2. Pipelines, for jobs both accept. Each side's pipeline is reduced to a set of
   ``(level, name)`` pairs: every action at depth 1 or 2 (level ``1`` or ``1.3``), and every
   deeper action whose name is in ``KEY_ACTIONS`` (it records a result in LAVA's ``lava`` suite,
   keyed by its level, or its level is part of a test run's uuid). The two sets must be equal;
   a mismatch lists the pairs each side lacks.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import yaml

#: libyaml's loader when PyYAML has it: hundreds of goldens are read in a test run
Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "tests" / "data" / "compat"
INDEX = DATA / "index.yaml"
KNOWN = DATA / "known-disagreements.yaml"
#: The version whose verdicts the golden files hold.
LAVA_VERSION = "2023.01"

#: Actions of LAVA 2023.01 that record a result in the ``lava`` suite keyed by their level (their
#: class sets ``self.results``: read from lava_dispatcher's source), and the test definition
#: actions whose level is the test run's uuid (``<job id>_<level>``). Their levels are compared at
#: full depth; other actions only to depth 2.
RESULT_ACTIONS = frozenset({
    "download-action", "http-download", "file-download", "scp-download", "lxc-download",
    "git-repo-action", "test-overlay", "test-install-overlay", "test-runscript-overlay",
    "prepare-empty-image", "pull-installer-files", "apply-overlay-guest",
    "fastboot-flash-action", "lxc-create-action", "login-action", "bootloader-overlay",
    "scp-deploy", "execute-qemu", "boot-fastboot", "fastboot-reboot", "enter-fastboot-action",
    "lava-test-monitor", "send-reboot-commands", "pdu-reboot", "pre-power-command",
    "pre-os-command", "power-on", "power-off",
})
UUID_ACTIONS = frozenset({"git-repo-action", "inline-repo-action", "url-repo-action", "tar-repo-action"})
KEY_ACTIONS = RESULT_ACTIONS | UUID_ACTIONS
#: Levels down to this depth are compared for every action.
SHALLOW_DEPTH = 2

NOT_IMPLEMENTED = re.compile(r"\bnot implemented\b", re.IGNORECASE)
POLICY = re.compile(r"\b(?:refused by (?:the )?worker(?:'s)? policy|worker policy)\b", re.IGNORECASE)

CATEGORIES = ("agree", "not-implemented", "policy", "pumice-refuses", "pumice-accepts", "pipeline-mismatch")
#: The categories that count as agreement (the others are disagreements).
AGREEING = frozenset({"agree", "not-implemented", "policy"})


@dataclass(frozen=True)
class Case:
    """One collected job and the device it is validated against."""

    id: str
    source: str
    job: str  # a path under DATA, or ``corpus:<path>`` under the LAVA corpus
    dictionary: str
    device: str  # a path under DATA

    def job_path(self, corpus: Path | None) -> Path | None:
        """The job file, or None when it is in the corpus and the corpus is absent."""
        if self.job.startswith("corpus:"):
            return corpus / self.job.removeprefix("corpus:") if corpus else None
        return DATA / self.job

    @property
    def device_path(self) -> Path:
        return DATA / self.device

    @property
    def golden_path(self) -> Path:
        return DATA / "lava" / f"{self.id}.yaml"


@dataclass
class Verdict:
    """A tool's judgement of a job: valid or not, its error messages, and a valid job's pipeline."""

    valid: bool
    errors: list[str] = field(default_factory=list)
    pipeline: list[dict] = field(default_factory=list)


@dataclass
class Comparison:
    """The outcome for one job: its category and, for a disagreement, what differs."""

    case: Case
    category: str
    lava: Verdict
    pumice: Verdict
    details: list[str] = field(default_factory=list)

    @property
    def agrees(self) -> bool:
        return self.category in AGREEING


def corpus_dir() -> Path | None:
    """The shared LAVA corpus (``$PUMICE_LAVA_CORPUS`` or ``../shared/lava-corpus``), if present."""
    import os

    path = Path(os.environ.get("PUMICE_LAVA_CORPUS") or ROOT.parent / "shared" / "lava-corpus")
    return path if path.is_dir() else None


def load_cases() -> list[Case]:
    """Every collected job, in index order."""
    entries = yaml.load(INDEX.read_text(encoding="utf-8"), Loader=Loader) or []
    return [Case(**entry) for entry in entries]


def load_golden(case: Case) -> Verdict:
    """LAVA's recorded verdict on ``case``."""
    data = yaml.load(case.golden_path.read_text(encoding="utf-8"), Loader=Loader)
    return Verdict(data["verdict"] == "valid", list(data.get("errors") or []), list(data.get("pipeline") or []))


def load_known() -> dict[str, dict]:
    """The reviewed expected disagreements, by job id."""
    if not KNOWN.exists():
        return {}
    entries = yaml.load(KNOWN.read_text(encoding="utf-8"), Loader=Loader) or []
    return {entry["job"]: entry for entry in entries}


def skeleton(pipeline: list[dict]) -> list[dict]:
    """A description's pipeline reduced to name, level and class, at full depth."""
    out = []
    for action in pipeline or []:
        node = {"name": action.get("name"), "level": str(action.get("level")), "class": action.get("class")}
        if action.get("pipeline"):
            node["pipeline"] = skeleton(action["pipeline"])
        out.append(node)
    return out


def _walk(pipeline: list[dict]) -> Iterator[dict]:
    for action in pipeline or []:
        yield action
        yield from _walk(action.get("pipeline") or [])


def compared_pairs(pipeline: list[dict]) -> set[tuple[str, str]]:
    """The ``(level, name)`` pairs the comparison rule looks at (see the module docstring)."""
    pairs = set()
    for action in _walk(pipeline):
        level = str(action.get("level"))
        if level.count(".") < SHALLOW_DEPTH or action.get("name") in KEY_ACTIONS:
            pairs.add((level, action.get("name")))
    return pairs


def _level_key(pair: tuple[str, str]) -> tuple:
    return tuple(int(part) if part.isdigit() else part for part in pair[0].split(".")), pair[1]


def pipeline_differences(lava: list[dict], pumice: list[dict]) -> list[str]:
    """What each side lacks under the comparison rule (empty when the pipelines match)."""
    ours, theirs = compared_pairs(pumice), compared_pairs(lava)
    details = [f"missing in Pumice: {level} {name}" for level, name in sorted(theirs - ours, key=_level_key)]
    details += [f"extra in Pumice: {level} {name}" for level, name in sorted(ours - theirs, key=_level_key)]
    return details


def compare(case: Case, lava: Verdict, pumice: Verdict) -> Comparison:
    """Judge one job under the rule in the module docstring."""
    if not pumice.valid:
        if any(NOT_IMPLEMENTED.search(error) for error in pumice.errors):
            return Comparison(case, "not-implemented", lava, pumice)
        if any(POLICY.search(error) for error in pumice.errors):
            return Comparison(case, "policy", lava, pumice)
        if lava.valid:
            return Comparison(case, "pumice-refuses", lava, pumice, list(pumice.errors))
        return Comparison(case, "agree", lava, pumice)
    if not lava.valid:
        return Comparison(case, "pumice-accepts", lava, pumice, list(lava.errors))
    details = pipeline_differences(lava.pipeline, pumice.pipeline)
    return Comparison(case, "pipeline-mismatch" if details else "agree", lava, pumice, details)


def pumice_verdict(job_text: str, device: dict) -> Verdict:
    """Pumice's judgement as ``pumice-run --validate`` makes it (on the worker: its tools are
    checked; no output directory; nothing is downloaded), in-process."""
    from agent.errors import JobDefinitionError
    from agent.job import load_job

    try:
        job = load_job(job_text, device, job_id="1")
    except JobDefinitionError as exc:
        return Verdict(False, [str(fault) for fault in exc.faults])
    return Verdict(True, [], skeleton(job.describe()["pipeline"]))


def judge(case: Case, corpus: Path | None) -> Comparison | None:
    """Compare Pumice with LAVA's golden verdict on ``case`` (None: its job is in an absent corpus)."""
    path = case.job_path(corpus)
    if path is None:
        return None
    device = yaml.load(case.device_path.read_text(encoding="utf-8"), Loader=Loader)
    text = path.read_bytes().decode("utf-8", errors="replace")
    return compare(case, load_golden(case), pumice_verdict(text, device))


def job_methods(path: Path) -> tuple[list[str], list[str]]:
    """The deploy ``to:`` and boot ``method:`` values a job uses (by its actions, roles ignored)."""
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=Loader) or {}
    except yaml.YAMLError:
        return [], []
    deploys, boots = [], []
    for block in data.get("actions") or [] if isinstance(data, dict) else []:
        if not isinstance(block, dict):
            continue
        for section, params in block.items():
            if not isinstance(params, dict):
                continue
            if section == "deploy" and params.get("to") not in deploys:
                deploys.append(str(params.get("to")))
            elif section == "boot" and params.get("method") not in boots:
                boots.append(str(params.get("method")))
    return deploys, boots
