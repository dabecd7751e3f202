"""Rebuilding refcounts of an image left dirty (lazy refcounts, crash): QEMU's
``qcow2_check_refcounts`` and ``rebuild_refcount_structure`` in
``qcow2-refcount.c``.

QEMU repairs a dirty image on every read-write open by running its check with
``FIX_ERRORS | FIX_LEAKS``.  We do the equivalent: count every reference
(header, active and snapshot L1/L2 tables and their data, the snapshot table,
the refcount structures), then either rewrite the existing refcount blocks
with the computed values, or, when some referenced cluster has no refcount
block, build a complete new refcount structure after the end of the image and
switch the header to it.  COPIED flags of the active tables are then made to
match the new refcounts.  The dirty bit stays set until all of it is on disk,
so a crash during the repair just repairs again next time.
"""

from __future__ import annotations

from array import array
from typing import TYPE_CHECKING

from qmpd.block.qcow2.format import (
    L1E_OFFSET_MASK,
    L2E_OFFSET_MASK,
    QCOW_OFLAG_COMPRESSED,
    QCOW_OFLAG_COPIED,
    REFT_OFFSET_MASK,
    Qcow2FormatError,
)
from qmpd.block.qcow2.refcount import RefBlock, array_to_u64_be, u64_be_to_array

if TYPE_CHECKING:
    from qmpd.block.qcow2.state import Qcow2State


class _Counts:
    """Reference counts per host cluster, growing as needed."""

    def __init__(self, cluster_bits: int, initial: int) -> None:
        self.cluster_bits = cluster_bits
        self.counts = array("Q", bytes(8 * max(initial, 1)))

    def add_range(self, offset: int, length: int) -> None:
        if length <= 0:
            return
        cb = self.cluster_bits
        first = offset >> cb
        last = (offset + length - 1) >> cb
        if last >= len(self.counts):
            self.counts.extend([0] * (last + 1 - len(self.counts) + 1024))
        for c in range(first, last + 1):
            self.counts[c] += 1

    def add(self, cluster: int) -> None:
        if cluster >= len(self.counts):
            self.counts.extend([0] * (cluster + 1 - len(self.counts) + 1024))
        self.counts[cluster] += 1

    def get(self, cluster: int) -> int:
        return int(self.counts[cluster]) if cluster < len(self.counts) else 0

    def last_used(self) -> int:
        for i in range(len(self.counts) - 1, -1, -1):
            if self.counts[i]:
                return i
        return -1


async def _count_l1(img: Qcow2State, counts: _Counts, l1: array[int]) -> None:
    cs = img.cluster_size
    cb = img.cluster_bits
    for e in l1:
        l2off = int(e) & L1E_OFFSET_MASK
        if not l2off:
            continue
        counts.add(l2off >> cb)
        table = u64_be_to_array(await img.file.read(l2off, cs))
        for entry in table:
            if not entry:
                continue
            if entry & QCOW_OFLAG_COMPRESSED:
                coffset, csize = img.comp.parse(int(entry))
                counts.add_range(coffset, csize)
            else:
                host = int(entry) & L2E_OFFSET_MASK
                if host:
                    counts.add(host >> cb)


async def count_references(img: Qcow2State, with_refcount_structures: bool) -> _Counts:
    cs = img.cluster_size
    counts = _Counts(img.cluster_bits, (img.file.size() + cs - 1) // cs)
    counts.add_range(0, cs)
    counts.add_range(img.l1_table_offset, len(img.l1) * 8)
    await _count_l1(img, counts, img.l1)
    hdr = img.header
    if hdr.nb_snapshots:
        counts.add_range(hdr.snapshots_offset, img.snapshot_table_size)
        for snap in img.snapshots:
            if not snap.l1_size:
                continue
            raw = await img.file.read(snap.l1_table_offset, snap.l1_size * 8)
            counts.add_range(snap.l1_table_offset, snap.l1_size * 8)
            await _count_l1(img, counts, u64_be_to_array(raw))
    if with_refcount_structures:
        refs = img.refs
        counts.add_range(refs.reftable_offset, refs.reftable_clusters * cs)
        for e in refs.reftable:
            off = int(e) & REFT_OFFSET_MASK
            if off:
                counts.add(off >> img.cluster_bits)
    return counts


async def repair_refcounts(img: Qcow2State) -> None:
    """Make refcounts and COPIED flags match the metadata (lock not needed: open time)."""
    refs = img.refs
    counts = await count_references(img, True)
    last = counts.last_used()
    covered = all(refs.covers(c) for c in range(0, last + 1, 1) if counts.get(c)) if last >= 0 \
        else True
    if covered:
        await _rewrite_blocks(img, counts)
    else:
        counts = await count_references(img, False)
        await _rebuild(img, counts)
    refs.cache.clear()
    refs.free_hint = 0
    await _fix_copied(img, counts)
    img.l2cache.clear()
    await img.file.sync()


async def _rewrite_blocks(img: Qcow2State, counts: _Counts) -> None:
    refs = img.refs
    cs = img.cluster_size
    for rt, e in enumerate(refs.reftable):
        off = int(e) & REFT_OFFSET_MASK
        if not off:
            continue
        base = rt << refs.rb_bits
        blk = RefBlock.new(refs.order, cs)
        for j in range(refs.rb_entries):
            v = counts.get(base + j)
            if v:
                if v > refs.max_refcount:
                    raise Qcow2FormatError("refcount overflow during repair", 34)
                blk.set(j, v)
        data = blk.to_bytes()
        if await img.file.read(off, cs) != data:
            await img.file.write(off, data)
    await img.file.sync()


async def _rebuild(img: Qcow2State, counts: _Counts) -> None:
    """A new reftable and dense refcount blocks after everything in use."""
    refs = img.refs
    cs = img.cluster_size
    cb = img.cluster_bits
    start = max(counts.last_used() + 1, (img.file.size() + cs - 1) // cs)
    nb = 1
    tc = 1
    while True:
        total = start + nb + tc
        need_nb = (total + refs.rb_entries - 1) // refs.rb_entries
        need_tc = (need_nb * 8 + cs - 1) // cs
        if need_nb <= nb and need_tc <= tc:
            break
        nb = max(nb, need_nb)
        tc = max(tc, need_tc)
    counts.add_range(start << cb, (nb + tc) << cb)
    blocks = []
    for rt in range(nb):
        blk = RefBlock.new(refs.order, cs)
        base = rt << refs.rb_bits
        for j in range(refs.rb_entries):
            v = counts.get(base + j)
            if v:
                if v > refs.max_refcount:
                    raise Qcow2FormatError("refcount overflow during repair", 34)
                blk.set(j, v)
        blocks.append(blk)
    table = array("Q", [(start + k) << cb for k in range(nb)])
    table.extend([0] * (tc * cs // 8 - nb))
    await img.file.write(start << cb, b"".join(b.to_bytes() for b in blocks))
    await img.file.write((start + nb) << cb, array_to_u64_be(table))
    await img.file.sync()
    await img.write_reftable_pointer((start + nb) << cb, tc)
    refs.reftable = table
    refs.reftable_offset = (start + nb) << cb
    refs.reftable_clusters = tc


async def _fix_copied(img: Qcow2State, counts: _Counts) -> None:
    cs = img.cluster_size
    cb = img.cluster_bits
    l1_changed = False
    for i, e in enumerate(img.l1):
        l2off = int(e) & L1E_OFFSET_MASK
        if not l2off:
            continue
        want = l2off | (QCOW_OFLAG_COPIED if counts.get(l2off >> cb) == 1 else 0)
        if want != int(e):
            img.l1[i] = want
            img.l1_generation += 1
            l1_changed = True
        table = u64_be_to_array(await img.file.read(l2off, cs))
        changed = False
        for j, entry in enumerate(table):
            if not entry or entry & QCOW_OFLAG_COMPRESSED:
                continue
            host = int(entry) & L2E_OFFSET_MASK
            if not host:
                continue
            new = int(entry) & ~QCOW_OFLAG_COPIED
            if counts.get(host >> cb) == 1:
                new |= QCOW_OFLAG_COPIED
            if new != entry:
                table[j] = new
                changed = True
        if changed:
            await img.file.write(l2off, array_to_u64_be(table))
    if l1_changed:
        data = array_to_u64_be(img.l1)
        await img.file.write(img.l1_table_offset, data + bytes(-len(data) % 512))
