"""Block-node options and images for in-process tests."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from qmpd.block.core import BlockLayer
from qmpd.block.qcow2.create import create_image
from qmpd.jobs.manager import JobManager
from qmpd.jobs.mirror import start_blockdev_mirror

MiB = 1 << 20


def qcow2(tmp_path: Path, name: str, size: int = 4 * MiB) -> dict[str, Any]:
    """blockdev-add options of a new qcow2 image ``name`` over a file node ``name-file``."""
    path = str(tmp_path / f"{name}.qcow2")
    create_image(path, size)
    return {"driver": "qcow2", "node-name": name,
            "file": {"driver": "file", "node-name": f"{name}-file", "filename": path}}


@asynccontextmanager
async def held_io(layer: BlockLayer) -> AsyncIterator[None]:
    """Every I/O thread of ``layer`` busy until the block ends: what is
    submitted meanwhile (a write, a reload) waits in the queue."""
    gate = threading.Event()
    blockers = [asyncio.ensure_future(layer.graph.run_io(gate.wait))
                for _ in range(layer.graph.io.threads)]
    await asyncio.sleep(0.05)
    try:
        yield
    finally:
        gate.set()
        await asyncio.gather(*blockers)


def job_manager(events: list[str]) -> JobManager:
    """A job manager for in-process tests: the names of the events it emits
    go to ``events``; its graph operations run one at a time."""
    lock = asyncio.Lock()

    async def serialise(op: Callable[[], Awaitable[Any]]) -> Any:
        async with lock:
            return await op()

    return JobManager(lambda name, data: events.append(name), serialise)


async def mirror_until_ready(layer: BlockLayer, **options: Any) -> None:
    """A blockdev-mirror (job ``m``) of node ``src`` to node ``tgt``, sync full
    and ``options``, run in process until it is ready; then its manager closes."""
    events: list[str] = []
    jobs = job_manager(events)
    try:
        await start_blockdev_mirror(jobs, layer, {"job-id": "m", "device": "src",
                                                  "target": "tgt", "sync": "full", **options})
        async with asyncio.timeout(30):
            while "BLOCK_JOB_READY" not in events:
                await asyncio.sleep(0.01)
    finally:
        await jobs.close()
