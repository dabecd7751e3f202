"""Helpers shared by the qcow2 interop tests (real files, real QEMU tools).

Kept in a ``test_qcow2_*`` module so the qcow2 tests stay self-contained; the
single test here checks that the tools are the QEMU 7.x the tests expect.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from qmpd.block.graph import BlockGraph, BlockNode
from qmpd.block.qcow2.standalone import close_image, open_image
from tests.conftest import require_tool


def tools() -> None:
    """Skip (or fail in CI) unless qemu-img and qemu-io are installed."""
    require_tool("qemu-img")
    require_tool("qemu-io")


def run(*argv: str | Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"{argv} exited {proc.returncode}: {proc.stdout}{proc.stderr}")
    return proc


def qemu_img_create(path: Path, size: int | str, options: str = "",
                    backing: Path | None = None, backing_fmt: str | None = None) -> None:
    argv: list[str | Path] = ["qemu-img", "create", "-q", "-f", "qcow2"]
    if options:
        argv += ["-o", options]
    if backing is not None:
        argv += ["-b", str(backing), "-F", backing_fmt or "qcow2"]
    run(*argv, path, str(size))


def qemu_io(path: Path, *commands: str, fmt: str = "qcow2", extra: tuple[str, ...] = ()
            ) -> subprocess.CompletedProcess[str]:
    argv: list[str | Path] = ["qemu-io", "-f", fmt, *extra]
    for c in commands:
        argv += ["-c", c]
    return run(*argv, path)


def check(path: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    """``qemu-img check`` (not raising: callers look at the exit code)."""
    return run("qemu-img", "check", *extra, path, check=False)


def assert_clean(path: Path) -> None:
    proc = check(path)
    assert proc.returncode == 0, f"qemu-img check {path}: {proc.returncode}\n{proc.stdout}"


def assert_same(img: Path, raw: Path) -> None:
    proc = run("qemu-img", "compare", "-f", "qcow2", "-F", "raw", img, raw, check=False)
    assert proc.returncode == 0, f"qemu-img compare: {proc.stdout}{proc.stderr}"


def to_raw(img: Path, raw: Path, fmt: str = "qcow2") -> bytes:
    run("qemu-img", "convert", "-f", fmt, "-O", "raw", img, raw)
    return raw.read_bytes()


@contextlib.asynccontextmanager
async def opened(path: Path, **kw: Any) -> AsyncIterator[BlockNode]:
    """An image opened through the qcow2 driver (backing chain included)."""
    graph = BlockGraph(io_threads=4)
    node = await open_image(graph, str(path), **kw)
    try:
        yield node
    finally:
        try:
            await close_image(node)
        finally:
            graph.close()


def run_async(coro: Any) -> Any:
    return asyncio.run(coro)


def test_qemu_tools_are_7x() -> None:
    tools()
    out = run("qemu-img", "--version").stdout
    assert "qemu-img version" in out
    major = int(out.split("version", 1)[1].split()[0].split(".")[0])
    if major != 7:
        pytest.skip(f"the qcow2 interop expectations were checked against QEMU 7.2, not {out}")
