"""Creating images without QEMU: qcow2 option checks in QEMU's order, the layouts'
own consistency, and file creation (issue 12)."""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

import pytest

from qmpd.block.driver import PERM_ALL, Perm
from qmpd.block.file_create import create_file
from qmpd.block.locking import ImageLock
from qmpd.block.qcow2.create import CreateError, Layout, check_options, plan
from qmpd.block.qcow2.format import parse_header
from qmpd.block.qcow2.refcount import RefBlock

MiB = 1 << 20

V3 = "(use version=v3 or greater)"
CHECKS: list[tuple[dict[str, Any], str]] = [
    ({"size": 1000}, "Image size must be a multiple of 512 bytes"),
    ({"size": -1}, "Image size must be a multiple of 512 bytes"),
    ({"cluster-size": 1000}, "Cluster size must be a power of two between 512 and 2048k"),
    ({"cluster-size": 1 << 22}, "Cluster size must be a power of two between 512 and 2048k"),
    ({"cluster-size": -65536}, "Cluster size must be a power of two between 512 and 2048k"),
    ({"backing-file": "b", "preallocation": "falloc"},
     "Backing file and preallocation can only be used at the same time if extended_l2 is on"),
    ({"backing-fmt": "raw"}, "Backing format cannot be used without backing file"),
    ({"version": "v2", "lazy-refcounts": True},
     f"Lazy refcounts only supported with compatibility level 1.1 and above {V3}"),
    ({"refcount-bits": 3}, "Refcount width must be a power of two and may not exceed 64 bits"),
    ({"refcount-bits": 0}, "Refcount width must be a power of two and may not exceed 64 bits"),
    ({"version": "v2", "refcount-bits": 8},
     f"Different refcount widths than 16 bits require compatibility level 1.1 or above {V3}"),
    # The first fault in QEMU's order wins.
    ({"size": 1000, "cluster-size": 1000}, "Image size must be a multiple of 512 bytes"),
    ({"cluster-size": 1000, "backing-fmt": "raw"},
     "Cluster size must be a power of two between 512 and 2048k"),
    ({"backing-fmt": "raw", "version": "v2", "lazy-refcounts": True},
     "Backing format cannot be used without backing file"),
    ({"version": "v2", "lazy-refcounts": True, "refcount-bits": 3},
     f"Lazy refcounts only supported with compatibility level 1.1 and above {V3}"),
]


@pytest.mark.parametrize(("extra", "text"), CHECKS)
def test_option_checks(extra: dict[str, Any], text: str) -> None:
    with pytest.raises(CreateError) as info:
        check_options({"size": MiB, **extra})
    assert info.value.desc == text


SIZES: list[tuple[dict[str, Any], str]] = [
    ({"size": -512}, "Could not resize image: Image size cannot be negative"),
    ({"size": (1 << 64) - 512}, "Could not resize image: Image size cannot be negative"),
    ({"size": (1 << 63) - 512},
     "Could not resize image: offset(9223372036854775296) exceeds maximum(9223372035781033984)"),
    ({"size": 1 << 62}, "Could not resize image: Failed to grow the L1 table: File too large"),
    ({"size": MiB, "backing-file": "b" * 1024},
     f"Could not assign backing file '{'b' * 1024}' with format '(null)': Invalid argument"),
    ({"size": MiB, "backing-file": "b" * 1023, "cluster-size": 512, "backing-fmt": "raw"},
     f"Could not assign backing file '{'b' * 1023}' with format 'raw': No space left on device"),
]


@pytest.mark.parametrize(("args", "text"), SIZES)
def test_failures_while_writing(args: dict[str, Any], text: str) -> None:
    opts = check_options(args)
    with pytest.raises(CreateError) as info:
        plan(opts)
    assert info.value.desc == text


def image(layout: Layout) -> bytes:
    out = bytearray(layout.file_size)
    for offset, data in layout.writes:
        out[offset:offset + len(data)] = data
    return bytes(out)


def referenced(img: bytes) -> dict[int, int]:
    """Every cluster the metadata points at, counted (what qemu-img check counts)."""
    hdr = parse_header(img)
    cs = hdr.cluster_size
    counts: dict[int, int] = {}

    def ref(offset: int, length: int) -> None:
        for cluster in range(offset // cs, -(-(offset + length) // cs)):
            counts[cluster] = counts.get(cluster, 0) + 1

    ref(0, cs)
    ref(hdr.refcount_table_offset, hdr.refcount_table_clusters * cs)
    table = img[hdr.refcount_table_offset:hdr.refcount_table_offset
                + hdr.refcount_table_clusters * cs]
    for i in range(0, len(table), 8):
        block = int.from_bytes(table[i:i + 8], "big")
        if block:
            ref(block, cs)
    if hdr.l1_size:
        ref(hdr.l1_table_offset, hdr.l1_size * 8)
    for i in range(hdr.l1_size):
        l2 = int.from_bytes(img[hdr.l1_table_offset + 8 * i:hdr.l1_table_offset + 8 * i + 8],
                            "big") & ((1 << 56) - 1) & ~(cs - 1)
        if not l2:
            continue
        ref(l2, cs)
        for k in range(cs // 8):
            data = int.from_bytes(img[l2 + 8 * k:l2 + 8 * k + 8], "big") & ((1 << 56) - 1)
            if data:
                ref(data & ~(cs - 1), cs)
    return counts


def refcounts(img: bytes) -> dict[int, int]:
    hdr = parse_header(img)
    cs = hdr.cluster_size
    per_block = cs * 8 // hdr.refcount_bits
    out = {}
    table = img[hdr.refcount_table_offset:hdr.refcount_table_offset
                + hdr.refcount_table_clusters * cs]
    for i in range(0, len(table), 8):
        block = int.from_bytes(table[i:i + 8], "big")
        if not block:
            continue
        blk = RefBlock.from_bytes(hdr.refcount_order, img[block:block + cs])
        for k in range(per_block):
            if blk.get(k):
                out[i // 8 * per_block + k] = blk.get(k)
    return out


LAYOUTS: list[dict[str, Any]] = [
    {"size": 0}, {"size": 512}, {"size": 1 << 30},
    {"size": 1 << 30, "cluster-size": 512},
    {"size": 1 << 30, "cluster-size": 512, "refcount-bits": 64},
    {"size": 1 << 40, "cluster-size": 4096, "refcount-bits": 64},
    {"size": 5 * MiB, "cluster-size": 512, "preallocation": "metadata"},
    {"size": 3 * MiB + 512, "cluster-size": 1024, "preallocation": "metadata",
     "refcount-bits": 2},
    {"size": 700 * MiB + 512, "preallocation": "metadata"},
    {"size": 40 * MiB, "cluster-size": 4096, "preallocation": "falloc"},
    {"size": 6 * MiB + 512, "cluster-size": 512, "preallocation": "full", "refcount-bits": 8},
    {"size": 100 * MiB, "preallocation": "full"},
]


@pytest.mark.parametrize("args", LAYOUTS)
def test_layouts_are_consistent(args: dict[str, Any]) -> None:
    """Every cluster in use is counted once; nothing else is; nothing lies past the end."""
    layout = plan(check_options(args))
    img = image(layout)
    hdr = parse_header(img)
    assert hdr.size == args["size"]
    assert refcounts(img) == referenced(img)
    cs = hdr.cluster_size
    assert max(refcounts(img)) * cs < layout.file_size
    if args.get("preallocation", "off") != "off":
        guest = -(-args["size"] // cs)
        assert sum(length for _, length in layout.data) == guest * cs


# --- files -----------------------------------------------------------------------------------

def test_create_file_modes(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"x" * 10000)
    create_file(str(path), 3 * MiB + 512)  # emptied, then grown: a hole
    assert path.read_bytes() == bytes(3 * MiB + 512)
    assert os.stat(path).st_blocks * 512 < MiB
    for mode in ("falloc", "full"):
        create_file(str(path), 3 * MiB, mode, nocow=True)
        assert os.path.getsize(path) == 3 * MiB
        assert os.stat(path).st_blocks * 512 >= 3 * MiB
    assert path.read_bytes() == bytes(3 * MiB)


@pytest.mark.parametrize(("args", "text", "err"), [
    ({"prealloc": "metadata"}, "Unsupported preallocation mode: metadata", errno.ENOTSUP),
    ({"size": -1}, "Could not resize file: Invalid argument", errno.EINVAL),
    ({"size": -1, "prealloc": "full"}, "Cannot use preallocation for shrinking files",
     errno.ENOTSUP),
    ({"extent_size_hint": 1 << 32}, "Extent size hint is too large", errno.EINVAL),
    ({"extent_size_hint": -1}, "Extent size hint is too large", errno.EINVAL),
])
def test_create_file_refusals(tmp_path: Path, args: dict[str, Any], text: str, err: int) -> None:
    size = args.pop("size", MiB)
    with pytest.raises(CreateError) as info:
        create_file(str(tmp_path / "f"), size, **args)
    assert (info.value.desc, info.value.errno) == (text, err)


def test_create_file_paths(tmp_path: Path) -> None:
    with pytest.raises(CreateError) as info:
        create_file(str(tmp_path / "no" / "f"), 0)
    assert info.value.desc == f"Could not create '{tmp_path}/no/f': No such file or directory"
    with pytest.raises(CreateError) as info:
        create_file(str(tmp_path), 0)
    assert info.value.desc == f"Could not create '{tmp_path}': Is a directory"


def test_create_file_respects_locks(tmp_path: Path) -> None:
    """A writer that shares no writes (another process's image, open) stops the create."""
    path = tmp_path / "f"
    path.write_bytes(b"data")
    fd = os.open(path, os.O_RDWR)
    lock = ImageLock(fd)
    lock.update(int(Perm.CONSISTENT_READ | Perm.WRITE), int(PERM_ALL & ~Perm.WRITE))
    try:
        with pytest.raises(CreateError) as info:
            create_file(str(path), MiB)
        assert info.value.desc == 'Failed to get "write" lock'
        assert path.read_bytes() == b"data"
    finally:
        lock.release()
        os.close(fd)
    create_file(str(path), MiB)
    assert os.path.getsize(path) == MiB
