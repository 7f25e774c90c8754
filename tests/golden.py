"""Golden-file comparison shared by every test area.

``check_golden("results/log-lines.yaml", text)`` compares ``text`` with
``tests/golden/results/log-lines.yaml``. With ``PUMICE_GOLDEN=update`` in the environment
(``make golden``) it writes the file instead, so changes are reviewed as diffs in git.

Import it as ``from golden import check_golden`` (pytest puts ``tests/`` on ``sys.path``).
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path

GOLDEN_DIR = Path(__file__).resolve().parent / "golden"


def golden_path(name: str) -> Path:
    """The path of golden file ``name`` (relative to tests/golden/, no '..' allowed)."""
    path = (GOLDEN_DIR / name).resolve()
    if GOLDEN_DIR not in path.parents:
        raise ValueError(f"golden file name {name!r} leaves {GOLDEN_DIR}")
    return path


def updating() -> bool:
    """True when golden files are being regenerated (PUMICE_GOLDEN=update)."""
    return os.environ.get("PUMICE_GOLDEN") == "update"


def check_golden(name: str, text: str) -> None:
    """Assert that ``text`` equals the golden file ``name`` (or write it when updating).

    The comparison is exact (bytes of the UTF-8 text, line endings included); a mismatch
    fails with a unified diff of the first differences.
    """
    path = golden_path(name)
    if updating():
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists() or path.read_bytes() != text.encode("utf-8"):
            path.write_bytes(text.encode("utf-8"))
        return
    if not path.exists():
        raise AssertionError(
            f"golden file {path} is missing; create it with `make golden` (PUMICE_GOLDEN=update) and review it"
        )
    expected = path.read_bytes().decode("utf-8")
    if expected == text:
        return
    diff = difflib.unified_diff(
        expected.splitlines(keepends=True), text.splitlines(keepends=True), f"golden/{name}", "actual", n=2
    )
    shown = "".join(line if line.endswith("\n") else line + "\n" for line in list(diff)[:80])
    raise AssertionError(
        f"output differs from golden file {path} (`make golden` regenerates it if the change is intended):\n{shown}"
    )
