"""The import graph of qmpd/ has no cycles, and layers import only downwards (issue 9)."""

from __future__ import annotations

import ast
from pathlib import Path

QMPD = Path(__file__).resolve().parents[2] / "qmpd"

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
    assert cycles(import_graph()) == []


#: The sans-IO cores: bytes in, events and bytes out.  They import only each
#: other and these foundations, and nothing that does I/O.
SANS_IO = ("qmpd.qmp.json_stream", "qmpd.qmp.session", "qmpd.qmp.encode", "qmpd.qmp.budget",
           "qmpd.nbd.protocol", "qmpd.migration.stream")
SANS_IO_MAY_IMPORT = ("qmpd.errors", "qmpd.runstate")
IO_MODULES = {"asyncio", "socket", "selectors", "subprocess", "threading", "aiohttp"}

#: Who may not import whom (by package prefix), from the bottom up.
TOP = ("qmpd.daemon", "qmpd.cli", "qmpd.http", "qmpd.__main__")
FORBIDDEN: dict[str, tuple[str, ...]] = {
    "qmpd.net": ("qmpd.qmp", "qmpd.block", "qmpd.nbd", "qmpd.migration", "qmpd.commands",
                 "qmpd.objects", "qmpd.services", "qmpd.vm", *TOP),
    "qmpd.objects": ("qmpd.qmp", "qmpd.block", "qmpd.nbd", "qmpd.migration", "qmpd.commands",
                     "qmpd.services", "qmpd.vm", *TOP),
    "qmpd.block": ("qmpd.qmp.server", "qmpd.qmp.dispatch", "qmpd.qmp.events", "qmpd.nbd",
                   "qmpd.migration", "qmpd.jobs", "qmpd.commands", "qmpd.services", "qmpd.vm",
                   *TOP),
    "qmpd.jobs": ("qmpd.qmp.server", "qmpd.qmp.dispatch", "qmpd.qmp.events", "qmpd.nbd.server",
                  "qmpd.nbd.exports", "qmpd.migration", "qmpd.commands", "qmpd.services",
                  "qmpd.vm", *TOP),
    "qmpd.nbd": ("qmpd.migration", "qmpd.jobs", "qmpd.commands", "qmpd.services", "qmpd.vm", *TOP),
    "qmpd.migration": ("qmpd.nbd", "qmpd.jobs", "qmpd.commands", "qmpd.services", "qmpd.vm", *TOP),
    "qmpd.qmp": ("qmpd.block", "qmpd.nbd", "qmpd.migration", "qmpd.commands", "qmpd.vm", *TOP),
    "qmpd.commands": TOP,
}

#: Narrow exceptions to FORBIDDEN.  The block layer's ``nbd`` driver uses the
#: NBD client, which sits on the sans-IO protocol and ``qmpd.net`` only
#: (tests/unit/test_nbd_layers.py), so it stays below the block layer;
#: the NBD server and exports stay out of its reach.
ALLOWED: dict[str, tuple[str, ...]] = {
    "qmpd.block": ("qmpd.nbd.client", "qmpd.nbd.protocol"),
}


def _under(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    found = []
    for module, deps in sorted(graph.items()):
        for layer, banned in FORBIDDEN.items():
            if _under(module, layer):
                allowed = ALLOWED.get(layer, ())
                found += [f"{module} imports {d}" for d in sorted(deps)
                          if any(_under(d, b) for b in banned)
                          and not any(_under(d, ok) for ok in allowed)]
        if any(_under(module, core) for core in SANS_IO):
            found += [f"{module} (sans-IO) imports {d}" for d in sorted(deps)
                      if not any(_under(d, ok) for ok in SANS_IO + SANS_IO_MAY_IMPORT)]
        if module != "qmpd.__main__":
            found += [f"{module} imports the daemon" for d in deps if d == "qmpd.daemon"]
    return found


def stdlib_imports(module: str) -> set[str]:
    path = QMPD.parent.joinpath(*module.split("."))
    path = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module.split(".")[0])
    return names


def test_the_layer_checker_finds_a_violation() -> None:
    graph = {"qmpd.block.graph": {"qmpd.nbd.server"}, "qmpd.block.nbd": {"qmpd.nbd.client"},
             "qmpd.nbd.protocol.x": {"qmpd.net"},
             "qmpd.vm": {"qmpd.daemon"}}
    assert layer_violations(graph) == [
        "qmpd.block.graph imports qmpd.nbd.server",
        "qmpd.nbd.protocol.x (sans-IO) imports qmpd.net",
        "qmpd.vm imports the daemon",
    ]


def test_layers_import_only_downwards() -> None:
    assert layer_violations(import_graph()) == []


def test_sans_io_cores_do_no_io() -> None:
    cores = [m for m in import_graph() if any(_under(m, c) for c in SANS_IO)]
    assert len(cores) >= len(SANS_IO)
    assert {m: stdlib_imports(m) & IO_MODULES for m in cores} == {m: set() for m in cores}


def test_no_module_over_a_thousand_lines() -> None:
    sizes = {p.name: len(p.read_text().splitlines()) for p in QMPD.rglob("*.py")}
    assert {name: n for name, n in sizes.items() if n > 1000} == {}
