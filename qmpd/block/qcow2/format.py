"""qcow2 on-disk format: constants, the header, header extensions, entry math.

Pure functions and plain data only (no I/O), so all of it can be unit tested
on byte strings.  Field layout and constants follow the qcow2 specification
(``docs/interop/qcow2.txt``); error texts are QEMU 7.2's, checked against
``qemu-io`` where the comment says so.
"""

from __future__ import annotations

import functools
import struct
from dataclasses import dataclass, field

QCOW_MAGIC = 0x514649FB

# --- entry flags and masks --------------------------------------------------------

QCOW_OFLAG_COPIED = 1 << 63
QCOW_OFLAG_COMPRESSED = 1 << 62
QCOW_OFLAG_ZERO = 1

L1E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
L2E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
REFT_OFFSET_MASK = 0xFFFFFFFFFFFFFE00
L1E_RESERVED_MASK = 0x7F000000000001FF
L2E_STD_RESERVED_MASK = 0x3F000000000001FE
REFT_RESERVED_MASK = 0x1FF

MIN_CLUSTER_BITS = 9
MAX_CLUSTER_BITS = 21
MAX_REFCOUNT_ORDER = 6
QCOW_MAX_L1_SIZE = 0x2000000  # bytes (32 MiB)
QCOW_MAX_REFTABLE_SIZE = 0x800000  # bytes (8 MiB)
QCOW_MAX_SNAPSHOTS = 65536
QCOW_MAX_CLUSTER_OFFSET = (1 << 56) - 1
MAX_BACKING_FILE_NAME = 1023

# --- feature bits -----------------------------------------------------------------

INCOMPAT_DIRTY = 1 << 0
INCOMPAT_CORRUPT = 1 << 1
INCOMPAT_DATA_FILE = 1 << 2
INCOMPAT_COMPRESSION = 1 << 3
INCOMPAT_EXTL2 = 1 << 4
INCOMPAT_MASK = 0x1F

COMPAT_LAZY_REFCOUNTS = 1 << 0

AUTOCLEAR_BITMAPS = 1 << 0
AUTOCLEAR_DATA_FILE_RAW = 1 << 1
AUTOCLEAR_MASK = 0x3

FEATURE_TYPE_INCOMPATIBLE = 0
FEATURE_TYPE_COMPATIBLE = 1
FEATURE_TYPE_AUTOCLEAR = 2

#: The feature-name table QEMU 7.2 writes (type, bit, name).
DEFAULT_FEATURE_TABLE: tuple[tuple[int, int, str], ...] = (
    (FEATURE_TYPE_INCOMPATIBLE, 0, "dirty bit"),
    (FEATURE_TYPE_INCOMPATIBLE, 1, "corrupt bit"),
    (FEATURE_TYPE_INCOMPATIBLE, 2, "external data file"),
    (FEATURE_TYPE_INCOMPATIBLE, 3, "compression type"),
    (FEATURE_TYPE_INCOMPATIBLE, 4, "extended L2 entries"),
    (FEATURE_TYPE_COMPATIBLE, 0, "lazy refcounts"),
    (FEATURE_TYPE_AUTOCLEAR, 0, "bitmaps"),
    (FEATURE_TYPE_AUTOCLEAR, 1, "raw external data"),
)

# --- header extensions --------------------------------------------------------------

EXT_END = 0x00000000
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_FEATURE_TABLE = 0x6803F857
EXT_BITMAPS = 0x23852875
EXT_CRYPTO = 0x0537BE77
EXT_DATA_FILE = 0x44415441

COMPRESSION_ZLIB = 0
COMPRESSION_ZSTD = 1
COMPRESSION_NAMES = {COMPRESSION_ZLIB: "zlib", COMPRESSION_ZSTD: "zstd"}

V2_HEADER_LENGTH = 72
V3_MIN_HEADER_LENGTH = 104
#: What QEMU 7.2 writes: 104 + compression_type (1) + padding (7).
V3_HEADER_LENGTH = 112

_V2 = struct.Struct(">IIQIIQIIQQIIQ")
_V3 = struct.Struct(">QQQII")
_EXT = struct.Struct(">II")
_SNAPSHOT = struct.Struct(">QIHHIIQII")
_FEATURE = struct.Struct(">BB46s")

assert _V2.size == V2_HEADER_LENGTH
assert _V2.size + _V3.size == V3_MIN_HEADER_LENGTH


class Qcow2FormatError(Exception):
    """The image cannot be opened; ``str()`` is QEMU's message, ``errno`` its code."""

    def __init__(self, message: str, errno: int = 22) -> None:
        super().__init__(message)
        self.errno = errno


@dataclass
class HeaderExtension:
    """One header extension record, kept verbatim (``data`` without padding)."""

    type: int
    data: bytes


@dataclass
class Header:
    """The parsed qcow2 header (cluster 0) with its extensions and backing name."""

    version: int
    backing_file_offset: int
    backing_file_size: int
    cluster_bits: int
    size: int
    crypt_method: int
    l1_size: int
    l1_table_offset: int
    refcount_table_offset: int
    refcount_table_clusters: int
    nb_snapshots: int
    snapshots_offset: int
    incompatible_features: int = 0
    compatible_features: int = 0
    autoclear_features: int = 0
    refcount_order: int = 4
    header_length: int = V2_HEADER_LENGTH
    compression_type: int = COMPRESSION_ZLIB
    extensions: list[HeaderExtension] = field(default_factory=list)
    backing_file: str | None = None
    backing_format: str | None = None
    feature_table: list[tuple[int, int, str]] = field(default_factory=list)
    bitmaps_ext: tuple[int, int, int] | None = None  # nb, dir size, dir offset
    data_file: str | None = None

    # --- derived ------------------------------------------------------------------

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    @property
    def refcount_bits(self) -> int:
        return 1 << self.refcount_order

    @property
    def l2_bits(self) -> int:
        return self.cluster_bits - 3

    def min_l1_size(self) -> int:
        return l1_size_for(self.size, self.cluster_bits)


def l1_size_for(size: int, cluster_bits: int) -> int:
    """The number of L1 entries a disk of ``size`` bytes needs (``size_to_l1``)."""
    shift = cluster_bits + cluster_bits - 3
    return (size + (1 << shift) - 1) >> shift


def _unsupported_features(table: list[tuple[int, int, str]], mask: int) -> str:
    """QEMU's ``report_unsupported_feature`` text (verified with qemu-io 7.2)."""
    names = []
    for ftype, bit, name in table:
        if ftype == FEATURE_TYPE_INCOMPATIBLE and mask & (1 << bit):
            names.append(name)
            mask &= ~(1 << bit)
    if mask:
        names.append(f"Unknown incompatible feature: {mask:x}")
    return "Unsupported qcow2 feature(s): " + ", ".join(names)


def parse_header(buf: bytes) -> Header:
    """Parse cluster 0 (at least the whole first cluster, or the whole file if shorter).

    Raises :class:`Qcow2FormatError` with QEMU's message for anything QEMU refuses
    before looking at the tables.  Feature checks that depend on how the image is
    opened (corrupt bit, read-write) are left to the caller.
    """
    if len(buf) < V2_HEADER_LENGTH:
        raise Qcow2FormatError("Image is not in qcow2 format")
    (
        magic,
        version,
        backing_file_offset,
        backing_file_size,
        cluster_bits,
        size,
        crypt_method,
        l1_size,
        l1_table_offset,
        refcount_table_offset,
        refcount_table_clusters,
        nb_snapshots,
        snapshots_offset,
    ) = _V2.unpack_from(buf, 0)
    if magic != QCOW_MAGIC:
        raise Qcow2FormatError("Image is not in qcow2 format")
    if version < 2 or version > 3:
        raise Qcow2FormatError(f"Unsupported qcow2 version {version}", 95)
    if cluster_bits < MIN_CLUSTER_BITS or cluster_bits > MAX_CLUSTER_BITS:
        raise Qcow2FormatError(f"Unsupported cluster size: 2^{cluster_bits}")
    hdr = Header(
        version=version,
        backing_file_offset=backing_file_offset,
        backing_file_size=backing_file_size,
        cluster_bits=cluster_bits,
        size=size,
        crypt_method=crypt_method,
        l1_size=l1_size,
        l1_table_offset=l1_table_offset,
        refcount_table_offset=refcount_table_offset,
        refcount_table_clusters=refcount_table_clusters,
        nb_snapshots=nb_snapshots,
        snapshots_offset=snapshots_offset,
    )
    cluster_size = 1 << cluster_bits
    if version == 3:
        if len(buf) < V3_MIN_HEADER_LENGTH:
            raise Qcow2FormatError("qcow2 header too short")
        (
            hdr.incompatible_features,
            hdr.compatible_features,
            hdr.autoclear_features,
            hdr.refcount_order,
            hdr.header_length,
        ) = _V3.unpack_from(buf, V2_HEADER_LENGTH)
        if hdr.header_length < V3_MIN_HEADER_LENGTH:
            raise Qcow2FormatError("qcow2 header too short")
        if hdr.header_length > cluster_size:
            raise Qcow2FormatError("qcow2 header exceeds cluster size")
        if hdr.header_length > len(buf):
            raise Qcow2FormatError("Could not read qcow2 header", 5)
        if hdr.header_length > V3_MIN_HEADER_LENGTH:
            hdr.compression_type = buf[V3_MIN_HEADER_LENGTH]
    if backing_file_offset > cluster_size:
        raise Qcow2FormatError("Invalid backing file offset")

    ext_end = backing_file_offset if backing_file_offset else cluster_size
    _parse_extensions(hdr, buf, hdr.header_length, min(ext_end, len(buf)))

    if backing_file_offset:
        if backing_file_size > MAX_BACKING_FILE_NAME or (
            backing_file_size > cluster_size - backing_file_offset
        ):
            raise Qcow2FormatError("Backing file name too long")
        raw = bytes(buf[backing_file_offset : backing_file_offset + backing_file_size])
        hdr.backing_file = raw.decode("utf-8", "surrogateescape")
    return hdr


def header_within(buf: bytes) -> bool:
    """Whether ``buf`` (the start of the file, shorter than a cluster) holds
    everything :func:`parse_header` reads: the header, every extension up to
    the end marker and the backing file name.  Then parsing it gives what
    parsing the whole cluster gives; when unsure, the answer is no.
    """
    if len(buf) < V3_MIN_HEADER_LENGTH:
        return False
    version = int.from_bytes(buf[4:8], "big")
    offset = V2_HEADER_LENGTH
    if version == 3:
        offset = int.from_bytes(buf[100:104], "big")
    elif version != 2:
        return False
    backing_offset = int.from_bytes(buf[8:16], "big")
    backing_size = int.from_bytes(buf[16:20], "big")
    if backing_offset and backing_offset + backing_size > len(buf):
        return False
    while offset + _EXT.size <= len(buf):
        ext_type, ext_len = _EXT.unpack_from(buf, offset)
        if ext_type == EXT_END:
            return True
        offset += _EXT.size + ((ext_len + 7) & ~7)
    return False


@functools.lru_cache(maxsize=8)
def _feature_table(data: bytes) -> tuple[tuple[int, int, str], ...]:
    # Images made by one program carry the same table: decoded once.
    return tuple(
        (ftype, bit, name.split(b"\0", 1)[0].decode("utf-8", "replace"))
        for ftype, bit, name in (_FEATURE.unpack_from(data, i * _FEATURE.size)
                                 for i in range(len(data) // _FEATURE.size))
    )


def _parse_extensions(hdr: Header, buf: bytes, start: int, end: int) -> None:
    offset = start
    while offset < end:
        if end - offset < _EXT.size:
            raise Qcow2FormatError("qcow2_read_extension: ERROR: pread fail from offset "
                                   f"{offset}", 5)
        ext_type, ext_len = _EXT.unpack_from(buf, offset)
        offset += _EXT.size
        if offset > end or ext_len > end - offset:
            raise Qcow2FormatError("Header extension too large")
        data = bytes(buf[offset : offset + ext_len])
        offset += (ext_len + 7) & ~7
        if ext_type == EXT_END:
            return
        hdr.extensions.append(HeaderExtension(ext_type, data))
        if ext_type == EXT_BACKING_FORMAT:
            if ext_len >= 16:
                raise Qcow2FormatError(
                    f"ERROR: ext_backing_format: len={ext_len} too large (>=16)"
                )
            hdr.backing_format = data.decode("utf-8", "surrogateescape")
        elif ext_type == EXT_FEATURE_TABLE:
            hdr.feature_table.extend(_feature_table(data))
        elif ext_type == EXT_BITMAPS:
            if len(data) >= 24:
                nb, _reserved, dir_size, dir_offset = struct.unpack_from(">IIQQ", data, 0)
                hdr.bitmaps_ext = (nb, dir_size, dir_offset)
        elif ext_type == EXT_DATA_FILE:
            hdr.data_file = data.decode("utf-8", "surrogateescape")


def check_features(hdr: Header, writable: bool) -> None:
    """The feature checks QEMU makes at open, with its messages (verified with qemu-io)."""
    unknown = hdr.incompatible_features & ~INCOMPAT_MASK
    if unknown:
        table = hdr.feature_table or list(DEFAULT_FEATURE_TABLE)
        raise Qcow2FormatError(_unsupported_features(table, unknown), 95)
    if hdr.incompatible_features & INCOMPAT_CORRUPT and writable:
        raise Qcow2FormatError("qcow2: Image is corrupt; cannot be opened read/write", 13)
    if hdr.incompatible_features & INCOMPAT_DATA_FILE:
        raise Qcow2FormatError("'data-file' is required for this image")
    if hdr.compression_type == COMPRESSION_ZLIB:
        if hdr.incompatible_features & INCOMPAT_COMPRESSION:
            raise Qcow2FormatError(
                "qcow2: Compression type incompatible feature bit must not be set"
            )
    else:
        if hdr.compression_type != COMPRESSION_ZSTD:
            raise Qcow2FormatError(
                f"qcow2: unknown compression type: {hdr.compression_type}", 95
            )
        if not hdr.incompatible_features & INCOMPAT_COMPRESSION:
            raise Qcow2FormatError(
                "qcow2: Compression type incompatible feature bit must be set"
            )
        # QEMU built without zstd says exactly this; qmpd reads zlib only.
        raise Qcow2FormatError(f"qcow2: unknown compression type: {hdr.compression_type}", 95)
    if hdr.incompatible_features & INCOMPAT_EXTL2:
        # QEMU 7.2 supports these; qmpd does not (yet), so refuse like an
        # unsupported feature rather than misreading 128-bit L2 entries.
        raise Qcow2FormatError(_unsupported_features(list(DEFAULT_FEATURE_TABLE),
                                                     INCOMPAT_EXTL2), 95)
    if hdr.refcount_order > MAX_REFCOUNT_ORDER:
        raise Qcow2FormatError(
            "Reference count entry width too large; may not exceed 64 bits"
        )
    if hdr.crypt_method:
        raise Qcow2FormatError("qcow2: encrypted images are not supported by qmpd", 95)


def _validate_table(offset: int, entries: int, entry_len: int, cluster_size: int,
                    max_bytes: int) -> str | None:
    if entries > max_bytes // entry_len:
        return "too large"
    if offset & (cluster_size - 1):
        return "invalid"
    if offset + entries * entry_len > (1 << 63):
        return "invalid"
    return None


def check_tables(hdr: Header) -> None:
    """Sanity checks of the table pointers, QEMU's order and texts."""
    cs = hdr.cluster_size
    if hdr.refcount_table_clusters == 0:
        raise Qcow2FormatError("Image does not contain a reference count table")
    problem = _validate_table(hdr.refcount_table_offset,
                              hdr.refcount_table_clusters * cs // 8, 8, cs,
                              QCOW_MAX_REFTABLE_SIZE)
    if problem == "too large":
        raise Qcow2FormatError("Reference count table too large")
    if problem:
        raise Qcow2FormatError("Reference count table offset invalid")
    if hdr.nb_snapshots > QCOW_MAX_SNAPSHOTS:
        raise Qcow2FormatError("Snapshot table too large")
    if hdr.nb_snapshots and hdr.snapshots_offset & (cs - 1):
        raise Qcow2FormatError("Snapshot table offset invalid")
    if hdr.l1_size > QCOW_MAX_L1_SIZE // 8:
        raise Qcow2FormatError("Active L1 table too large", 27)
    if hdr.l1_size < hdr.min_l1_size():
        raise Qcow2FormatError("L1 table is too small")
    if hdr.l1_size and hdr.l1_table_offset & (cs - 1):
        raise Qcow2FormatError("Active L1 table offset invalid")


# --- header writing ------------------------------------------------------------------


def pack_header_fields(hdr: Header) -> bytes:
    """The fixed header fields (72 bytes for v2, 104 for v3) as they are on disk."""
    out = _V2.pack(
        QCOW_MAGIC,
        hdr.version,
        hdr.backing_file_offset,
        hdr.backing_file_size,
        hdr.cluster_bits,
        hdr.size,
        hdr.crypt_method,
        hdr.l1_size,
        hdr.l1_table_offset,
        hdr.refcount_table_offset,
        hdr.refcount_table_clusters,
        hdr.nb_snapshots,
        hdr.snapshots_offset,
    )
    if hdr.version >= 3:
        out += _V3.pack(
            hdr.incompatible_features,
            hdr.compatible_features,
            hdr.autoclear_features,
            hdr.refcount_order,
            hdr.header_length,
        )
    return out


def build_header_cluster(hdr: Header, extra_header: bytes = b"") -> bytes:
    """A whole first cluster the way ``qcow2_update_header`` lays it out.

    ``extra_header`` holds the header bytes from 104 up to ``header_length``
    (compression type, padding, unknown fields), kept verbatim.  Extensions are
    written in QEMU's order: backing format, data file, crypto, feature table,
    bitmaps, unknown ones, end marker; then the backing file name.
    """
    cs = hdr.cluster_size
    extra = b""
    if hdr.version >= 3:
        extra = extra_header[: hdr.header_length - V3_MIN_HEADER_LENGTH].ljust(
            hdr.header_length - V3_MIN_HEADER_LENGTH, b"\0"
        )
    parts: list[bytes] = []

    def ext(ext_type: int, data: bytes) -> None:
        parts.append(_EXT.pack(ext_type, len(data)))
        parts.append(data + b"\0" * (-len(data) % 8))

    by_type = {e.type: e for e in hdr.extensions}
    if hdr.backing_format:
        ext(EXT_BACKING_FORMAT, hdr.backing_format.encode("utf-8", "surrogateescape"))
    for known in (EXT_DATA_FILE, EXT_CRYPTO):
        if known in by_type:
            ext(known, by_type[known].data)
    if hdr.version >= 3 and EXT_FEATURE_TABLE in by_type:
        ext(EXT_FEATURE_TABLE, by_type[EXT_FEATURE_TABLE].data)
    if EXT_BITMAPS in by_type:
        ext(EXT_BITMAPS, by_type[EXT_BITMAPS].data)
    known_types = {EXT_BACKING_FORMAT, EXT_DATA_FILE, EXT_CRYPTO, EXT_FEATURE_TABLE, EXT_BITMAPS}
    for e in hdr.extensions:
        if e.type not in known_types:
            ext(e.type, e.data)
    parts.append(_EXT.pack(EXT_END, 0))
    exts = b"".join(parts)
    fixed_len = (V3_MIN_HEADER_LENGTH if hdr.version >= 3 else V2_HEADER_LENGTH) + len(extra)
    name = b""
    if hdr.backing_file is not None:
        name = hdr.backing_file.encode("utf-8", "surrogateescape")
        hdr.backing_file_offset = fixed_len + len(exts)
        hdr.backing_file_size = len(name)
    else:
        hdr.backing_file_offset = 0
        hdr.backing_file_size = 0
    body = pack_header_fields(hdr) + extra + exts + name
    if len(body) > cs:
        raise Qcow2FormatError("Header extensions and backing file name exceed the cluster", 28)
    return body + bytes(cs - len(body))


def feature_table_extension() -> HeaderExtension:
    data = b"".join(
        _FEATURE.pack(t, b, n.encode()) for t, b, n in DEFAULT_FEATURE_TABLE
    )
    return HeaderExtension(EXT_FEATURE_TABLE, data)


# --- L2 entries -------------------------------------------------------------------------


class ClusterType:
    """``qcow2_get_cluster_type`` results (standard, non-extended L2 entries)."""

    UNALLOCATED = 0
    ZERO_PLAIN = 1
    ZERO_ALLOC = 2
    NORMAL = 3
    COMPRESSED = 4

    NAMES = ("unallocated", "zero-plain", "zero-alloc", "normal", "compressed")


def cluster_type(entry: int) -> int:
    if entry & QCOW_OFLAG_COMPRESSED:
        return ClusterType.COMPRESSED
    if entry & QCOW_OFLAG_ZERO:
        return ClusterType.ZERO_ALLOC if entry & L2E_OFFSET_MASK else ClusterType.ZERO_PLAIN
    if entry & L2E_OFFSET_MASK:
        return ClusterType.NORMAL
    return ClusterType.UNALLOCATED


def cluster_is_allocated(ctype: int) -> bool:
    """Whether the entry holds host clusters (``qcow2_cluster_is_allocated``)."""
    return ctype in (ClusterType.NORMAL, ClusterType.ZERO_ALLOC, ClusterType.COMPRESSED)


@dataclass(frozen=True)
class CompressedGeometry:
    """Compressed-cluster descriptor math for one cluster size."""

    cluster_bits: int

    @property
    def csize_shift(self) -> int:
        return 62 - (self.cluster_bits - 8)

    @property
    def csize_mask(self) -> int:
        return (1 << (self.cluster_bits - 8)) - 1

    @property
    def offset_mask(self) -> int:
        return (1 << self.csize_shift) - 1

    def parse(self, entry: int) -> tuple[int, int]:
        """(host byte offset, bytes to read) of a compressed descriptor."""
        coffset = entry & self.offset_mask
        nb_sectors = ((entry >> self.csize_shift) & self.csize_mask) + 1
        return coffset, nb_sectors * 512 - (coffset & 511)

    def make(self, coffset: int, clen: int) -> int:
        """The descriptor for ``clen`` compressed bytes stored at ``coffset``."""
        nb_field = (coffset + clen - 1) // 512 - coffset // 512
        if nb_field > self.csize_mask:
            raise ValueError("compressed data too large for the descriptor")
        return QCOW_OFLAG_COMPRESSED | (nb_field << self.csize_shift) | coffset

    def host_clusters(self, entry: int) -> range:
        """Indexes of the host clusters a compressed descriptor touches."""
        coffset, csize = self.parse(entry)
        return range(coffset >> self.cluster_bits,
                      ((coffset + csize - 1) >> self.cluster_bits) + 1)


# --- snapshot table -----------------------------------------------------------------------


@dataclass
class Snapshot:
    l1_table_offset: int
    l1_size: int
    id_str: str
    name: str
    extra: bytes = b""
    date_sec: int = 0
    date_nsec: int = 0
    vm_clock_nsec: int = 0
    vm_state_size: int = 0

    @property
    def icount(self) -> int | None:
        if len(self.extra) >= 24:
            value = int(struct.unpack_from(">Q", self.extra, 16)[0])
            return None if value == (1 << 64) - 1 else value
        return None

    def info(self) -> dict[str, object]:
        """QEMU's SnapshotInfo for this entry."""
        size = self.vm_state_size
        if len(self.extra) >= 8:
            size = int(struct.unpack_from(">Q", self.extra, 0)[0])
        out: dict[str, object] = {
            "id": self.id_str,
            "name": self.name,
            "vm-state-size": size,
            "date-sec": self.date_sec,
            "date-nsec": self.date_nsec,
            "vm-clock-sec": self.vm_clock_nsec // 1_000_000_000,
            "vm-clock-nsec": self.vm_clock_nsec % 1_000_000_000,
        }
        if self.icount is not None:
            out["icount"] = self.icount
        return out

    @property
    def disk_size(self) -> int | None:
        if len(self.extra) >= 16:
            return int(struct.unpack_from(">Q", self.extra, 8)[0])
        return None


def parse_snapshots(buf: bytes, count: int) -> tuple[list[Snapshot], int]:
    """Parse ``count`` snapshot entries; returns them and the table's byte length."""
    snaps: list[Snapshot] = []
    off = 0
    for _ in range(count):
        if off + _SNAPSHOT.size > len(buf):
            raise Qcow2FormatError("Snapshot table is truncated", 5)
        (l1_off, l1_size, id_len, name_len, date_sec, date_nsec, vm_clock, vm_state,
         extra_len) = _SNAPSHOT.unpack_from(buf, off)
        off += _SNAPSHOT.size
        extra = bytes(buf[off : off + extra_len])
        off += extra_len
        id_str = bytes(buf[off : off + id_len]).decode("utf-8", "replace")
        off += id_len
        name = bytes(buf[off : off + name_len]).decode("utf-8", "replace")
        off += name_len
        off = (off + 7) & ~7
        snaps.append(Snapshot(l1_off, l1_size, id_str, name, extra, date_sec, date_nsec,
                              vm_clock, vm_state))
    return snaps, off

