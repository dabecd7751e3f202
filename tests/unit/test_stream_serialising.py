"""A stream's copy-on-read and the writes to its top never overlap in time
(QEMU's serialising requests): a write that arrives while the job copies a
range lands after the copy, so the stale data it copied cannot undo it."""

from __future__ import annotations

import asyncio
from pathlib import Path

from qmpd.block.core import BlockLayer
from qmpd.block.tracked import RangeSerialiser
from qmpd.jobs.stream import StreamJob
from tests.support.block import qcow2

MiB = 1 << 20


async def chain(layer: BlockLayer, tmp_path: Path) -> StreamJob:
    base = await layer.add(qcow2(tmp_path, "base"))
    await base.write(0, b"\x01" * MiB)
    await layer.add({**qcow2(tmp_path, "top"), "backing": "base"})
    top = layer.graph.lookup("top")
    assert top is not None
    return StreamJob("j", layer, top, base, None, "report", 0, True, True)


async def test_a_write_during_a_copy_lands_after_it(layer: BlockLayer, tmp_path: Path) -> None:
    job = await chain(layer, tmp_path)
    top = job.top
    top.serialiser = RangeSerialiser()
    copy = asyncio.create_task(job._populate(0, MiB))
    await asyncio.sleep(0)  # the copy holds its range and reads the backing data
    await top.write(4096, b"\x09" * 4096)
    await copy
    assert await top.read(0, 8192) == b"\x01" * 4096 + b"\x09" * 4096
    assert await top.read(MiB - 4096, 4096) == b"\x01" * 4096


async def test_a_copy_waits_for_writes_in_flight(layer: BlockLayer, tmp_path: Path) -> None:
    job = await chain(layer, tmp_path)
    top = job.top
    top.serialiser = RangeSerialiser()
    write = asyncio.create_task(top.write(0, b"\x07" * 65536))
    await asyncio.sleep(0)  # the write is in flight
    await job._populate(0, MiB)
    await write
    assert await top.read(0, 65536) == b"\x07" * 65536
    assert await top.read(65536, 4096) == b"\x01" * 4096


async def test_serialiser_lets_the_copying_task_write(layer: BlockLayer) -> None:
    serialiser = RangeSerialiser()
    async with serialiser.copy(0, 100):
        token = await serialiser.begin_write(10, 10)  # (wait_for would be another task)
        serialiser.end_write(token)
        other = asyncio.create_task(serialiser.begin_write(50, 10))
        await asyncio.sleep(0.01)
        assert not other.done()
    serialiser.end_write(await asyncio.wait_for(other, 1))
