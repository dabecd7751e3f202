"""Images written by QEMU read back through our driver, and QEMU's view of ours.

* qemu-io patterns, zero writes and discards, compressed clusters from
  ``qemu-img convert -c``, internal snapshots: read back identically, and
  ``block_status`` agrees with ``qemu-img map``;
* open errors are QEMU's texts (compared with qemu-io on the same images);
* ``image_info`` is what ``qemu-img info --output=json`` shows;
* a dirty image (lazy refcounts, then a crash) is repaired on a read-write open;
* unknown header extensions are left in place, bitmaps kept.
"""

from __future__ import annotations

import json
import random
import shutil
import struct
from pathlib import Path

import pytest

from qmpd.block.qcow2.create import create_image
from qmpd.block.qcow2.driver import Qcow2Driver
from qmpd.block.qcow2.format import (
    EXT_BITMAPS,
    HeaderExtension,
    build_header_cluster,
    parse_header,
)
from qmpd.block.qcow2.standalone import open_image
from qmpd.errors import GenericError
from tests.interop.test_qcow2_common import (
    assert_clean,
    check,
    opened,
    qemu_img_create,
    qemu_io,
    run,
    to_raw,
    tools,
)

pytestmark = pytest.mark.qemu

MiB = 1 << 20


def _qemu_written(tmp: Path, opts: str) -> Path:
    img = tmp / "q.qcow2"
    qemu_img_create(img, 40 * MiB, opts)
    qemu_io(img, "write -q -P 0x11 0 3M", "write -q -P 0x22 5000000 777777",
            "write -q -z 1M 64k", "write -q -z -u 2M 192k", "discard -q 100k 200k",
            "write -q -P 0x33 20M 4k", "write -q -z 21M 1M", "write -q -P 0x44 39M 1M",
            "discard -q 39M 512k")
    return img


async def _compare_with_map(node: object, img: Path) -> None:
    from qmpd.block.graph import BlockNode

    assert isinstance(node, BlockNode)
    extents = json.loads(run("qemu-img", "map", "--output=json", img).stdout)
    for ext in extents:
        pos = ext["start"]
        end = pos + ext["length"]
        while pos < end:
            st = await node.block_status(pos, end - pos)
            assert st.length > 0
            assert st.allocated == ext["present"], (pos, st, ext)
            assert st.data == ext["data"], (pos, st, ext)
            if not ext["data"]:
                assert st.zero == ext["zero"], (pos, st, ext)
            if "offset" in ext and st.offset is not None:
                assert st.offset == ext["offset"] + (pos - ext["start"]), (pos, st, ext)
            pos += st.length


@pytest.mark.parametrize("opts", [
    "cluster_size=65536", "cluster_size=512,refcount_bits=1", "cluster_size=4096,compat=0.10",
    "cluster_size=2M,refcount_bits=64", "cluster_size=16k,lazy_refcounts=on",
])
async def test_reads_qemu_io_images(tmp_path: Path, opts: str) -> None:
    tools()
    img = _qemu_written(tmp_path, opts)
    want = to_raw(img, tmp_path / "q.raw")
    async with opened(img, read_only=True) as node:
        assert await node.read(0, len(want)) == want
        rng = random.Random(1)
        for _ in range(200):
            off = rng.randrange(len(want))
            n = min(rng.randrange(1, 300000), len(want) - off)
            assert await node.read(off, n) == want[off : off + n]
        await _compare_with_map(node, img)


@pytest.mark.parametrize("cluster_size", ["4096", "65536", "2M"])
async def test_reads_compressed_clusters(tmp_path: Path, cluster_size: str) -> None:
    tools()
    src = tmp_path / "src.raw"
    rng = random.Random(2)
    parts = [b"\x61" * 3 * MiB, rng.randbytes(MiB), bytes(2 * MiB),
             (b"abc" * 100000)[: 3 * MiB], rng.randbytes(12345)]
    src.write_bytes(b"".join(parts))
    img = tmp_path / "c.qcow2"
    run("qemu-img", "convert", "-c", "-f", "raw", "-O", "qcow2", "-o",
        f"cluster_size={cluster_size}", src, img)
    want = src.read_bytes()
    want += bytes(-len(want) % 512)
    async with opened(img, discard_unmap=True) as node:
        assert await node.read(0, node.size()) == want[: node.size()]
        st = await node.block_status(0, node.size())
        assert st.data and st.offset is None  # compressed: no host offset
        # overwrite parts of compressed clusters: COW into normal clusters
        await node.write(100, b"\xff" * 10)
        await node.write(3 * MiB + 5, b"\xee" * 70000)
        await node.write_zeroes(4 * MiB, 8192)
        await node.discard(0, 4 * MiB)  # whole clusters freed
        exp = bytearray(want[: node.size()])
        exp[100:110] = b"\xff" * 10
        exp[3 * MiB + 5 : 3 * MiB + 70005] = b"\xee" * 70000
        exp[4 * MiB : 4 * MiB + 8192] = bytes(8192)
        cs = 4096 if cluster_size == "4096" else 65536 if cluster_size == "65536" else 2 * MiB
        cut = 4 * MiB // cs * cs
        exp[:cut] = bytes(cut)
        assert await node.read(0, node.size()) == bytes(exp)
    assert_clean(img)
    assert to_raw(img, tmp_path / "out.raw") == bytes(exp)


async def test_snapshot_shared_clusters(tmp_path: Path) -> None:
    tools()
    img = tmp_path / "s.qcow2"
    qemu_img_create(img, 16 * MiB, "cluster_size=4096")
    qemu_io(img, "write -q -P 0x11 0 5M", "write -q -P 0x22 8M 1M")
    run("qemu-img", "snapshot", "-c", "snap1", img)
    async with opened(img, discard_unmap=True) as node:
        drv = node.driver
        assert isinstance(drv, Qcow2Driver)
        assert [s["name"] for s in drv.snapshots()] == ["snap1"]
        await node.write(4096 + 100, b"\x99" * 9000)  # COW of shared data and L2 tables
        await node.write_zeroes(8 * MiB, 64 * 1024, may_unmap=True)
        await node.write_zeroes(9 * MiB - 8192, 8192)
        await node.discard(2 * MiB, MiB)
    assert_clean(img)
    snap = to_raw_snapshot(img, tmp_path / "snap.raw", "snap1")
    assert snap[: 5 * MiB] == b"\x11" * 5 * MiB
    assert snap[8 * MiB : 9 * MiB] == b"\x22" * MiB
    cur = to_raw(img, tmp_path / "cur.raw")
    assert cur[4096 + 100 : 4096 + 9100] == b"\x99" * 9000
    assert cur[8 * MiB : 8 * MiB + 65536] == bytes(65536)
    assert cur[2 * MiB : 3 * MiB] == bytes(MiB)
    assert cur[3 * MiB : 5 * MiB] == b"\x11" * 2 * MiB


def to_raw_snapshot(img: Path, raw: Path, name: str) -> bytes:
    run("qemu-img", "convert", "-l", name, "-O", "raw", img, raw)
    return raw.read_bytes()


async def test_dirty_image_is_repaired_on_read_write_open(tmp_path: Path) -> None:
    tools()
    img = tmp_path / "d.qcow2"
    qemu_img_create(img, 64 * MiB, "lazy_refcounts=on,cluster_size=4096")
    # qemu-io's abort leaves the image dirty with stale refcounts
    run("qemu-io", "-c", "write -P 0x44 0 3M", "-c", "write -P 0x45 40M 100k", "-c", "abort",
        img, check=False)
    assert json.loads(run("qemu-img", "info", "--output=json", img).stdout)["dirty-flag"]
    assert check(img).returncode == 2  # stale refcounts are errors for qemu-img check
    async with opened(img, read_only=True) as node:
        drv = node.driver
        assert isinstance(drv, Qcow2Driver)
        assert drv.image_info()["dirty-flag"] is True
        assert await node.read(0, 3 * MiB) == b"\x44" * 3 * MiB
    async with opened(img) as node:
        drv = node.driver
        assert isinstance(drv, Qcow2Driver)
        assert drv.image_info()["dirty-flag"] is False
        await node.write(10 * MiB, b"\x99" * 100000)
    assert_clean(img)
    data = to_raw(img, tmp_path / "d.raw")
    assert data[: 3 * MiB] == b"\x44" * 3 * MiB
    assert data[40 * MiB : 40 * MiB + 102400] == b"\x45" * 102400
    assert data[10 * MiB : 10 * MiB + 100000] == b"\x99" * 100000


def _patched(tmp: Path, name: str, offset: int, value: int, fmt: str = ">Q",
             or_bits: bool = True) -> Path:
    src = tmp / "base.qcow2"
    if not src.exists():
        qemu_img_create(src, 64 * MiB)
    dst = tmp / name
    shutil.copy(src, dst)
    with open(dst, "r+b") as f:
        size = struct.calcsize(fmt)
        f.seek(offset)
        old = struct.unpack(fmt, f.read(size))[0]
        f.seek(offset)
        f.write(struct.pack(fmt, (old | value) if or_bits else value))
    return dst


@pytest.mark.parametrize(("name", "offset", "value", "fmt", "or_bits", "read_only"), [
    ("inc5.qcow2", 72, 1 << 5, ">Q", True, True),
    ("inc56.qcow2", 72, (1 << 5) | (1 << 6), ">Q", True, True),
    ("inc63.qcow2", 72, 1 << 63, ">Q", True, True),
    ("corrupt.qcow2", 72, 2, ">Q", True, False),
    ("datafile.qcow2", 72, 4, ">Q", True, True),
    ("comp.qcow2", 72, 8, ">Q", True, True),
    ("ver4.qcow2", 4, 4, ">I", False, True),
    ("magic.qcow2", 0, 0x12345678, ">I", False, True),
    ("cbits.qcow2", 20, 8, ">I", False, True),
])
async def test_open_errors_match_qemu(tmp_path: Path, name: str, offset: int, value: int,
                                      fmt: str, or_bits: bool, read_only: bool) -> None:
    tools()
    img = _patched(tmp_path, name, offset, value, fmt, or_bits)
    argv = ["qemu-io", "-f", "qcow2", "-c", "read 0 512"]
    proc = run(*argv, img, check=False)
    assert proc.returncode != 0
    prefix = f"qemu-io: can't open device {img}: "
    qemu_msg = (proc.stderr + proc.stdout).strip().splitlines()[0]
    assert qemu_msg.startswith(prefix), qemu_msg
    from qmpd.block.graph import BlockGraph

    graph = BlockGraph(io_threads=2)
    try:
        with pytest.raises(GenericError) as info:
            await open_image(graph, str(img), read_only=False)
        assert str(info.value) == qemu_msg[len(prefix):]
        if not read_only:
            node = await open_image(graph, str(img), read_only=True, node_name="ro")
            assert await node.read(0, 512) == bytes(512)
            await node.driver.close()
    finally:
        graph.close()


@pytest.mark.parametrize("opts", [
    "", "compat=0.10", "lazy_refcounts=on", "refcount_bits=1,cluster_size=4096",
    "BACKING",
])
async def test_image_info_matches_qemu_img(tmp_path: Path, opts: str) -> None:
    tools()
    img = tmp_path / "i.qcow2"
    if opts == "BACKING":
        base = tmp_path / "base.qcow2"
        qemu_img_create(base, MiB)
        qemu_img_create(img, 4 * MiB, "", Path("base.qcow2"), "qcow2")
    else:
        qemu_img_create(img, 4 * MiB, opts)
    qemu = json.loads(run("qemu-img", "info", "--output=json", img).stdout)
    async with opened(img, read_only=True, backing=False) as node:
        drv = node.driver
        assert isinstance(drv, Qcow2Driver)
        ours = drv.image_info()
    for key in ("cluster-size", "dirty-flag", "format-specific", "backing-filename",
                "backing-filename-format"):
        assert ours.get(key) == qemu.get(key), key
    assert list(ours["format-specific"]["data"]) == list(qemu["format-specific"]["data"])
    if opts == "BACKING":
        # qemu-img was given an absolute image path: its full name is absolute too
        assert ours["full-backing-filename"] == qemu["full-backing-filename"]


async def test_our_images_pass_check_and_match_qemu_img_create(tmp_path: Path) -> None:
    tools()
    for cs in (512, 4096, 65536, 2 * MiB):
        for rb in (1, 16, 64):
            ours = tmp_path / f"o-{cs}-{rb}.qcow2"
            create_image(str(ours), 3 << 30, cluster_size=cs, refcount_bits=rb)
            assert_clean(ours)
    ours = tmp_path / "o.qcow2"
    theirs = tmp_path / "t.qcow2"
    create_image(str(ours), 1 << 30)
    qemu_img_create(theirs, 1 << 30)
    assert ours.read_bytes() == theirs.read_bytes()


async def test_unknown_extension_and_bitmaps_left_in_place(tmp_path: Path) -> None:
    tools()
    img = tmp_path / "b.qcow2"
    qemu_img_create(img, 16 * MiB)
    run("qemu-img", "bitmap", "--add", img, "bm0")
    qemu_io(img, "write -q -P 0x10 0 1M")
    # add an unknown extension, the way another program might
    raw = bytearray(img.read_bytes())
    hdr = parse_header(raw[:65536])
    hdr.extensions.append(HeaderExtension(0x51A7E000, b"keep me, please"))
    raw[:65536] = build_header_cluster(hdr, bytes(raw[104 : hdr.header_length]))
    img.write_bytes(raw)
    assert check(img).returncode == 0
    async with opened(img) as node:
        await node.write(2 * MiB, b"\x20" * 70000)
    after = parse_header(img.read_bytes()[:65536])
    types = [e.type for e in after.extensions]
    assert 0x51A7E000 in types and EXT_BITMAPS in types
    assert [e.data for e in after.extensions if e.type == 0x51A7E000] == [b"keep me, please"]
    # the bitmap is kept (issue 11): autoclear bit set, stored, not in use
    assert after.autoclear_features == 1
    info = run("qemu-img", "info", "--output=json", img)
    assert "inconsistent" not in info.stderr
    (bitmap,) = json.loads(info.stdout)["format-specific"]["data"]["bitmaps"]
    assert bitmap["name"] == "bm0" and bitmap["flags"] == ["auto"]
    assert check(img).returncode == 0
    data = to_raw(img, tmp_path / "b.raw")
    assert data[:MiB] == b"\x10" * MiB and data[2 * MiB : 2 * MiB + 70000] == b"\x20" * 70000


async def test_truncate_interop(tmp_path: Path) -> None:
    tools()
    img = tmp_path / "t.qcow2"
    qemu_img_create(img, 4 * MiB, "cluster_size=4096")
    qemu_io(img, "write -q -P 0x33 0 4M")
    async with opened(img) as node:
        drv = node.driver
        assert isinstance(drv, Qcow2Driver)
        await drv.truncate(100 * MiB)
        await node.write(99 * MiB, b"\x34" * 4096)
        await drv.truncate(2 * MiB + 512)
    assert_clean(img)
    info = json.loads(run("qemu-img", "info", "--output=json", img).stdout)
    assert info["virtual-size"] == 2 * MiB + 512
    assert to_raw(img, tmp_path / "t.raw") == b"\x33" * (2 * MiB + 512)
