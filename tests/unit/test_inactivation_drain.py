"""An inactivation waits for the writes under way on its nodes, as QEMU drains
before it inactivates: a write still queued for a driver's thread when the
write-back and the lock release are over would land on an image that another
host may own by then.  In process, on a real image; the write is held in the
I/O thread pool (every worker busy) until the test lets it go."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from qmpd.block.common import ChildRole
from qmpd.block.core import BlockLayer
from qmpd.block.driver import (
    BdrvChild,
    BlockDriverError,
    BlockNode,
    NodeState,
    NodeUser,
    WriteHook,
)
from qmpd.errors import QMPError
from tests.support.tools import qemu_img

MiB = 1 << 20


async def raw_node(layer: BlockLayer, tmp_path: Path) -> tuple[BlockNode, Path]:
    path = tmp_path / "disk.raw"
    qemu_img("create", "-f", "raw", str(path), "4M")
    return await layer.add({"driver": "file", "node-name": "f0", "filename": str(path)}), path


@asynccontextmanager
async def held_io(layer: BlockLayer) -> AsyncIterator[None]:
    """Every I/O thread busy until the block ends."""
    gate = threading.Event()
    blockers = [asyncio.ensure_future(layer.graph.run_io(gate.wait))
                for _ in range(layer.graph.io.threads)]
    try:
        yield
    finally:
        gate.set()
        await asyncio.gather(*blockers)


def write_under_way(node: BlockNode) -> asyncio.Task[None]:
    # Larger than the file driver writes inline: its pwrite waits for a worker.
    return asyncio.create_task(node.write(0, b"\x5a" * 2 * MiB))


def inactivate_node(layer: BlockLayer) -> Awaitable[None]:
    return layer.set_active("f0", False)


def inactivate_all(layer: BlockLayer) -> Awaitable[None]:
    return layer.inactivate_all()


@pytest.mark.parametrize("inactivate", [inactivate_node, inactivate_all])
async def test_an_inactivation_waits_for_the_writes_under_way(
        layer: BlockLayer, tmp_path: Path,
        inactivate: Callable[[BlockLayer], Awaitable[None]]) -> None:
    node, path = await raw_node(layer, tmp_path)
    async with held_io(layer):
        write = write_under_way(node)
        await asyncio.sleep(0.05)
        inactivation = asyncio.ensure_future(inactivate(layer))
        await asyncio.sleep(0.2)
        assert not write.done()
        assert not inactivation.done(), "inactivated with a write under way"
        assert node.state is NodeState.ACTIVE
        # Meanwhile a new write is refused, as it would be a moment later.
        with pytest.raises(BlockDriverError, match="inactive"):
            await node.write(3 * MiB, b"\xa5" * 4096)
    await asyncio.wait_for(write, 10)
    await asyncio.wait_for(inactivation, 10)
    assert node.state is NodeState.INACTIVE
    data = path.read_bytes()
    assert data[:2 * MiB] == b"\x5a" * 2 * MiB
    assert data[3 * MiB:3 * MiB + 4096] == bytes(4096)


async def test_an_inactivation_that_will_be_refused_refuses_no_write(
        layer: BlockLayer, tmp_path: Path) -> None:
    """A writable user without allow-inactive (an export) blocks the
    inactivation: it fails at once, and the node's writes go on."""
    node, path = await raw_node(layer, tmp_path)
    export = NodeUser("export", "e0", writable=True)
    await layer.graph.add_user(BdrvChild(name="root", role=ChildRole.image(), child=node,
                                         user=export))
    async with held_io(layer):
        write = write_under_way(node)
        await asyncio.sleep(0.05)
        with pytest.raises(QMPError, match="Failed to inactivate node"):
            await asyncio.wait_for(inactivate_node(layer), 2)
        assert not write.done()
        more = asyncio.create_task(node.write(3 * MiB, b"\xa5" * 4096))
        await asyncio.sleep(0.05)
    await asyncio.wait_for(asyncio.gather(write, more), 10)
    assert node.state is NodeState.ACTIVE and node.quiesce_counter == 0
    assert path.read_bytes()[3 * MiB:3 * MiB + 4096] == b"\xa5" * 4096


async def test_without_writes_under_way_nothing_is_refused_nor_waited_for(
        layer: BlockLayer, tmp_path: Path) -> None:
    node, _ = await raw_node(layer, tmp_path)
    await node.write(0, b"\x5a" * MiB)
    await asyncio.wait_for(layer.set_active("f0", False), 5)
    assert node.state is NodeState.INACTIVE
    assert node.quiesce_counter == 0
    await layer.set_active("f0", True)
    await node.write(MiB, b"\x5a" * 4096)


class CountingHook(WriteHook):
    """A job's hook that only counts the writes it sees before they land."""

    def __init__(self) -> None:
        self.seen: list[int] = []

    async def before_write(self, node: BlockNode, offset: int, length: int) -> BlockNode | None:
        self.seen.append(offset)
        return None


@pytest.mark.parametrize("inactivate", [inactivate_node, inactivate_all])
async def test_an_inactivation_waits_for_the_writes_through_a_hook(
        layer: BlockLayer, tmp_path: Path,
        inactivate: Callable[[BlockLayer], Awaitable[None]]) -> None:
    """A write that passed a job's hook (a backup's copy-before-write) is
    waited for as a plain one is; a new one is refused before its hook runs."""
    node, path = await raw_node(layer, tmp_path)
    hook = CountingHook()
    node.write_hooks.append(hook)
    async with held_io(layer):
        write = write_under_way(node)
        await asyncio.sleep(0.05)
        assert hook.seen == [0] and node.hooked_writes == 1
        inactivation = asyncio.ensure_future(inactivate(layer))
        await asyncio.sleep(0.2)
        assert not write.done()
        assert not inactivation.done(), "inactivated with a hooked write under way"
        assert node.state is NodeState.ACTIVE
        with pytest.raises(BlockDriverError, match="inactive"):
            await node.write(3 * MiB, b"\xa5" * 4096)
        assert hook.seen == [0]
    await asyncio.wait_for(write, 10)
    await asyncio.wait_for(inactivation, 10)
    assert node.state is NodeState.INACTIVE and node.hooked_writes == 0
    data = path.read_bytes()
    assert data[:2 * MiB] == b"\x5a" * 2 * MiB
    assert data[3 * MiB:3 * MiB + 4096] == bytes(4096)
