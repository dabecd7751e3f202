"""An inactivation waits for the writes under way on its nodes, as QEMU drains
before it inactivates: a write still queued for a driver's thread when the
write-back and the lock release are over would land on an image that another
host may own by then.  New writes stay refused for the whole inactivation; a
write that a job's hook holds back is not waited for (it is refused when it
goes on); a hooked write that goes on during an activation waits for the
reload.  In process, on real images; I/O is held in the I/O thread pool
(every worker busy) where a step must wait."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

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
from qmpd.jobs.manager import JobManager
from qmpd.jobs.mirror import MirrorJob, start_blockdev_mirror
from tests.support.block import held_io
from tests.support.tools import qemu_img

MiB = 1 << 20


async def raw_node(layer: BlockLayer, tmp_path: Path) -> tuple[BlockNode, Path]:
    path = tmp_path / "disk.raw"
    qemu_img("create", "-f", "raw", str(path), "4M")
    return await layer.add({"driver": "file", "node-name": "f0", "filename": str(path)}), path


def write_under_way(node: BlockNode) -> asyncio.Task[None]:
    # Larger than the file driver writes inline: its pwrite waits for a worker.
    return asyncio.create_task(node.write(0, b"\x5a" * 2 * MiB))


def inactivate_node(layer: BlockLayer) -> Awaitable[None]:
    return layer.set_active("f0", False)


def inactivate_all(layer: BlockLayer) -> Awaitable[None]:
    return layer.inactivate_all()


class CountingHook(WriteHook):
    """A job's hook that only counts the writes it sees before they land."""

    def __init__(self) -> None:
        self.seen: list[int] = []

    async def before_write(self, node: BlockNode, offset: int, length: int) -> BlockNode | None:
        self.seen.append(offset)
        return None


@pytest.mark.parametrize("hooked", [False, True], ids=["plain", "hooked"])
@pytest.mark.parametrize("inactivate", [inactivate_node, inactivate_all])
async def test_an_inactivation_waits_for_the_writes_under_way(
        layer: BlockLayer, tmp_path: Path,
        inactivate: Callable[[BlockLayer], Awaitable[None]], hooked: bool) -> None:
    """Hooked: the write passed a job's hook (a backup's copy-before-write)
    and is waited for as a plain one is; a new one is refused before its
    hook runs."""
    node, path = await raw_node(layer, tmp_path)
    hook = CountingHook()
    if hooked:
        node.write_hooks.append(hook)
    async with held_io(layer):
        write = write_under_way(node)
        await asyncio.sleep(0.05)
        assert (node.hooked_writes, node.plain_writes) == ((1, 0) if hooked else (0, 1))
        inactivation = asyncio.ensure_future(inactivate(layer))
        await asyncio.sleep(0.2)
        assert not write.done()
        assert not inactivation.done(), "inactivated with a write under way"
        assert node.state is NodeState.ACTIVE
        # Meanwhile a new write is refused, as it would be a moment later.
        with pytest.raises(BlockDriverError, match="inactive"):
            await node.write(3 * MiB, b"\xa5" * 4096)
        assert hook.seen == ([0] if hooked else [])
    await asyncio.wait_for(write, 10)
    await asyncio.wait_for(inactivation, 10)
    assert node.state is NodeState.INACTIVE and node.hooked_writes == 0
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


# --- new writes stay refused for the whole inactivation -------------------------


async def raw_over_file(layer: BlockLayer, tmp_path: Path, name: str) -> tuple[BlockNode, Path]:
    path = tmp_path / f"{name}.img"
    path.write_bytes(bytes(4 * MiB))
    node = await layer.add({"driver": "raw", "node-name": name,
                            "file": {"driver": "file", "node-name": f"{name}-file",
                                     "filename": str(path)}})
    return node, path


async def test_a_write_queued_behind_inactivate_all_is_refused_with_several_trees(
        layer: BlockLayer, tmp_path: Path) -> None:
    """Raw over file waits for its write-back: with two trees, what is left runs
    as tasks, which start a loop turn later.  A request already queued on the
    loop (an NBD handler's) ran first and found its root active and no longer
    quiesced: its write landed after the write-back and the lock release."""
    a, path = await raw_over_file(layer, tmp_path, "a")
    await raw_over_file(layer, tmp_path, "b")
    async with held_io(layer):
        inactivation = asyncio.ensure_future(layer.inactivate_all())
        write = asyncio.ensure_future(a.write(0, b"\x5a" * 2 * MiB))
        await asyncio.sleep(0.3)
        assert a.plain_writes == 0, "a write reached the driver during the inactivation"
    await asyncio.wait_for(inactivation, 10)
    with pytest.raises(BlockDriverError, match="inactive"):
        await write
    assert a.state is NodeState.INACTIVE and a.file is not None
    assert a.file.state is NodeState.INACTIVE
    assert a.quiesce_counter == 0
    assert path.read_bytes()[:2 * MiB] == bytes(2 * MiB)


async def test_a_write_held_at_a_mirrors_gate_does_not_block_an_inactivation(
        layer: BlockLayer, tmp_path: Path) -> None:
    """A pending mirror (auto-finalize off) holds new source writes at its gate
    until it is finalized, which takes the graph lock; an inactivation under
    that lock waited for them: neither ever ended."""
    for name in ("src", "tgt"):
        (tmp_path / f"{name}.img").write_bytes(bytes(4 * MiB))
        await layer.add({"driver": "file", "node-name": name,
                         "filename": str(tmp_path / f"{name}.img")})
    src = layer.graph.lookup("src")
    events: list[str] = []
    jobs = JobManager(lambda name, data: events.append(name), layer.lock.run)
    try:
        await layer.lock.run(lambda: start_blockdev_mirror(
            jobs, layer, {"job-id": "m", "device": "src", "target": "tgt", "sync": "full",
                          "auto-finalize": False}))
        async with asyncio.timeout(20):
            while "BLOCK_JOB_READY" not in events:
                await asyncio.sleep(0.01)
        job = jobs.find("m")
        jobs.complete(job)
        async with asyncio.timeout(20):
            while job.status.value != "pending":
                await asyncio.sleep(0.01)
        write = asyncio.ensure_future(src.write(0, b"\x11" * 4096))
        await asyncio.sleep(0.1)
        assert not write.done()
        await asyncio.wait_for(layer.lock.run(lambda: layer.set_active("src", False)), 5)
        assert src.state is NodeState.INACTIVE
        await asyncio.wait_for(layer.lock.run(lambda: jobs.finalize(job)), 10)
        outcome = await asyncio.wait_for(asyncio.gather(write, return_exceptions=True), 10)
        # Let go at the pivot, it went to the new node (which took the
        # source's users) or was refused: never onto the inactive source.
        assert outcome == [None] or isinstance(outcome[0], BlockDriverError), outcome
        assert (tmp_path / "src.img").read_bytes()[:4096] == bytes(4096)
    finally:
        for held in jobs:
            if isinstance(held, MirrorJob):
                held.gate.set()  # a failed run must not hang the close
        await asyncio.wait_for(jobs.close(), 10)


class HeldHook(WriteHook):
    """A job's hook that holds each write until told (a copy-before-write copying)."""

    def __init__(self) -> None:
        self.go = asyncio.Event()
        self.seen = 0

    async def before_write(self, node: BlockNode, offset: int, length: int) -> BlockNode | None:
        self.seen += 1
        await self.go.wait()
        return None


async def exported_file(layer: BlockLayer, tmp_path: Path) -> tuple[BlockNode, Path]:
    path = tmp_path / "f.img"
    path.write_bytes(bytes(4 * MiB))
    # drop-cache: the activation's reload runs in an I/O thread, as on NFS.
    node = await layer.add({"driver": "file", "node-name": "f0", "filename": str(path),
                            "drop-cache": True})
    user = NodeUser("export", "e0", writable=True, allow_inactive=True)
    await layer.graph.add_user(BdrvChild(name="root", role=ChildRole.image(), child=node,
                                         user=user))
    return node, path


async def test_a_hooked_write_to_an_inactive_node_is_refused_before_its_hook(
        layer: BlockLayer, tmp_path: Path) -> None:
    node, _ = await exported_file(layer, tmp_path)
    await layer.set_active("f0", False)
    hook = HeldHook()
    node.write_hooks.append(hook)
    with pytest.raises(BlockDriverError, match="inactive"):
        await asyncio.wait_for(node.write(0, b"\x33" * 4096), 5)
    assert hook.seen == 0


async def test_a_hooked_write_let_go_during_an_activation_waits_for_the_reload(
        layer: BlockLayer, tmp_path: Path) -> None:
    node, path = await exported_file(layer, tmp_path)
    hook = HeldHook()
    node.write_hooks.append(hook)
    write = asyncio.ensure_future(node.write(0, b"\x33" * 4096))
    await asyncio.sleep(0.05)
    assert hook.seen == 1 and node.hooked_writes == 0
    # Not waited for while its hook holds it.
    await asyncio.wait_for(layer.set_active("f0", False), 5)
    seen: list[bool] = []
    real_write = node.driver.write

    async def observed(offset: int, data: bytes, fua: bool = False) -> Any:
        seen.append(node.reloading is not None)
        return await real_write(offset, data, fua)

    node.driver.write = observed  # type: ignore[method-assign]
    async with held_io(layer):
        activation = asyncio.ensure_future(layer.set_active("f0", True))
        await asyncio.sleep(0.1)
        assert node.state is NodeState.ACTIVE and node.reloading is not None
        hook.go.set()
        await asyncio.sleep(0.1)
        assert seen == [], "the write reached the driver during the reload"
    await asyncio.wait_for(activation, 10)
    await asyncio.wait_for(write, 10)
    assert seen == [False]
    assert path.read_bytes()[:4096] == b"\x33" * 4096
