"""Package structure: no import cycle among headavatar's modules, and the stage images' code needs no dev-only code.

Imports are read from the source (every ``import`` statement, also those inside functions, which
run lazily but still tie two modules together), so a cycle is caught even when no test happens to
import the modules in the order that breaks.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE_ROOT = Path(__file__).resolve().parents[1] / "tasks"
# Development-only subpackages: left out of the stage images by .dockerignore (docs/development.md).
DEV_ONLY = ("headavatar.bench", "headavatar.devserver")


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted((PACKAGE_ROOT / "headavatar").rglob("*.py")):
        parts = path.relative_to(PACKAGE_ROOT).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def import_graph() -> dict[str, set[str]]:
    """module -> the headavatar modules it imports (``from pkg import name`` counts a submodule ``name``)."""
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        is_pkg = path.name == "__init__.py"
        edges: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    pkg = name.split(".") if is_pkg else name.split(".")[:-1]
                    pkg = pkg[: len(pkg) - node.level + 1]
                    base = ".".join([*pkg, base] if base else pkg)
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            for t in targets:
                while t and t not in modules:  # `import headavatar.x.y` -> the deepest module that exists
                    t = t.rpartition(".")[0]
                if t.startswith("headavatar") and t != name and t != "headavatar":
                    edges.add(t)
        graph[name] = edges
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                comp = []
                while True:
                    m = stack.pop()
                    on_stack.discard(m)
                    comp.append(m)
                    if m == node:
                        break
                if len(comp) > 1:
                    found.append(sorted(comp))
    return found


def test_cycle_finder_sees_a_cycle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_graph_sees_lazy_imports() -> None:
    graph = import_graph()
    assert "headavatar.landmarks.dlib68" in graph["headavatar.landmarks.factory"]  # imported inside a function
    assert "headavatar.landmarks.base" in graph["headavatar.landmarks.dlib68"]


def test_no_import_cycle() -> None:
    assert cycles(import_graph()) == []


def test_stage_code_needs_no_dev_only_code() -> None:
    """What the stage images run (the CLI and the stages, with everything they import) never imports dev code."""
    graph = import_graph()
    seen: set[str] = set()
    todo = ["headavatar.cli", *(m for m in graph if m.startswith("headavatar.stages"))]
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo.extend(graph.get(m, ()))
    assert sorted(m for m in seen if m.startswith(DEV_ONLY)) == []


def test_dev_only_code_is_left_out_of_the_images() -> None:
    ignored = (PACKAGE_ROOT.parent / ".dockerignore").read_text().splitlines()
    for pkg in DEV_ONLY:
        assert "tasks/" + pkg.replace(".", "/") in ignored, pkg


def test_no_plugin_module_shadows_an_installed_module() -> None:
    """Airflow's plugin manager imports every .py under plugins/ by its bare file name, so a
    plugins/headavatar_airflow/limits.py became the top-level module ``limits`` and broke flask-limiter
    (the FAB auth manager): the compose stack's api-server could not start. Checked against the standard
    library, this environment and the distributions pinned for the Airflow image."""
    import importlib.util
    import re
    import sys

    repo = PACKAGE_ROOT.parent
    plugins = repo / "plugins"
    pinned = {re.split(r"[=<>\[ ]", line, maxsplit=1)[0].strip().lower().replace("-", "_")
              for line in (repo / "images" / "requirements" / "airflow-constraints.txt").read_text().splitlines()
              if line.strip() and not line.startswith("#")}
    pinned |= {"limits"}  # flask-limiter's, which FAB brings into the image unpinned (the case found)
    def origin(name: str) -> str | None:
        """Where the importable module ``name`` lives (already imported or not); None if nowhere."""
        module = sys.modules.get(name)
        spec = getattr(module, "__spec__", None) if module is not None else importlib.util.find_spec(name)
        if spec is None:
            return None if module is None else "<loaded>"
        return spec.origin or "<namespace>"

    clashes = []
    for path in plugins.rglob("*.py"):
        if path.stem == "__init__":
            continue
        where = origin(path.stem)
        installed = where is not None and not where.startswith(str(plugins))
        if path.stem in sys.stdlib_module_names or installed or path.stem.lower() in pinned:
            clashes.append(f"{path.relative_to(repo)} shadows {path.stem}")
    assert clashes == [], clashes
