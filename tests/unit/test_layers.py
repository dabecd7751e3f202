"""The import graph of qmpd/ has no cycles, and layers import only downwards (issue 9)."""

from __future__ import annotations

import ast
from pathlib import Path

QMPD = Path(__file__).resolve().parents[2] / "qmpd"

#: Cycles still being taken apart; each entry goes when its refactor lands.
KNOWN_CYCLES: list[list[str]] = [
    ["qmpd.nbd.exports", "qmpd.nbd.server"],
    ["qmpd.daemon", "qmpd.migration.manager"],
    ["qmpd.block.qcow2.cluster", "qmpd.block.qcow2.repair",
     "qmpd.block.qcow2.resize", "qmpd.block.qcow2.zero"],
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(QMPD.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def import_graph() -> dict[str, set[str]]:
    """Every qmpd module and the qmpd modules it imports (TYPE_CHECKING imports count too)."""
    paths = {module_name(p): p for p in QMPD.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in paths.items():
        package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name in paths)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    prefix = package[: len(package) - node.level + 1]
                    base = ".".join(prefix + ([base] if base else []))
                for alias in node.names:
                    full = f"{base}.{alias.name}"
                    if full in paths:
                        deps.add(full)
                    elif base in paths:
                        deps.add(base)
        deps.discard(name)
        graph[name] = deps
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
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
    return sorted(found)


def test_the_checker_finds_a_cycle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]


def test_no_import_cycles() -> None:
    assert cycles(import_graph()) == sorted(KNOWN_CYCLES)
