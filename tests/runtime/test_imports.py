"""runtime/'s modules import each other without a cycle: each service gets a narrow interface
from the node instead of importing it (the node imports them, never the other way)."""

from __future__ import annotations

import ast
from pathlib import Path

import earendil_py.runtime

PACKAGE = "earendil_py.runtime"


def _imports(path: Path) -> set[str]:
    """The runtime modules `path` imports, anywhere in it (under TYPE_CHECKING too: a cycle
    there is still one for the reader)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            # `from earendil_py.runtime import node` imports a module too.
            modules = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 1:
            modules = [f"{PACKAGE}.{node.module}"] if node.module else []
            modules += [f"{PACKAGE}.{alias.name}" for alias in node.names]
        else:
            continue
        names.update(m.removeprefix(PACKAGE + ".") for m in modules if m.startswith(PACKAGE + "."))
    return names


def _graph() -> dict[str, set[str]]:
    runtime_dir = Path(earendil_py.runtime.__file__).parent
    files = {path.stem: path for path in runtime_dir.glob("*.py") if path.stem != "__init__"}
    return {name: _imports(path) & files.keys() - {name} for name, path in files.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle in `graph`, as the modules along it, or None."""
    done: set[str] = set()
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        if module in path:
            return [*path[path.index(module) :], module]
        if module in done:
            return None
        path.append(module)
        for imported in sorted(graph[module]):
            if (cycle := visit(imported)) is not None:
                return cycle
        path.pop()
        done.add(module)
        return None

    for module in sorted(graph):
        if (cycle := visit(module)) is not None:
            return cycle
    return None


def test_runtime_has_no_import_cycle() -> None:
    graph = _graph()
    assert {"node", "neighbors", "chat", "gossip", "control"} <= graph.keys()
    assert _cycle(graph) is None, " -> ".join(_cycle(graph) or [])


def test_services_do_not_import_the_node() -> None:
    graph = _graph()
    assert [
        name for name in ("neighbors", "chat", "gossip", "control") if "node" in graph[name]
    ] == []


def test_the_cycle_finder_finds_one() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None
