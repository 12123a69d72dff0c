"""The layers: sdpo_core (the torch core) <- tasks (Prefect tasks) <- flows (flows and the CLI).

sdpo_core must not import Prefect, MLflow or the orchestration packages; no package imports a
layer above it; and no modules of the three import each other in a cycle. Imports are read from
the source with ``ast``: module-level and function-level ones alike (a deferred import hides a
cycle from Python at import time, not from the design).
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Mapping
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CORE = REPO / "sdpo_core"
FORBIDDEN = {"prefect", "mlflow", "flows", "tasks", "boto3"}
LAYERS = ("sdpo_core", "tasks", "flows")
"""Bottom to top: a package may import those before it, never those after it."""


@pytest.mark.parametrize("path", sorted(CORE.glob("*.py")), ids=lambda p: p.name)
def test_core_module_imports_no_orchestration(path: Path) -> None:
    tree = ast.parse(path.read_text(), filename=str(path))
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            imported.add(node.module.split(".")[0])
    assert not imported & FORBIDDEN, f"{path.name} imports {sorted(imported & FORBIDDEN)}"


# ---------------------------------------------------------------------------------------------
# The import graph of the project's modules


def module_name(path: Path, root: Path = REPO) -> str:
    """``tasks/data.py`` -> ``tasks.data``; ``tasks/__init__.py`` -> ``tasks``."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_modules(root: Path = REPO, packages: Iterable[str] = LAYERS) -> dict[str, Path]:
    """Every module of the packages (recursively), by dotted name."""
    return {module_name(p, root): p for pkg in packages for p in sorted((root / pkg).rglob("*.py"))}


def imported_modules(source: str, name: str, is_package: bool, known: set[str]) -> set[str]:
    """The modules of ``known`` that the module ``name`` imports, anywhere in its source.

    ``import a.b`` and ``from a.b import c`` import ``a.b`` (and ``a.b.c`` when that is a module),
    and, as Python does, the packages above them. Relative imports are resolved against the
    module's package.
    """
    package = name if is_package else name.rpartition(".")[0]
    targets: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)] if node.level > 1 else base
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            targets.add(module)
            targets.update(f"{module}.{alias.name}" for alias in node.names)
    found = set()
    for target in targets:
        parts = target.split(".")
        found.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    return (found & known) - {name}


def import_graph(root: Path = REPO, packages: Iterable[str] = LAYERS) -> dict[str, set[str]]:
    """Module -> the project modules it imports."""
    modules = project_modules(root, packages)
    known = set(modules)
    return {
        name: imported_modules(path.read_text(), name, path.name == "__init__.py", known)
        for name, path in modules.items()
    }


def strongly_connected(graph: Mapping[str, Iterable[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components of ``graph`` (iterative), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[list[str]] = []
    nodes = set(graph) | {w for targets in graph.values() for w in targets}
    for start in sorted(nodes):
        if start in index:
            continue
        work = [(start, iter(sorted(graph.get(start, ()))))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            v, edges = work[-1]
            w = next(edges, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph.get(w, ())))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                component = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    component.append(w)
                    if w == v:
                        break
                components.append(sorted(component))
    return components


def find_cycles(graph: Mapping[str, Iterable[str]]) -> list[list[str]]:
    """One cycle (``[a, b, ..., a]``) through each strongly connected component that has one:
    two or more modules, or a module importing itself."""
    cycles = []
    for component in strongly_connected(graph):
        members = set(component)
        first = component[0]
        if len(component) == 1 and first not in set(graph.get(first, ())):
            continue
        # A shortest path back to ``first`` inside the component (breadth first).
        parent: dict[str, str] = {}
        frontier = [first]
        while first not in parent:
            nxt = []
            for v in frontier:
                for w in sorted(graph.get(v, ())):
                    if w in members and w not in parent:
                        parent[w] = v
                        nxt.append(w)
            frontier = nxt
        path = [first]
        while True:
            path.append(parent[path[-1]])
            if path[-1] == first:
                break
        cycles.append(path[::-1])
    return cycles


def upward_imports(graph: Mapping[str, Iterable[str]], layers: tuple[str, ...] = LAYERS) -> list[str]:
    """Every import of a module of a higher layer, as ``"importer -> imported"``."""

    def layer(module: str) -> int:
        return layers.index(module.split(".")[0])

    return sorted(f"{a} -> {b}" for a, targets in graph.items() for b in targets if layer(b) > layer(a))


def _describe(graph: Mapping[str, Iterable[str]]) -> str:
    return "\n".join(f"  {a} -> {', '.join(sorted(b))}" for a, b in sorted(graph.items()) if b)


def test_no_import_cycles() -> None:
    graph = import_graph()
    assert len(graph) > 30 and {"sdpo_core.step", "tasks.data", "flows.pipeline"} <= set(graph)
    cycles = find_cycles(graph)
    assert not cycles, "import cycles:\n" + "\n".join("  " + " -> ".join(c) for c in cycles)


def test_no_upward_imports() -> None:
    """tasks never imports flows; sdpo_core never imports tasks or flows."""
    graph = import_graph()
    assert "sdpo_core.step" in graph["tasks.training"], "the graph sees the tasks' imports of the core"
    assert "tasks.data" in graph["flows.pipeline"] or "tasks.data" in graph["flows.cli"]
    upward = upward_imports(graph)
    assert not upward, "imports of a higher layer:\n  " + "\n  ".join(upward)


# ---------------------------------------------------------------------------------------------
# The checks themselves, on synthetic graphs and sources: they must find what they look for


def test_cycle_finder_on_a_synthetic_graph() -> None:
    graph = {
        "a": {"b"},
        "b": {"c", "x"},
        "c": {"a"},  # a -> b -> c -> a
        "x": {"y"},
        "y": set(),  # x, y: acyclic
        "s": {"s"},  # imports itself
        "p": {"q", "a"},
        "q": {"p"},  # p <-> q, and an edge into the other cycle that does not merge them
        "d": {"e", "f"},
        "e": {"f"},
        "f": {"d"},  # two cycles, one component: d -> e -> f -> d and d -> f -> d
    }
    components = sorted(strongly_connected(graph))
    assert components == [["a", "b", "c"], ["d", "e", "f"], ["p", "q"], ["s"], ["x"], ["y"]]
    cycles = find_cycles(graph)
    assert sorted(cycles) == [["a", "b", "c", "a"], ["d", "f", "d"], ["p", "q", "p"], ["s", "s"]]
    for cycle in cycles:
        assert all(b in graph[a] for a, b in zip(cycle, cycle[1:], strict=False)), f"{cycle} follows edges"
    assert find_cycles({k: v for k, v in graph.items() if k in "xy"}) == []
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": set(), "d": {"a", "c"}}) == []
    # A long chain closed at its end: the iterative search does not hit the recursion limit.
    chain = {f"m{i}": {f"m{i + 1}"} for i in range(5000)} | {"m5000": {"m0"}}
    assert [len(c) for c in find_cycles(chain)] == [5002]


def test_upward_imports_on_a_synthetic_graph() -> None:
    graph = {
        "flows.cli": {"tasks.data", "sdpo_core.config"},
        "tasks.data": {"sdpo_core.step", "flows.pipeline"},
        "sdpo_core.step": {"sdpo_core.records", "tasks.scores"},
        "sdpo_core.records": set(),
    }
    assert upward_imports(graph) == ["sdpo_core.step -> tasks.scores", "tasks.data -> flows.pipeline"]


def test_imports_found_anywhere_in_a_module() -> None:
    known = {"tasks", "tasks.tracking", "tasks.scores", "tasks.storage", "flows", "flows.pipeline"}
    known |= {"sdpo_core", "sdpo_core.step", "sdpo_core.data"}
    source = """
import os
from sdpo_core import data as data_mod
from . import scores
from .storage import fetch

def later():
    import flows.pipeline
    from tasks import tracking

class K:
    def method(self):
        from sdpo_core.step import run_step
"""
    found = imported_modules(source, "tasks.data", False, known)
    assert found == known, "each import, at module level, in a function and in a method, with its packages"
    # From a package's __init__, "." is the package itself; from a module, its package.
    assert imported_modules("from .. import scores", "tasks.sub", True, known) == {"tasks", "tasks.scores"}
    assert imported_modules("from .. import scores", "tasks.sub.m", False, known) == {"tasks", "tasks.scores"}
    assert imported_modules("from . import scores", "tasks", True, known) == {"tasks.scores"}


def test_the_checks_fail_on_a_cycle_and_an_upward_import(tmp_path: Path) -> None:
    """A small tree with a deferred-import cycle in the core and a core module importing tasks."""
    files = {
        "sdpo_core/__init__.py": "",
        "sdpo_core/a.py": "from sdpo_core import b\n",
        "sdpo_core/b.py": "def f():\n    import sdpo_core.a\n",
        "sdpo_core/c.py": "from tasks.t import x\n",
        "tasks/__init__.py": "",
        "tasks/t.py": "from sdpo_core.c import y\n",
        "flows/__init__.py": "",
        "flows/f.py": "import tasks.t\n",
    }
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    graph = import_graph(tmp_path)
    assert sorted(find_cycles(graph)) == [
        ["sdpo_core.a", "sdpo_core.b", "sdpo_core.a"],
        ["sdpo_core.c", "tasks.t", "sdpo_core.c"],
    ], _describe(graph)
    assert upward_imports(graph) == ["sdpo_core.c -> tasks", "sdpo_core.c -> tasks.t"]
