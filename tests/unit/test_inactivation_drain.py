"""An inactivation waits for the writes under way on its nodes, as QEMU drains
before it inactivates: a write still queued for a driver's thread when the
write-back and the lock release are over would land on an image that another
host may own by then.  In process, on a real image; the write is held in the
I/O thread pool (every worker busy) until the test lets it go."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from qmpd.block.core import BlockLayer
from qmpd.block.driver import BlockDriverError, NodeState
from tests.support.tools import qemu_img

MiB = 1 << 20


def inactivate_node(layer: BlockLayer) -> Awaitable[None]:
    return layer.set_active("f0", False)


def inactivate_all(layer: BlockLayer) -> Awaitable[None]:
    return layer.inactivate_all()


@pytest.mark.parametrize("inactivate", [inactivate_node, inactivate_all])
async def test_an_inactivation_waits_for_the_writes_under_way(
        layer: BlockLayer, tmp_path: Path,
        inactivate: Callable[[BlockLayer], Awaitable[None]]) -> None:
    path = tmp_path / "disk.raw"
    qemu_img("create", "-f", "raw", str(path), "4M")
    node = await layer.add({"driver": "file", "node-name": "f0", "filename": str(path)})
    gate = threading.Event()
    blockers = [asyncio.ensure_future(layer.graph.run_io(gate.wait))
                for _ in range(layer.graph.io.threads)]
    try:
        # Larger than the file driver writes inline: its pwrite waits for a worker.
        write = asyncio.create_task(node.write(0, b"\x5a" * 2 * MiB))
        await asyncio.sleep(0.05)
        inactivation = asyncio.ensure_future(inactivate(layer))
        await asyncio.sleep(0.2)
        assert not write.done()
        assert not inactivation.done(), "inactivated with a write under way"
        assert node.state is NodeState.ACTIVE
        # Meanwhile a new write is refused, as it would be a moment later.
        with pytest.raises(BlockDriverError, match="inactive"):
            await node.write(3 * MiB, b"\xa5" * 4096)
    finally:
        gate.set()
        await asyncio.gather(*blockers)
    await asyncio.wait_for(write, 10)
    await asyncio.wait_for(inactivation, 10)
    assert node.state is NodeState.INACTIVE
    data = path.read_bytes()
    assert data[:2 * MiB] == b"\x5a" * 2 * MiB
    assert data[3 * MiB:3 * MiB + 4096] == bytes(4096)


async def test_without_writes_under_way_nothing_is_refused_nor_waited_for(
        layer: BlockLayer, tmp_path: Path) -> None:
    path = tmp_path / "disk.raw"
    qemu_img("create", "-f", "raw", str(path), "4M")
    node = await layer.add({"driver": "file", "node-name": "f0", "filename": str(path)})
    await node.write(0, b"\x5a" * MiB)
    await asyncio.wait_for(layer.set_active("f0", False), 5)
    assert node.state is NodeState.INACTIVE
    assert node.quiesce_counter == 0
    await layer.set_active("f0", True)
    await node.write(MiB, b"\x5a" * 4096)
