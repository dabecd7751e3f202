"""A job's write hook sees every write: the writes that started before it
was installed are waited for (QEMU drains the node when inserting its filter)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from qmpd.block.core import BlockLayer
from qmpd.block.driver import BlockNode, WriteHook

MiB = 1 << 20


class Recording(WriteHook):
    def __init__(self) -> None:
        self.seen: list[tuple[int, int]] = []

    async def after_write(self, node: BlockNode, offset: int, length: int,
                          data: bytes | None) -> None:
        self.seen.append((offset, length))


async def test_drain_waits_for_unhooked_writes_only(tmp_path: Path, layer: BlockLayer) -> None:
    # A disk file (not tmpfs): its writes go through the I/O threads, so they
    # are still under way when the hook goes in.
    path = tmp_path / "a.raw"
    path.write_bytes(bytes(8 * MiB))
    node = await layer.add({"driver": "file", "node-name": "f", "filename": str(path)})
    before = [asyncio.create_task(node.write(i * MiB, b"\x01" * MiB)) for i in range(4)]
    await asyncio.sleep(0)
    assert node.plain_writes == 4
    hook = Recording()
    node.write_hooks.append(hook)
    after = asyncio.create_task(node.write(5 * MiB, b"\x02" * 4096))
    await node.drain_plain_writes()
    assert all(task.done() for task in before)
    assert node.plain_writes == 0
    await after
    # Only the hooked write passed the hook; the drained ones did not.
    assert hook.seen == [(5 * MiB, 4096)]
    await node.drain_plain_writes()  # nothing under way: returns at once
    node.write_hooks.remove(hook)
    await node.write_zeroes(0, 4096)
    await node.discard(0, 4096)
    assert node.plain_writes == 0
