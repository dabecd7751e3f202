"""The ``dirty-bitmap`` section's chunks (QEMU's migration/block-dirty-bitmap.c).

A chunk is: flags (1, 2 or 4 bytes), the node alias when it changes
(``DEVICE_NAME``), the bitmap alias when it changes (``BITMAP_NAME``), then

* ``START``: be32 granularity, u8 flags (enabled, persistent);
* ``BITS``: be64 first sector, be32 sector count, and unless ``ZEROES`` a
  be64 buffer size and the bits (least significant first, whole 64-bit
  words, the buffer padded to 32 bytes);
* ``COMPLETE``: nothing more.

The last chunk of a section carries ``EOS``.  A source sends every bitmap's
``START`` in the setup section and its bits, in chunks of 8192 granules,
then every ``COMPLETE``, in the section that ends the migration.
"""

from __future__ import annotations

import errno
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

FLAG_EOS = 0x01
FLAG_ZEROES = 0x02
FLAG_BITMAP_NAME = 0x04
FLAG_DEVICE_NAME = 0x08
FLAG_START = 0x10
FLAG_COMPLETE = 0x20
FLAG_BITS = 0x40
FLAG_EXTRA = 0x80

START_ENABLED = 0x01
START_PERSISTENT = 0x02
START_RESERVED = 0xF8

#: Bitmap bytes per BITS chunk (QEMU's CHUNK_SIZE): 8192 granules.
CHUNK_BYTES = 1 << 10
#: The largest buffer a BITS chunk may announce before the stream is refused.
MAX_BUFFER = 10 * CHUNK_BYTES
SECTOR = 512


class BitmapRefused(Exception):
    """A chunk the destination cannot take: the migration fails (QEMU's
    ``-EINVAL`` from the section's load), with ``message`` printed first."""

    def __init__(self, message: str, err: int = errno.EINVAL) -> None:
        super().__init__(message)
        self.message = message
        self.errno = err


@dataclass(frozen=True)
class BitmapChunk:
    """One chunk as read, with the names it refers to (None: never sent)."""

    flags: int
    node: str | None
    name: str | None
    granularity: int = 0
    start_flags: int = 0
    first_byte: int = 0
    nr_bytes: int = 0
    #: The bits of a BITS chunk; None with ZEROES.
    data: bytes | None = None

    @property
    def kind(self) -> str:
        if self.flags & FLAG_START:
            return "start"
        if self.flags & FLAG_COMPLETE:
            return "complete"
        if self.flags & FLAG_BITS:
            return "bits"
        return "eos"


@dataclass(frozen=True)
class MigratedBitmap:
    """What a source sends of one bitmap."""

    node: str
    name: str
    granularity: int
    enabled: bool
    persistent: bool
    #: The node's length in bytes.
    size: int

    @property
    def start_flags(self) -> int:
        return (START_ENABLED if self.enabled else 0) | (START_PERSISTENT if self.persistent
                                                         else 0)


def serialization_size(granularity: int, first_byte: int, nr_bytes: int) -> int:
    """Bytes of bits for a byte range: whole 64-bit words (hbitmap's rule)."""
    if nr_bytes == 0:
        return 0
    first = first_byte // granularity
    last = (first_byte + nr_bytes - 1) // granularity
    return -(-(last - first + 1) // 64) * 8


class _Names:
    """Names are sent only when they differ from the previous chunk's."""

    def __init__(self) -> None:
        self.node: str | None = None
        self.name: str | None = None

    def header(self, flags: int, bitmap: MigratedBitmap) -> bytes:
        tail = b""
        if bitmap.node != self.node:
            flags |= FLAG_DEVICE_NAME
            tail += _counted(bitmap.node)
        if (bitmap.node, bitmap.name) != (self.node, self.name):
            flags |= FLAG_BITMAP_NAME
            tail += _counted(bitmap.name)
        self.node, self.name = bitmap.node, bitmap.name
        return bytes([flags]) + tail


def _counted(text: str) -> bytes:
    raw = text.encode()
    return bytes([len(raw)]) + raw


class BitmapWriter:
    """The chunks of both sections, with QEMU's name elision across them."""

    def __init__(self, bitmaps: Iterable[MigratedBitmap]) -> None:
        self.bitmaps = list(bitmaps)
        self._names = _Names()

    def setup(self) -> bytes:
        out = bytearray()
        for bitmap in self.bitmaps:
            out += self._names.header(FLAG_START, bitmap)
            out += bitmap.granularity.to_bytes(4, "big") + bytes([bitmap.start_flags])
        out.append(FLAG_EOS)
        return bytes(out)

    def complete(self, bits: Sequence[bytes]) -> bytes:
        """Every bitmap's bits (as they are now, least significant first, in
        the order given at setup), then every COMPLETE."""
        out = bytearray()
        for bitmap, data in zip(self.bitmaps, bits, strict=True):
            for chunk in self._bits(bitmap, data):
                out += chunk
        for bitmap in self.bitmaps:
            out += self._names.header(FLAG_COMPLETE, bitmap)
        out.append(FLAG_EOS)
        return bytes(out)

    def _bits(self, bitmap: MigratedBitmap, bits: bytes) -> Iterable[bytes]:
        total = -(-bitmap.size // SECTOR)
        per_chunk = CHUNK_BYTES * 8 * (bitmap.granularity // SECTOR)
        sector = 0
        while sector < total:
            count = min(total - sector, per_chunk)
            first_byte, nr_bytes = sector * SECTOR, count * SECTOR
            size = serialization_size(bitmap.granularity, first_byte, nr_bytes)
            offset = first_byte // bitmap.granularity // 8
            data = bits[offset:offset + size]
            flags = FLAG_BITS
            if not any(data):
                flags |= FLAG_ZEROES
            out = self._names.header(flags, bitmap)
            out += sector.to_bytes(8, "big") + count.to_bytes(4, "big")
            if not flags & FLAG_ZEROES:
                buffer = data.ljust(-(-size // 32) * 32, b"\0")
                out += len(buffer).to_bytes(8, "big") + buffer
            yield out
            sector += count


def apply_bits(bits: bytearray, granularity: int, chunk: BitmapChunk) -> None:
    """Write a BITS chunk into ``bits`` (the destination bitmap's bytes)."""
    size = serialization_size(granularity, chunk.first_byte, chunk.nr_bytes)
    first = chunk.first_byte // granularity
    count = min(-(-chunk.nr_bytes // granularity), len(bits) * 8 - first)
    if count <= 0:
        return
    data = chunk.data[:size] if chunk.data is not None else bytes(size)
    # Chunks start on whole bytes of bits (8192 granules apart); the count
    # may end inside one.
    start = first // 8
    whole, rest = divmod(count, 8)
    bits[start:start + whole] = data[:whole]
    if rest:
        keep = bits[start + whole] & ~((1 << rest) - 1) & 0xFF
        bits[start + whole] = keep | (data[whole] & ((1 << rest) - 1))


# --- block-bitmap-mapping -----------------------------------------------------------------

_WELL_FORMED = re.compile(r"[A-Za-z][A-Za-z0-9._-]*\Z")
#: BlockDriverState.node_name holds 31 bytes.
MAX_NODE_NAME = 31
#: BDRV_BITMAP_MAX_NAME_SIZE
MAX_BITMAP_NAME = 1023


@dataclass(frozen=True)
class NodeAlias:
    """One node of a block-bitmap-mapping, seen from one side: the name on
    the other end and its bitmaps (name -> (other name, persistent or None))."""

    other: str
    bitmaps: dict[str, tuple[str, bool | None]]


def alias_map(mapping: list[dict[str, Any]], outgoing: bool) -> dict[str, NodeAlias]:
    """QEMU's construct_alias_map: node name -> alias when ``outgoing``, else
    alias -> node name (and the same for bitmaps); ValueError with QEMU's
    text for a mapping it refuses."""
    out: dict[str, NodeAlias] = {}
    for node in mapping:
        name, alias = node["node-name"], node["alias"]
        if not _WELL_FORMED.match(alias):
            raise ValueError(f"The node alias '{alias}' is not well-formed")
        if len(alias.encode()) > 255:
            raise ValueError(f"The node alias '{alias}' is longer than 255 bytes")
        if len(name.encode()) > MAX_NODE_NAME:
            raise ValueError(f"The node name '{name}' is longer than {MAX_NODE_NAME} bytes")
        key, other = (name, alias) if outgoing else (alias, name)
        if key in out:
            raise ValueError(f"The node name '{name}' is mapped twice" if outgoing
                             else f"The node alias '{alias}' is used twice")
        bitmaps: dict[str, tuple[str, bool | None]] = {}
        out[key] = NodeAlias(other, bitmaps)
        for bitmap in node["bitmaps"]:
            bname, balias = bitmap["name"], bitmap["alias"]
            if len(balias.encode()) > 255:
                raise ValueError(f"The bitmap alias '{balias}' is longer than 255 bytes")
            if len(bname.encode()) > MAX_BITMAP_NAME:
                raise ValueError(f"The bitmap name '{bname}' is longer than "
                                 f"{MAX_BITMAP_NAME} bytes")
            bkey, bother = (bname, balias) if outgoing else (balias, bname)
            if bkey in bitmaps:
                raise ValueError(f"The bitmap '{name}'/'{bname}' is mapped twice" if outgoing
                                 else f"The bitmap alias '{alias}'/'{balias}' is used twice")
            persistent = bitmap.get("transform", {}).get("persistent")
            bitmaps[bkey] = (bother, persistent)
    return out


def check_mapping(mapping: list[dict[str, Any]]) -> None:
    """check_dirty_bitmap_mig_alias_map: both directions must be valid."""
    alias_map(mapping, True)
    alias_map(mapping, False)
