"""The mutable state of one open qcow2 image (QEMU's ``BDRVQcow2State`` in
``qcow2.h``) and the primitives the mapping and allocation paths share.

:class:`Qcow2State` holds everything that can change on disk: the header
fields, the L1 table, the L2 slice cache, the refcount table and its block
cache, the snapshot list and the allocation hints.  Cache invalidation throws
the whole image away and loads a new one, so nothing mutable can survive it
by accident.

Concurrency
-----------
One asyncio lock per image serialises every metadata change and every
metadata write-back.  Reads never take it, and neither do writes that land
entirely in clusters that are already allocated and owned (COPIED): those
go straight to the file.

A cluster freed by a metadata change could be handed out again while a
lock-free read or write still targets it.  Every lock-free request therefore
registers itself for its whole duration (:meth:`Qcow2State.enter`), and an
operation that drops a refcount first waits until the requests that started
before its L2 update have finished (:meth:`Qcow2State.drain`).

Write ordering (crash consistency)
----------------------------------
* refcount increments are cached; the L2 cache *depends on* the refcount
  cache, so they reach the disk before any L2 entry that needs them;
* guest data (with COW head and tail) is written into new clusters first; the
  L2 cache is then marked *depends on flush*, so the file is synced before
  the L2 entry pointing at the data is written;
* a new L2 table is written (after its refcount) and synced before the L1
  entry that points at it is written in place (and synced);
* a reference is removed from the cached L2 table before the refcount is
  dropped, and the refcount cache then *depends on* the L2 cache.

A crash can therefore only leak clusters, never point at a free one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from array import array
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from qmpd.block.driver import BlockDriverError
from qmpd.block.extent import HostSpan
from qmpd.block.qcow2.cache import MetadataCache
from qmpd.block.qcow2.fileio import META_ALIGN, ImageFile
from qmpd.block.qcow2.format import (
    INCOMPAT_CORRUPT,
    L1E_OFFSET_MASK,
    L2E_OFFSET_MASK,
    CompressedGeometry,
    Header,
    Snapshot,
    pack_header_fields,
)
from qmpd.block.qcow2.overlap import (
    OL_ACTIVE_L2,
    OL_REFCOUNT_BLOCK,
    OverlapChecker,
    c_hex,
    overlap_message,
    signal_corruption,
)
from qmpd.block.qcow2.refcount import Refcounts, array_to_u64_be, u64_be_to_array

if TYPE_CHECKING:
    from qmpd.block.graph import BlockNode

log = logging.getLogger(__name__)

#: Free-request types, for the pass-discard-* options.
DISCARD_NEVER = "never"
DISCARD_REQUEST = "request"
DISCARD_SNAPSHOT = "snapshot"
DISCARD_OTHER = "other"


@dataclass(frozen=True)
class CacheConfig:
    """Cache geometry computed from the options (see ``driver.read_cache_sizes``)."""

    l2_entries: int
    l2_entry_size: int
    refcount_entries: int


class Qcow2State:
    """All mutable metadata of an open image, request tracking, and the
    header, corruption and data-cluster I/O helpers."""

    def __init__(self, node: BlockNode, file: ImageFile, header: Header,
                 cluster0: bytearray, config: CacheConfig) -> None:
        self.node = node
        self.file = file
        self.header = header
        self.cluster0 = cluster0
        self.version = header.version
        self.size = header.size
        cb = self.cluster_bits = header.cluster_bits
        self.cluster_size = 1 << cb
        self.cmask = self.cluster_size - 1
        self.l2_bits = cb - 3
        self.l2_entries = 1 << self.l2_bits
        self.l2_mask = self.l2_entries - 1
        self.slice_bytes = config.l2_entry_size
        self.slice_entries = self.slice_bytes // 8
        self.slice_bits = self.slice_entries.bit_length() - 1
        self.slice_mask = self.slice_entries - 1
        self.slice_shift = self.slice_bits + 3
        self.comp = CompressedGeometry(cb)
        self.l1: array[int] = array("Q")
        #: Bumped whenever an L1 entry changes in place (the overlap checks follow it).
        self.l1_generation = 0
        self.l1_table_offset = header.l1_table_offset
        self.snapshots: list[Snapshot] = []
        self.snapshot_table_size = 0
        self.lock = asyncio.Lock()
        self._rmw_lock = asyncio.Lock()
        self.l2cache: MetadataCache[array[int]] = MetadataCache(
            "l2", config.l2_entries, self._load_l2_slice, self._store_l2_slice, array_to_u64_be,
            file.sync,
        )
        self.refs = Refcounts(
            file, cb, header.refcount_order, array("Q"), header.refcount_table_offset,
            header.refcount_table_clusters, config.refcount_entries, self.write_reftable_pointer,
            self._store_refblock,
        )
        self.writable = False
        self.direct = bool(node.cache_direct or (node.file is not None and node.file.cache_direct))
        self.corrupt = bool(header.incompatible_features & INCOMPAT_CORRUPT)
        self.broken: str | None = None
        self.broken_errno = 5
        self.signaled_corruption = False
        self.overlap = OverlapChecker(self)
        self.pass_discard = {DISCARD_NEVER: False, DISCARD_REQUEST: False,
                             DISCARD_SNAPSHOT: True, DISCARD_OTHER: False}
        # lock-free request tracking (see the module docstring)
        self._epoch = 0
        self._inflight: dict[int, int] = {}
        self._drainers: list[tuple[int, asyncio.Future[None]]] = []
        #: guest cluster index -> completion of the allocation in flight for it
        self.allocs: dict[int, asyncio.Future[None]] = {}

    # --- header -----------------------------------------------------------------------

    async def write_header_fields(self) -> None:
        """Write the fixed header fields from ``self.header`` (first sector) and sync."""
        fixed = pack_header_fields(self.header)
        self.cluster0[: len(fixed)] = fixed
        await self.file.write(0, bytes(self.cluster0[:META_ALIGN]))
        await self.file.sync()

    async def write_reftable_pointer(self, offset: int, clusters: int) -> None:
        self.header.refcount_table_offset = offset
        self.header.refcount_table_clusters = clusters
        await self.write_header_fields()

    # --- corruption -------------------------------------------------------------------

    async def mark_corrupt(self, message: str, offset: int | None = None,
                           size: int | None = None) -> None:
        """QEMU's fatal ``qcow2_signal_corruption`` (see overlap.py)."""
        await signal_corruption(self, True, offset, size, message)

    async def write_corrupt_bit(self) -> None:
        """Set the corrupt bit on disk (best effort: the node is unusable anyway)."""
        self.header.incompatible_features |= INCOMPAT_CORRUPT
        try:
            await self.write_header_fields()
        except (BlockDriverError, OSError) as exc:
            log.warning("qcow2: could not mark the image corrupt on disk: %s", exc)

    async def pre_write_check(self, host: int, size: int, ign: int = 0) -> None:
        """``qcow2_pre_write_overlap_check``: refuse (EIO) a write onto live metadata."""
        bit = self.overlap.check(host, size, ign)
        if bit:
            await self.mark_corrupt(overlap_message(bit), host, size)
            raise BlockDriverError("Input/output error", 5)

    async def bad_l2_offset(self, l2off: int, l1i: int) -> BlockDriverError:
        await self.mark_corrupt(
            f"L2 table offset {c_hex(l2off)} unaligned (L1 index: {c_hex(l1i)})")
        return BlockDriverError("Input/output error", 5)

    async def bad_host(self, entry: int, ci: int) -> BlockDriverError:
        """A read found an unaligned data cluster offset."""
        l2off = int(self.l1[ci >> self.l2_bits]) & L1E_OFFSET_MASK
        await self.mark_corrupt(
            f"Cluster allocation offset {c_hex(entry & L2E_OFFSET_MASK)} unaligned "
            f"(L2 offset: {c_hex(l2off)}, L2 index: {c_hex(ci & self.l2_mask)})")
        return BlockDriverError("Input/output error", 5)

    async def bad_data_cluster(self, entry: int, guest: int) -> BlockDriverError:
        """A write found an unaligned data cluster offset."""
        await self.mark_corrupt(
            f"Data cluster offset {c_hex(entry & L2E_OFFSET_MASK)} unaligned "
            f"(guest offset: {c_hex(guest)})")
        return BlockDriverError("Input/output error", 5)

    def check_usable(self) -> None:
        if self.broken is not None:
            raise BlockDriverError(self.broken, self.broken_errno)

    def check_writable(self) -> None:
        if self.broken is not None:
            raise BlockDriverError(self.broken, self.broken_errno)
        if not self.writable:
            raise BlockDriverError("qcow2: image is not open for writing", 1)

    # --- metadata caches ---------------------------------------------------------------

    async def _load_l2_slice(self, offset: int) -> array[int]:
        raw = await self.file.read(offset, self.slice_bytes)
        return u64_be_to_array(raw)

    async def _store_l2_slice(self, offset: int, data: bytes) -> None:
        await self.pre_write_check(offset, len(data), OL_ACTIVE_L2)
        await self.file.write(offset, data)

    async def _store_refblock(self, offset: int, data: bytes) -> None:
        await self.pre_write_check(offset, len(data), OL_REFCOUNT_BLOCK)
        await self.file.write(offset, data)

    def slice_key(self, l2_offset: int, l2_index: int) -> int:
        return l2_offset + ((l2_index >> self.slice_bits) << self.slice_shift)

    async def flush_metadata(self) -> None:
        """Write back every dirty L2 slice, then every dirty refcount block (lock held)."""
        await self.l2cache.write_all()
        await self.refs.cache.write_all()

    def idle(self) -> bool:
        """Nothing in flight, nothing dirty: a flush would write nothing of its own."""
        if self.allocs or self._inflight or self.lock.locked() or self.refs.pending_discards:
            return False
        # Plain loops, here: this runs for every node at every handover.
        for entry in self.l2cache.entries.values():
            if entry.dirty:
                return False
        for block in self.refs.cache.entries.values():
            if block.dirty:
                return False
        return True

    # --- lock-free request tracking -----------------------------------------------------

    def enter(self) -> int:
        """Register a lock-free request; pass the token to :meth:`leave`."""
        ep = self._epoch
        d = self._inflight
        d[ep] = d.get(ep, 0) + 1
        return ep

    def leave(self, ep: int) -> None:
        d = self._inflight
        c = d[ep] - 1
        if c:
            d[ep] = c
            return
        del d[ep]
        if self._drainers:
            oldest = min(d) if d else None
            keep = []
            for target, fut in self._drainers:
                if oldest is None or oldest > target:
                    if not fut.done():
                        fut.set_result(None)
                else:
                    keep.append((target, fut))
            self._drainers = keep

    async def drain(self) -> None:
        """Wait for every lock-free request that started before now."""
        target = self._epoch
        self._epoch += 1
        if not self._inflight or min(self._inflight) > target:
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._drainers.append((target, fut))
        await fut

    # --- allocations in flight -----------------------------------------------------------

    @contextlib.asynccontextmanager
    async def exclusive(self, first: int, last: int) -> AsyncIterator[None]:
        """The metadata lock, once no allocation of guest clusters first..last is
        in flight."""
        await self.lock_clusters(first, last)
        try:
            yield
        finally:
            self.lock.release()

    async def lock_clusters(self, first: int, last: int) -> None:
        """:meth:`exclusive` without the context manager (the write path's, per
        request): the caller releases :attr:`lock`."""
        while True:
            await self._wait_allocs(first, last)
            await self.lock.acquire()
            if not self._allocs_overlap(first, last):
                return
            self.lock.release()

    def _allocs_overlap(self, first: int, last: int) -> bool:
        allocs = self.allocs
        if not allocs:
            return False
        if last - first < len(allocs):
            return not allocs.keys().isdisjoint(range(first, last + 1))
        return any(first <= c <= last for c in allocs)

    async def _wait_allocs(self, first: int, last: int) -> None:
        while self._allocs_overlap(first, last):
            allocs = self.allocs
            if last - first < len(allocs):
                fut = next(allocs[c] for c in range(first, last + 1) if c in allocs)
            else:
                fut = next(f for c, f in allocs.items() if first <= c <= last)
            await asyncio.shield(fut)

    async def quiesce(self) -> None:
        """Wait for in-flight allocations and lock-free requests (inactivation)."""
        while self.allocs:
            await asyncio.shield(next(iter(self.allocs.values())))
        await self.drain()

    # --- data clusters -------------------------------------------------------------------

    async def data_read(self, host: int, length: int) -> bytes:
        if self.direct and (host | length) & (META_ALIGN - 1):
            start = host & ~(META_ALIGN - 1)
            end = (host + length + META_ALIGN - 1) & ~(META_ALIGN - 1)
            raw = await self.file.read(start, end - start)
            return raw[host - start : host - start + length]
        return await self.file.read(host, length)

    async def data_read_into(self, host: int, buf: memoryview) -> None:
        if self.direct and (host | buf.nbytes) & (META_ALIGN - 1):
            buf[:] = await self.data_read(host, buf.nbytes)
            return
        await self.file.read_into(host, buf)

    async def data_write(self, host: int, data: bytes | memoryview | HostSpan) -> None:
        if isinstance(data, HostSpan):
            await self.file.write_span(host, data)
            return
        if self.direct and (host | len(data)) & (META_ALIGN - 1):
            # O_DIRECT needs whole sectors: read-modify-write, one at a time so
            # that two writes to different bytes of one sector cannot race.
            start = host & ~(META_ALIGN - 1)
            end = (host + len(data) + META_ALIGN - 1) & ~(META_ALIGN - 1)
            async with self._rmw_lock:
                buf = bytearray(await self.file.read(start, end - start))
                buf[host - start : host - start + len(data)] = data
                await self.file.write(start, bytes(buf))
            return
        if isinstance(data, memoryview):
            # The caller's buffer outlives the write: no copy.
            await self.file.write_view(host, data)
            return
        await self.file.write(host, data)
