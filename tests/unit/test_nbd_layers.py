"""The layers inside qmpd/nbd: a sans-IO protocol package, a client on top of it only,
a server that does not know the export registry's module (issue 9)."""

from __future__ import annotations

import ast

from tests.unit.test_layers import QMPD, import_graph, module_name

PROTOCOL = "qmpd.nbd.protocol"


def _in_protocol(name: str) -> bool:
    return name == PROTOCOL or name.startswith(PROTOCOL + ".")


def test_protocol_package_imports_only_itself() -> None:
    graph = import_graph()
    modules = [m for m in graph if _in_protocol(m)]
    assert f"{PROTOCOL}.handshake" in modules and f"{PROTOCOL}.transmission" in modules
    for module in modules:
        outside = {dep for dep in graph[module] if not _in_protocol(dep)}
        assert not outside, f"{module} imports {sorted(outside)}"


def test_protocol_package_does_no_io() -> None:
    io_modules = {"asyncio", "socket", "selectors", "ssl", "threading"}
    for path in (QMPD / "nbd" / "protocol").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name.split(".")[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                names = [node.module.split(".")[0]]
            assert not io_modules & set(names), f"{module_name(path)} imports {names}"


def test_client_depends_on_the_protocol_and_net_only() -> None:
    # The block layer's nbd driver imports the client (tests/unit/test_layers.py
    # ALLOWED): it must stay below the block layer, opening sockets through net.
    graph = import_graph()
    deps = graph["qmpd.nbd.client"]
    assert deps and all(_in_protocol(dep) or dep == "qmpd.net" for dep in deps), sorted(deps)
    assert "qmpd.errors" in graph["qmpd.net"] and all(
        not dep.startswith(("qmpd.block", "qmpd.nbd")) for dep in graph["qmpd.net"])


def test_server_does_not_import_exports() -> None:
    graph = import_graph()
    assert "qmpd.nbd.exports" not in graph["qmpd.nbd.server"]
    assert "qmpd.nbd.server" in graph["qmpd.nbd.exports"]


def test_no_nbd_module_over_1000_lines() -> None:
    for path in (QMPD / "nbd").rglob("*.py"):
        lines = len(path.read_text().splitlines())
        assert lines <= 1000, f"{module_name(path)} has {lines} lines"


def test_protocol_package_exports_every_public_name() -> None:
    import importlib

    from qmpd.nbd import protocol

    for name in ("constants", "sansio", "handshake", "transmission", "replies"):
        module = importlib.import_module(f"{PROTOCOL}.{name}")
        for attr, value in vars(module).items():
            if attr.startswith("_") or getattr(value, "__module__", module.__name__) != module.__name__:
                continue
            if isinstance(value, type(importlib)):  # a module (struct, enum ...)
                continue
            assert getattr(protocol, attr, None) is value, f"{name}.{attr} not re-exported"
