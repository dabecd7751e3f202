"""qcow2 format unit tests: header, extensions, feature checks, refcount widths,
L2 entry classification, compressed descriptors, cache sizing (no QEMU needed)."""

from __future__ import annotations

import random
import struct
import zlib

import pytest

from qmpd.block.qcow2.create import image_bytes
from qmpd.block.qcow2.driver import cache_config, path_combine, read_cache_sizes
from qmpd.block.qcow2.format import (
    EXT_BACKING_FORMAT,
    EXT_END,
    EXT_FEATURE_TABLE,
    INCOMPAT_COMPRESSION,
    INCOMPAT_CORRUPT,
    INCOMPAT_DATA_FILE,
    INCOMPAT_DIRTY,
    INCOMPAT_EXTL2,
    QCOW_OFLAG_COMPRESSED,
    QCOW_OFLAG_COPIED,
    QCOW_OFLAG_ZERO,
    ClusterType,
    CompressedGeometry,
    Header,
    HeaderExtension,
    Qcow2FormatError,
    build_header_cluster,
    check_features,
    check_tables,
    cluster_is_allocated,
    cluster_type,
    l1_size_for,
    parse_header,
    parse_snapshots,
)
from qmpd.block.qcow2.refcount import RefBlock
from qmpd.errors import GenericError

GiB = 1 << 30


def fresh(**kw: object) -> bytearray:
    return bytearray(image_bytes(GiB, **kw))  # type: ignore[arg-type]


# --- header ---------------------------------------------------------------------


def test_fresh_v3_header_matches_qemu_layout() -> None:
    """The layout qemu-img 7.2 writes (checked with a hexdump, see reference)."""
    buf = fresh()
    hdr = parse_header(buf)
    assert hdr.version == 3
    assert hdr.cluster_size == 65536
    assert hdr.header_length == 0x70
    assert hdr.refcount_table_offset == 0x10000
    assert hdr.l1_table_offset == 0x30000
    assert hdr.l1_size == 2
    assert hdr.refcount_bits == 16
    # feature table right after the header, end marker at 0x1f8
    assert struct.unpack_from(">II", buf, 0x70) == (EXT_FEATURE_TABLE, 0x180)
    assert struct.unpack_from(">II", buf, 0x1F8) == (EXT_END, 0)
    names = [n for _, _, n in hdr.feature_table]
    assert names[:5] == ["dirty bit", "corrupt bit", "external data file", "compression type",
                         "extended L2 entries"]
    # refcount table -> refblock at 0x20000; refcounts of clusters 0..3 are 1
    assert struct.unpack_from(">Q", buf, 0x10000)[0] == 0x20000
    assert struct.unpack_from(">4H", buf, 0x20000) == (1, 1, 1, 1)
    assert len(buf) == 0x30000 + 16  # ends part-way through the L1 cluster


def test_backing_layout_matches_qemu() -> None:
    buf = fresh(backing_file="base.qcow2", backing_format="qcow2")
    hdr = parse_header(buf)
    assert struct.unpack_from(">II", buf, 0x70) == (EXT_BACKING_FORMAT, 5)
    assert buf[0x78:0x80] == b"qcow2\0\0\0"
    assert hdr.backing_file_offset == 0x210
    assert hdr.backing_file_size == 10
    assert hdr.backing_file == "base.qcow2"
    assert hdr.backing_format == "qcow2"


def test_v2_header() -> None:
    hdr = parse_header(fresh(version=2))
    assert hdr.version == 2
    assert hdr.header_length == 72
    assert hdr.refcount_order == 4
    assert hdr.incompatible_features == 0
    assert hdr.feature_table == []


def test_extensions_round_trip_keeps_unknown_ones() -> None:
    hdr = parse_header(fresh(backing_file="/abs/base.raw", backing_format="raw"))
    hdr.extensions.append(HeaderExtension(0x12345678, b"opaque data!"))
    hdr.extensions.append(HeaderExtension(0x0BADCAFE, b""))
    out = build_header_cluster(hdr, b"\0" * 8)
    again = parse_header(out)
    assert [(e.type, e.data) for e in again.extensions] == [(e.type, e.data) for e in
                                                            hdr.extensions]
    assert again.backing_file == "/abs/base.raw"
    assert again.backing_format == "raw"
    assert again.feature_table == hdr.feature_table
    # a third generation is byte-identical
    assert build_header_cluster(parse_header(out), b"\0" * 8) == out


def test_header_extension_too_large() -> None:
    buf = fresh()
    struct.pack_into(">II", buf, 0x70, 0x11111111, 0x10000)
    with pytest.raises(Qcow2FormatError, match=r"^Header extension too large$"):
        parse_header(buf)


@pytest.mark.parametrize(
    ("offset", "value", "fmt", "message"),
    [
        (0, 0x12345678, ">I", "Image is not in qcow2 format"),
        (4, 4, ">I", "Unsupported qcow2 version 4"),
        (4, 1, ">I", "Unsupported qcow2 version 1"),
        (20, 8, ">I", "Unsupported cluster size: 2^8"),
        (20, 22, ">I", "Unsupported cluster size: 2^22"),
        (100, 96, ">I", "qcow2 header too short"),
        (8, 0x20000, ">Q", "Invalid backing file offset"),
    ],
)
def test_header_errors(offset: int, value: int, fmt: str, message: str) -> None:
    buf = fresh()
    struct.pack_into(fmt, buf, offset, value)
    with pytest.raises(Qcow2FormatError) as info:
        parse_header(buf)
    assert str(info.value) == message


def test_not_qcow2_at_all() -> None:
    with pytest.raises(Qcow2FormatError, match=r"^Image is not in qcow2 format$"):
        parse_header(bytes(4096))


def _with_incompat(bits: int, **kw: object) -> Header:
    buf = fresh(**kw)
    old = struct.unpack_from(">Q", buf, 72)[0]
    struct.pack_into(">Q", buf, 72, old | bits)
    return parse_header(buf)


@pytest.mark.parametrize(
    ("bits", "message"),
    [
        # texts verified with qemu-io 7.2 on images patched the same way
        (1 << 5, "Unsupported qcow2 feature(s): Unknown incompatible feature: 20"),
        (1 << 63, "Unsupported qcow2 feature(s): Unknown incompatible feature: 8000000000000000"),
        ((1 << 5) | (1 << 6), "Unsupported qcow2 feature(s): Unknown incompatible feature: 60"),
        (INCOMPAT_DATA_FILE, "'data-file' is required for this image"),
        (INCOMPAT_COMPRESSION,
         "qcow2: Compression type incompatible feature bit must not be set"),
    ],
)
def test_feature_errors(bits: int, message: str) -> None:
    hdr = _with_incompat(bits)
    with pytest.raises(Qcow2FormatError) as info:
        check_features(hdr, writable=False)
    assert str(info.value) == message


def test_named_unknown_feature_uses_the_table() -> None:
    buf = fresh()
    # rename the table's entry for incompatible bit 4 to bit 5 (as in our qemu-io test)
    for i in range(8):
        e = 0x78 + 48 * i
        if buf[e] == 0 and buf[e + 1] == 4:
            buf[e + 1] = 5
    struct.pack_into(">Q", buf, 72, (1 << 5) | (1 << 7) | (1 << 9))
    with pytest.raises(Qcow2FormatError) as info:
        check_features(parse_header(buf), writable=False)
    assert str(info.value) == (
        "Unsupported qcow2 feature(s): extended L2 entries, Unknown incompatible feature: 280")


def test_corrupt_bit_refuses_read_write_only() -> None:
    hdr = _with_incompat(INCOMPAT_CORRUPT)
    check_features(hdr, writable=False)
    with pytest.raises(Qcow2FormatError) as info:
        check_features(hdr, writable=True)
    assert str(info.value) == "qcow2: Image is corrupt; cannot be opened read/write"


def test_dirty_bit_is_known() -> None:
    check_features(_with_incompat(INCOMPAT_DIRTY), writable=True)


def test_extended_l2_and_zstd_refused() -> None:
    with pytest.raises(Qcow2FormatError, match=r"extended L2 entries"):
        check_features(_with_incompat(INCOMPAT_EXTL2), writable=False)
    buf = fresh()
    struct.pack_into(">Q", buf, 72, INCOMPAT_COMPRESSION)
    buf[104] = 1
    with pytest.raises(Qcow2FormatError, match=r"^qcow2: unknown compression type: 1$"):
        check_features(parse_header(buf), writable=False)


def test_table_checks() -> None:
    hdr = parse_header(fresh())
    check_tables(hdr)
    hdr.l1_size = 1
    with pytest.raises(Qcow2FormatError, match=r"^L1 table is too small$"):
        check_tables(hdr)
    hdr = parse_header(fresh())
    hdr.refcount_table_clusters = 0
    with pytest.raises(Qcow2FormatError,
                       match=r"^Image does not contain a reference count table$"):
        check_tables(hdr)
    hdr = parse_header(fresh())
    hdr.refcount_table_offset += 512
    with pytest.raises(Qcow2FormatError, match=r"^Reference count table offset invalid$"):
        check_tables(hdr)
    hdr = parse_header(fresh())
    hdr.refcount_order = 7
    with pytest.raises(Qcow2FormatError, match=r"may not exceed 64 bits"):
        check_features(hdr, writable=False)


def test_l1_size_math() -> None:
    assert l1_size_for(GiB, 16) == 2  # 512 MiB per L2 table
    assert l1_size_for(GiB + 1, 16) == 3
    assert l1_size_for(1 << 40, 16) == 2048
    assert l1_size_for(1 << 20, 9) == 32  # 512 B clusters: 32 KiB per table
    assert l1_size_for(0, 16) == 0


def test_snapshot_table_parse() -> None:
    extra = struct.pack(">QQQ", 0, 5 * GiB, 2**64 - 1)
    entry = struct.pack(">QIHHIIQII", 0x70000, 2, 1, 5, 1700000000, 5, 3_000_000_123, 0,
                        len(extra)) + extra + b"1" + b"snap1"
    entry += bytes(-len(entry) % 8)
    snaps, length = parse_snapshots(entry * 2, 2)
    assert length == len(entry) * 2
    assert snaps[0].name == "snap1" and snaps[0].id_str == "1"
    assert snaps[0].l1_table_offset == 0x70000 and snaps[0].l1_size == 2
    assert snaps[0].disk_size == 5 * GiB
    info = snaps[1].info()
    assert info["vm-clock-sec"] == 3 and info["vm-clock-nsec"] == 123
    assert "icount" not in info


# --- refcount blocks of every width ---------------------------------------------------


@pytest.mark.parametrize("order", range(7))
def test_refblock_get_set_round_trip(order: int) -> None:
    cs = 512
    blk = RefBlock.new(order, cs)
    assert blk.entries == cs * 8 >> order
    rng = random.Random(order)
    model = [0] * blk.entries
    maxv = (1 << (1 << order)) - 1
    for _ in range(2000):
        i = rng.randrange(blk.entries)
        v = rng.choice([0, 1, maxv, rng.randrange(maxv + 1)])
        blk.set(i, v)
        model[i] = v
    assert [blk.get(i) for i in range(blk.entries)] == model
    raw = blk.to_bytes()
    assert len(raw) == cs
    again = RefBlock.from_bytes(order, raw)
    assert [again.get(i) for i in range(blk.entries)] == model
    # find_zero / nonzero_from against brute force
    for start in [0, 1, 7, 8, 63, blk.entries // 2, blk.entries - 1, blk.entries]:
        zs = [i for i in range(start, blk.entries) if model[i] == 0]
        assert blk.find_zero(start) == (zs[0] if zs else -1)
        nz = [i for i in range(start, blk.entries) if model[i] != 0]
        assert blk.nonzero_from(start) == (nz[0] if nz else blk.entries)


def test_refblock_on_disk_layout() -> None:
    """Sub-byte widths are packed LSB first; wider ones are big-endian."""
    b = RefBlock.new(0, 512)
    b.set(0, 1)
    b.set(9, 1)
    assert b.to_bytes()[:2] == b"\x01\x02"
    b = RefBlock.new(1, 512)
    b.set(1, 3)
    assert b.to_bytes()[0] == 0b1100
    b = RefBlock.new(2, 512)
    b.set(1, 0xA)
    assert b.to_bytes()[0] == 0xA0
    b = RefBlock.new(3, 512)
    b.set(2, 0x7F)
    assert b.to_bytes()[2] == 0x7F
    b = RefBlock.new(4, 512)
    b.set(1, 0x1234)
    assert b.to_bytes()[2:4] == b"\x12\x34"
    b = RefBlock.new(5, 512)
    b.set(1, 0x12345678)
    assert b.to_bytes()[4:8] == b"\x12\x34\x56\x78"
    b = RefBlock.new(6, 512)
    b.set(1, 0x0102030405060708)
    assert b.to_bytes()[8:16] == bytes(range(1, 9))


def test_refblock_find_zero_in_full_blocks() -> None:
    for order in range(7):
        b = RefBlock.new(order, 512)
        for i in range(b.entries):
            b.set(i, 1)
        assert b.find_zero(0) == -1
        b.set(b.entries - 3, 0)
        assert b.find_zero(0) == b.entries - 3
        assert b.find_zero(b.entries - 2) == -1
        assert b.nonzero_from(b.entries - 3) == b.entries - 2


# --- L2 entries and compressed descriptors ----------------------------------------------


def test_cluster_types() -> None:
    assert cluster_type(0) == ClusterType.UNALLOCATED
    assert cluster_type(QCOW_OFLAG_ZERO) == ClusterType.ZERO_PLAIN
    assert cluster_type(QCOW_OFLAG_COPIED | 0x50000 | QCOW_OFLAG_ZERO) == ClusterType.ZERO_ALLOC
    assert cluster_type(QCOW_OFLAG_COPIED | 0x50000) == ClusterType.NORMAL
    assert cluster_type(0x50000) == ClusterType.NORMAL  # shared (no COPIED)
    assert cluster_type(QCOW_OFLAG_COMPRESSED | 0x123) == ClusterType.COMPRESSED
    # compressed wins over the zero bit (bit 0 is part of the offset there)
    assert cluster_type(QCOW_OFLAG_COMPRESSED | 1) == ClusterType.COMPRESSED
    assert [cluster_is_allocated(t) for t in range(5)] == [False, False, True, True, True]


@pytest.mark.parametrize("cluster_bits", range(9, 22))
def test_compressed_descriptor_math(cluster_bits: int) -> None:
    g = CompressedGeometry(cluster_bits)
    assert g.csize_shift == 62 - (cluster_bits - 8)
    assert g.csize_mask == (1 << (cluster_bits - 8)) - 1
    rng = random.Random(cluster_bits)
    cs = 1 << cluster_bits
    for _ in range(200):
        coffset = rng.randrange(cs, 1 << 40)
        clen = rng.randrange(1, cs + 1)
        entry = g.make(coffset, clen)
        assert entry & QCOW_OFLAG_COMPRESSED and not entry & QCOW_OFLAG_COPIED
        off, csize = g.parse(entry)
        assert off == coffset
        # whole sectors from the sector holding coffset, minus the lead-in
        assert csize >= clen
        assert (coffset + csize) % 512 == 0
        assert csize - clen < 512
        clusters = g.host_clusters(entry)
        assert clusters.start == coffset >> cluster_bits
        assert clusters.stop - 1 == (coffset + csize - 1) >> cluster_bits


def test_compressed_descriptor_64k_example() -> None:
    g = CompressedGeometry(16)
    assert g.csize_shift == 54
    assert g.offset_mask == (1 << 54) - 1
    # 3 sectors from 0x50123: field = (0x50123+1000-1)//512 - 0x50123//512 = 2
    entry = g.make(0x50123, 1000)
    assert (entry >> 54) & 0xFF == 2
    assert g.parse(entry) == (0x50123, 3 * 512 - 0x123)


def test_raw_deflate_is_what_qemu_writes() -> None:
    data = bytes(range(256)) * 256
    c = zlib.compressobj(6, zlib.DEFLATED, -12)
    raw = c.compress(data) + c.flush()
    d = zlib.decompressobj(-15)
    # trailing bytes of a neighbour in the last sector are ignored
    assert d.decompress(raw + b"\xff" * 300, len(data)) == data


# --- cache sizes (QEMU's read_cache_sizes) ------------------------------------------------


def test_default_cache_sizes() -> None:
    cs = 65536
    # 1 GiB: covers the whole disk with 128 KiB = 2 whole tables
    assert read_cache_sizes({}, GiB, cs) == (128 * 1024, cs, 0)
    cfg = cache_config({}, GiB, cs)
    assert (cfg.l2_entries, cfg.l2_entry_size, cfg.refcount_entries) == (2, cs, 4)
    # 64 GiB: 8 MiB, whole-cluster entries
    assert cache_config({}, 64 * GiB, cs).l2_entries == 128
    # 1 TiB: capped at 32 MiB -> 4 KiB slices, 8192 entries
    cfg = cache_config({}, 1 << 40, cs)
    assert (cfg.l2_entries, cfg.l2_entry_size) == (8192, 4096)
    # small clusters: entry size never above the cluster size
    assert cache_config({}, 1 << 40, 512).l2_entry_size == 512


def test_cache_size_options() -> None:
    cs = 65536
    l2, entry, rc = read_cache_sizes({"cache-size": 10 << 20}, 64 * GiB, cs)
    assert (l2, rc) == (8 << 20, 2 << 20) and entry == cs
    l2, entry, rc = read_cache_sizes({"cache-size": 1 << 20}, 64 * GiB, cs)
    assert (l2, rc) == (768 << 10, 256 << 10) and entry == 4096
    l2, _, rc = read_cache_sizes({"cache-size": 4 << 20, "l2-cache-size": 1 << 20}, 64 * GiB, cs)
    assert (l2, rc) == (1 << 20, 3 << 20)
    l2, _, rc = read_cache_sizes({"cache-size": 4 << 20, "refcount-cache-size": 1 << 20},
                                 64 * GiB, cs)
    assert (l2, rc) == (3 << 20, 1 << 20)
    assert read_cache_sizes({"l2-cache-entry-size": 8192}, 1 << 40, cs)[1] == 8192
    assert read_cache_sizes({"l2-cache-size": 1 << 40}, GiB, cs)[0] == 128 * 1024


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"cache-size": 1, "l2-cache-size": 1, "refcount-cache-size": 1},
         "cache-size, l2-cache-size and refcount-cache-size may not be set at the same time"),
        ({"cache-size": 1 << 20, "l2-cache-size": 2 << 20},
         "l2-cache-size may not exceed cache-size"),
        ({"cache-size": 1 << 20, "refcount-cache-size": 2 << 20},
         "refcount-cache-size may not exceed cache-size"),
        ({"l2-cache-entry-size": 256},
         "L2 cache entry size must be a power of two between 512 and the cluster size (65536)"),
        ({"l2-cache-entry-size": 3000},
         "L2 cache entry size must be a power of two between 512 and the cluster size (65536)"),
        ({"l2-cache-entry-size": 131072},
         "L2 cache entry size must be a power of two between 512 and the cluster size (65536)"),
    ],
)
def test_cache_size_errors(options: dict[str, int], message: str) -> None:
    with pytest.raises(GenericError) as info:
        read_cache_sizes(options, GiB, 65536)
    assert str(info.value) == message


def test_path_combine() -> None:
    assert path_combine("/images/top.qcow2", "base.qcow2") == "/images/base.qcow2"
    assert path_combine("/images/top.qcow2", "/other/base.qcow2") == "/other/base.qcow2"
    assert path_combine("top.qcow2", "base.qcow2") == "base.qcow2"
    assert path_combine("dir/top.qcow2", "../b.raw") == "dir/../b.raw"
