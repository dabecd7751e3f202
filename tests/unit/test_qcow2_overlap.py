"""The qcow2 metadata overlap checks and corruption signalling, in process.

The behaviour against QEMU itself is in tests/interop/test_qcow2_overlap.py;
here: the option, the order and alignment of the checks, the cached sets
following the tables, and the event hook (fatal, non-fatal, suppressed).
"""

from __future__ import annotations

import struct
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from qmpd.block.driver import BlockDriverError
from qmpd.block.graph import BlockGraph, BlockNode
from qmpd.block.qcow2.create import create_image
from qmpd.block.qcow2.driver import Qcow2Driver
from qmpd.block.qcow2.format import INCOMPAT_CORRUPT, QCOW_OFLAG_COPIED, Qcow2FormatError
from qmpd.block.qcow2.image import Qcow2Image
from qmpd.block.qcow2.overlap import (
    OL_ACTIVE_L1,
    OL_ACTIVE_L2,
    OL_CACHED,
    OL_CONSTANT,
    OL_MAIN_HEADER,
    OL_REFCOUNT_BLOCK,
    OL_REFCOUNT_TABLE,
    overlap_checks,
    overlap_message,
)
from qmpd.block.qcow2.standalone import close_image, open_image
from qmpd.errors import GenericError

CS = 65536
MASK = 0x00FFFFFFFFFFFE00


@pytest.fixture
async def graph() -> AsyncIterator[BlockGraph]:
    g = BlockGraph(io_threads=4)
    yield g
    g.close()


def events_of(graph: BlockGraph) -> list[tuple[str, dict[str, Any]]]:
    seen: list[tuple[str, dict[str, Any]]] = []
    graph.on_event = lambda name, data: seen.append((name, data))
    return seen


def image_of(node: BlockNode) -> Qcow2Image:
    d = node.driver
    assert isinstance(d, Qcow2Driver) and d.image is not None
    return d.image


def u64(raw: bytes, offset: int) -> int:
    return int(struct.unpack_from(">Q", raw, offset)[0])


async def written_image(tmp_path: Path, graph: BlockGraph) -> Path:
    path = tmp_path / "a.qcow2"
    create_image(str(path), 1 << 30)
    node = await open_image(graph, str(path))
    await node.write(0, b"\x11" * CS)
    await close_image(node)
    return path


def point_l2_entry_at(path: Path, what: str) -> int:
    """Make guest cluster 0's L2 entry point at ``what``; returns its offset."""
    raw = bytearray(path.read_bytes())
    l1 = u64(raw, 40)
    l2 = u64(raw, l1) & MASK
    target = {"l2": l2, "l1": l1, "reftable": u64(raw, 48),
              "refblock": u64(raw, u64(raw, 48))}[what]
    struct.pack_into(">Q", raw, l2, QCOW_OFLAG_COPIED | target)
    path.write_bytes(raw)
    return target


@pytest.mark.parametrize(("option", "checks"), [
    (None, OL_CACHED),
    ("none", 0),
    ("constant", OL_CONSTANT),
    ({"template": "constant", "active-l2": True}, OL_CONSTANT | OL_ACTIVE_L2),
    ({"active-l1": False}, OL_CACHED & ~OL_ACTIVE_L1),
    ({"template": "none", "refcount-block": True}, OL_REFCOUNT_BLOCK),
])
def test_option(option: Any, checks: int) -> None:
    assert overlap_checks(option) == checks


def test_option_unknown_template() -> None:
    with pytest.raises(Qcow2FormatError) as info:
        overlap_checks("x")
    assert str(info.value) == ("Unsupported value 'x' for qcow2 option 'overlap-check'. "
                               "Allowed are any of the following: none, constant, cached, all")


def test_messages() -> None:
    assert overlap_message(OL_MAIN_HEADER) == (
        "Preventing invalid write on metadata (overlaps with qcow2_header)")
    assert overlap_message(OL_REFCOUNT_BLOCK | OL_ACTIVE_L2).endswith("(overlaps with active L2 table)")


async def test_checks_follow_the_tables(tmp_path: Path, graph: BlockGraph) -> None:
    path = await written_image(tmp_path, graph)
    raw = path.read_bytes()
    l1, reftable = u64(raw, 40), u64(raw, 48)
    l2, refblock = u64(raw, l1) & MASK, u64(raw, reftable)
    data = u64(raw, l2) & MASK
    node = await open_image(graph, str(path))
    ov = image_of(node).overlap
    assert ov.check(100, 1) == OL_MAIN_HEADER
    assert ov.check(l1 + CS - 1, 1) == OL_ACTIVE_L1  # whole clusters compared
    assert ov.check(reftable, 8) == OL_REFCOUNT_TABLE
    assert ov.check(refblock + 512, 512) == OL_REFCOUNT_BLOCK
    assert ov.check(l2, CS) == OL_ACTIVE_L2
    assert ov.check(l2, CS, ign=OL_ACTIVE_L2) == 0
    assert ov.check(data, CS) == 0
    assert ov.check(data, 0) == 0
    # a new L2 table (L1 index 1) is found as soon as the L1 table points at it
    await node.write((512 << 20) + 4096, b"\x22" * 512)
    new_l2 = image_of(node).l1[1] & MASK
    assert new_l2 and ov.check(new_l2 + 8, 8) == OL_ACTIVE_L2
    # and forgotten once it is freed (shrinking drops L1 entry 1)
    await node.driver.truncate(256 << 20)
    assert image_of(node).l1[1] == 0
    assert ov.check(new_l2, CS) == 0
    await close_image(node)


async def test_none_lets_the_write_through(tmp_path: Path, graph: BlockGraph) -> None:
    """overlap-check=none: as in QEMU, the write lands on the metadata."""
    path = await written_image(tmp_path, graph)
    target = point_l2_entry_at(path, "reftable")
    seen = events_of(graph)
    node = await open_image(graph, str(path), options={"overlap-check": "none"})
    await node.write(0, b"\x00" * 512)
    await close_image(node)
    assert seen == []
    assert path.read_bytes()[target : target + 512] == bytes(512)


async def test_fatal_corruption_event_and_state(tmp_path: Path, graph: BlockGraph) -> None:
    path = await written_image(tmp_path, graph)
    target = point_l2_entry_at(path, "l2")
    seen = events_of(graph)
    node = await open_image(graph, str(path))
    with pytest.raises(BlockDriverError) as info:
        await node.write(512, b"\x55" * 1024)
    assert info.value.errno == 5
    assert seen == [("BLOCK_IMAGE_CORRUPTED", {
        "device": "", "node-name": node.node_name,
        "msg": "Preventing invalid write on metadata (overlaps with active L2 table)",
        "offset": target + 512, "size": 1024, "fatal": True})]
    assert u64(path.read_bytes(), 72) & INCOMPAT_CORRUPT
    info_data = node.driver.image_info()["format-specific"]["data"]
    assert info_data["corrupt"] is True
    for op in (node.write(8 << 20, b"x"), node.read(0, 512)):
        with pytest.raises(BlockDriverError) as info:
            await op
        assert (info.value.errno, str(info.value)) == (123, "No medium found")
    assert len(seen) == 1  # no second event
    with pytest.raises(BlockDriverError, match=r"^No medium found$"):
        await close_image(node)  # its flush fails too; the close does not
    with pytest.raises(GenericError, match=r"^qcow2: Image is corrupt; cannot be opened "
                       r"read/write$"):
        await open_image(graph, str(path))


async def test_read_only_corruption_is_not_fatal(tmp_path: Path, graph: BlockGraph) -> None:
    """An unaligned L2 entry on a read-only image: event with fatal=false, the
    image is left as it is and stays usable (QEMU's qcow2_signal_corruption)."""
    path = await written_image(tmp_path, graph)
    raw = bytearray(path.read_bytes())
    l2 = u64(raw, u64(raw, 40)) & MASK
    struct.pack_into(">Q", raw, l2 + 8, QCOW_OFLAG_COPIED | (5 * CS + 512))
    path.write_bytes(raw)
    seen = events_of(graph)
    node = await open_image(graph, str(path), read_only=True)
    for _ in range(2):
        with pytest.raises(BlockDriverError):
            await node.read(CS, 512)
    assert [(name, data["fatal"]) for name, data in seen] == [("BLOCK_IMAGE_CORRUPTED", False)]
    assert await node.read(0, 512) == b"\x11" * 512
    await close_image(node)
    assert path.read_bytes() == raw
