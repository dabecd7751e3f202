"""Refcount blocks, the refcount table, and cluster allocation (QEMU's
``qcow2-refcount.c``).

Refcounts of every width from 1 to 64 bits are supported.  Sub-byte widths
are packed least significant bits first inside each byte; wider ones are
big-endian integers (the spec's layout).

Allocation is crash safe in QEMU's order:

* a new refcount block that covers itself is written and synced before the
  reftable entry pointing at it is written (and synced);
* a grown refcount table, with the new blocks that cover it, is written and
  synced before the header switches to it; only then is the old table freed;
* refcount increments stay in the write-back cache: the caller makes the L2
  cache depend on this cache, so the increment reaches the disk before any
  reference to the cluster does;
* decrements happen only after the reference is gone from the (cached) L2 or
  L1 table, and the caller makes this cache depend on the L2 cache.
"""

from __future__ import annotations

import contextlib
import re
import sys
from array import array
from collections.abc import AsyncIterator, Awaitable, Callable

from qmpd.block.driver import BlockDriverError
from qmpd.block.qcow2.cache import MetadataCache
from qmpd.block.qcow2.fileio import META_ALIGN, ImageFile
from qmpd.block.qcow2.format import QCOW_MAX_REFTABLE_SIZE, REFT_OFFSET_MASK

_LITTLE = sys.byteorder == "little"
_TYPECODES = {3: "B", 4: "H", 5: "I", 6: "Q"}
assert array("I").itemsize == 4 and array("Q").itemsize == 8

_NONZERO = re.compile(b"[^\x00]")


def _zero_field_class(order: int) -> re.Pattern[bytes]:
    """A regex matching bytes that hold at least one zero refcount field."""
    width = 1 << order
    mask = (1 << width) - 1
    per_byte = 8 >> order
    hits = [
        b for b in range(256)
        if any(((b >> (k * width)) & mask) == 0 for k in range(per_byte))
    ]
    return re.compile(b"[" + b"".join(re.escape(bytes([b])) for b in hits) + b"]")


_ZERO_FIELD = {order: _zero_field_class(order) for order in (0, 1, 2)}


def u64_be_to_array(data: bytes | memoryview) -> array[int]:
    """Big-endian u64s to a host-order ``array('Q')``."""
    arr = array("Q")
    arr.frombytes(data)
    if _LITTLE:
        arr.byteswap()
    return arr


def array_to_u64_be(arr: array[int], start: int = 0, stop: int | None = None) -> bytes:
    """A host-order ``array('Q')`` slice as big-endian bytes."""
    part = arr[start:stop] if (start or stop is not None) else array("Q", arr)
    if _LITTLE:
        part.byteswap()
    return part.tobytes()


class RefBlock:
    """One refcount block, decoded for fast get/set."""

    __slots__ = ("data", "entries", "order")

    def __init__(self, order: int, data: array[int] | bytearray, entries: int) -> None:
        self.order = order
        self.data = data
        self.entries = entries

    @classmethod
    def new(cls, order: int, cluster_size: int) -> RefBlock:
        entries = cluster_size * 8 >> order
        if order >= 3:
            return cls(order, array(_TYPECODES[order], bytes(cluster_size)), entries)
        return cls(order, bytearray(cluster_size), entries)

    @classmethod
    def from_bytes(cls, order: int, raw: bytes) -> RefBlock:
        entries = len(raw) * 8 >> order
        if order >= 3:
            arr = array(_TYPECODES[order])
            arr.frombytes(raw)
            if _LITTLE and order > 3:
                arr.byteswap()
            return cls(order, arr, entries)
        return cls(order, bytearray(raw), entries)

    def to_bytes(self) -> bytes:
        data = self.data
        if isinstance(data, array):
            if _LITTLE and self.order > 3:
                copy = array(data.typecode, data)
                copy.byteswap()
                return copy.tobytes()
            return data.tobytes()
        return bytes(data)

    def get(self, index: int) -> int:
        order = self.order
        if order >= 3:
            return int(self.data[index])
        shift = 3 - order
        bit = (index & ((1 << shift) - 1)) << order
        return (self.data[index >> shift] >> bit) & ((1 << (1 << order)) - 1)

    def set(self, index: int, value: int) -> None:
        order = self.order
        if order >= 3:
            self.data[index] = value
            return
        shift = 3 - order
        bit = (index & ((1 << shift) - 1)) << order
        mask = ((1 << (1 << order)) - 1) << bit
        pos = index >> shift
        self.data[pos] = (self.data[pos] & ~mask) | (value << bit)

    def replace_all(self, start: int, stop: int, old: int, new: int) -> bool:
        """Set the refcounts [start, stop) to ``new`` if every one of them is
        ``old``; False, having changed nothing, otherwise (a run freshly
        allocated or freed, set in one slice instead of one by one)."""
        data = self.data
        if not isinstance(data, array):
            return False
        n = stop - start
        if data[start:stop].count(old) != n:
            return False
        data[start:stop] = array(data.typecode, (new,)) * n
        return True

    def find_zero(self, start: int) -> int:
        """Index of the first zero refcount at or after ``start``, or -1."""
        if start >= self.entries:
            return -1
        data = self.data
        if isinstance(data, array):
            try:
                return data.index(0, start)
            except ValueError:
                return -1
        per_byte_bits = 3 - self.order
        pos = start >> per_byte_bits
        while True:
            m = _ZERO_FIELD[self.order].search(data, pos)
            if m is None:
                return -1
            pos = m.start()
            first = max(start, pos << per_byte_bits)
            for idx in range(first, (pos + 1) << per_byte_bits):
                if self.get(idx) == 0:
                    return idx
            pos += 1

    def count_nonzero(self, stop: int) -> int:
        """How many of the first ``stop`` refcounts are not zero."""
        data = self.data
        if isinstance(data, array):
            return stop - data[:stop].count(0)
        return sum(1 for i in range(stop) if self.get(i))

    def nonzero_from(self, start: int, stop: int | None = None) -> int:
        """Index of the first non-zero refcount in [start, stop), or ``stop``.

        ``stop`` defaults to the end of the block; a short window keeps the
        search cheap when only a few free clusters are wanted.
        """
        end = self.entries if stop is None else min(stop, self.entries)
        if start >= end:
            return end
        data = self.data
        if isinstance(data, array):
            size = data.itemsize
            view = memoryview(data).cast("B")
            m = _NONZERO.search(view, start * size, end * size)
            return end if m is None else m.start() // size
        per_byte_bits = 3 - self.order
        pos = start >> per_byte_bits
        last = (end + (1 << per_byte_bits) - 1) >> per_byte_bits
        while True:
            m = _NONZERO.search(data, pos, last)
            if m is None:
                return end
            pos = m.start()
            first = max(start, pos << per_byte_bits)
            for idx in range(first, min(end, (pos + 1) << per_byte_bits)):
                if self.get(idx) != 0:
                    return idx
            pos += 1


class Refcounts:
    """The refcount table, a cache of refcount blocks, and the cluster allocator.

    Every method that changes anything must be called with the image's
    metadata lock held.
    """

    def __init__(
        self,
        file: ImageFile,
        cluster_bits: int,
        refcount_order: int,
        reftable: array[int],
        reftable_offset: int,
        reftable_clusters: int,
        cache_entries: int,
        write_reftable_pointer: Callable[[int, int], Awaitable[None]],
        store_block: Callable[[int, bytes], Awaitable[None]] | None = None,
    ) -> None:
        self.file = file
        self.cluster_bits = cluster_bits
        self.cluster_size = 1 << cluster_bits
        self.order = refcount_order
        self.rb_bits = cluster_bits + 3 - refcount_order
        self.rb_entries = 1 << self.rb_bits
        self.rb_mask = self.rb_entries - 1
        self.max_refcount = (1 << (1 << refcount_order)) - 1
        self.reftable = reftable
        #: Bumped whenever a reftable entry changes in place (for the overlap checks).
        self.generation = 0
        self.reftable_offset = reftable_offset
        self.reftable_clusters = reftable_clusters
        self._write_reftable_pointer = write_reftable_pointer
        self.free_hint = 0
        #: Host ranges whose refcount dropped to zero, to discard in the file later.
        self.pending_discards: list[tuple[int, int]] = []
        #: Whether freed clusters are discarded in the file (pass-discard-*).
        self.discard_passthrough = False
        self.cache: MetadataCache[RefBlock] = MetadataCache(
            "refcount", cache_entries, self._load, store_block or file.write,
            RefBlock.to_bytes, file.sync,
        )

    async def _load(self, offset: int) -> RefBlock:
        raw = await self.file.read(offset, self.cluster_size)
        return RefBlock.from_bytes(self.order, raw)

    # --- lookups ------------------------------------------------------------------

    def block_offset(self, rt_index: int) -> int:
        if rt_index >= len(self.reftable):
            return 0
        return int(self.reftable[rt_index]) & REFT_OFFSET_MASK

    async def block(self, rt_index: int) -> RefBlock | None:
        offset = self.block_offset(rt_index)
        if not offset:
            return None
        return (await self.cache.get(offset)).value

    async def get(self, cluster_index: int) -> int:
        """The refcount of host cluster ``cluster_index``."""
        blk = await self.block(cluster_index >> self.rb_bits)
        if blk is None:
            return 0
        return blk.get(cluster_index & self.rb_mask)

    async def count_referenced(self, end: int, enough: int) -> int:
        """Clusters below ``end`` with a refcount, counted until ``enough`` are found."""
        count = 0
        for rt in range(0, (end + self.rb_entries - 1) >> self.rb_bits):
            blk = await self.block(rt)
            if blk is not None:
                count += blk.count_nonzero(min(self.rb_entries, end - (rt << self.rb_bits)))
            if count >= enough:
                break
        return count

    async def find_free(self, n: int) -> int:
        """The first cluster index of ``n`` contiguous free clusters at/after the hint."""
        i = self.free_hint
        rbe = self.rb_entries
        run = 0
        run_start = i
        while True:
            rt = i >> self.rb_bits
            offset = self.block_offset(rt)
            base = rt << self.rb_bits
            if not offset:
                if run == 0:
                    run_start = i
                run += base + rbe - i
                if run >= n:
                    return run_start
                i = base + rbe
                continue
            blk = (await self.cache.get(offset)).value
            j = i - base
            while j < rbe:
                if run == 0:
                    z = blk.find_zero(j)
                    if z < 0:
                        j = rbe
                        break
                    j = z
                    run_start = base + z
                e = blk.nonzero_from(j, j + n - run)
                run += e - j
                if run >= n:
                    return run_start
                if e >= rbe:
                    j = rbe
                    break
                run = 0
                j = e + 1
            i = base + rbe

    # --- allocation -----------------------------------------------------------------

    async def alloc(self, n: int) -> int:
        """Allocate ``n`` contiguous clusters (refcount 1); returns the host offset."""
        while True:
            start = await self.find_free(n)
            first_rt = start >> self.rb_bits
            last_rt = (start + n - 1) >> self.rb_bits
            missing = next(
                (rt for rt in range(first_rt, last_rt + 1) if not self.block_offset(rt)), None
            )
            if missing is not None:
                await self._create_block(missing)
                continue  # the new block may sit where we looked
            await self.update(start, n, 1)
            self.free_hint = start + n
            return start << self.cluster_bits

    @contextlib.asynccontextmanager
    async def freed_on_error(self, offset: int, n: int) -> AsyncIterator[None]:
        """Give back ``n`` clusters just allocated at ``offset`` when what fills
        them fails (a full disk, say), as QEMU frees a new L2 table or data
        cluster whose write failed: a failed request leaks nothing."""
        try:
            yield
        except BaseException:
            await self.update(offset >> self.cluster_bits, n, -1)
            raise

    async def update(self, cluster_index: int, n: int, delta: int) -> None:
        """Add ``delta`` to the refcounts of ``n`` clusters (their blocks must exist
        for increments; a decrement below zero is a corruption)."""
        end = cluster_index + n
        ci = cluster_index
        while ci < end:
            rt = ci >> self.rb_bits
            offset = self.block_offset(rt)
            if not offset:
                raise BlockDriverError(
                    f"qcow2: refcount block missing for cluster {ci:#x}", 5
                )
            entry = await self.cache.get(offset)
            blk = entry.value
            stop = min(end, (rt + 1) << self.rb_bits)
            base = rt << self.rb_bits
            if 0 < delta <= self.max_refcount:
                fast = blk.replace_all(ci - base, stop - base, 0, delta)
            else:
                fast = delta < 0 and blk.replace_all(ci - base, stop - base, -delta, 0)
            if fast:
                if delta < 0:
                    self.free_hint = min(self.free_hint, ci)
                    if self.discard_passthrough:
                        for c in range(ci, stop):
                            self._queue_discard(c)
                self.cache.mark_dirty(entry)
                ci = stop
                continue
            for c in range(ci, stop):
                j = c - base
                value = blk.get(j) + delta
                if value < 0 or value > self.max_refcount:
                    raise BlockDriverError(
                        f"qcow2: refcount of cluster {c:#x} out of range ({value})",
                        34 if value > 0 else 22,
                    )
                blk.set(j, value)
                if value == 0:
                    if c < self.free_hint:
                        self.free_hint = c
                    if self.discard_passthrough:
                        self._queue_discard(c)
            self.cache.mark_dirty(entry)
            ci = stop

    def _queue_discard(self, cluster_index: int) -> None:
        offset = cluster_index << self.cluster_bits
        pend = self.pending_discards
        if pend and pend[-1][0] + pend[-1][1] == offset:
            pend[-1] = (pend[-1][0], pend[-1][1] + self.cluster_size)
        else:
            pend.append((offset, self.cluster_size))

    async def process_discards(self) -> None:
        """Discard freed ranges in the file (after the metadata reached the disk)."""
        pend, self.pending_discards = self.pending_discards, []
        for offset, length in pend:
            ci = offset >> self.cluster_bits
            run_start = -1
            for c in range(ci, ci + (length >> self.cluster_bits)):
                free = await self.get(c) == 0
                if free and run_start < 0:
                    run_start = c
                elif not free and run_start >= 0:
                    await self.file.discard(run_start << self.cluster_bits,
                                            (c - run_start) << self.cluster_bits)
                    run_start = -1
            if run_start >= 0:
                end = ci + (length >> self.cluster_bits)
                await self.file.discard(run_start << self.cluster_bits,
                                        (end - run_start) << self.cluster_bits)

    async def _write_reftable_entry(self, rt_index: int) -> None:
        per_sector = META_ALIGN // 8
        first = rt_index - rt_index % per_sector
        data = array_to_u64_be(self.reftable, first, first + per_sector)
        await self.file.write(self.reftable_offset + first * 8, data)
        await self.file.sync()

    async def _create_block(self, rt_index: int) -> None:
        """Create the refcount block for reftable index ``rt_index``."""
        if rt_index >= len(self.reftable):
            await self._grow_reftable(rt_index)
            return
        cb = self.cluster_bits
        where = await self.find_free(1)
        where_rt = where >> self.rb_bits
        if where_rt == rt_index:
            # self-describing: the block accounts for its own cluster
            blk = RefBlock.new(self.order, self.cluster_size)
            blk.set(where & self.rb_mask, 1)
        elif self.block_offset(where_rt):
            await self.update(where, 1, 1)
            await self.cache.flush()
            blk = RefBlock.new(self.order, self.cluster_size)
        else:
            await self._create_block(where_rt)
            return
        try:
            await self.file.write(where << cb, blk.to_bytes())
            await self.file.sync()
        except BaseException:
            if where_rt != rt_index:  # counted in an existing block: give it back
                await self.update(where, 1, -1)
            raise
        self.reftable[rt_index] = where << cb
        self.generation += 1
        await self._write_reftable_entry(rt_index)
        self.cache.insert(where << cb, blk, dirty=False)

    async def _grow_reftable(self, rt_needed: int) -> None:
        """Move to a bigger refcount table, laid out with the blocks that cover it."""
        cb = self.cluster_bits
        cs = self.cluster_size
        old_entries = len(self.reftable)
        area = old_entries << self.rb_bits  # first cluster no current block can cover
        first_rt = old_entries
        nb = 1
        while True:
            need = max(rt_needed + 1, first_rt + nb)
            want = need + need // 2
            table_clusters = (want * 8 + cs - 1) // cs
            total = nb + table_clusters
            blocks = (total + self.rb_entries - 1) // self.rb_entries
            if blocks <= nb:
                break
            nb = blocks
        new_entries = table_clusters * cs // 8
        if new_entries * 8 > QCOW_MAX_REFTABLE_SIZE:
            raise BlockDriverError("qcow2: refcount table would exceed its maximum size", 27)
        blocks_data = []
        for k in range(nb):
            blk = RefBlock.new(self.order, cs)
            base = (first_rt + k) << self.rb_bits
            for c in range(max(area, base), min(area + total, base + self.rb_entries)):
                blk.set(c - base, 1)
            blocks_data.append(blk)
        new_table = array("Q", self.reftable)
        new_table.extend([0] * (new_entries - old_entries))
        for k in range(nb):
            new_table[first_rt + k] = (area + k) << cb
        table_offset = (area + nb) << cb
        await self.cache.flush()
        await self.file.write(area << cb, b"".join(b.to_bytes() for b in blocks_data))
        await self.file.write(table_offset, array_to_u64_be(new_table))
        await self.file.sync()
        await self._write_reftable_pointer(table_offset, table_clusters)
        old_offset, old_clusters = self.reftable_offset, self.reftable_clusters
        self.reftable = new_table
        self.reftable_offset = table_offset
        self.reftable_clusters = table_clusters
        for k, blk in enumerate(blocks_data):
            self.cache.insert((area + k) << cb, blk, dirty=False)
        await self.update(old_offset >> cb, old_clusters, -1)

    # --- helpers for the table-moving operations -------------------------------------

    def covers(self, cluster_index: int) -> bool:
        return bool(self.block_offset(cluster_index >> self.rb_bits))
