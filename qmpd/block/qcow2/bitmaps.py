"""qcow2 persistent dirty bitmaps (the ``bitmaps`` header extension).

The format is docs/interop/qcow2.txt's "Bitmaps extension": a directory of
entries (table offset and size, flags, type, granularity, name), each
pointing at a bitmap table whose entries are data clusters (or 0 = all
zeros, 1 = all ones).  The checks and error texts are QEMU 7.2's.

The parsing and serialisation functions are pure; :func:`load_bitmaps`,
:func:`store_bitmaps` and :func:`remove_bitmap` do the I/O over an open
image.  As in QEMU, a read-write open marks every bitmap in-use on disk and
storing (at close and inactivation) clears the mark; a bitmap found in-use
at open was not stored after its last write (a crash) and is inconsistent.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from qmpd.block.dirty_bitmap import DirtyBitmap
from qmpd.block.driver import BlockDriverError
from qmpd.block.qcow2.fileio import META_ALIGN
from qmpd.block.qcow2.format import (
    AUTOCLEAR_BITMAPS,
    EXT_BITMAPS,
    V3_MIN_HEADER_LENGTH,
    Header,
    HeaderExtension,
    Qcow2FormatError,
    build_header_cluster,
)

if TYPE_CHECKING:
    from qmpd.block.qcow2.state import Qcow2State

BME_FLAG_IN_USE = 1 << 0
BME_FLAG_AUTO = 1 << 1
BME_RESERVED_FLAGS = 0xFFFFFFFC
BT_DIRTY_TRACKING_BITMAP = 1
BME_MIN_GRANULARITY_BITS = 9
BME_MAX_GRANULARITY_BITS = 31
BME_MAX_NAME_SIZE = 1023
BME_MAX_TABLE_SIZE = 0x8000000
BME_MAX_PHYS_SIZE = 0x20000000
QCOW2_MAX_BITMAPS = 65535
QCOW2_MAX_BITMAP_DIRECTORY_SIZE = 1024 * QCOW2_MAX_BITMAPS

TABLE_OFFSET_MASK = 0x00FFFFFFFFFFFE00
TABLE_RESERVED_MASK = 0xFF000000000001FE
TABLE_ALL_ONES = 1

_EXT = struct.Struct(">IIQQ")
_DIR = struct.Struct(">QIIBBHI")


@dataclass
class BitmapEntry:
    """One bitmap directory entry (extra data is refused at load)."""

    name: str
    table_offset: int
    table_size: int
    flags: int
    granularity_bits: int
    #: The bitmap table, once read (to free its clusters when replaced).
    table: list[int] | None = field(default=None, repr=False)

    @property
    def in_use(self) -> bool:
        return bool(self.flags & BME_FLAG_IN_USE)


def dir_entry_size(name_size: int, extra_size: int = 0) -> int:
    return (_DIR.size + name_size + extra_size + 7) & ~7


def bitmap_bytes(size: int, granularity: int) -> int:
    """Bytes of bitmap data for a node of ``size`` bytes."""
    return (-(-size // granularity) + 7) // 8


def has_bitmaps_ext(hdr: Header) -> bool:
    return any(e.type == EXT_BITMAPS for e in hdr.extensions)


def parse_bitmaps_ext(hdr: Header) -> tuple[int, int, int] | None:
    """The checked extension (count, directory size, offset), or None when
    there is none or the autoclear bit says another program dropped them
    (qcow2_read_extensions)."""
    ext = next((e for e in hdr.extensions if e.type == EXT_BITMAPS), None)
    if ext is None or not hdr.autoclear_features & AUTOCLEAR_BITMAPS:
        return None
    if len(ext.data) != _EXT.size:
        raise Qcow2FormatError("bitmaps_ext: Invalid extension length")
    nb, reserved, dir_size, dir_offset = _EXT.unpack(ext.data)
    if reserved:
        raise Qcow2FormatError("bitmaps_ext: Reserved field is not zero")
    if nb > QCOW2_MAX_BITMAPS:
        raise Qcow2FormatError(f"bitmaps_ext: Image has {nb} bitmaps, exceeding the QEMU "
                               f"supported maximum of {QCOW2_MAX_BITMAPS}")
    if nb == 0:
        raise Qcow2FormatError("found bitmaps extension with zero bitmaps")
    if dir_offset & (hdr.cluster_size - 1):
        raise Qcow2FormatError("bitmaps_ext: invalid bitmap directory offset")
    if dir_size > QCOW2_MAX_BITMAP_DIRECTORY_SIZE:
        raise Qcow2FormatError(
            f"bitmaps_ext: bitmap directory size ({dir_size}) exceeds the maximum "
            f"supported size ({QCOW2_MAX_BITMAP_DIRECTORY_SIZE})")
    return nb, dir_size, dir_offset


def _entry_ok(e: BitmapEntry, ty: int, cluster_size: int, disk_size: int) -> bool:
    """QEMU's check_dir_entry."""
    if (e.table_size == 0 or e.table_offset == 0 or e.table_offset % cluster_size
            or e.table_size > BME_MAX_TABLE_SIZE
            or not BME_MIN_GRANULARITY_BITS <= e.granularity_bits <= BME_MAX_GRANULARITY_BITS
            or e.flags & BME_RESERVED_FLAGS or ty != BT_DIRTY_TRACKING_BITMAP):
        return False
    phys = e.table_size * cluster_size
    if phys > BME_MAX_PHYS_SIZE:
        return False
    return e.in_use or disk_size <= (phys * 8) << e.granularity_bits


def parse_directory(buf: bytes, nb: int, cluster_size: int, disk_size: int) -> list[BitmapEntry]:
    """The directory entries, checked as QEMU's bitmap_list_load does."""
    if not buf:
        raise Qcow2FormatError("Requested bitmap directory size is zero")
    out: list[BitmapEntry] = []
    pos, end = 0, len(buf)
    while pos < end:
        if pos + _DIR.size > end:
            raise Qcow2FormatError("Broken bitmap directory")
        if len(out) + 1 > nb:
            raise Qcow2FormatError("More bitmaps found than specified in header extension")
        offset, tsize, flags, ty, gbits, name_size, extra = _DIR.unpack_from(buf, pos)
        size = dir_entry_size(name_size, extra)
        if pos + size > end:
            raise Qcow2FormatError("Broken bitmap directory")
        if extra:
            raise Qcow2FormatError("Bitmap extra data is not supported")
        raw = buf[pos + _DIR.size:pos + _DIR.size + name_size]
        name = raw.decode("utf-8", "surrogateescape")
        entry = BitmapEntry(name, offset, tsize, flags, gbits)
        if name_size > BME_MAX_NAME_SIZE or not _entry_ok(entry, ty, cluster_size, disk_size):
            raise Qcow2FormatError(f"Bitmap '{name}' doesn't satisfy the constraints")
        out.append(entry)
        pos += size
    if len(out) != nb:
        raise Qcow2FormatError("Less bitmaps found than specified in header extension")
    return out


def pack_directory(entries: Sequence[BitmapEntry]) -> bytes:
    parts = []
    for e in entries:
        name = e.name.encode("utf-8", "surrogateescape")
        rec = _DIR.pack(e.table_offset, e.table_size, e.flags, BT_DIRTY_TRACKING_BITMAP,
                        e.granularity_bits, len(name), 0) + name
        parts.append(rec + bytes(-len(rec) % 8))
    return b"".join(parts)


def check_table(table: Sequence[int], cluster_size: int) -> bool:
    """Every entry is 0, 1 or an aligned cluster (QEMU's check_table_entry)."""
    for entry in table:
        if entry & TABLE_RESERVED_MASK:
            return False
        offset = entry & TABLE_OFFSET_MASK
        if offset and (entry & TABLE_ALL_ONES or offset % cluster_size):
            return False
    return True


def set_bitmaps_ext(hdr: Header, entries: Sequence[BitmapEntry], dir_size: int,
                    dir_offset: int) -> None:
    """Put the extension (or its absence) and the autoclear bit in ``hdr``."""
    hdr.extensions = [e for e in hdr.extensions if e.type != EXT_BITMAPS]
    if entries:
        hdr.extensions.append(
            HeaderExtension(EXT_BITMAPS, _EXT.pack(len(entries), 0, dir_size, dir_offset)))
        hdr.bitmaps_ext = (len(entries), dir_size, dir_offset)
        hdr.autoclear_features |= AUTOCLEAR_BITMAPS
    else:
        hdr.bitmaps_ext = None
        hdr.autoclear_features &= ~AUTOCLEAR_BITMAPS


def check_new_bitmap(version: int, size: int, cluster_size: int, name: str, granularity: int,
                     entries: Sequence[BitmapEntry], dir_size: int) -> str | None:
    """Why a new persistent bitmap cannot be stored (QEMU's text), or None
    (qcow2_co_can_store_new_dirty_bitmap and check_constraints_on_bitmap)."""
    if version < 3:
        return "Cannot store dirty bitmaps in qcow2 v2 files"
    gbits = granularity.bit_length() - 1
    if gbits > BME_MAX_GRANULARITY_BITS:
        return f"Granularity exceeds maximum ({1 << BME_MAX_GRANULARITY_BITS} bytes)"
    if gbits < BME_MIN_GRANULARITY_BITS:
        return f"Granularity is under minimum ({1 << BME_MIN_GRANULARITY_BITS} bytes)"
    nbytes = bitmap_bytes(size, granularity)
    if nbytes > BME_MAX_PHYS_SIZE or nbytes > BME_MAX_TABLE_SIZE * cluster_size:
        return "Too much space will be occupied by the bitmap. Use larger granularity"
    if len(name.encode("utf-8", "surrogateescape")) > BME_MAX_NAME_SIZE:
        return f"Name length exceeds maximum ({BME_MAX_NAME_SIZE} characters)"
    if not entries:
        return None
    if len(entries) >= QCOW2_MAX_BITMAPS:
        return "Maximum number of persistent bitmaps is already reached"
    if dir_size + dir_entry_size(len(name.encode("utf-8", "surrogateescape"))) \
            > QCOW2_MAX_BITMAP_DIRECTORY_SIZE:
        return "Not enough space in the bitmap directory"
    if any(e.name == name for e in entries):
        return "Bitmap with the same name is already stored"
    return None


# --- I/O over an open image -------------------------------------------------------------

def _round(n: int, align: int) -> int:
    return (n + align - 1) & ~(align - 1)


async def _read_table(img: Qcow2State, e: BitmapEntry) -> list[int]:
    raw = await img.file.read(e.table_offset, _round(e.table_size * 8, META_ALIGN))
    return list(struct.unpack_from(f">{e.table_size}Q", raw))


async def load_bitmaps(img: Qcow2State, entries_out: list[BitmapEntry]) -> list[DirtyBitmap]:
    """Read the directory and every consistent bitmap's data (an active open).

    Fills ``entries_out`` with the directory; returns the bitmaps for the
    node, in directory order.
    """
    ext = parse_bitmaps_ext(img.header)
    if ext is None:
        return []
    nb, dir_size, dir_offset = ext
    if dir_size == 0:
        raise Qcow2FormatError("Requested bitmap directory size is zero")
    raw = await img.file.read(dir_offset, _round(dir_size, META_ALIGN))
    entries = parse_directory(raw[:dir_size], nb, img.cluster_size, img.size)
    cs = img.cluster_size
    out = []
    for e in entries:
        bm = DirtyBitmap(e.name, img.size, 1 << e.granularity_bits, persistent=True,
                         recording=bool(e.flags & BME_FLAG_AUTO) and not e.in_use,
                         inconsistent=e.in_use)
        if not e.in_use:  # an in-use bitmap's data is not to be trusted: not read
            table = await _read_table(img, e)
            if not check_table(table, cs):
                raise Qcow2FormatError(
                    f"Could not read bitmap_table table from image for bitmap '{e.name}': "
                    "Invalid argument")
            e.table = table
            need = len(bm.bits)
            chunks = []
            for entry in table[: -(-need // cs)]:
                offset = entry & TABLE_OFFSET_MASK
                if offset:
                    chunks.append(await img.file.read(offset, cs))
                else:
                    chunks.append((b"\xff" if entry & TABLE_ALL_ONES else b"\0") * cs)
            bm.load_bytes(b"".join(chunks))
        out.append(bm)
    entries_out[:] = entries
    return out


async def write_header_cluster(img: Qcow2State) -> None:
    """Rewrite the header with its extensions (qcow2_update_header) and sync."""
    hdr = img.header
    extra = bytes(img.cluster0[V3_MIN_HEADER_LENGTH:hdr.header_length]) \
        if hdr.version >= 3 else b""
    data = build_header_cluster(hdr, extra)
    await img.file.write(0, data)
    await img.file.sync()
    img.cluster0 = bytearray(data)


async def mark_in_use(img: Qcow2State, entries: list[BitmapEntry]) -> None:
    """A read-write open: every bitmap in-use on disk, in place (QEMU's
    update_ext_header_and_dir_in_place)."""
    if all(e.in_use for e in entries):
        return
    for e in entries:
        e.flags |= BME_FLAG_IN_USE
    ext = img.header.bitmaps_ext
    assert ext is not None
    # exactly the directory's bytes, as QEMU writes them (the file driver
    # handles an unaligned O_DIRECT write; padding could grow the file)
    await img.file.write(ext[2], pack_directory(entries))
    await img.file.sync()


async def _write_data(img: Qcow2State, bm: DirtyBitmap) -> list[int]:
    """The bitmap's clusters written (all-zero ones as entry 0); its table."""
    cs = img.cluster_size
    data = bm.to_bytes()
    table = []
    for start in range(0, max(len(data), 1), cs):
        chunk = data[start:start + cs]
        if not chunk.strip(b"\0"):
            table.append(0)
            continue
        offset = await img.refs.alloc(1)
        await img.file.write(offset, chunk.ljust(cs, b"\0"))
        table.append(offset)
    return table


async def _free_table(img: Qcow2State, e: BitmapEntry) -> None:
    table = e.table if e.table is not None else await _read_table(img, e)
    if not check_table(table, img.cluster_size):
        return  # leak rather than free what is not ours
    cb = img.cluster_bits
    for entry in table:
        offset = entry & TABLE_OFFSET_MASK
        if offset:
            await img.refs.update(offset >> cb, 1, -1)
    await img.refs.update(e.table_offset >> cb, -(-e.table_size * 8 // img.cluster_size), -1)


async def store_bitmaps(img: Qcow2State, bitmaps: Sequence[DirtyBitmap],
                        entries: list[BitmapEntry], removed: str | None = None) -> None:
    """Write every consistent persistent bitmap, a new directory and header,
    then free what they replace (qcow2_store_persistent_dirty_bitmaps).

    The stored bitmaps lose their in-use mark; inconsistent ones, those a
    migration carries and those the node does not hold stay as they are.  ``removed`` names a bitmap
    to drop from the directory.
    """
    cs, cb = img.cluster_size, img.cluster_bits
    by_name = {b.name: b for b in bitmaps if b.stored}
    new_entries: list[BitmapEntry] = []
    replaced: list[BitmapEntry] = []
    for e in entries:
        if e.name == removed:
            replaced.append(e)
            continue
        if e.name in by_name:
            replaced.append(e)
        else:
            new_entries.append(e)
    todo = [b for b in bitmaps if b.name in by_name]
    if not todo and not replaced:
        return
    written = []
    for bm in todo:
        table = await _write_data(img, bm)
        tclusters = -(-len(table) * 8 // cs)
        toff = await img.refs.alloc(tclusters)
        raw = struct.pack(f">{len(table)}Q", *table)
        await img.file.write(toff, raw.ljust(tclusters * cs, b"\0"))
        flags = BME_FLAG_AUTO if bm.recording else 0
        written.append(BitmapEntry(bm.name, toff, len(table), flags,
                                   bm.granularity.bit_length() - 1, table))
    # directory order: the entries kept and rewritten where they were, new ones last
    order = {e.name: i for i, e in enumerate(entries)}
    final = sorted(new_entries + written, key=lambda e: order.get(e.name, len(order)))
    old_ext = img.header.bitmaps_ext if img.header.autoclear_features & AUTOCLEAR_BITMAPS \
        else None
    dir_offset = dir_size = 0
    if final:
        data = pack_directory(final)
        dir_size = len(data)
        nclusters = -(-dir_size // cs)
        dir_offset = await img.refs.alloc(nclusters)
        await img.file.write(dir_offset, data.ljust(nclusters * cs, b"\0"))
    await img.flush_metadata()
    await img.file.sync()
    set_bitmaps_ext(img.header, final, dir_size, dir_offset)
    await write_header_cluster(img)
    entries[:] = final
    if old_ext is not None and old_ext[1]:
        await img.refs.update(old_ext[2] >> cb, -(-old_ext[1] // cs), -1)
    for e in replaced:
        await _free_table(img, e)
    await img.flush_metadata()
    await img.file.sync()


def cannot_store(img: Qcow2State, entries: Sequence[BitmapEntry], name: str,
                 granularity: int) -> BlockDriverError | None:
    ext = img.header.bitmaps_ext
    why = check_new_bitmap(img.version, img.size, img.cluster_size, name, granularity,
                           entries, ext[1] if ext is not None and entries else 0)
    return None if why is None else BlockDriverError(why, 22)
