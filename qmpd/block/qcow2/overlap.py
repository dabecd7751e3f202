"""Metadata overlap checks and corruption signalling, as QEMU 7.2's qcow2.

Before guest data (or copy-on-write data, or a new L2 table) is written to a
host cluster, the range is checked against the image's live metadata
(``qcow2_check_metadata_overlap``); an overlap means the image is corrupt
(a malicious or damaged L2 entry or refcount), and the write is refused
instead of overwriting metadata (``qcow2_pre_write_overlap_check``).

:func:`signal_corruption` is ``qcow2_signal_corruption``: one log line, the
``BLOCK_IMAGE_CORRUPTED`` event, and, when fatal, the corrupt bit in the
header and a node that refuses all further I/O.
"""

from __future__ import annotations

import logging
from array import array
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

from qmpd.block.qcow2.format import AUTOCLEAR_BITMAPS, L1E_OFFSET_MASK, Qcow2FormatError, Snapshot

if TYPE_CHECKING:
    from qmpd.block.graph import BlockNode

log = logging.getLogger(__name__)

# QEMU's QCow2MetadataOverlap bits, in QEMU's order (the lowest set bit names
# the overlap in the message).
OL_MAIN_HEADER = 1 << 0
OL_ACTIVE_L1 = 1 << 1
OL_ACTIVE_L2 = 1 << 2
OL_REFCOUNT_TABLE = 1 << 3
OL_REFCOUNT_BLOCK = 1 << 4
OL_SNAPSHOT_TABLE = 1 << 5
OL_INACTIVE_L1 = 1 << 6
OL_INACTIVE_L2 = 1 << 7
OL_BITMAP_DIRECTORY = 1 << 8

OL_NAMES = (
    "qcow2_header", "active L1 table", "active L2 table", "refcount table",
    "refcount block", "snapshot table", "inactive L1 table", "inactive L2 table",
    "bitmap directory",
)

#: The option names of the single checks (``overlap-check.<name>``).
OL_OPTION_NAMES = (
    "main-header", "active-l1", "active-l2", "refcount-table", "refcount-block",
    "snapshot-table", "inactive-l1", "inactive-l2", "bitmap-directory",
)

OL_CONSTANT = (OL_MAIN_HEADER | OL_ACTIVE_L1 | OL_REFCOUNT_TABLE | OL_SNAPSHOT_TABLE
               | OL_BITMAP_DIRECTORY)
OL_CACHED = OL_CONSTANT | OL_ACTIVE_L2 | OL_REFCOUNT_BLOCK | OL_INACTIVE_L1
OL_ALL = OL_CACHED | OL_INACTIVE_L2
OL_TEMPLATES = {"none": 0, "constant": OL_CONSTANT, "cached": OL_CACHED, "all": OL_ALL}

REFT_OFFSET_MASK = 0xFFFFFFFFFFFFFE00

ENOMEDIUM = 123


def overlap_checks(option: Any) -> int:
    """The check bits selected by the ``overlap-check`` option (QEMU's default: cached).

    Raises Qcow2FormatError with QEMU's text for an unknown template.
    """
    if option is None:
        return OL_CACHED
    if isinstance(option, str):
        template, flags = option, {}
    else:
        template, flags = option.get("template", "cached"), option
    if template not in OL_TEMPLATES:
        raise Qcow2FormatError(
            f"Unsupported value '{template}' for qcow2 option 'overlap-check'. "
            "Allowed are any of the following: none, constant, cached, all")
    checks = OL_TEMPLATES[template]
    for bit, name in enumerate(OL_OPTION_NAMES):
        value = flags.get(name)
        if value is not None:
            checks = checks | (1 << bit) if value else checks & ~(1 << bit)
    return checks


class _Refcounts(Protocol):
    reftable: array[int]
    generation: int
    reftable_offset: int
    reftable_clusters: int


class _Header(Protocol):
    snapshots_offset: int
    autoclear_features: int
    bitmaps_ext: tuple[int, int, int] | None


class MetadataImage(Protocol):
    """What the checks read from an open image (a ``Qcow2Image``)."""

    cluster_bits: int
    cluster_size: int
    l1: array[int]
    l1_generation: int
    l1_table_offset: int
    snapshots: list[Snapshot]
    snapshot_table_size: int

    @property
    def refs(self) -> _Refcounts: ...

    @property
    def header(self) -> _Header: ...


def _overlaps(start: int, end: int, offset: int, size: int) -> bool:
    return size > 0 and start < offset + size and offset < end


def _clusters(table: Sequence[int], mask: int, cb: int, cs: int) -> frozenset[int]:
    out: set[int] = set()
    for e in table:
        off = e & mask
        if off:
            out.update(range(off >> cb, ((off + cs - 1) >> cb) + 1))
    return frozenset(out)


class OverlapChecker:
    """``qcow2_check_metadata_overlap`` for one open image.

    The host clusters of the L2 tables and refcount blocks are kept as sets,
    rebuilt when the L1 table or the refcount table was replaced or changed
    (its generation), so a check costs a few set lookups whatever the image
    size.  A hit is confirmed against freshly built sets before it counts.
    """

    def __init__(self, image: MetadataImage, checks: int = OL_CACHED) -> None:
        self.image = image
        self.checks = checks
        self._l1: tuple[array[int] | None, int] = (None, -1)
        self._l2_clusters: frozenset[int] = frozenset()
        self._reftable: tuple[array[int] | None, int] = (None, -1)
        self._refblock_clusters: frozenset[int] = frozenset()

    def _l2_set(self, fresh: bool = False) -> frozenset[int]:
        img = self.image
        key = self._l1
        if fresh or key[0] is not img.l1 or key[1] != img.l1_generation:
            self._l2_clusters = _clusters(img.l1, L1E_OFFSET_MASK, img.cluster_bits,
                                          img.cluster_size)
            self._l1 = (img.l1, img.l1_generation)
        return self._l2_clusters

    def _refblock_set(self, fresh: bool = False) -> frozenset[int]:
        img = self.image
        refs = img.refs
        key = self._reftable
        if fresh or key[0] is not refs.reftable or key[1] != refs.generation:
            self._refblock_clusters = _clusters(refs.reftable, REFT_OFFSET_MASK,
                                                img.cluster_bits, img.cluster_size)
            self._reftable = (refs.reftable, refs.generation)
        return self._refblock_clusters

    def check(self, offset: int, size: int, ign: int = 0) -> int:
        """The bit of the first metadata structure [offset, offset+size) overlaps, or 0."""
        chk = self.checks & ~ign
        if size <= 0:
            return 0
        img = self.image
        cs = img.cluster_size
        if chk & OL_MAIN_HEADER and offset < cs:
            return OL_MAIN_HEADER
        # QEMU compares whole clusters
        start = offset & ~(cs - 1)
        end = (offset + size + cs - 1) & ~(cs - 1)
        if chk & OL_ACTIVE_L1 and _overlaps(start, end, img.l1_table_offset, len(img.l1) * 8):
            return OL_ACTIVE_L1
        refs = img.refs
        if chk & OL_REFCOUNT_TABLE and _overlaps(start, end, refs.reftable_offset,
                                                 refs.reftable_clusters * cs):
            return OL_REFCOUNT_TABLE
        if chk & OL_SNAPSHOT_TABLE and _overlaps(start, end, img.header.snapshots_offset,
                                                 img.snapshot_table_size):
            return OL_SNAPSHOT_TABLE
        if chk & OL_INACTIVE_L1:
            for snap in img.snapshots:
                if _overlaps(start, end, snap.l1_table_offset, snap.l1_size * 8):
                    return OL_INACTIVE_L1
        cb = img.cluster_bits
        first, last = start >> cb, (end >> cb) - 1
        if (chk & OL_ACTIVE_L2 and _any_in(self._l2_set(), first, last)
                and _any_in(self._l2_set(fresh=True), first, last)):
            return OL_ACTIVE_L2
        if (chk & OL_REFCOUNT_BLOCK and _any_in(self._refblock_set(), first, last)
                and _any_in(self._refblock_set(fresh=True), first, last)):
            return OL_REFCOUNT_BLOCK
        hdr = img.header
        ext = hdr.bitmaps_ext
        if (chk & OL_BITMAP_DIRECTORY and ext is not None
                and hdr.autoclear_features & AUTOCLEAR_BITMAPS
                and _overlaps(start, end, ext[2], ext[1])):
            return OL_BITMAP_DIRECTORY
        return 0


def _any_in(clusters: frozenset[int], first: int, last: int) -> bool:
    if last - first < len(clusters):
        return any(c in clusters for c in range(first, last + 1))
    return any(first <= c <= last for c in clusters)


def c_hex(value: int) -> str:
    """C's ``%#x`` (zero is ``0``, not ``0x0``), for QEMU's message texts."""
    return f"{value:#x}" if value else "0"


def overlap_message(bit: int) -> str:
    """QEMU's text for a write refused because of overlap ``bit``."""
    name = OL_NAMES[(bit & -bit).bit_length() - 1]
    return f"Preventing invalid write on metadata (overlaps with {name})"


class CorruptionState(Protocol):
    """What :func:`signal_corruption` changes on an image."""

    node: BlockNode
    writable: bool
    corrupt: bool
    signaled_corruption: bool
    broken: str | None
    broken_errno: int

    async def write_corrupt_bit(self) -> None: ...


async def signal_corruption(image: CorruptionState, fatal: bool, offset: int | None,
                            size: int | None, message: str) -> None:
    """``qcow2_signal_corruption``: log, emit BLOCK_IMAGE_CORRUPTED and, if fatal
    (only a writable image), set the corrupt bit and make the node unusable."""
    fatal = fatal and image.writable
    if image.signaled_corruption and (not fatal or image.corrupt):
        return
    if fatal:
        log.error("qcow2: Marking image as corrupt: %s; further corruption events "
                  "will be suppressed", message)
    else:
        log.error("qcow2: Image is corrupt: %s; further non-fatal corruption events "
                  "will be suppressed", message)
    node = image.node
    data: dict[str, Any] = {"device": ""}
    if node.node_name:
        data["node-name"] = node.node_name
    data["msg"] = message
    if offset is not None:
        data["offset"] = offset
    if size is not None:
        data["size"] = size
    data["fatal"] = fatal
    node.graph.on_event("BLOCK_IMAGE_CORRUPTED", data)
    if fatal:
        if not image.corrupt:
            image.corrupt = True
            await image.write_corrupt_bit()
        # QEMU drops the driver (bs->drv = NULL): every later request ENOMEDIUM
        image.broken = "No medium found"
        image.broken_errno = ENOMEDIUM
    image.signaled_corruption = True
