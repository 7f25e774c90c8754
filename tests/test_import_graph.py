"""The import graph of the four packages: imports point one way, and no two modules import each other.

``results/`` is the bottom (records shared by everyone); ``agent/`` runs jobs on ``results/``;
``sitegen/`` renders a store with ``results/``; ``master/`` uses all three. A package's
``__init__`` that lists its own modules (``agent/actions/__init__.py`` registering every strategy)
is a table of contents, not a dependency, so it takes no part in the cycle check; nor does an
import under ``if TYPE_CHECKING:``, which names a type for annotations and runs nothing (an action's
``run(job: Job)`` may name the job that runs it). The direction check counts every import.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("agent", "master", "results", "sitegen")
#: package -> the packages it may import (besides itself)
ALLOWED = {
    "results": set(),
    "agent": {"results"},
    "sitegen": {"results"},
    "master": {"agent", "results", "sitegen"},
}


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _type_only(tree: ast.Module) -> set[ast.AST]:
    """The import statements under ``if TYPE_CHECKING:``."""
    return {node for block in ast.walk(tree)
            if isinstance(block, ast.If) and isinstance(block.test, ast.Name) and block.test.id == "TYPE_CHECKING"
            for statement in block.body for node in ast.walk(statement)}


def _imports(path: Path, modules: dict[str, Path], *, runtime: bool = False) -> set[str]:
    """The modules of the four packages that ``path`` imports (anywhere in it, functions included;
    ``runtime``: leaving out the imports for type annotations only)."""
    names: set[str] = set()
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    skipped = _type_only(tree) if runtime else set()
    for node in ast.walk(tree):
        if node in skipped:
            continue
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {name for name in names if name in modules}


def _graph(*, runtime: bool = False) -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(path, modules, runtime=runtime) for name, path in modules.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_imports_point_from_master_to_sitegen_and_agent_down_to_results() -> None:
    wrong = [f"{module} imports {target}" for module, targets in sorted(_graph().items())
             for target in sorted(targets)
             if (src := module.split(".")[0]) != (dst := target.split(".")[0]) and dst not in ALLOWED[src]]
    assert wrong == [], "imports against the direction results <- agent, results <- sitegen, master -> all:\n" + \
        "\n".join(wrong)


def _cycles_in(package: str) -> list[list[str]]:
    # a package importing its own modules lists them (a registry's table of contents)
    graph = {module: {t for t in targets if not t.startswith(module + ".")}
             for module, targets in _graph(runtime=True).items()}
    return [cycle for cycle in _cycles(graph) if cycle[0].split(".")[0] == package]


@pytest.mark.parametrize("package", PACKAGES)
def test_no_two_modules_import_each_other(package: str) -> None:
    assert _cycles_in(package) == []


def test_the_checks_see_a_cycle_and_a_backward_import() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []
    graph = _graph()
    assert "results.store" in graph["sitegen.build"]  # the walker sees the real imports
    assert "master.certificates" in graph["master.api"]
