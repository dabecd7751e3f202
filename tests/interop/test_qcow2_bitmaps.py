"""qcow2 persistent dirty bitmaps against QEMU's tools (issue 11).

Images carry bitmaps made by ``qemu-img bitmap`` and written by ``qemu-io``;
qmpd opens them, writes, closes.  ``qemu-img info`` must then show the same
bitmaps not in use, ``qemu-img check`` must be clean, and the dirty
clusters read back by ``qemu-nbd`` + ``nbdinfo --map`` must match a model
of the writes.  A crash (the process killed while open read-write) leaves
them in-use, and a reopen reports them inconsistent.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qmpd.block.graph import BlockGraph
from qmpd.block.qcow2.driver import Qcow2Driver
from qmpd.block.qcow2.standalone import close_image, open_image
from qmpd.errors import GenericError
from tests.conftest import require_tool
from tests.interop.test_qcow2_common import (
    assert_clean,
    check,
    opened,
    qemu_img_create,
    qemu_io,
    run,
    tools,
)

pytestmark = pytest.mark.qemu

KiB = 1 << 10
MiB = 1 << 20


def info_bitmaps(img: Path, *extra: str) -> dict[str, dict[str, object]]:
    out = json.loads(run("qemu-img", "info", "--output=json", *extra, img).stdout)
    data = out.get("format-specific", {}).get("data", {})
    return {b["name"]: {"flags": sorted(b["flags"]), "granularity": b["granularity"]}
            for b in data.get("bitmaps", [])}


def dirty_map(img: Path, name: str, tmp: Path) -> list[tuple[int, int]]:
    """The bitmap's dirty extents as qemu-nbd serves them (read-only export)."""
    require_tool("qemu-nbd")
    require_tool("nbdinfo")
    sock = tmp / f"nbd-{name}.sock"
    proc = subprocess.Popen(["qemu-nbd", "-r", "-f", "qcow2", "-B", name, "-k", str(sock),
                             str(img)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        for _ in range(200):
            if sock.exists():
                break
            time.sleep(0.05)
        out = subprocess.run(["nbdinfo", f"--map=qemu:dirty-bitmap:{name}",
                              f"nbd+unix:///?socket={sock}"],
                             capture_output=True, text=True, check=True, timeout=30).stdout
    finally:
        proc.terminate()
        proc.wait(10)
    extents = []
    for line in out.splitlines():
        offset, length, kind = line.split()[:3]
        if int(kind) & 1:
            extents.append((int(offset), int(length)))
    return extents


def model(writes: list[tuple[int, int]], granularity: int, size: int) -> list[tuple[int, int]]:
    """The dirty extents ``writes`` leave in a bitmap of ``granularity``."""
    dirty = set()
    for offset, length in writes:
        dirty.update(range(offset // granularity, (offset + length - 1) // granularity + 1))
    out: list[tuple[int, int]] = []
    for k in sorted(dirty):
        start = k * granularity
        stop = min(start + granularity, size)
        if out and out[-1][0] + out[-1][1] == start:
            out[-1] = (out[-1][0], stop - out[-1][0])
        else:
            out.append((start, stop - start))
    return out


def _image_with_bitmaps(tmp: Path) -> Path:
    img = tmp / "b.qcow2"
    qemu_img_create(img, 16 * MiB)
    run("qemu-img", "bitmap", "--add", img, "bm0")
    run("qemu-img", "bitmap", "--add", "-g", "128k", img, "off")
    qemu_io(img, "write -q -P 0x10 0 70k", "write -q -P 0x11 3M 4k")
    run("qemu-img", "bitmap", "--disable", img, "off")
    return img


async def test_bitmaps_survive_a_write_and_record_it(tmp_path: Path) -> None:
    tools()
    img = _image_with_bitmaps(tmp_path)
    before = info_bitmaps(img)
    assert before == {"bm0": {"flags": ["auto"], "granularity": 65536},
                      "off": {"flags": [], "granularity": 131072}}
    async with opened(img) as node:
        bms = node.dirty_bitmaps
        assert list(bms) == ["bm0", "off"]
        assert bms["bm0"].persistent and bms["bm0"].recording
        assert not bms["off"].recording and not bms["off"].inconsistent
        assert bms["bm0"].count() == 3 * 65536  # 0..70k: 2 granules, 3M: 1
        # while open read-write, QEMU's tools see them in use
        assert all("in-use" in b["flags"] for b in info_bitmaps(img, "-U").values())
        await node.write(5 * MiB, b"\x20" * 70000)
        await node.write_zeroes(9 * MiB + 1, 10)
    after = info_bitmaps(img)
    assert after == before
    assert_clean(img)
    assert dirty_map(img, "bm0", tmp_path) == model(
        [(0, 70 * KiB), (3 * MiB, 4 * KiB), (5 * MiB, 70000), (9 * MiB + 1, 10)], 65536,
        16 * MiB)
    # disabled: what qemu-io wrote while it was enabled, nothing of ours
    assert dirty_map(img, "off", tmp_path) == model([(0, 70 * KiB), (3 * MiB, 4 * KiB)],
                                                    131072, 16 * MiB)
    # and a second open/close cycle reads back what we stored
    async with opened(img) as node:
        assert node.dirty_bitmaps["bm0"].count() == 6 * 65536
        await node.write(12 * MiB, b"x" * 512)
    assert dirty_map(img, "bm0", tmp_path)[-1] == (12 * MiB, 65536)
    assert_clean(img)


async def test_read_only_open_leaves_the_image_alone(tmp_path: Path) -> None:
    tools()
    img = _image_with_bitmaps(tmp_path)
    raw = img.read_bytes()
    async with opened(img, read_only=True) as node:
        assert node.dirty_bitmaps["bm0"].count() == 3 * 65536
        assert info_bitmaps(img, "-U")["bm0"]["flags"] == ["auto"]
    assert img.read_bytes() == raw


async def test_negative_control_cleared_autoclear_bit_is_caught(tmp_path: Path) -> None:
    """What the checks above catch: an image whose bitmaps autoclear bit was
    cleared (as qmpd did before) has its bitmaps dropped by QEMU."""
    tools()
    img = _image_with_bitmaps(tmp_path)
    with img.open("r+b") as f:
        f.seek(88)
        value = struct.unpack(">Q", f.read(8))[0]
        f.seek(88)
        f.write(struct.pack(">Q", value & ~1))
    proc = run("qemu-img", "info", img)
    assert "bitmaps are now considered inconsistent" in proc.stderr
    assert info_bitmaps(img) == {}


async def test_new_persistent_bitmap_is_stored_and_removed(tmp_path: Path) -> None:
    tools()
    img = tmp_path / "n.qcow2"
    qemu_img_create(img, 8 * MiB)
    from qmpd.block.dirty_bitmap import DirtyBitmap
    async with opened(img) as node:
        drv = node.driver
        assert isinstance(drv, Qcow2Driver)
        drv.can_store_new_bitmap("new", 65536)
        with pytest.raises(GenericError, match="Granularity is under minimum"):
            drv.can_store_new_bitmap("x", 256)
        with pytest.raises(GenericError, match="Name length exceeds maximum"):
            drv.can_store_new_bitmap("x" * 1024, 65536)
        node.dirty_bitmaps["new"] = DirtyBitmap("new", node.size(), 65536, persistent=True)
        await node.write(MiB, b"y" * 4096)
    assert info_bitmaps(img) == {"new": {"flags": ["auto"], "granularity": 65536}}
    assert dirty_map(img, "new", tmp_path) == [(MiB, 65536)]
    assert_clean(img)
    async with opened(img) as node:
        drv = node.driver
        assert isinstance(drv, Qcow2Driver)
        with pytest.raises(GenericError, match="Bitmap with the same name is already stored"):
            drv.can_store_new_bitmap("new", 65536)
        del node.dirty_bitmaps["new"]
        await drv.remove_persistent_bitmap("new")
    assert info_bitmaps(img) == {}
    assert_clean(img)


async def test_v2_image_refuses_persistent_bitmaps(tmp_path: Path) -> None:
    tools()
    img = tmp_path / "v2.qcow2"
    qemu_img_create(img, 8 * MiB, "compat=0.10")
    async with opened(img) as node:
        drv = node.driver
        assert isinstance(drv, Qcow2Driver)
        with pytest.raises(GenericError, match=r"^Can't make bitmap 'b' persistent in '.*': "
                           r"Cannot store dirty bitmaps in qcow2 v2 files$"):
            drv.can_store_new_bitmap("b", 65536)


_CRASHER = """
import asyncio, os, sys
from qmpd.block.graph import BlockGraph
from qmpd.block.qcow2.standalone import open_image

async def main():
    graph = BlockGraph(io_threads=2)
    node = await open_image(graph, sys.argv[1])
    await node.write(5 * 1024 * 1024, b"z" * 4096)
    await node.flush()
    print("ready", flush=True)
    await asyncio.sleep(60)

asyncio.run(main())
"""


async def test_kill_while_open_leaves_bitmaps_inconsistent(tmp_path: Path) -> None:
    tools()
    img = _image_with_bitmaps(tmp_path)
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    proc = subprocess.Popen([sys.executable, "-c", _CRASHER, str(img)], stdout=subprocess.PIPE,
                            env=env, text=True)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    bitmaps = info_bitmaps(img)
    assert bitmaps["bm0"]["flags"] == ["auto", "in-use"]
    assert bitmaps["off"]["flags"] == ["in-use"]
    assert check(img).returncode == 0  # in-use bitmaps are no error
    graph = BlockGraph(io_threads=2)
    try:
        node = await open_image(graph, str(img))
        bm = node.dirty_bitmaps["bm0"]
        assert bm.inconsistent and not bm.recording and bm.count() == 0 and bm.persistent
        await node.write(0, b"a" * 512)
        assert bm.count() == 0
        await close_image(node)
    finally:
        graph.close()
    # an inconsistent bitmap is not stored: it stays in-use on disk
    assert info_bitmaps(img)["bm0"]["flags"] == ["auto", "in-use"]
    assert_clean(img)


async def test_resize_keeps_bitmaps_valid(tmp_path: Path) -> None:
    tools()
    img = _image_with_bitmaps(tmp_path)
    async with opened(img) as node:
        drv = node.driver
        assert isinstance(drv, Qcow2Driver)
        await drv.truncate(64 * MiB)
        await node.write(60 * MiB, b"q" * 512)
    assert info_bitmaps(img)["bm0"]["flags"] == ["auto"]
    assert_clean(img)
    assert dirty_map(img, "bm0", tmp_path) == model(
        [(0, 70 * KiB), (3 * MiB, 4 * KiB), (60 * MiB, 512)], 65536, 64 * MiB)
    async with opened(img) as node:
        drv = node.driver
        assert isinstance(drv, Qcow2Driver)
        await drv.truncate(2 * MiB)
    assert_clean(img)
    assert dirty_map(img, "bm0", tmp_path) == [(0, 2 * 65536)]


#: case -> how to break the first directory entry (offset in it, struct, value),
#: or the extension's data for the "ext-" cases
BROKEN = {
    "type": (16, ">B", 2),
    "granularity": (17, ">B", 8),
    "flags": (12, ">I", 4),
    "table-size": (8, ">I", 0),
    "extra-data": (20, ">I", 8),
    "ext-more": (0, ">I", 2),
    "ext-zero": (0, ">I", 0),
    "ext-reserved": (4, ">I", 1),
    "ext-dir-offset": (20, ">I", 4096 + 512),
}


@pytest.mark.parametrize("case", list(BROKEN))
async def test_broken_directory_refused_as_qemu(tmp_path: Path, case: str) -> None:
    tools()
    img = tmp_path / f"{case}.qcow2"
    qemu_img_create(img, 16 * MiB)
    run("qemu-img", "bitmap", "--add", img, "b0")
    raw = bytearray(img.read_bytes())
    offset = struct.unpack_from(">I", raw, 100)[0]
    while struct.unpack_from(">I", raw, offset)[0] != 0x23852875:
        offset += 8 + (struct.unpack_from(">I", raw, offset + 4)[0] + 7 & ~7)
    directory = struct.unpack_from(">Q", raw, offset + 8 + 16)[0]
    where, fmt, value = BROKEN[case]
    struct.pack_into(fmt, raw, (offset + 8 if case.startswith("ext-") else directory) + where,
                     value)
    img.write_bytes(raw)
    theirs = run("qemu-io", "-f", "qcow2", "-c", "read 0 512", img, check=False)
    assert theirs.returncode != 0
    graph = BlockGraph(io_threads=2)
    try:
        with pytest.raises(GenericError) as exc:
            await open_image(graph, str(img))
    finally:
        graph.close()
    assert theirs.stderr.strip() == f"qemu-io: can't open device {img}: {exc.value.desc}"


async def test_random_writes_dirty_the_same_as_qemu_io(tmp_path: Path) -> None:
    """Differential: the same random writes through qemu-io (QEMU's own
    bitmap code) and through qmpd leave the same dirty extents."""
    tools()
    base = tmp_path / "base.qcow2"
    qemu_img_create(base, 32 * MiB, "cluster_size=16384")
    for name, gran in (("g64k", "65536"), ("g512", "512"), ("g1m", "1M")):
        run("qemu-img", "bitmap", "--add", "-g", gran, base, name)
    rng = random.Random(11)
    ops = []
    for _ in range(60):
        offset = rng.randrange(0, 32 * MiB - 300 * KiB)
        length = rng.choice([1, 512, 4096, 65536, rng.randrange(1, 300 * KiB)])
        ops.append((rng.random() < 0.3, offset, length))
    theirs, ours = tmp_path / "theirs.qcow2", tmp_path / "ours.qcow2"
    shutil.copy(base, theirs)
    shutil.copy(base, ours)
    qemu_io(theirs, *(f"write -q {'-z ' if zero else ''}{offset} {length}"
                      for zero, offset, length in ops))
    async with opened(ours) as node:
        for zero, offset, length in ops:
            if zero:
                await node.write_zeroes(offset, length)
            else:
                await node.write(offset, b"\xcd" * length)
    assert info_bitmaps(ours) == info_bitmaps(theirs)
    assert_clean(ours)
    for name in ("g64k", "g512", "g1m"):
        assert dirty_map(ours, name, tmp_path) == dirty_map(theirs, name, tmp_path), name


async def test_migrating_bitmap_is_not_stored(tmp_path: Path) -> None:
    """With the dirty-bitmaps capability the stream carries a persistent
    bitmap: QEMU does not store it, the image keeps it in-use."""
    tools()
    img = _image_with_bitmaps(tmp_path)
    async with opened(img) as node:
        node.dirty_bitmaps["bm0"].migration = True
        await node.write(0, b"m" * 512)
    assert info_bitmaps(img) == {"bm0": {"flags": ["auto", "in-use"], "granularity": 65536},
                                 "off": {"flags": [], "granularity": 131072}}
    assert_clean(img)


async def test_qemu_img_bitmap_edits_what_we_stored(tmp_path: Path) -> None:
    tools()
    img = _image_with_bitmaps(tmp_path)
    async with opened(img) as node:
        await node.write(8 * MiB, b"w" * 4096)
    run("qemu-img", "bitmap", "--merge", "bm0", "--enable", img, "off")
    run("qemu-img", "bitmap", "--add", img, "extra")
    run("qemu-img", "bitmap", "--clear", img, "bm0")
    assert_clean(img)
    async with opened(img) as node:
        bms = node.dirty_bitmaps
        assert list(bms) == ["bm0", "off", "extra"]
        assert bms["bm0"].count() == 0 and bms["bm0"].recording
        assert bms["off"].recording
        # 0..70k, 3M and 8M at 128k granules
        assert bms["off"].dirty_extents(0, 16 * MiB) == [
            (0, 131072), (3 * MiB, 131072), (8 * MiB, 131072)]
        await node.write(MiB, b"v" * 512)
    run("qemu-img", "bitmap", "--remove", img, "off")
    assert info_bitmaps(img) == {"bm0": {"flags": ["auto"], "granularity": 65536},
                                 "extra": {"flags": ["auto"], "granularity": 65536}}
    assert dirty_map(img, "bm0", tmp_path) == [(MiB, 65536)]
    assert dirty_map(img, "extra", tmp_path) == [(MiB, 65536)]
    assert_clean(img)
