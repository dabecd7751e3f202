"""The mutable state of one open qcow2 image, and guest I/O on it.

:class:`Qcow2Image` holds everything that can change on disk: the header
fields, the L1 table, the L2 slice cache, the refcount table and its block
cache, the snapshot list and the allocation hints.  Cache invalidation
(``invalidate_cache``) simply throws the object away and loads a new one, so
nothing mutable can survive it by accident.

Concurrency
-----------
One asyncio lock per image serialises every metadata change and every
metadata write-back.  Reads never take it, and neither do writes that land
entirely in clusters that are already allocated and owned (COPIED): those
go straight to the file.

A cluster freed by a metadata change could be handed out again while a
lock-free read or write still targets it.  Every lock-free request therefore
registers itself for its whole duration, and an operation that drops a
refcount first waits until the requests that started before its L2 update
have finished (:meth:`Qcow2Image._drain`).

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
import zlib
from array import array
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from qmpd.block.driver import BlockDriverError, BlockStatus
from qmpd.block.qcow2 import resize, zero
from qmpd.block.qcow2.cache import CacheEntry, MetadataCache
from qmpd.block.qcow2.fileio import META_ALIGN, ImageFile
from qmpd.block.qcow2.format import (
    AUTOCLEAR_BITMAPS,
    AUTOCLEAR_MASK,
    INCOMPAT_CORRUPT,
    INCOMPAT_DIRTY,
    L1E_OFFSET_MASK,
    L2E_OFFSET_MASK,
    QCOW_OFLAG_COMPRESSED,
    QCOW_OFLAG_COPIED,
    QCOW_OFLAG_ZERO,
    ClusterType,
    CompressedGeometry,
    Header,
    Qcow2FormatError,
    Snapshot,
    check_features,
    check_tables,
    cluster_type,
    pack_header_fields,
    parse_header,
    parse_snapshots,
)
from qmpd.block.qcow2.overlap import (
    OL_ACTIVE_L1,
    OL_ACTIVE_L2,
    OL_REFCOUNT_BLOCK,
    OverlapChecker,
    c_hex,
    overlap_message,
    signal_corruption,
)
from qmpd.block.qcow2.refcount import Refcounts, array_to_u64_be, u64_be_to_array
from qmpd.block.qcow2.zero import DISCARD_NEVER, DISCARD_OTHER, DISCARD_REQUEST, DISCARD_SNAPSHOT

if TYPE_CHECKING:
    from qmpd.block.graph import BlockNode

log = logging.getLogger(__name__)

_CZ = QCOW_OFLAG_COMPRESSED | QCOW_OFLAG_ZERO
_FAST_WRITE_MASK = QCOW_OFLAG_COPIED | QCOW_OFLAG_COMPRESSED | QCOW_OFLAG_ZERO

# write-path categories of an L2 entry
_INPLACE = 0  # normal, owned (COPIED): overwrite in place
_REUSE = 1  # zero flag on an owned cluster: fill it, then clear the flag
_ALLOC = 2  # anything else: new cluster, COW, then point the entry at it


@dataclass(frozen=True)
class CacheConfig:
    """Cache geometry computed from the options (see ``driver.read_cache_sizes``)."""

    l2_entries: int
    l2_entry_size: int
    refcount_entries: int


@dataclass
class _AllocPlan:
    """An allocation in flight: guest clusters ``ci..ci+k-1`` -> host ``host``."""

    ci: int
    k: int
    host: int
    pos: int
    run_end: int
    old: list[int]
    l2off: int
    fut: asyncio.Future[None]


entry_type = cluster_type


def _write_category(entry: int) -> int:
    if entry & QCOW_OFLAG_COMPRESSED or not entry & L2E_OFFSET_MASK:
        return _ALLOC
    if not entry & QCOW_OFLAG_COPIED:
        return _ALLOC
    return _REUSE if entry & QCOW_OFLAG_ZERO else _INPLACE


_FIRST_READ = 64 * 1024


class Qcow2Image:
    """All mutable metadata of an open image, and the guest I/O paths."""

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
            header.refcount_table_clusters, config.refcount_entries, self._write_reftable_pointer,
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
        self._allocs: dict[int, asyncio.Future[None]] = {}

    # --- loading ----------------------------------------------------------------------

    @classmethod
    async def load(cls, node: BlockNode, config_for: Callable[[Header], CacheConfig],
                   writable: bool, active: bool) -> Qcow2Image:
        """Read and check the header and tables; repair or clean up if writable.

        ``config_for`` turns the header into cache geometry (it may raise an
        option error: the virtual size takes part in the default sizes).
        """
        child = node.file
        if child is None:
            raise Qcow2FormatError("qcow2 needs a 'file' child")
        file = ImageFile(child)
        # One read covers the header cluster of the common cluster sizes
        # (activation does this for every node, so each round trip counts).
        first = await file.read(0, _FIRST_READ)
        if len(first) < 72 or first[:4] != b"QFI\xfb":
            raise Qcow2FormatError("Image is not in qcow2 format")
        cluster_bits = int.from_bytes(first[20:24], "big")
        if 9 <= cluster_bits <= 21 and cluster_bits:
            if 1 << cluster_bits <= len(first):
                buf = first[: 1 << cluster_bits]
            else:
                buf = await file.read(0, 1 << cluster_bits)
        else:
            buf = first[:META_ALIGN]
        header = parse_header(buf)
        check_features(header, writable)
        check_tables(header)
        config = config_for(header)
        img = cls(node, file, header, bytearray(buf), config)
        await img._load_tables()
        img.writable = writable and active
        if img.writable:
            await img._open_for_writing()
        return img

    async def _load_tables(self) -> None:
        hdr = self.header
        cs = self.cluster_size
        if hdr.l1_size:
            nbytes = hdr.l1_size * 8
            raw = await self.file.read(hdr.l1_table_offset,
                                       (nbytes + META_ALIGN - 1) & ~(META_ALIGN - 1))
            self.l1 = u64_be_to_array(memoryview(raw)[:nbytes])
        self.l1_table_offset = hdr.l1_table_offset
        raw = await self.file.read(hdr.refcount_table_offset, hdr.refcount_table_clusters * cs)
        self.refs.reftable = u64_be_to_array(raw)
        if hdr.nb_snapshots:
            length = 64 * 1024
            while True:
                raw = await self.file.read(hdr.snapshots_offset, length)
                try:
                    self.snapshots, self.snapshot_table_size = parse_snapshots(
                        raw, hdr.nb_snapshots)
                    break
                except Qcow2FormatError:
                    if length >= 64 * 1024 * 1024:
                        raise Qcow2FormatError("Snapshot table too large") from None
                    length *= 4
        # An unaligned L1 entry is found (and the image marked corrupt) when
        # a request uses it, as in QEMU, not at open.

    async def _open_for_writing(self) -> None:
        hdr = self.header
        # We maintain no bitmaps and know no other autoclear feature: clear
        # them all before the first write (QEMU clears the unknown ones).
        # Bitmap clusters then count as leaks, as with any program that does
        # not know bitmaps.
        if hdr.version >= 3 and hdr.autoclear_features & (AUTOCLEAR_BITMAPS | ~AUTOCLEAR_MASK):
            hdr.autoclear_features &= AUTOCLEAR_MASK & ~AUTOCLEAR_BITMAPS
            await self._write_header_fields()
        if hdr.incompatible_features & INCOMPAT_DIRTY:
            from qmpd.block.qcow2.repair import repair_refcounts

            try:
                await repair_refcounts(self)
            except (BlockDriverError, Qcow2FormatError, OSError) as exc:
                log.warning("qcow2: repair of dirty image failed: %s", exc)
                raise Qcow2FormatError("Could not repair dirty image", 5) from exc
            hdr.incompatible_features &= ~INCOMPAT_DIRTY
            await self._write_header_fields()

    # --- header -----------------------------------------------------------------------

    async def _write_header_fields(self) -> None:
        """Write the fixed header fields from ``self.header`` (first sector) and sync."""
        fixed = pack_header_fields(self.header)
        self.cluster0[: len(fixed)] = fixed
        await self.file.write(0, bytes(self.cluster0[:META_ALIGN]))
        await self.file.sync()

    async def _write_reftable_pointer(self, offset: int, clusters: int) -> None:
        self.header.refcount_table_offset = offset
        self.header.refcount_table_clusters = clusters
        await self._write_header_fields()

    async def mark_corrupt(self, message: str, offset: int | None = None,
                           size: int | None = None) -> None:
        """QEMU's fatal ``qcow2_signal_corruption`` (see overlap.py)."""
        await signal_corruption(self, True, offset, size, message)

    async def write_corrupt_bit(self) -> None:
        """Set the corrupt bit on disk (best effort: the node is unusable anyway)."""
        self.header.incompatible_features |= INCOMPAT_CORRUPT
        try:
            await self._write_header_fields()
        except (BlockDriverError, OSError) as exc:
            log.warning("qcow2: could not mark the image corrupt on disk: %s", exc)

    async def pre_write_check(self, host: int, size: int, ign: int = 0) -> None:
        """``qcow2_pre_write_overlap_check``: refuse (EIO) a write onto live metadata."""
        bit = self.overlap.check(host, size, ign)
        if bit:
            await self.mark_corrupt(overlap_message(bit), host, size)
            raise BlockDriverError("Input/output error", 5)

    async def _store_l2_slice(self, offset: int, data: bytes) -> None:
        await self.pre_write_check(offset, len(data), OL_ACTIVE_L2)
        await self.file.write(offset, data)

    async def _store_refblock(self, offset: int, data: bytes) -> None:
        await self.pre_write_check(offset, len(data), OL_REFCOUNT_BLOCK)
        await self.file.write(offset, data)

    # --- lock-free request tracking -----------------------------------------------------

    def _enter(self) -> int:
        ep = self._epoch
        d = self._inflight
        d[ep] = d.get(ep, 0) + 1
        return ep

    def _leave(self, ep: int) -> None:
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

    async def _drain(self) -> None:
        """Wait for every lock-free request that started before now."""
        target = self._epoch
        self._epoch += 1
        if not self._inflight or min(self._inflight) > target:
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._drainers.append((target, fut))
        await fut

    # --- L2 lookups ------------------------------------------------------------------------

    async def _load_l2_slice(self, offset: int) -> array[int]:
        raw = await self.file.read(offset, self.slice_bytes)
        return u64_be_to_array(raw)

    def _slice_key(self, l2_offset: int, l2_index: int) -> int:
        return l2_offset + ((l2_index >> self.slice_bits) << self.slice_shift)

    def lookup_cached(self, ci: int) -> int | None:
        """The L2 entry of guest cluster ``ci`` if its slice is cached (0 if no L2 table)."""
        l2off = self.l1[ci >> self.l2_bits] & L1E_OFFSET_MASK
        if not l2off:
            return 0
        idx = ci & self.l2_mask
        key = l2off + ((idx >> self.slice_bits) << self.slice_shift)
        cache = self.l2cache
        ent = cache.entries.get(key)
        if ent is None:
            return None
        cache.entries.move_to_end(key)
        cache.hits += 1
        return int(ent.value[idx & self.slice_mask])

    def host_run(self, offset: int, length: int) -> int | None:
        """The host offset of guest range [offset, offset+length) if it is stored
        in contiguous normal clusters whose L2 entries are cached, else None."""
        cb = self.cluster_bits
        ci = offset >> cb
        last = (offset + length - 1) >> cb
        e = self.lookup_cached(ci)
        if e is None or e & _CZ or not e & L2E_OFFSET_MASK or e & L2E_OFFSET_MASK & self.cmask:
            return None
        host = e & L2E_OFFSET_MASK
        nxt = host
        for c in range(ci + 1, last + 1):
            nxt += self.cluster_size
            f = self.lookup_cached(c)
            if f is None or f & (_CZ | L2E_OFFSET_MASK) != nxt:
                return None
        return host + (offset & self.cmask)

    async def entries(self, ci: int, n: int) -> array[int]:
        """L2 entries of up to ``n`` clusters from ``ci`` (never crossing a slice)."""
        l1i = ci >> self.l2_bits
        if l1i >= len(self.l1):
            raise BlockDriverError("qcow2: access beyond the L1 table", 5)
        l2off = self.l1[l1i] & L1E_OFFSET_MASK
        idx = ci & self.l2_mask
        o = idx & self.slice_mask
        k = min(n, self.slice_entries - o)
        if not l2off:
            return array("Q", bytes(8 * k))
        if l2off & self.cmask:
            raise await self._bad_l2_offset(l2off, l1i)
        key = l2off + ((idx >> self.slice_bits) << self.slice_shift)
        ent = self.l2cache.lookup(key)
        if ent is None:
            ent = await self.l2cache.get(key)
        return ent.value[o : o + k]

    async def _bad_l2_offset(self, l2off: int, l1i: int) -> BlockDriverError:
        await self.mark_corrupt(
            f"L2 table offset {c_hex(l2off)} unaligned (L1 index: {c_hex(l1i)})")
        return BlockDriverError("Input/output error", 5)

    async def _bad_host(self, entry: int, ci: int) -> BlockDriverError:
        """A read found an unaligned data cluster offset."""
        l2off = int(self.l1[ci >> self.l2_bits]) & L1E_OFFSET_MASK
        await self.mark_corrupt(
            f"Cluster allocation offset {c_hex(entry & L2E_OFFSET_MASK)} unaligned "
            f"(L2 offset: {c_hex(l2off)}, L2 index: {c_hex(ci & self.l2_mask)})")
        return BlockDriverError("Input/output error", 5)

    async def _bad_data_cluster(self, entry: int, guest: int) -> BlockDriverError:
        """A write found an unaligned data cluster offset."""
        await self.mark_corrupt(
            f"Data cluster offset {c_hex(entry & L2E_OFFSET_MASK)} unaligned "
            f"(guest offset: {c_hex(guest)})")
        return BlockDriverError("Input/output error", 5)

    # --- reads -------------------------------------------------------------------------------

    def check_usable(self) -> None:
        if self.broken is not None:
            raise BlockDriverError(self.broken, self.broken_errno)

    async def read(self, offset: int, length: int) -> bytes:
        if self.broken is not None:
            raise BlockDriverError(self.broken, self.broken_errno)
        if length <= 0 or offset < 0 or offset + length > self.size:
            if length == 0:
                return b""
            raise BlockDriverError("Input/output error: request beyond end of device", 5)
        cb = self.cluster_bits
        ci = offset >> cb
        in_off = offset & self.cmask
        tok = self._enter()
        try:
            if in_off + length <= self.cluster_size:
                e = self.lookup_cached(ci)
                if e is None:
                    e = int((await self.entries(ci, 1))[0])
                host = e & L2E_OFFSET_MASK
                if host and not e & _CZ:
                    if host & self.cmask:
                        raise await self._bad_host(e, ci)
                    return await self._data_read(host + in_off, length)
            return await self._read_general(offset, length)
        finally:
            self._leave(tok)

    async def _data_read(self, host: int, length: int) -> bytes:
        if self.direct and (host | length) & (META_ALIGN - 1):
            start = host & ~(META_ALIGN - 1)
            end = (host + length + META_ALIGN - 1) & ~(META_ALIGN - 1)
            raw = await self.file.read(start, end - start)
            return raw[host - start : host - start + length]
        return await self.file.read(host, length)

    async def _data_write(self, host: int, data: bytes | memoryview) -> None:
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
        await self.file.write(host, data if isinstance(data, bytes) else bytes(data))

    async def read_backing(self, offset: int, length: int) -> bytes:
        backing = self.node.backing
        if backing is None:
            return bytes(length)
        bsize = backing.size()
        if offset >= bsize:
            return bytes(length)
        n = min(length, bsize - offset)
        data = await backing.read(offset, n)
        if n < length:
            data += bytes(length - n)
        return data

    async def read_compressed(self, entry: int) -> bytes:
        """The whole decompressed cluster of a compressed L2 entry."""
        coffset, csize = self.comp.parse(entry)
        start = coffset & ~(META_ALIGN - 1)
        end = (coffset + csize + META_ALIGN - 1) & ~(META_ALIGN - 1)
        raw = await self.file.read(start, end - start)
        data = memoryview(raw)[coffset - start : coffset - start + csize]
        cs = self.cluster_size

        def inflate() -> bytes:
            try:
                d = zlib.decompressobj(-15)
                return d.decompress(data, cs)
            except zlib.error:
                return b""

        out = inflate() if cs <= 65536 else await self.node.graph.run_io(inflate)
        if len(out) != cs:
            raise BlockDriverError("qcow2: could not decompress cluster", 5)
        return out

    async def _read_general(self, offset: int, length: int) -> bytes:
        cb = self.cluster_bits
        cs = self.cluster_size
        cmask = self.cmask
        parts: list[bytes] = []
        pos = offset
        end = offset + length
        while pos < end:
            ci = pos >> cb
            ents = await self.entries(ci, ((end - 1) >> cb) - ci + 1)
            m = len(ents)
            i = 0
            while i < m:
                e = int(ents[i])
                t = entry_type(e)
                j = i + 1
                if t == ClusterType.NORMAL:
                    host = e & L2E_OFFSET_MASK
                    if host & cmask:
                        raise await self._bad_host(e, ci + i)
                    nxt = host + cs
                    while j < m and int(ents[j]) & (L2E_OFFSET_MASK | _CZ) == nxt:
                        j += 1
                        nxt += cs
                elif t == ClusterType.UNALLOCATED:
                    while j < m and entry_type(int(ents[j])) == ClusterType.UNALLOCATED:
                        j += 1
                elif t != ClusterType.COMPRESSED:
                    while j < m and entry_type(int(ents[j])) in (
                        ClusterType.ZERO_PLAIN, ClusterType.ZERO_ALLOC
                    ):
                        j += 1
                run_end = min(end, (ci + j) << cb)
                n = run_end - pos
                if t == ClusterType.NORMAL:
                    parts.append(await self._data_read((e & L2E_OFFSET_MASK) + (pos & cmask), n))
                elif t == ClusterType.UNALLOCATED:
                    parts.append(await self.read_backing(pos, n))
                elif t == ClusterType.COMPRESSED:
                    data = await self.read_compressed(e)
                    parts.append(data[pos & cmask : (pos & cmask) + n])
                else:
                    parts.append(bytes(n))
                pos = run_end
                i = j
        return parts[0] if len(parts) == 1 else b"".join(parts)

    # --- block status --------------------------------------------------------------------------

    async def block_status(self, offset: int, length: int) -> BlockStatus:
        self.check_usable()
        cb = self.cluster_bits
        cs = self.cluster_size
        end = min(offset + length, self.size)
        if offset >= end:
            return BlockStatus(length=0, data=False, zero=True)
        ci = offset >> cb
        ents = await self.entries(ci, ((end - 1) >> cb) - ci + 1)
        e = int(ents[0])
        t = entry_type(e)
        j = 1
        m = len(ents)
        if t == ClusterType.NORMAL:
            nxt = (e & L2E_OFFSET_MASK) + cs
            while j < m and int(ents[j]) & (L2E_OFFSET_MASK | _CZ) == nxt:
                j += 1
                nxt += cs
        elif t == ClusterType.ZERO_ALLOC:
            nxt = (e & L2E_OFFSET_MASK) + cs
            while j < m and entry_type(int(ents[j])) == ClusterType.ZERO_ALLOC and (
                int(ents[j]) & L2E_OFFSET_MASK == nxt
            ):
                j += 1
                nxt += cs
        elif t != ClusterType.COMPRESSED:
            while j < m and entry_type(int(ents[j])) == t:
                j += 1
        n = min(end, (ci + j) << cb) - offset
        in_off = offset & self.cmask
        if t == ClusterType.NORMAL:
            return BlockStatus(length=n, data=True, zero=False,
                               offset=(e & L2E_OFFSET_MASK) + in_off)
        if t == ClusterType.COMPRESSED:
            return BlockStatus(length=n, data=True, zero=False)
        if t == ClusterType.ZERO_ALLOC:
            return BlockStatus(length=n, data=False, zero=True,
                               offset=(e & L2E_OFFSET_MASK) + in_off)
        if t == ClusterType.ZERO_PLAIN:
            return BlockStatus(length=n, data=False, zero=True)
        backing = self.node.backing
        if backing is None:
            return BlockStatus(length=n, data=False, zero=True, allocated=False)
        bsize = backing.size()
        if offset >= bsize:
            return BlockStatus(length=n, data=False, zero=True, allocated=False)
        return BlockStatus(length=min(n, bsize - offset), data=False, zero=False,
                           allocated=False)

    # --- writes ----------------------------------------------------------------------------------

    def check_writable(self) -> None:
        if self.broken is not None:
            raise BlockDriverError(self.broken, self.broken_errno)
        if not self.writable:
            raise BlockDriverError("qcow2: image is not open for writing", 1)

    async def write(self, offset: int, data: bytes | memoryview) -> None:
        self.check_writable()
        n = len(data)
        if not n:
            return
        if offset < 0 or offset + n > self.size:
            raise BlockDriverError("Input/output error: request beyond end of device", 5)
        cb = self.cluster_bits
        ci = offset >> cb
        in_off = offset & self.cmask
        last = (offset + n - 1) >> cb
        # Fast path: every cluster owned (COPIED) and contiguous on the host,
        # all in one cached L2 slice: no metadata changes, no lock.
        e = self.lookup_cached(ci)
        if e is None:
            await self.entries(ci, 1)
            e = self.lookup_cached(ci)
        if e is not None and e & _FAST_WRITE_MASK == QCOW_OFLAG_COPIED and e & L2E_OFFSET_MASK:
            host = e & L2E_OFFSET_MASK
            ok = not host & self.cmask
            if ok and last != ci:
                nxt = host
                for c in range(ci + 1, last + 1):
                    nxt += self.cluster_size
                    f = self.lookup_cached(c)
                    if f is None or f & (_FAST_WRITE_MASK | L2E_OFFSET_MASK) != (
                        QCOW_OFLAG_COPIED | nxt
                    ):
                        ok = False
                        break
            if ok and not self.overlap.check(host + in_off, n):
                tok = self._enter()
                try:
                    await self._data_write(host + in_off, data)
                finally:
                    self._leave(tok)
                return
        await self._write_slow(offset, memoryview(data) if isinstance(data, bytes) else data)

    async def _write_slow(self, offset: int, data: memoryview) -> None:
        """Writes that change metadata.  Allocations drop the lock for the data
        write (like QEMU's in-flight ``QCowL2Meta``): the guest clusters are
        registered as in flight, so any other request touching them waits."""
        cb = self.cluster_bits
        pos = offset
        end = offset + len(data)
        while pos < end:
            async with self._exclusive(pos >> cb, (end - 1) >> cb):
                self.check_writable()
                pos, plan = await self._write_step(offset, data, pos, end, True)
            if plan is not None:
                await self._finish_alloc(plan, data[plan.pos - offset : plan.run_end - offset])

    @contextlib.asynccontextmanager
    async def _exclusive(self, first: int, last: int) -> AsyncIterator[None]:
        """The metadata lock, once no allocation of guest clusters first..last is
        in flight."""
        while True:
            await self._wait_allocs(first, last)
            await self.lock.acquire()
            if not self._allocs_overlap(first, last):
                break
            self.lock.release()
        try:
            yield
        finally:
            self.lock.release()

    def _allocs_overlap(self, first: int, last: int) -> bool:
        allocs = self._allocs
        if not allocs:
            return False
        if last - first < len(allocs):
            return any(c in allocs for c in range(first, last + 1))
        return any(first <= c <= last for c in allocs)

    async def _wait_allocs(self, first: int, last: int) -> None:
        while self._allocs_overlap(first, last):
            allocs = self._allocs
            if last - first < len(allocs):
                fut = next(allocs[c] for c in range(first, last + 1) if c in allocs)
            else:
                fut = next(f for c, f in allocs.items() if first <= c <= last)
            await asyncio.shield(fut)

    async def quiesce(self) -> None:
        """Wait for in-flight allocations and lock-free requests (inactivation)."""
        while self._allocs:
            await asyncio.shield(next(iter(self._allocs.values())))
        await self._drain()

    async def _l2_for_write(self, l1i: int) -> int:
        """The offset of a writable (owned) L2 table for L1 index ``l1i``."""
        l1e = int(self.l1[l1i])
        if l1e & L1E_OFFSET_MASK & self.cmask:
            raise await self._bad_l2_offset(l1e & L1E_OFFSET_MASK, l1i)
        if l1e & QCOW_OFLAG_COPIED and l1e & L1E_OFFSET_MASK:
            return l1e & L1E_OFFSET_MASK
        old = l1e & L1E_OFFSET_MASK
        cs = self.cluster_size
        new = await self.refs.alloc(1)
        for k in range(0, cs, self.slice_bytes):
            self.l2cache.drop(new + k)
        if old:
            content = await self.file.read(old, cs)
        else:
            content = bytes(cs)
        # refcount of the new table, then the table, on disk before the L1 entry
        await self.pre_write_check(new, self.slice_bytes, OL_ACTIVE_L2)
        async with self.refs.freed_on_error(new, 1):
            await self.refs.cache.write_all()
            await self.file.write(new, content)
            await self.file.sync()
        self.l1[l1i] = new | QCOW_OFLAG_COPIED
        self.l1_generation += 1
        await self._write_l1_entry(l1i)
        if old:
            await self._drain()
            await self.refs.update(old >> self.cluster_bits, 1, -1)
        return new

    async def _write_l1_entry(self, l1i: int) -> None:
        per_sector = META_ALIGN // 8
        first = l1i - l1i % per_sector
        data = array_to_u64_be(self.l1, first, first + per_sector)
        data += bytes(META_ALIGN - len(data))
        await self.pre_write_check(self.l1_table_offset + first * 8, META_ALIGN, OL_ACTIVE_L1)
        await self.file.write(self.l1_table_offset + first * 8, data)
        await self.file.sync()

    async def _writable_slice(self, ci: int) -> CacheEntry[array[int]]:
        l2off = await self._l2_for_write(ci >> self.l2_bits)
        return await self.l2cache.get(self._slice_key(l2off, ci & self.l2_mask))

    async def cow_part(self, ci: int, entry: int, start: int, stop: int) -> bytes:
        """Guest cluster ``ci``'s current bytes [start, stop) (for copy-on-write)."""
        if stop <= start:
            return b""
        t = entry_type(entry)
        if t == ClusterType.UNALLOCATED:
            return await self.read_backing((ci << self.cluster_bits) + start, stop - start)
        if t == ClusterType.NORMAL:
            return await self._data_read((entry & L2E_OFFSET_MASK) + start, stop - start)
        if t == ClusterType.COMPRESSED:
            return (await self.read_compressed(entry))[start:stop]
        return bytes(stop - start)

    async def _write_locked(self, offset: int, data: memoryview) -> None:
        """A whole write with the lock held throughout (zero-write fallbacks)."""
        pos = offset
        end = offset + len(data)
        while pos < end:
            pos, _ = await self._write_step(offset, data, pos, end, False)
        await self.l2cache.trim()
        await self.refs.cache.trim()

    async def _write_step(self, offset: int, data: memoryview, pos: int, end: int,
                          defer_alloc: bool) -> tuple[int, _AllocPlan | None]:
        """Write from ``pos`` through one L2 slice (lock held).  With
        ``defer_alloc``, stop at the first run that needs new clusters: allocate
        them, register the run as in flight and return its plan."""
        cb = self.cluster_bits
        cs = self.cluster_size
        cmask = self.cmask
        ci = pos >> cb
        entry = await self._writable_slice(ci)
        entry.pins += 1
        try:
            arr = entry.value
            o = ci & self.slice_mask
            m = min(((end - 1) >> cb) - ci + 1, self.slice_entries - o)
            i = 0
            while i < m:
                e = int(arr[o + i])
                cat = _write_category(e)
                j = i + 1
                if cat == _INPLACE:
                    nxt = (e & L2E_OFFSET_MASK) + cs
                    while j < m and int(arr[o + j]) & (
                        _FAST_WRITE_MASK | L2E_OFFSET_MASK
                    ) == QCOW_OFLAG_COPIED | nxt:
                        j += 1
                        nxt += cs
                elif cat == _ALLOC:
                    while j < m and _write_category(int(arr[o + j])) == _ALLOC:
                        j += 1
                run_end = min(end, (ci + j) << cb)
                chunk = data[pos - offset : run_end - offset]
                if cat == _INPLACE:
                    host = (e & L2E_OFFSET_MASK) + (pos & cmask)
                    if (e & L2E_OFFSET_MASK) & cmask:
                        raise await self._bad_data_cluster(e, pos)
                    await self.pre_write_check(host, len(chunk))
                    await self._data_write(host, chunk)
                elif cat == _REUSE:
                    host = e & L2E_OFFSET_MASK
                    if host & cmask:
                        raise await self._bad_data_cluster(e, pos)
                    await self.pre_write_check(host + (pos & cmask), len(chunk))
                    head = pos & cmask
                    tail = ((run_end - 1) & cmask) + 1
                    buf = b"".join((bytes(head), chunk, bytes(cs - tail)))
                    await self._data_write(host, buf)
                    self.l2cache.set_depends_on_flush()
                    arr[o + i] = host | QCOW_OFLAG_COPIED
                    self.l2cache.mark_dirty(entry)
                elif defer_alloc:
                    plan = await self._plan_alloc(ci + i, arr, o + i, j - i, pos, run_end)
                    return run_end, plan
                else:
                    await self._alloc_run(ci + i, arr, o + i, j - i, pos, run_end, chunk,
                                          entry)
                pos = run_end
                i = j
        finally:
            entry.pins -= 1
        return pos, None

    async def _plan_alloc(self, ci: int, arr: array[int], slot: int, k: int, pos: int,
                          run_end: int) -> _AllocPlan:
        """Allocate host clusters for guest clusters ``ci..ci+k-1`` and mark them
        in flight; the data is written and the L2 entries linked later."""
        old = [int(arr[slot + m]) for m in range(k)]
        host = await self.refs.alloc(k)
        # QEMU checks the guest data's range (its COW follows only if that passes)
        await self.pre_write_check(host + (pos & self.cmask), run_end - pos)
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        for c in range(ci, ci + k):
            self._allocs[c] = fut
        l2off = int(self.l1[ci >> self.l2_bits]) & L1E_OFFSET_MASK
        return _AllocPlan(ci, k, host, pos, run_end, old, l2off, fut)

    async def _finish_alloc(self, plan: _AllocPlan, chunk: memoryview) -> None:
        """COW + data into the new clusters (no lock), then link the L2 entries."""
        cb = self.cluster_bits
        cs = self.cluster_size
        cmask = self.cmask
        try:
            try:
                head_len = plan.pos & cmask
                tail_start = ((plan.run_end - 1) & cmask) + 1
                head = (await self.cow_part(plan.ci, plan.old[0], 0, head_len)
                        if head_len else b"")
                tail = (await self.cow_part(plan.ci + plan.k - 1, plan.old[-1], tail_start, cs)
                        if tail_start < cs else b"")
                buf = b"".join((head, chunk, tail)) if head or tail else chunk
                await self._data_write(plan.host, buf)
            except BaseException:
                async with self.lock:
                    await self.refs.update(plan.host >> cb, plan.k, -1)
                raise
            async with self.lock:
                self.check_writable()
                l1i = plan.ci >> self.l2_bits
                if int(self.l1[l1i]) & L1E_OFFSET_MASK != plan.l2off:
                    raise BlockDriverError("qcow2: L2 table moved during an allocation", 5)
                self.l2cache.set_depends_on_flush()
                await self.l2cache.set_dependency(self.refs.cache)
                idx = plan.ci & self.l2_mask
                entry = await self.l2cache.get(self._slice_key(plan.l2off, idx))
                arr = entry.value
                o = idx & self.slice_mask
                for m in range(plan.k):
                    if int(arr[o + m]) != plan.old[m]:
                        raise BlockDriverError("qcow2: L2 entry changed during an allocation", 5)
                    arr[o + m] = (plan.host + (m << cb)) | QCOW_OFLAG_COPIED
                self.l2cache.mark_dirty(entry)
                frees = [e for e in plan.old if e & L2E_OFFSET_MASK or e & QCOW_OFLAG_COMPRESSED]
                if frees:
                    await self._free_entries_pinned(entry, frees, DISCARD_OTHER)
                await self.l2cache.trim()
                await self.refs.cache.trim()
        finally:
            for c in range(plan.ci, plan.ci + plan.k):
                if self._allocs.get(c) is plan.fut:
                    del self._allocs[c]
            if not plan.fut.done():
                plan.fut.set_result(None)

    async def _alloc_run(self, ci: int, arr: array[int], slot: int, k: int, pos: int,
                         run_end: int, chunk: memoryview, entry: CacheEntry[array[int]]) -> None:
        """Write guest clusters ``ci..ci+k-1`` into ``k`` new host clusters."""
        cb = self.cluster_bits
        cs = self.cluster_size
        cmask = self.cmask
        old = [int(arr[slot + m]) for m in range(k)]
        host = await self.refs.alloc(k)
        await self.pre_write_check(host + (pos & cmask), len(chunk))
        head_len = pos & cmask
        tail_start = ((run_end - 1) & cmask) + 1
        async with self.refs.freed_on_error(host, k):
            head = await self.cow_part(ci, old[0], 0, head_len) if head_len else b""
            tail = (await self.cow_part(ci + k - 1, old[-1], tail_start, cs)
                    if tail_start < cs else b"")
            buf = b"".join((head, chunk, tail)) if head or tail else bytes(chunk)
            await self._data_write(host, buf)
        # data before the L2 entry; refcount before the L2 entry
        self.l2cache.set_depends_on_flush()
        await self.l2cache.set_dependency(self.refs.cache)
        for m in range(k):
            arr[slot + m] = (host + (m << cb)) | QCOW_OFLAG_COPIED
        self.l2cache.mark_dirty(entry)
        frees = [e for e in old if e & L2E_OFFSET_MASK or e & QCOW_OFLAG_COMPRESSED]
        if frees:
            await self._free_entries(frees, DISCARD_OTHER)

    async def _free_entries_pinned(self, entry: CacheEntry[array[int]], olds: list[int],
                                   kind: str) -> None:
        """_free_entries while ``entry``, the L2 slice that held them, stays cached."""
        entry.pins += 1
        try:
            await self._free_entries(olds, kind)
        finally:
            entry.pins -= 1

    async def _free_entries(self, olds: list[int], kind: str) -> None:
        """Drop the references of removed L2 entries (already gone from the L2 cache)."""
        await self.refs.cache.set_dependency(self.l2cache)
        await self._drain()
        clusters: list[int] = []
        cb = self.cluster_bits
        for e in olds:
            if e & QCOW_OFLAG_COMPRESSED:
                clusters.extend(self.comp.host_clusters(e))
            elif e & L2E_OFFSET_MASK:
                clusters.append((e & L2E_OFFSET_MASK) >> cb)
        clusters.sort()
        passthrough = self.pass_discard[kind]
        old_pt = self.refs.discard_passthrough
        self.refs.discard_passthrough = passthrough
        try:
            i = 0
            while i < len(clusters):
                j = i + 1
                while j < len(clusters) and clusters[j] == clusters[j - 1] + 1:
                    j += 1
                await self.refs.update(clusters[i], j - i, -1)
                i = j
        finally:
            self.refs.discard_passthrough = old_pt

    # --- zeroing, discarding, resizing (zero.py, resize.py) ------------------------------

    async def write_zeroes(self, offset: int, length: int, may_unmap: bool) -> None:
        await zero.write_zeroes(self, offset, length, may_unmap)

    async def discard(self, offset: int, length: int, full: bool = False) -> None:
        await zero.discard(self, offset, length, full)

    async def truncate(self, size: int) -> None:
        await resize.truncate(self, size)

    # --- flush ----------------------------------------------------------------------------

    async def flush_metadata(self) -> None:
        """Write back every dirty L2 slice, then every dirty refcount block (lock held)."""
        await self.l2cache.write_all()
        await self.refs.cache.write_all()

    async def flush(self) -> None:
        if self.broken is not None:
            raise BlockDriverError(self.broken, self.broken_errno)
        if not self.writable:
            return
        async with self.lock:
            await self.flush_metadata()
            await self.file.sync()
            if self.refs.pending_discards:
                await self.refs.process_discards()
