"""An open qcow2 image: open, header, flush and resize (QEMU's ``qcow2.c``).

:class:`Qcow2Image` is the image state (:mod:`~qmpd.block.qcow2.state`) plus
the paths composed on it: reads and block status from
:class:`~qmpd.block.qcow2.mapping.Qcow2Mapping`, writes, zeroing and discard
from :class:`~qmpd.block.qcow2.allocation.Qcow2Allocation`.  Their methods
are bound straight onto the image, so a request costs no extra call.
"""

from __future__ import annotations

import logging
import sys
from array import array
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from qmpd.block.dirty_bitmap import DirtyBitmap
from qmpd.block.driver import BlockDriverError
from qmpd.block.qcow2.allocation import Qcow2Allocation
from qmpd.block.qcow2.bitmaps import (
    BitmapEntry,
    has_bitmaps_ext,
    load_bitmaps,
    mark_in_use,
    parse_bitmaps_ext,
    set_bitmaps_ext,
    write_header_cluster,
)
from qmpd.block.qcow2.fileio import META_ALIGN, ImageFile
from qmpd.block.qcow2.format import (
    AUTOCLEAR_MASK,
    INCOMPAT_DIRTY,
    L1E_OFFSET_MASK,
    QCOW_MAX_L1_SIZE,
    Header,
    Qcow2FormatError,
    Snapshot,
    check_features,
    check_tables,
    header_within,
    l1_size_for,
    parse_header,
    parse_snapshots,
)
from qmpd.block.qcow2.mapping import Qcow2Mapping
from qmpd.block.qcow2.refcount import array_to_u64_be, u64_be_to_array
from qmpd.block.qcow2.repair import repair_refcounts
from qmpd.block.qcow2.state import CacheConfig, Qcow2State

if TYPE_CHECKING:
    from qmpd.block.graph import BlockNode

log = logging.getLogger(__name__)

#: The header, its extensions and the backing file name fit here in any
#: image QEMU writes; the rest of the first cluster is read only if not.
_FIRST_READ = 4096


@dataclass
class LoadedMetadata:
    """What opening (or activating) reads from disk, before any image state."""

    header: Header
    cluster0: bytearray
    config: CacheConfig
    l1: array[int] | None
    reftable: array[int]
    snapshots: list[Snapshot]
    snapshot_table_size: int


#: A read the loader asks for: (offset, length).  It asks for a list of them
#: at a time (reads that do not depend on each other) and gets their bytes.
ReadRequest = tuple[int, int]


def read_metadata(config_for: Callable[[Header], CacheConfig], writable: bool,
                  spare_reftable: array[int] | None = None,
                  ) -> Generator[list[ReadRequest], list[bytes], LoadedMetadata]:
    """Read and check the header, L1 table, refcount table and snapshots.

    Written once for both ways of reading: the open path sends it the
    results of awaited reads, activation runs it whole in an I/O thread
    over a blocking read (so one node costs one thread hop, not three).
    Pure apart from the reads: it touches no node or event-loop state
    but ``spare_reftable``, a refcount table nobody uses any more (the
    dropped image's, at activation), which takes the one read from disk
    if it has its size.
    """
    # One small read covers the header in practice (activation does this for
    # every node, so each round trip and each byte from the disk counts).
    (first,) = yield [(0, _FIRST_READ)]
    if len(first) < 72 or first[:4] != b"QFI\xfb":
        raise Qcow2FormatError("Image is not in qcow2 format")
    cluster_bits = int.from_bytes(first[20:24], "big")
    if 9 <= cluster_bits <= 21 and cluster_bits:
        if 1 << cluster_bits <= len(first):
            buf = first[: 1 << cluster_bits]
        elif header_within(first):
            # Only the first sector is ever written back (write_header_fields).
            buf = first
        else:
            (buf,) = yield [(0, 1 << cluster_bits)]
    else:
        buf = first[:META_ALIGN]
    hdr = parse_header(buf)
    check_features(hdr, writable)
    check_tables(hdr)
    config = config_for(hdr)
    cs = hdr.cluster_size
    l1 = None
    # The L1 and refcount tables in one request: the reader may overlap them.
    nbytes = hdr.l1_size * 8
    tables = [(hdr.l1_table_offset, (nbytes + META_ALIGN - 1) & ~(META_ALIGN - 1))]
    if not hdr.l1_size:
        tables = []
    tables.append((hdr.refcount_table_offset, hdr.refcount_table_clusters * cs))
    raws = yield tables
    if hdr.l1_size:
        l1 = u64_be_to_array(memoryview(raws[0])[:nbytes])
    reftable = _refill(spare_reftable, raws[-1])
    snapshots: list[Snapshot] = []
    table_size = 0
    if hdr.nb_snapshots:
        length = 64 * 1024
        while True:
            (raw,) = yield [(hdr.snapshots_offset, length)]
            try:
                snapshots, table_size = parse_snapshots(raw, hdr.nb_snapshots)
                break
            except Qcow2FormatError:
                if length >= 64 * 1024 * 1024:
                    raise Qcow2FormatError("Snapshot table too large") from None
                length *= 4
    return LoadedMetadata(hdr, bytearray(buf), config, l1, reftable, snapshots, table_size)


#: Reads a list of ranges, blocking (in an I/O thread), and returns their bytes.
BlockingRead = Callable[[list[ReadRequest]], list[bytes]]


def _refill(spare: array[int] | None, raw: bytes) -> array[int]:
    """``raw`` (big-endian u64s) as a host-order array: in ``spare`` if it has
    the size.  Memory already in use takes it without new pages (a fresh
    64 KiB table costs ~17 page faults, the better part of activating a
    node's Python)."""
    if spare is None or len(spare) * 8 != len(raw):
        return u64_be_to_array(raw)
    with memoryview(spare) as view, view.cast("B") as octets:
        octets[:] = raw
    if sys.byteorder == "little":
        spare.byteswap()
    return spare


def read_metadata_blocking(
    read: BlockingRead, config_for: Callable[[Header], CacheConfig], writable: bool,
    spare_reftable: array[int] | None = None,
) -> tuple[LoadedMetadata, int, int]:
    """:func:`read_metadata` over a blocking ``read`` (in an I/O thread):
    the metadata, and the reads and bytes done (for the file's counters)."""
    steps = read_metadata(config_for, writable, spare_reftable)
    reads = nbytes = 0
    try:
        requests = next(steps)
        while True:
            reads += len(requests)
            nbytes += sum(length for _, length in requests)
            requests = steps.send(read(requests))
    except StopIteration as done:
        loaded: LoadedMetadata = done.value
    return loaded, reads, nbytes


class Qcow2Image(Qcow2State):
    """The state of an open image with its guest I/O paths."""

    def __init__(self, node: BlockNode, file: ImageFile, header: Header,
                 cluster0: bytearray, config: CacheConfig) -> None:
        super().__init__(node, file, header, cluster0, config)
        self.mapping = mapping = Qcow2Mapping(self)
        self.allocation = alloc = Qcow2Allocation(self, mapping)
        self.host_run = mapping.host_run
        self.entries = mapping.entries
        self.read = mapping.read
        self.read_into = mapping.read_into
        self.block_status = mapping.block_status
        self.write = alloc.write
        self.write_zeroes = alloc.write_zeroes
        self.discard = alloc.discard
        #: The bitmap directory as on disk (empty without bitmaps or until loaded).
        self.bitmap_entries: list[BitmapEntry] = []

    # --- open -------------------------------------------------------------------------

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
        steps = read_metadata(config_for, writable)
        try:
            requests = next(steps)
            while True:
                requests = steps.send([await file.read(*r) for r in requests])
        except StopIteration as done:
            loaded: LoadedMetadata = done.value
        return await cls.from_metadata(node, file, loaded, writable, active)

    @classmethod
    async def from_metadata(cls, node: BlockNode, file: ImageFile, loaded: LoadedMetadata,
                            writable: bool, active: bool) -> Qcow2Image:
        """The image over what :func:`read_metadata` read; cleaned up if writable."""
        img = cls(node, file, loaded.header, loaded.cluster0, loaded.config)
        if loaded.l1 is not None:
            img.l1 = loaded.l1
        img.refs.reftable = loaded.reftable
        img.snapshots, img.snapshot_table_size = loaded.snapshots, loaded.snapshot_table_size
        # An unaligned L1 entry is found (and the image marked corrupt) when
        # a request uses it, as in QEMU, not at open.
        parse_bitmaps_ext(img.header)  # QEMU checks the extension at any open
        img.writable = writable and active
        if img.writable:
            await img._open_for_writing()
        if active:
            # An inactive node (a migration destination) loads its bitmaps at
            # activation, never before (QEMU: not with BDRV_O_INACTIVE).
            bitmaps = await load_bitmaps(img, img.bitmap_entries)
            if not img.writable:
                for bitmap in bitmaps:  # QEMU: read-only until the image is writable
                    bitmap.readonly = True
            img.install_bitmaps(bitmaps)
            if img.writable and img.bitmap_entries:
                await mark_in_use(img, img.bitmap_entries)
        return img

    def install_bitmaps(self, loaded: list[DirtyBitmap]) -> None:
        """Put loaded bitmaps on the node; a bitmap in-use on disk that the
        node already holds is the node's own (a reopen), so it is kept."""
        bitmaps = self.node.dirty_bitmaps
        for bm in loaded:
            if bm.inconsistent and bm.name in bitmaps:
                continue
            bitmaps[bm.name] = bm

    async def _open_for_writing(self) -> None:
        hdr = self.header
        # Unknown autoclear features are cleared before the first write (as
        # QEMU does); the bitmaps bit stays, we keep the bitmaps consistent.
        if hdr.version >= 3 and hdr.autoclear_features & ~AUTOCLEAR_MASK:
            hdr.autoclear_features &= AUTOCLEAR_MASK
            await self.write_header_fields()
        if has_bitmaps_ext(hdr) and parse_bitmaps_ext(hdr) is None:
            # Bitmaps another program invalidated (autoclear bit clear): QEMU
            # drops the extension; their clusters are leaks for check -r.
            set_bitmaps_ext(hdr, [], 0, 0)
            await write_header_cluster(self)
        if hdr.incompatible_features & INCOMPAT_DIRTY:
            try:
                await repair_refcounts(self)
            except (BlockDriverError, Qcow2FormatError, OSError) as exc:
                log.warning("qcow2: repair of dirty image failed: %s", exc)
                raise Qcow2FormatError("Could not repair dirty image", 5) from exc
            hdr.incompatible_features &= ~INCOMPAT_DIRTY
            await self.write_header_fields()

    # --- flush ------------------------------------------------------------------------

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

    # --- resize (qcow2_co_truncate, metadata preallocation off) -----------------------

    async def truncate(self, size: int) -> None:
        """Grow the L1 table or drop its tail; the header follows."""
        self.check_writable()
        if size % 512:
            raise BlockDriverError("The new size must be a multiple of 512", 22)
        alloc = self.allocation
        async with self.exclusive(0, 1 << 62):
            self.check_writable()
            if self.snapshots and self.version < 3:
                raise BlockDriverError("Can't resize a v2 image which has snapshots", 95)
            old = self.size
            new_l1 = l1_size_for(size, self.cluster_bits)
            if size < old:
                start = (size + self.cmask) & ~self.cmask
                if old > start:
                    await alloc.discard_locked(start, old - start, True)
                await self._shrink_l1(new_l1)
            elif size > old:
                if new_l1 > len(self.l1):
                    await self._grow_l1(new_l1)
                backing = self.node.backing
                if backing is not None and backing.size() > old:
                    # do not let the backing file's data show through
                    self.size = size
                    zero_start = (old + self.cmask) & ~self.cmask
                    if size > zero_start:
                        await alloc.write_zeroes_locked(zero_start, size - zero_start, False)
                    if zero_start > old:
                        await alloc.write_zero_data(old, min(zero_start, size))
            self.size = size
            self.header.size = size
            await self.flush_metadata()
            await self.write_header_fields()

    async def _grow_l1(self, new_size: int) -> None:
        cs = self.cluster_size
        if new_size * 8 > QCOW_MAX_L1_SIZE:
            raise BlockDriverError("Failed to grow the L1 table: File too large", 27)
        clusters = (new_size * 8 + cs - 1) // cs
        new_off = await self.refs.alloc(clusters)
        await self.refs.cache.write_all()
        table = array("Q", self.l1)
        table.extend([0] * (clusters * cs // 8 - len(table)))
        await self.file.write(new_off, array_to_u64_be(table))
        await self.file.sync()
        old_off, old_size = self.l1_table_offset, len(self.l1)
        self.header.l1_size = new_size
        self.header.l1_table_offset = new_off
        await self.write_header_fields()
        self.l1 = table[:new_size]
        self.l1_table_offset = new_off
        if old_size:
            await self.refs.update(old_off >> self.cluster_bits,
                                   (old_size * 8 + cs - 1) // cs, -1)

    async def _shrink_l1(self, new_size: int) -> None:
        """Free the L2 tables past ``new_size`` L1 entries (the table keeps its size)."""
        freed = []
        for i in range(new_size, len(self.l1)):
            e = int(self.l1[i])
            if e & L1E_OFFSET_MASK:
                freed.append(e & L1E_OFFSET_MASK)
                self.l1[i] = 0
        if not freed:
            return
        self.l1_generation += 1
        await self.flush_metadata()
        cs = self.cluster_size
        await self.file.write(self.l1_table_offset,
                              array_to_u64_be(self.l1) + bytes(-len(self.l1) * 8 % META_ALIGN))
        await self.file.sync()
        await self.drain()
        for off in freed:
            for k in range(0, cs, self.slice_bytes):
                self.l2cache.drop(off + k)
            await self.refs.update(off >> self.cluster_bits, 1, -1)
