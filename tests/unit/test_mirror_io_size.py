"""How long a mirror's copies are: up to 4 MiB while nothing paces the job,
QEMU's 1 MiB (MAX_IO_BYTES) with a speed limit or in write-blocking mode, and
never more than ``buf-size``.  Counted as the writes reaching the target node
of a real mirror between two image files, in process."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from qmpd.block.core import BlockLayer
from qmpd.jobs.manager import JobManager
from qmpd.jobs.mirror import start_blockdev_mirror

MiB = 1 << 20
SIZE = 16 * MiB


def manager(events: list[str]) -> JobManager:
    lock = asyncio.Lock()

    async def serialise(op: Callable[[], Awaitable[Any]]) -> Any:
        async with lock:
            return await op()

    return JobManager(lambda name, data: events.append(name), serialise)


@pytest.mark.parametrize(("options", "length"), [
    ({}, 4 * MiB),
    ({"speed": 1 << 40}, MiB),
    ({"copy-mode": "write-blocking"}, MiB),
    ({"buf-size": 2 * MiB}, 2 * MiB),
    ({"granularity": 8 * MiB}, 8 * MiB),
])
async def test_copy_lengths(layer: BlockLayer, tmp_path: Path, options: dict[str, Any],
                            length: int) -> None:
    src, tgt = tmp_path / "src.raw", tmp_path / "tgt.raw"
    data = os.urandom(SIZE)
    src.write_bytes(data)
    with open(tgt, "wb") as f:
        f.truncate(SIZE)
    await layer.add({"driver": "raw", "node-name": "src",
                     "file": {"driver": "file", "filename": str(src)}})
    target = await layer.add({"driver": "raw", "node-name": "tgt",
                              "file": {"driver": "file", "filename": str(tgt)}})
    events: list[str] = []
    jobs = manager(events)
    try:
        await start_blockdev_mirror(jobs, layer, {"job-id": "m", "device": "src",
                                                  "target": "tgt", "sync": "full", **options})
        async with asyncio.timeout(30):
            while "BLOCK_JOB_READY" not in events:
                await asyncio.sleep(0.01)
        assert target.stats.wr_bytes == SIZE
        assert target.stats.wr_operations == SIZE // length
    finally:
        await jobs.close()
    assert tgt.read_bytes() == data


@pytest.mark.parametrize("direct", [False, True])
async def test_copies_between_files_are_one_io_job_each(layer: BlockLayer, tmp_path: Path,
                                                        direct: bool) -> None:
    """qcow2 to qcow2 over files: each 4 MiB copy is one I/O job that reads the
    source file and writes the target file (a host file span), and the target
    ends up equal to the source (``qemu-img compare``).  A target opened with
    O_DIRECT (``cache.direct``) cannot take a span: the data is read first."""
    from tests.support.tools import qemu_img, qemu_io

    src, tgt = tmp_path / "src.qcow2", tmp_path / "tgt.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", src, str(SIZE))
    qemu_img("create", "-q", "-f", "qcow2", tgt, str(SIZE))
    qemu_io("-f", "qcow2", "-c", "write -P 0x5a 0 12M", "-c", "write -P 0x6b 12M 4M", src,
            check=True)
    await layer.add({"driver": "qcow2", "node-name": "src",
                     "file": {"driver": "file", "filename": str(src)}})
    await layer.add({"driver": "qcow2", "node-name": "tgt", "cache": {"direct": direct},
                     "file": {"driver": "file", "filename": str(tgt)}})
    jobs_run: list[str] = []
    pool_run = layer.graph.io.run

    async def counted(fn: Callable[..., Any], *args: Any) -> Any:
        jobs_run.append(fn.__name__)
        return await pool_run(fn, *args)

    layer.graph.io.run = counted  # type: ignore[method-assign]
    events: list[str] = []
    jobs = manager(events)
    try:
        await start_blockdev_mirror(jobs, layer, {"job-id": "m", "device": "src",
                                                  "target": "tgt", "sync": "full"})
        async with asyncio.timeout(30):
            while "BLOCK_JOB_READY" not in events:
                await asyncio.sleep(0.01)
    finally:
        await jobs.close()
        await layer.close_all()
    copies = [name for name in jobs_run if name in ("_copy_span", "read_span")]
    assert copies == (["read_span"] if direct else ["_copy_span"]) * (SIZE // (4 * MiB))
    qemu_img("compare", "-q", "-f", "qcow2", "-F", "qcow2", src, tgt)
