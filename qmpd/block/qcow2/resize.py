"""Resizing a qcow2 image (QEMU's ``qcow2_co_truncate`` for metadata
preallocation off): the L1 table grows or drops its tail, the header follows.
"""

from __future__ import annotations

from array import array
from typing import TYPE_CHECKING

from qmpd.block.driver import BlockDriverError
from qmpd.block.qcow2.fileio import META_ALIGN
from qmpd.block.qcow2.format import L1E_OFFSET_MASK, QCOW_MAX_L1_SIZE, l1_size_for
from qmpd.block.qcow2.refcount import array_to_u64_be
from qmpd.block.qcow2.zero import discard_locked, write_zero_data, write_zeroes_locked

if TYPE_CHECKING:
    from qmpd.block.qcow2.cluster import Qcow2Image


async def truncate(img: Qcow2Image, size: int) -> None:
    img.check_writable()
    if size % 512:
        raise BlockDriverError("The new size must be a multiple of 512", 22)
    async with img._exclusive(0, 1 << 62):
        img.check_writable()
        if img.snapshots and img.version < 3:
            raise BlockDriverError("Can't resize a v2 image which has snapshots", 95)
        old = img.size
        new_l1 = l1_size_for(size, img.cluster_bits)
        if size < old:
            start = (size + img.cmask) & ~img.cmask
            if old > start:
                await discard_locked(img, start, old - start, True)
            await shrink_l1(img, new_l1)
        elif size > old:
            if new_l1 > len(img.l1):
                await grow_l1(img, new_l1)
            backing = img.node.backing
            if backing is not None and backing.size() > old:
                # do not let the backing file's data show through
                img.size = size
                zero_start = (old + img.cmask) & ~img.cmask
                if size > zero_start:
                    await write_zeroes_locked(img, zero_start, size - zero_start, False)
                if zero_start > old:
                    await write_zero_data(img, old, min(zero_start, size))
        img.size = size
        img.header.size = size
        await img.flush_metadata()
        await img._write_header_fields()


async def grow_l1(img: Qcow2Image, new_size: int) -> None:
    cs = img.cluster_size
    if new_size * 8 > QCOW_MAX_L1_SIZE:
        raise BlockDriverError("Failed to grow the L1 table: File too large", 27)
    clusters = (new_size * 8 + cs - 1) // cs
    new_off = await img.refs.alloc(clusters)
    await img.refs.cache.write_all()
    table = array("Q", img.l1)
    table.extend([0] * (clusters * cs // 8 - len(table)))
    await img.file.write(new_off, array_to_u64_be(table))
    await img.file.sync()
    old_off, old_size = img.l1_table_offset, len(img.l1)
    img.header.l1_size = new_size
    img.header.l1_table_offset = new_off
    await img._write_header_fields()
    img.l1 = table[:new_size]
    img.l1_table_offset = new_off
    if old_size:
        await img.refs.update(old_off >> img.cluster_bits,
                               (old_size * 8 + cs - 1) // cs, -1)


async def shrink_l1(img: Qcow2Image, new_size: int) -> None:
    """Free the L2 tables past ``new_size`` L1 entries (the table keeps its size)."""
    freed = []
    for i in range(new_size, len(img.l1)):
        e = int(img.l1[i])
        if e & L1E_OFFSET_MASK:
            freed.append(e & L1E_OFFSET_MASK)
            img.l1[i] = 0
    if not freed:
        return
    img.l1_generation += 1
    await img.flush_metadata()
    cs = img.cluster_size
    await img.file.write(img.l1_table_offset,
                          array_to_u64_be(img.l1) + bytes(-len(img.l1) * 8 % META_ALIGN))
    await img.file.sync()
    await img._drain()
    for off in freed:
        for k in range(0, cs, img.slice_bytes):
            img.l2cache.drop(off + k)
        await img.refs.update(off >> img.cluster_bits, 1, -1)
