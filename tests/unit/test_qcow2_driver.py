"""The qcow2 driver on images made in Python (no QEMU tools needed)."""

from __future__ import annotations

import asyncio
import os
import random
import struct
import tracemalloc
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from qmpd.block.driver import BlockDriverError
from qmpd.block.graph import BlockGraph, BlockNode, NodeState
from qmpd.block.qcow2.create import create_image
from qmpd.block.qcow2.driver import Qcow2Driver
from qmpd.block.qcow2.format import (
    INCOMPAT_CORRUPT,
    QCOW_OFLAG_COPIED,
    ClusterType,
)
from qmpd.block.qcow2.format import cluster_type as entry_type
from qmpd.block.qcow2.standalone import close_image, open_image
from qmpd.errors import GenericError

MiB = 1 << 20


@pytest.fixture
async def graph() -> AsyncIterator[BlockGraph]:
    g = BlockGraph(io_threads=4)
    yield g
    g.close()


def drv(node: BlockNode) -> Qcow2Driver:
    d = node.driver
    assert isinstance(d, Qcow2Driver)
    return d


async def entry_of(node: BlockNode, offset: int) -> int:
    img = drv(node).image
    assert img is not None
    return int((await img.entries(offset >> img.cluster_bits, 1))[0])


async def test_write_read_reopen(tmp_path: Path, graph: BlockGraph) -> None:
    path = tmp_path / "a.qcow2"
    create_image(str(path), 64 * MiB)
    node = await open_image(graph, str(path))
    data = os.urandom(300_000)
    await node.write(65536 * 3 + 123, data)
    assert await node.read(65536 * 3 + 123, len(data)) == data
    assert await node.read(0, 4096) == bytes(4096)
    e = await entry_of(node, 65536 * 3)
    assert e & QCOW_OFLAG_COPIED and entry_type(e) == ClusterType.NORMAL
    await close_image(node)
    node = await open_image(graph, str(path), read_only=True)
    assert await node.read(65536 * 3 + 123, len(data)) == data
    await close_image(node)


async def test_v3_zero_and_discard_semantics(tmp_path: Path, graph: BlockGraph) -> None:
    path = tmp_path / "z.qcow2"
    create_image(str(path), 16 * MiB)
    node = await open_image(graph, str(path), discard_unmap=True)
    await node.write(0, b"\x55" * (4 * 65536))
    # write_zeroes without unmap keeps the cluster (ZERO_ALLOC)
    await node.write_zeroes(0, 65536)
    assert entry_type(await entry_of(node, 0)) == ClusterType.ZERO_ALLOC
    # with unmap the cluster is released (ZERO_PLAIN)
    await node.write_zeroes(65536, 65536, may_unmap=True)
    assert entry_type(await entry_of(node, 65536)) == ClusterType.ZERO_PLAIN
    # a partial zero write into a data cluster writes zeros as data
    await node.write_zeroes(2 * 65536 + 100, 200)
    assert entry_type(await entry_of(node, 2 * 65536)) == ClusterType.NORMAL
    # discard: partial clusters are ignored, whole ones read as zero
    await node.discard(3 * 65536 + 512, 1024)
    assert await node.read(3 * 65536, 65536) == b"\x55" * 65536
    await node.discard(3 * 65536, 65536)
    assert entry_type(await entry_of(node, 3 * 65536)) == ClusterType.ZERO_PLAIN
    assert await node.read(0, 4 * 65536) == (
        bytes(2 * 65536) + b"\x55" * 100 + bytes(200) + b"\x55" * (65536 - 300) + bytes(65536))
    # writing into a ZERO_ALLOC cluster reuses it in place
    host = await entry_of(node, 0)
    await node.write(1000, b"\x66" * 10)
    assert await entry_of(node, 0) == (host & ~1) | QCOW_OFLAG_COPIED
    assert await node.read(0, 2000) == bytes(1000) + b"\x66" * 10 + bytes(990)
    st = await node.block_status(0, 16 * MiB)
    assert st.data and not st.zero and st.allocated
    st = await node.block_status(65536, 16 * MiB - 65536)
    assert st.zero and not st.data and st.allocated and st.length == 65536
    st = await node.block_status(4 * 65536, 16 * MiB - 4 * 65536)
    assert not st.allocated and st.zero and st.length == 16 * MiB - 4 * 65536
    await close_image(node)


async def test_v2_writes_real_zeros(tmp_path: Path, graph: BlockGraph) -> None:
    path = tmp_path / "v2.qcow2"
    create_image(str(path), 8 * MiB, version=2)
    node = await open_image(graph, str(path), discard_unmap=True)
    await node.write_zeroes(0, 65536, may_unmap=True)
    assert entry_type(await entry_of(node, 0)) == ClusterType.NORMAL
    await node.write(65536, b"\x01" * 65536)
    await node.discard(65536, 65536)  # no backing: becomes unallocated
    assert entry_type(await entry_of(node, 65536)) == ClusterType.UNALLOCATED
    assert await node.read(0, 2 * 65536) == bytes(2 * 65536)
    info = drv(node).image_info()
    assert info["format-specific"] == {
        "type": "qcow2", "data": {"compat": "0.10", "compression-type": "zlib",
                                  "refcount-bits": 16}}
    await close_image(node)


async def test_backing_reads_and_cow(tmp_path: Path, graph: BlockGraph) -> None:
    base = tmp_path / "base.raw"
    base.write_bytes(b"\xab" * (MiB + 1000))  # shorter than the overlay
    top = tmp_path / "top.qcow2"
    create_image(str(top), 4 * MiB, backing_file="base.raw", backing_format="raw")
    node = await open_image(graph, str(top), discard_unmap=True)
    d = drv(node)
    assert d.raw_backing_file_name() == "base.raw"
    assert d.backing_file_name() == str(tmp_path / "base.raw")
    assert d.backing_format() == "raw"
    info = d.image_info()
    assert info["backing-filename"] == "base.raw"
    assert info["full-backing-filename"] == str(tmp_path / "base.raw")
    assert info["backing-filename-format"] == "raw"
    assert node.backing is not None
    # past the backing file's end: zeros
    assert await node.read(MiB, 2000) == b"\xab" * 1000 + bytes(1000)
    st = await node.block_status(0, 4 * MiB)
    # the backing node's length is in whole sectors, as QEMU's bdrv_getlength
    assert not st.allocated and not st.zero and st.length == MiB + 1024
    # a partial write copies the rest of the cluster from the backing file
    await node.write(100, b"\x01" * 10)
    assert await node.read(0, 65536) == b"\xab" * 100 + b"\x01" * 10 + b"\xab" * (65536 - 110)
    # discard on v3 with a backing file stores zero clusters
    await node.discard(65536, 65536)
    assert await node.read(65536, 65536) == bytes(65536)
    assert entry_type(await entry_of(node, 65536)) == ClusterType.ZERO_PLAIN
    await close_image(node)


async def test_discard_ignored_without_discard_unmap(tmp_path: Path, graph: BlockGraph
                                                     ) -> None:
    path = tmp_path / "d.qcow2"
    create_image(str(path), 4 * MiB)
    node = await open_image(graph, str(path))
    await node.write(0, b"\x01" * 65536)
    await node.discard(0, 65536)
    assert await node.read(0, 65536) == b"\x01" * 65536
    await close_image(node)


async def test_concurrent_writes_same_cluster(tmp_path: Path, graph: BlockGraph) -> None:
    path = tmp_path / "c.qcow2"
    create_image(str(path), 16 * MiB, cluster_size=65536)
    node = await open_image(graph, str(path))
    rng = random.Random(3)
    expect = bytearray(16 * MiB)
    writes = []
    for k in range(64):
        off = (k * 4096) % (4 * 65536) + rng.randrange(0, 4 * MiB, 4 * 65536)
        data = bytes([k + 1]) * 4096
        writes.append(node.write(off, data))
        expect[off : off + 4096] = data
    await asyncio.gather(*writes)
    assert await node.read(0, 16 * MiB) == bytes(expect)
    await close_image(node)


async def test_unknown_autoclear_bits_cleared_on_rw_open(tmp_path: Path, graph: BlockGraph
                                                         ) -> None:
    path = tmp_path / "ac.qcow2"
    create_image(str(path), 8 * MiB)
    with open(path, "r+b") as f:
        f.seek(88)
        f.write(struct.pack(">Q", (1 << 5) | 1))
        f.seek(80)
        f.write(struct.pack(">Q", 1 << 7))
    node = await open_image(graph, str(path), read_only=True)
    await close_image(node)
    assert struct.unpack_from(">Q", path.read_bytes(), 88)[0] == (1 << 5) | 1
    node = await open_image(graph, str(path))
    await close_image(node)
    raw = path.read_bytes()
    # the unknown bit goes, the bitmaps bit stays (qemu-io 7.2 leaves 1 here too)
    assert struct.unpack_from(">Q", raw, 88)[0] == 1
    assert struct.unpack_from(">Q", raw, 80)[0] == 1 << 7  # compatible bits untouched


async def test_open_errors(tmp_path: Path, graph: BlockGraph) -> None:
    path = tmp_path / "e.qcow2"
    path.write_bytes(bytes(8192))
    with pytest.raises(GenericError, match=r"^Image is not in qcow2 format$"):
        await open_image(graph, str(path), node_name="e1")
    create_image(str(path), 8 * MiB)
    with open(path, "r+b") as f:
        f.seek(72)
        f.write(struct.pack(">Q", INCOMPAT_CORRUPT))
    with pytest.raises(GenericError,
                       match=r"^qcow2: Image is corrupt; cannot be opened read/write$"):
        await open_image(graph, str(path), node_name="e2")
    node = await open_image(graph, str(path), node_name="e3", read_only=True)
    assert drv(node).image_info()["format-specific"]["data"]["corrupt"] is True
    await close_image(node)
    create_image(str(path), 8 * MiB, version=2)
    with pytest.raises(GenericError, match=r"^Lazy refcounts require"):
        await open_image(graph, str(path), node_name="e4", options={"lazy-refcounts": True})
    with pytest.raises(GenericError, match=r"^L2 cache entry size must be a power of two"):
        await open_image(graph, str(path), node_name="e5", options={"l2-cache-entry-size": 100})
    with pytest.raises(GenericError, match=r"^Cache clean interval too big$"):
        await open_image(graph, str(path), node_name="e6",
                         options={"cache-clean-interval": 2**32})


async def test_inactivate_refuses_writes_and_invalidate_reloads(tmp_path: Path) -> None:
    """Two owners of one file, handing over like a migration (no QEMU tools)."""
    path = tmp_path / "m.qcow2"
    create_image(str(path), 1024 * MiB)
    g1 = BlockGraph(io_threads=2)
    g2 = BlockGraph(io_threads=2)
    try:
        a = await open_image(g1, str(path), node_name="a", locking="off")
        await a.write(0, b"\x11" * 65536)
        assert await a.read(MiB, 4096) == bytes(4096)  # caches the L2 slice
        assert await a.read(600 * MiB, 4096) == bytes(4096)
        await drv(a).inactivate()
        a.state = NodeState.INACTIVE
        with pytest.raises(BlockDriverError):
            await drv(a).write(0, b"x")
        b = await open_image(g2, str(path), node_name="b", locking="off")
        await b.write(MiB, b"\x22" * 4096)  # new cluster, cached L2 table
        await b.write(600 * MiB, b"\x33" * 4096)  # new L2 table
        await close_image(b)
        assert await drv(a).read(MiB, 4096) == bytes(4096)  # the driver's cache: stale
        # Through the node, an inactive node re-reads its metadata (refresh_inactive).
        assert await a.read(600 * MiB, 4096) == b"\x33" * 4096
        assert await drv(a).read(2 * MiB, 4096) == bytes(4096)  # caches the L2 slice
        b2 = await open_image(g2, str(path), node_name="b2", locking="off")
        await b2.write(2 * MiB, b"\x55" * 4096)
        await close_image(b2)
        assert await drv(a).read(2 * MiB, 4096) == bytes(4096)
        a.state = NodeState.ACTIVE
        await drv(a).invalidate_cache()
        assert await a.read(2 * MiB, 4096) == b"\x55" * 4096
        assert await a.read(MiB, 4096) == b"\x22" * 4096
        assert await a.read(600 * MiB, 4096) == b"\x33" * 4096
        await a.write(300 * MiB, b"\x44" * 4096)  # allocates after b's clusters
        assert await a.read(0, 65536) == b"\x11" * 65536
        await close_image(a)
        c = await open_image(g2, str(path), node_name="c", read_only=True, locking="off")
        for off, byte in ((0, 0x11), (MiB, 0x22), (600 * MiB, 0x33), (300 * MiB, 0x44)):
            assert await c.read(off, 4096) == bytes([byte]) * 4096
        await close_image(c)
    finally:
        g1.close()
        g2.close()


async def test_failed_invalidate_leaves_driver_unusable(tmp_path: Path,
                                                       graph: BlockGraph) -> None:
    path = tmp_path / "f.qcow2"
    create_image(str(path), 8 * MiB)
    node = await open_image(graph, str(path), locking="off")
    await drv(node).inactivate()
    good = path.read_bytes()
    path.write_bytes(b"garbage!" * 1024)
    with pytest.raises(BlockDriverError, match=r"^Could not reopen qcow2 layer: "
                                               "Image is not in qcow2 format$"):
        await drv(node).invalidate_cache()
    with pytest.raises(BlockDriverError):
        await drv(node).read(0, 512)
    path.write_bytes(good)
    await drv(node).invalidate_cache()
    assert await drv(node).read(0, 512) == bytes(512)
    await close_image(node)


async def test_truncate_grow_and_shrink(tmp_path: Path, graph: BlockGraph) -> None:
    path = tmp_path / "t.qcow2"
    create_image(str(path), 1024 * 1024, cluster_size=4096)  # 1 MiB: one L2 table is 2 MiB
    node = await open_image(graph, str(path))
    await node.write(0, b"\x77" * 8192)
    await drv(node).truncate(64 * MiB)  # needs a bigger L1 table
    assert node.size() == 64 * MiB
    await node.write(63 * MiB, b"\x78" * 4096)
    assert await node.read(0, 8192) == b"\x77" * 8192
    with pytest.raises(BlockDriverError, match=r"multiple of 512"):
        await drv(node).truncate(1000)
    await drv(node).truncate(4096)
    assert await node.read(0, 4096) == b"\x77" * 4096
    await drv(node).truncate(8 * MiB)
    assert await node.read(4096, 4096) == bytes(4096)  # cropped clusters are gone
    await close_image(node)
    node = await open_image(graph, str(path), read_only=True)
    assert node.size() == 8 * MiB
    await close_image(node)


async def test_unaligned_l2_entry_marks_corrupt(tmp_path: Path, graph: BlockGraph) -> None:
    path = tmp_path / "bad.qcow2"
    create_image(str(path), 8 * MiB)
    node = await open_image(graph, str(path))
    await node.write(0, b"\x01" * 65536)
    await close_image(node)
    raw = bytearray(path.read_bytes())
    l1 = struct.unpack_from(">Q", raw, 40)[0]
    l2 = struct.unpack_from(">Q", raw, l1)[0] & 0x00FFFFFFFFFFFE00
    e = struct.unpack_from(">Q", raw, l2)[0]
    struct.pack_into(">Q", raw, l2, e + 0x200)  # data offset no longer cluster aligned
    path.write_bytes(raw)
    node = await open_image(graph, str(path))
    with pytest.raises(BlockDriverError):
        await node.read(0, 512)
    with pytest.raises(BlockDriverError):
        await node.write(65536 * 4, b"x")  # the image is now unusable
    incompat = struct.unpack_from(">Q", path.read_bytes(), 72)[0]
    assert incompat & INCOMPAT_CORRUPT
    await drv(node).close()


@pytest.mark.parametrize("cluster_size", [512, 4096, 65536])
@pytest.mark.parametrize("refcount_bits", [1, 8, 64])
async def test_refcount_structures_grow(tmp_path: Path, graph: BlockGraph,
                                        cluster_size: int, refcount_bits: int) -> None:
    """Enough allocation to need new refcount blocks (and, for small clusters,
    a bigger refcount table); then every byte reads back after a reopen."""
    path = tmp_path / "g.qcow2"
    size = 48 * MiB if cluster_size == 512 else 64 * MiB
    create_image(str(path), size, cluster_size=cluster_size, refcount_bits=refcount_bits)
    node = await open_image(graph, str(path))
    rng = random.Random(cluster_size + refcount_bits)
    chunks = {}
    step = max(cluster_size, 65536)
    for k in range(0, size // step, 3):
        data = rng.randbytes(min(step, 32768))
        chunks[k * step] = data
        await node.write(k * step, data)
    img = drv(node).image
    assert img is not None
    blocks = sum(1 for e in img.refs.reftable if e)
    assert blocks >= 1
    await close_image(node)
    node = await open_image(graph, str(path), read_only=True)
    for off, data in chunks.items():
        assert await node.read(off, len(data)) == data
    await close_image(node)


async def test_direct_io_is_sector_aligned(tmp_path: Path, graph: BlockGraph,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """With cache.direct=on every request to the image file is 512-byte aligned
    (the file driver passes O_DIRECT requests through unchanged)."""
    import qmpd.block.file as file_mod

    seen: list[tuple[int, int, int]] = []
    real_pread, real_pwrite = file_mod._pread_full, file_mod._pwrite_full

    def pread(fd: int, length: int, offset: int) -> bytes:
        seen.append((fd, offset, length))
        return real_pread(fd, length, offset)

    def pwrite(fd: int, data: bytes, offset: int) -> None:
        seen.append((fd, offset, len(data)))
        real_pwrite(fd, data, offset)

    monkeypatch.setattr(file_mod, "_pread_full", pread)
    monkeypatch.setattr(file_mod, "_pwrite_full", pwrite)
    base = tmp_path / "base.raw"
    base.write_bytes(b"\x42" * (2 * MiB))
    path = tmp_path / "d.qcow2"
    create_image(str(path), 8 * MiB, cluster_size=4096, backing_file="base.raw",
                 backing_format="raw")
    node = await open_image(graph, str(path), discard_unmap=True)
    img = drv(node).image
    assert img is not None and node.file is not None
    image_fd = node.file.driver.fd  # type: ignore[attr-defined]
    img.direct = True  # what cache.direct=on sets (not used for real: /tmp may refuse O_DIRECT)
    mirror = bytearray(b"\x42" * (2 * MiB) + bytes(6 * MiB))
    rng = random.Random(9)
    for _ in range(300):
        off = rng.randrange(8 * MiB - 1)
        n = min(rng.randrange(1, 20000), 8 * MiB - off)
        k = rng.random()
        if k < 0.5:
            data = rng.randbytes(n)
            await node.write(off, data)
            mirror[off : off + n] = data
        elif k < 0.6:
            await node.write_zeroes(off, n)
            mirror[off : off + n] = bytes(n)
        elif k < 0.7:
            await node.discard(off, n)
            cs = 4096
            a, b = -(-off // cs) * cs, (off + n) // cs * cs
            if b > a:
                mirror[a:b] = bytes(b - a)
        else:
            assert await node.read(off, n) == mirror[off : off + n]
    await close_image(node)
    ours = [(o, n) for fd, o, n in seen if fd == image_fd]
    assert len(ours) > 100
    assert [(o, n) for o, n in ours if (o | n) % 512] == []


async def test_overlap_check_refuses_writes_onto_metadata(tmp_path: Path,
                                                          graph: BlockGraph) -> None:
    """An L2 entry pointing at the L1 table (a corrupt image): the write is
    refused and the image marked corrupt instead of overwriting metadata."""
    path = tmp_path / "ov.qcow2"
    create_image(str(path), 8 * MiB)
    node = await open_image(graph, str(path))
    await node.write(0, b"\x01" * 65536)
    await close_image(node)
    raw = bytearray(path.read_bytes())
    l1 = struct.unpack_from(">Q", raw, 40)[0]
    l2 = struct.unpack_from(">Q", raw, l1)[0] & 0x00FFFFFFFFFFFE00
    struct.pack_into(">Q", raw, l2 + 8, QCOW_OFLAG_COPIED | l1)  # cluster 1 -> the L1 table
    path.write_bytes(raw)
    node = await open_image(graph, str(path))
    with pytest.raises(BlockDriverError):
        await node.write(65536, b"\x02" * 512)
    assert path.read_bytes()[l1 : l1 + 8] == raw[l1 : l1 + 8]  # L1 untouched
    assert struct.unpack_from(">Q", path.read_bytes(), 72)[0] & INCOMPAT_CORRUPT
    await drv(node).close()


async def test_host_file_for_normal_clusters(tmp_path: Path, graph: BlockGraph) -> None:
    path = tmp_path / "h.qcow2"
    create_image(str(path), 8 * MiB)
    node = await open_image(graph, str(path))
    d = drv(node)
    assert d.host_file(0, 65536) is None  # unallocated: nothing to send from the file
    await node.write(0, b"\x07" * (3 * 65536))
    img = d.image
    assert img is not None and node.file is not None
    where = d.host_file(100, 2 * 65536)
    assert where is not None
    fd, off = where
    assert os.pread(fd, 4, off) == b"\x07" * 4
    assert off == (await entry_of(node, 0) & 0x00FFFFFFFFFFFE00) + 100
    await node.write_zeroes(65536, 65536)  # zero flag: not a plain data run any more
    assert d.host_file(0, 2 * 65536) is None
    await close_image(node)


async def test_host_file_across_l2_slices(tmp_path: Path, graph: BlockGraph) -> None:
    """host_file over runs that cross L2 cache slices (64 entries of 4 KiB
    clusters here) answers as the entries do, cluster by cluster: the host
    offset when they are one contiguous run of normal clusters, else None."""
    cs = 4096
    path = tmp_path / "s.qcow2"
    create_image(str(path), 4 * MiB, cluster_size=cs)
    node = await open_image(graph, str(path), options={"l2-cache-entry-size": 512})
    d = drv(node)
    await node.write(0, b"\x01" * (200 * cs))       # one run over four slices
    await node.write(300 * cs, b"\x02" * (40 * cs))  # a run after a gap
    await node.write(120 * cs, b"\x03" * cs)          # in place: still the same run
    await node.write_zeroes(170 * cs, cs)              # a zero flag inside the run
    rng = random.Random(7)
    cases = [(0, 200 * cs), (10 * cs + 5, 150 * cs), (60 * cs, 10 * cs), (100 * cs, 100 * cs),
             (190 * cs, 20 * cs), (300 * cs, 40 * cs), (250 * cs, 60 * cs)]
    cases += [(rng.randrange(0, 340 * cs), rng.randrange(1, 80 * cs)) for _ in range(200)]
    for offset, length in cases:
        first, last = offset // cs, (offset + length - 1) // cs
        entries = [await entry_of(node, c * cs) for c in range(first, last + 1)]
        hosts = [e & 0x00FFFFFFFFFFFE00 for e in entries]
        plain = all(e & 0x00FFFFFFFFFFFE00 and not e & 1 for e in entries)
        run = plain and all(h == hosts[0] + i * cs for i, h in enumerate(hosts))
        want = (hosts[0] + offset % cs) if run else None
        where = d.host_file(offset, length)
        assert (where[1] if where else None) == want, (offset, length)
    await close_image(node)


async def test_one_write_over_mixed_clusters(tmp_path: Path, graph: BlockGraph) -> None:
    """A write over unallocated, owned, zero-flagged and again unallocated
    clusters in one L2 slice: owned ones are written in place, zero-flagged
    owned ones reused, the unallocated runs get new clusters (the write path
    takes a run of unallocated entries in one go; this is where it must stop)."""
    cs = 65536
    path = tmp_path / "m.qcow2"
    create_image(str(path), 16 * MiB)
    node = await open_image(graph, str(path))
    await node.write(1 * cs, b"\x01" * cs)
    await node.write(4 * cs, b"\x04" * cs)
    await node.write_zeroes(4 * cs, cs)  # zero flag on an owned cluster
    owned = await entry_of(node, 1 * cs)
    zeroed = await entry_of(node, 4 * cs)
    assert entry_type(zeroed) == ClusterType.ZERO_ALLOC
    data = os.urandom(8 * cs)
    await node.write(0, data)
    assert await node.read(0, 8 * cs) == data
    assert await entry_of(node, 1 * cs) == owned  # in place
    reused = await entry_of(node, 4 * cs)
    assert reused & 0x00FFFFFFFFFFFE00 == zeroed & 0x00FFFFFFFFFFFE00
    assert entry_type(reused) == ClusterType.NORMAL
    hosts = [await entry_of(node, k * cs) & 0x00FFFFFFFFFFFE00 for k in range(8)]
    assert len(set(hosts)) == 8 and all(hosts)
    await close_image(node)
    node = await open_image(graph, str(path), read_only=True)
    assert await node.read(0, 8 * cs) == data
    await close_image(node)


@pytest.mark.parametrize("allocated", [False, True])
async def test_bytearray_write_is_not_copied(tmp_path: Path, graph: BlockGraph,
                                             allocated: bool) -> None:
    """A write given a bytearray (what the NBD server hands on) is written
    from views of it: no copy of the megabyte is made on the way."""
    path = tmp_path / "b.qcow2"
    create_image(str(path), 16 * MiB)
    node = await open_image(graph, str(path))
    if allocated:
        await node.write(0, bytes(MiB))  # the write below goes in place
    data = bytearray(os.urandom(MiB))
    await node.write(2 * MiB, bytes(65536))  # warm the caches and the I/O threads
    tracemalloc.start()
    try:
        await node.write(0, data)  # type: ignore[arg-type]  # as NbdExport.write does
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < MiB // 2, peak
    assert await node.read(0, MiB) == data
    await close_image(node)
