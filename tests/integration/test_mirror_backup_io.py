"""Mirror and backup under guest writes through an NBD export (real processes,
image files, QEMU's tools).

* mirror, background and write-blocking: writes keep coming through the
  export across READY and the pivot; afterwards the export serves the
  target, which holds every acknowledged write;
* write-blocking: an acknowledged write is in the target already;
* a soft cancel of a READY mirror leaves the target equal to the source;
* backup: the target is the source as it was when the job started, whatever
  is written meanwhile (copy-before-write);
* kill -9 in the middle of a mirror: the source passes ``qemu-img check`` and
  holds every acknowledged (FUA) write.
"""

from __future__ import annotations

import asyncio
import random
import signal
from pathlib import Path
from typing import Any

import pytest

from qmpd.nbd.client import NbdClient
from tests.conftest import QmpdProcess
from tests.support.qmp import QmpClient
from tests.support.tools import qemu_img, qemu_io

pytestmark = pytest.mark.qemu

MiB = 1 << 20
SIZE = 16 * MiB


def make_source(tmp: Path, fmt: str = "qcow2") -> Path:
    src = tmp / f"src.{fmt}"
    qemu_img("create", "-q", "-f", fmt, src, str(SIZE))
    qemu_io("-f", fmt, "-c", "write -P 0x11 0 3M", "-c", "write -P 0x22 8M 1M",
            "-c", "write -P 0x33 12M 64k", src, check=True)
    return src


def start(tmp: Path, src: Path, fmt: str = "qcow2") -> QmpdProcess:
    return QmpdProcess(
        tmp, "--blockdev", f"driver={fmt},node-name=src,file.driver=file,file.filename={src}",
        "--nbd-server", f"addr.type=unix,addr.path={tmp}/nbd.sock",
        "--export", "nbd,id=e,node-name=src,name=src,writable=on")


def add_target(qmp: QmpClient, path: Path, fmt: str) -> None:
    qemu_img("create", "-q", "-f", fmt, path, str(SIZE))
    qmp.ok("blockdev-add", {"driver": fmt, "node-name": "tgt",
                            "file": {"driver": "file", "filename": str(path)}})


def image_bytes(path: Path, fmt: str) -> bytes:
    out = path.with_suffix(".out.raw")
    qemu_img("convert", "-U", "-f", fmt, "-O", "raw", path, out)
    return out.read_bytes()


class Writer:
    """Random writes through NBD; ``model`` is what the disk must hold."""

    def __init__(self, client: NbdClient, model: bytearray, seed: int, fua: bool = False
                 ) -> None:
        self.client = client
        self.model = model
        self.rng = random.Random(seed)
        self.fua = fua
        self.stop = asyncio.Event()
        self.count = 0

    async def one(self, slot: int) -> None:
        # Writes in flight together never overlap (each slot keeps to its own
        # quarter): the order of overlapping ones is not defined by NBD.
        length = self.rng.choice([512, 4096, 65536, 100 * 512, 300 * 1024])
        quarter = SIZE // 4
        offset = slot * quarter + self.rng.randrange(0, quarter - length) // 512 * 512
        data = self.rng.randbytes(length)
        await self.client.write(offset, data, fua=self.fua)
        self.model[offset:offset + length] = data
        self.count += 1

    async def run(self) -> None:
        while not self.stop.is_set():
            await asyncio.gather(*(self.one(slot) for slot in range(4)))
            await asyncio.sleep(0.002)


def same(got: bytes, want: bytes) -> None:
    """Equal, or the first differing offset (no diff of megabytes)."""
    if got != want:
        first = next(i for i, (a, b) in enumerate(zip(got, want, strict=False)) if a != b) \
            if len(got) == len(want) else min(len(got), len(want))
        raise AssertionError(f"differ from byte {first} (lengths {len(got)}, {len(want)})")


async def read_all(client: NbdClient) -> bytes:
    parts = [await client.read(off, MiB) for off in range(0, SIZE, MiB)]
    return b"".join(parts)


async def qmp_call(fn: Any, *args: Any) -> Any:
    return await asyncio.to_thread(fn, *args)


@pytest.mark.parametrize("mode", ["background", "write-blocking"])
def test_mirror_pivot_under_writes(tmp_path: Path, mode: str) -> None:
    src = make_source(tmp_path)
    daemon = start(tmp_path, src)
    tgt = tmp_path / "tgt.qcow2"
    try:
        qmp = QmpClient(daemon.sock, 30, negotiate=True)
        add_target(qmp, tgt, "qcow2")

        async def scenario() -> None:
            async with await NbdClient.connect(f"nbd+unix:///src?socket={tmp_path}/nbd.sock") as c:
                model = bytearray(await read_all(c))
                writer = Writer(c, model, seed=7)
                task = asyncio.create_task(writer.run())
                await asyncio.sleep(0.2)
                await qmp_call(qmp.ok, "blockdev-mirror", {
                    "job-id": "m", "device": "src", "target": "tgt", "sync": "full",
                    "copy-mode": mode})
                await qmp_call(qmp.wait_event, "BLOCK_JOB_READY", None, 60)
                first = (await qmp_call(qmp.ok, "query-jobs"))[0]["total-progress"]
                await asyncio.sleep(0.5)
                grown = (await qmp_call(qmp.ok, "query-jobs"))[0]["total-progress"]
                assert grown > first  # total-progress grows as writes arrive
                await qmp_call(qmp.ok, "block-job-complete", {"device": "m"})
                done = await qmp_call(qmp.wait_event, "BLOCK_JOB_COMPLETED", None, 60)
                assert "error" not in done["data"]
                await asyncio.sleep(0.2)  # writes go on, now to the target
                writer.stop.set()
                await task
                assert writer.count > 50
                same(await read_all(c), bytes(model))
                exports = await qmp_call(qmp.ok, "query-block-exports")
                assert exports[0]["node-name"] == "tgt"
                await c.flush()
                same(image_bytes(tgt, "qcow2"), bytes(model))

        asyncio.run(scenario())
        names = [ev["event"] for ev in qmp.events]
        assert "BLOCK_JOB_CANCELLED" not in names
        qmp.close()
    finally:
        daemon.stop()
    qemu_img("check", "-q", tgt)
    qemu_img("check", "-q", src)


def test_write_blocking_write_is_in_the_target_when_acknowledged(tmp_path: Path) -> None:
    src = make_source(tmp_path, "raw")
    daemon = start(tmp_path, src, "raw")
    tgt = tmp_path / "tgt.raw"
    try:
        qmp = QmpClient(daemon.sock, 30, negotiate=True)
        add_target(qmp, tgt, "raw")
        qmp.ok("blockdev-mirror", {"job-id": "m", "device": "src", "target": "tgt",
                                   "sync": "full", "copy-mode": "write-blocking"})
        qmp.wait_event("BLOCK_JOB_READY", timeout=60)

        async def scenario() -> None:
            async with await NbdClient.connect(f"nbd+unix:///src?socket={tmp_path}/nbd.sock") as c:
                rng = random.Random(3)
                with open(tgt, "rb") as f:
                    for _ in range(40):
                        offset = rng.randrange(0, SIZE // 4096) * 4096 + rng.choice([0, 512])
                        data = rng.randbytes(rng.choice([512, 4096, 70000]))
                        await c.write(offset, data)
                        f.seek(offset)
                        same(f.read(len(data)), data)

        asyncio.run(scenario())
        qmp.ok("block-job-cancel", {"device": "m"})
        qmp.wait_event("BLOCK_JOB_COMPLETED")
        qmp.close()
    finally:
        daemon.stop()
    same(tgt.read_bytes(), src.read_bytes())


def test_soft_cancel_of_ready_mirror(tmp_path: Path) -> None:
    src = make_source(tmp_path)
    daemon = start(tmp_path, src)
    tgt = tmp_path / "tgt.qcow2"
    try:
        qmp = QmpClient(daemon.sock, 30, negotiate=True)
        add_target(qmp, tgt, "qcow2")

        async def scenario() -> None:
            async with await NbdClient.connect(f"nbd+unix:///src?socket={tmp_path}/nbd.sock") as c:
                model = bytearray(await read_all(c))
                writer = Writer(c, model, seed=11)
                task = asyncio.create_task(writer.run())
                await qmp_call(qmp.ok, "blockdev-mirror", {
                    "job-id": "m", "device": "src", "target": "tgt", "sync": "full"})
                await qmp_call(qmp.wait_event, "BLOCK_JOB_READY", None, 60)
                await asyncio.sleep(0.3)
                writer.stop.set()
                await task
                await qmp_call(qmp.ok, "block-job-cancel", {"device": "m"})
                await qmp_call(qmp.wait_event, "BLOCK_JOB_COMPLETED", None, 60)
                assert (await qmp_call(qmp.ok, "query-block-exports"))[0]["node-name"] == "src"
                await qmp_call(qmp.ok, "blockdev-del", {"node-name": "tgt"})
                same(image_bytes(tgt, "qcow2"), bytes(model))
                same(await read_all(c), bytes(model))

        asyncio.run(scenario())
        assert "BLOCK_JOB_CANCELLED" not in [ev["event"] for ev in qmp.events]
        qmp.close()
    finally:
        daemon.stop()
    qemu_img("check", "-q", tgt)


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_backup_is_point_in_time(tmp_path: Path, fmt: str) -> None:
    src = make_source(tmp_path, fmt)
    daemon = start(tmp_path, src, fmt)
    tgt = tmp_path / f"tgt.{fmt}"
    try:
        qmp = QmpClient(daemon.sock, 30, negotiate=True)
        add_target(qmp, tgt, fmt)

        async def scenario() -> bytes:
            async with await NbdClient.connect(f"nbd+unix:///src?socket={tmp_path}/nbd.sock") as c:
                before = await read_all(c)
                model = bytearray(before)
                writer = Writer(c, model, seed=5)
                await qmp_call(qmp.ok, "blockdev-backup", {
                    "job-id": "b", "device": "src", "target": "tgt", "sync": "full",
                    "speed": 8 * MiB})
                task = asyncio.create_task(writer.run())
                await qmp_call(qmp.wait_event, "BLOCK_JOB_COMPLETED", None, 60)
                writer.stop.set()
                await task
                assert writer.count > 50
                same(await read_all(c), bytes(model))
                return before

        before = asyncio.run(scenario())
        qmp.ok("blockdev-del", {"node-name": "tgt"})
        same(image_bytes(tgt, fmt), before)
        qmp.close()
    finally:
        daemon.stop()
    if fmt == "qcow2":
        qemu_img("check", "-q", tgt)


def test_kill_9_mid_mirror(tmp_path: Path) -> None:
    src = make_source(tmp_path)
    daemon = start(tmp_path, src)
    tgt = tmp_path / "tgt.qcow2"
    qmp = QmpClient(daemon.sock, 30, negotiate=True)
    add_target(qmp, tgt, "qcow2")

    async def scenario() -> bytes:
        async with await NbdClient.connect(f"nbd+unix:///src?socket={tmp_path}/nbd.sock") as c:
            model = bytearray(await read_all(c))
            writer = Writer(c, model, seed=13, fua=True)
            await qmp_call(qmp.ok, "blockdev-mirror", {
                "job-id": "m", "device": "src", "target": "tgt", "sync": "full",
                "speed": 4 * MiB})
            task = asyncio.create_task(writer.run())
            await asyncio.sleep(1.0)
            writer.stop.set()
            await task
            jobs = await qmp_call(qmp.ok, "query-jobs")
            assert jobs and jobs[0]["status"] == "running"
            daemon.signal(signal.SIGKILL)
            return bytes(model)

    try:
        model = asyncio.run(scenario())
        daemon.wait()
    finally:
        qmp.close()
        daemon.stop()
    qemu_img("check", "-q", src)
    same(image_bytes(src, "qcow2"), model)
