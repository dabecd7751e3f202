"""kill -9 in the middle of a backup (issue 12), guest writes acknowledged
meanwhile: the source holds every acknowledged write and passes
``qemu-img check``, and so does the half-written target (a guest write to an
area not yet copied first copied the old data there)."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

from qmpd.nbd.client import NbdClient
from tests.integration.test_mirror_backup_io import (
    Writer,
    add_target,
    image_bytes,
    make_source,
    qmp_call,
    read_all,
    same,
    start,
)
from tests.support.qmp import QmpClient
from tests.support.tools import qemu_img


def test_kill_9_mid_backup(tmp_path: Path) -> None:
    src = make_source(tmp_path)
    daemon = start(tmp_path, src)
    tgt = tmp_path / "tgt.qcow2"
    qmp = QmpClient(daemon.sock, 30, negotiate=True)
    add_target(qmp, tgt, "qcow2")

    async def scenario() -> bytes:
        async with await NbdClient.connect(f"nbd+unix:///src?socket={tmp_path}/nbd.sock") as c:
            model = bytearray(await read_all(c))
            writer = Writer(c, model, seed=17, fua=True)
            await qmp_call(qmp.ok, "blockdev-backup", {
                "job-id": "b", "device": "src", "target": "tgt", "sync": "full",
                # 4 MiB of data at 128 KiB/s: half a minute, so a loaded
                # machine's slow writer still finds it running.
                "speed": 128 * 1024})
            task = asyncio.create_task(writer.run())
            await asyncio.sleep(1.0)
            writer.stop.set()
            await task
            assert writer.count > 0
            jobs = await qmp_call(qmp.ok, "query-jobs")
            assert jobs and jobs[0]["status"] == "running", jobs
            daemon.signal(signal.SIGKILL)
            return bytes(model)

    try:
        model = asyncio.run(scenario())
        daemon.wait()
    finally:
        qmp.close()
        daemon.stop()
    qemu_img("check", "-q", src)
    qemu_img("check", "-q", tgt)
    same(image_bytes(src, "qcow2"), model)
