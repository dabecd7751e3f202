"""BlockDriver is the only contract between the graph and drivers (issue 9)."""

from __future__ import annotations

import ast
from pathlib import Path

from qmpd.block.driver import BlockDriver

QMPD = Path(__file__).resolve().parents[2] / "qmpd"
DRIVER_NAMES = {"file", "host_device", "raw", "qcow2", "null-co", "throttle", "nbd"}


def _offences(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) \
                and node.func.id == "hasattr":
            found.append(f"{path.name}:{node.lineno}: hasattr")
        if isinstance(node, ast.Compare) and any(
                isinstance(c, ast.Constant) and c.value in DRIVER_NAMES
                for c in node.comparators) and isinstance(node.left, ast.Name) \
                and "driver" in node.left.id:
            found.append(f"{path.name}:{node.lineno}: driver-name test")
    return found


def test_generic_code_asks_drivers_only_through_hooks() -> None:
    offences = [o for path in sorted(QMPD.rglob("*.py")) for o in _offences(path)]
    assert offences == []


def test_header_backing_hooks_have_defaults() -> None:
    for hook in ("raw_backing_file_name", "backing_file_name", "backing_format"):
        assert getattr(BlockDriver, hook)(None) is None  # defaults ignore the instance


def test_drivers_raise_block_errors_only() -> None:
    """Drivers raise BlockDriverError (a GenericError with an errno), never a bare
    QMP error, so nothing needs translating on the way out."""
    from qmpd.block.registry import DRIVERS

    modules = {Path(__import__(cls.__module__, fromlist=["_"]).__file__ or "")
               for cls in DRIVERS.values()}
    offences = []
    for path in sorted(modules):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call) \
                    and isinstance(node.exc.func, ast.Name) \
                    and node.exc.func.id in {"GenericError", "QMPError"}:
                offences.append(f"{path.name}:{node.lineno}")
    assert len(modules) >= 5 and offences == []
