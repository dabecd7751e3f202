"""A full file system under a writable NBD export: ENOSPC, no corruption, recovery.

A qcow2 (or raw) image lives on a small tmpfs (mounted for the test: root only; the
test skips with the reason otherwise).  Writes through NBD fill it until the
file system is full, then:

* the clients see ENOSPC (NBD error 28, qemu-io's "No space left on
  device"), as with qemu-storage-daemon, never EIO;
* every write that was acknowledged reads back, before and after a restart;
* the daemon logs the cause once, not one line or traceback per request;
* once space is freed (a filler file deleted), writes succeed again;
* ``qemu-img check`` finds the image clean.
"""

from __future__ import annotations

import asyncio
import os
import random
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from qmpd.nbd import protocol as p
from qmpd.nbd.client import NbdClient, NbdError
from tests.conftest import QmpdProcess, require_tool

MiB = 1 << 20
KiB = 1 << 10
#: The tmpfs, the virtual disk (much larger), and what a filler file keeps back.
FS_SIZE = 6 * MiB
DISK_SIZE = 32 * MiB
FILLER = 2 * MiB


def run(*argv: str | Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=60)
    if check:
        assert result.returncode == 0, (argv, result.stdout, result.stderr)
    return result


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A fresh tmpfs of FS_SIZE bytes."""
    mount = require_tool("mount")
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    where = tmp_path / "fs"
    where.mkdir()
    result = run(mount, "-t", "tmpfs", "-o", f"size={FS_SIZE}", "tmpfs", where, check=False)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
    try:
        yield where
    finally:
        run(require_tool("umount"), "-l", where, check=False)


class Model:
    """What the disk must contain: acknowledged writes; failed ones taint their range."""

    def __init__(self, size: int) -> None:
        self.data = bytearray(size)
        self.tainted = bytearray(size)

    def written(self, offset: int, data: bytes) -> None:
        self.data[offset : offset + len(data)] = data
        self.tainted[offset : offset + len(data)] = bytes(len(data))

    def failed(self, offset: int, length: int) -> None:
        self.tainted[offset : offset + length] = b"\1" * length

    def check(self, actual: bytes) -> None:
        assert len(actual) == len(self.data)
        for start in range(0, len(actual), 64 * KiB):
            end = start + 64 * KiB
            want = self.data[start:end]
            got = bytearray(actual[start:end])
            taint = self.tainted[start:end]
            if taint.count(0) != len(taint):
                for i, t in enumerate(taint):
                    if t:
                        got[i] = want[i]
            assert bytes(got) == bytes(want), f"acknowledged data lost at {start:#x}"


async def fill(url: str, model: Model, rng: random.Random, rounds: int) -> list[int]:
    """Random writes (many new clusters, so new L2 tables and refcount blocks) until
    ``rounds`` of them have failed; the NBD errors seen."""
    errors: list[int] = []
    async with await NbdClient.connect(url) as c:
        while len(errors) < rounds:
            length = rng.choice([512, 4 * KiB, 60 * KiB, 256 * KiB])
            offset = rng.randrange(0, DISK_SIZE - length, 512)
            data = rng.randbytes(length)
            try:
                await c.write(offset, data, fua=rng.random() < 0.2)
            except NbdError as exc:
                errors.append(exc.errno)
                model.failed(offset, length)
            else:
                model.written(offset, data)
        await c.flush()
    return errors


async def read_all(url: str) -> bytes:
    async with await NbdClient.connect(url) as c:
        parts = [await c.read(off, 4 * MiB) for off in range(0, DISK_SIZE, 4 * MiB)]
    return b"".join(parts)


def start(tmp: Path, image: Path, sock: Path, fmt: str) -> QmpdProcess:
    return QmpdProcess(
        tmp,
        "--blockdev", f"driver=file,node-name=f,filename={image}",
        "--blockdev", f"driver={fmt},node-name=disk,file=f",
        "--nbd-server", f"addr.type=unix,addr.path={sock}",
        "--export", "type=nbd,id=e,node-name=disk,writable=on",
    )


@pytest.mark.parametrize("fmt", ["qcow2", "raw"])
def test_enospc_reaches_clients_and_recovers(small_fs: Path, tmp_path: Path, fmt: str) -> None:
    qemu_img, qemu_io = require_tool("qemu-img"), require_tool("qemu-io")
    image = small_fs / f"disk.{fmt}"
    opts = ["-o", "cluster_size=4096"] if fmt == "qcow2" else []
    run(qemu_img, "create", "-q", "-f", fmt, *opts, image, DISK_SIZE)
    filler = small_fs / "filler"
    filler.write_bytes(b"\xff" * FILLER)
    sock = tmp_path / "nbd.sock"
    url = f"nbd+unix:///disk?socket={sock}"
    model = Model(DISK_SIZE)
    rng = random.Random(8)
    daemon = start(tmp_path, image, sock, fmt)
    try:
        # qemu-io sees the errno QEMU's clients see with qemu-storage-daemon.
        result = run(qemu_io, "-f", "raw", "-c", "write -P 0x5a 0 8M", url, check=False)
        assert "write failed: No space left on device" in result.stdout + result.stderr
        model.failed(0, 8 * MiB)
        errors = asyncio.run(fill(url, model, rng, rounds=20))
        assert set(errors) == {p.Errno.ENOSPC}
        model.check(asyncio.run(read_all(url)))
        # Space comes back: writes succeed again, on the same connection type.
        filler.unlink()
        asyncio.run(write_more(url, model, rng))
        model.check(asyncio.run(read_all(url)))
        log = daemon.read_stderr()
        assert "Traceback" not in log
        # One line for the cause (and, should the test take over a minute,
        # one summary line), not one per failed request.
        lines = [line for line in log.splitlines() if "No space left on device" in line]
        assert lines[0].endswith("NBD write on export e: No space left on device (ENOSPC)")
        assert len(lines) <= 2 and all("more since the last report" in x for x in lines[1:])
    finally:
        daemon.stop()
    if fmt == "qcow2":
        check = run(qemu_img, "check", image, check=False)
        assert check.returncode == 0, check.stdout + check.stderr
    daemon = start(tmp_path, image, sock, fmt)
    try:
        model.check(asyncio.run(read_all(url)))
    finally:
        daemon.stop()


async def write_more(url: str, model: Model, rng: random.Random) -> None:
    async with await NbdClient.connect(url) as c:
        for _ in range(8):
            offset = rng.randrange(0, DISK_SIZE - 64 * KiB, 4 * KiB)
            data = rng.randbytes(64 * KiB)
            await c.write(offset, data)
            model.written(offset, data)
        await c.flush()
