"""Creating qcow2 images the way QEMU 7.2's ``qcow2_co_create`` leaves them.

Cluster 0 holds the header, extensions and backing file name; then come the
refcount table, the refcount block(s) and the L1 table, each starting on a
cluster boundary.  For a 1 GiB image with 64 KiB clusters that is reftable at
0x10000, refblock at 0x20000, L1 at 0x30000 (as QEMU 7.2 lays it out).  A
zero-sized image has no L1 table at all.

Every cluster goes where QEMU's allocator puts it: :class:`_RefcountModel`
replays ``qcow2_alloc_clusters`` and the placement of new refcount blocks
(``alloc_refcount_block``).  Preallocation follows ``qcow2_co_truncate``:
``metadata`` places each L2 table right before the data clusters it maps;
``falloc`` and ``full`` first build refcount structures behind what is used
(``qcow2_refcount_area``), put the data clusters after them and the first
L2 table in the freed cluster 1.  Images whose refcount table would have to
grow while they are made (beyond 16 TiB of file with 64 KiB clusters) are
refused.

:func:`check_options` validates options in QEMU's order with its texts;
:func:`plan` says what to write where (:class:`Layout`), so that the caller
writes through a node.
"""

from __future__ import annotations

import sys
from array import array
from dataclasses import dataclass, field

from qmpd.block.qcow2.format import (
    COMPAT_LAZY_REFCOUNTS,
    MAX_BACKING_FILE_NAME,
    QCOW_MAX_L1_SIZE,
    QCOW_OFLAG_COPIED,
    V2_HEADER_LENGTH,
    V3_HEADER_LENGTH,
    Header,
    Qcow2FormatError,
    build_header_cluster,
    feature_table_extension,
    l1_size_for,
)
from qmpd.block.qcow2.refcount import RefBlock
from qmpd.errors import GenericError

#: bdrv_co_truncate's limit: INT64_MAX aligned down to 1 GiB (BDRV_MAX_LENGTH).
MAX_LENGTH = ((1 << 63) - 1) & ~((1 << 30) - 1)

PREALLOC_MODES = ("off", "metadata", "falloc", "full")


class CreateError(GenericError):
    """A refused or failed creation, with QEMU's text and errno."""

    def __init__(self, desc: str, errno: int = 22) -> None:
        super().__init__(desc)
        self.errno = errno


@dataclass(frozen=True)
class Qcow2Options:
    """Checked options of a new image (defaults filled in)."""

    size: int
    cluster_size: int = 65536
    refcount_bits: int = 16
    version: int = 3
    lazy_refcounts: bool = False
    backing_file: str | None = None
    backing_format: str | None = None
    preallocation: str = "off"


@dataclass
class Layout:
    """What a new image is: writes at offsets, then the data area."""

    writes: list[tuple[int, bytes]] = field(default_factory=list)
    #: Host ranges of preallocated data clusters (falloc/full allocate them in the file).
    data: list[tuple[int, int]] = field(default_factory=list)
    #: The file is at least this long afterwards (metadata: up to the last data byte).
    file_size: int = 0


def as_int64(value: int) -> int:
    """A QAPI ``size`` (uint64) as C's int64_t sees it."""
    value &= (1 << 64) - 1
    return value - (1 << 64) if value >= 1 << 63 else value


def check_options(args: dict[str, object]) -> Qcow2Options:
    """qcow2_co_create's checks before it writes anything, in its order and words."""
    raw_size = int(args["size"])  # type: ignore[call-overload]
    if (raw_size & ((1 << 64) - 1)) % 512:
        raise CreateError("Image size must be a multiple of 512 bytes")
    version = 2 if args.get("version") == "v2" else 3
    cluster_size = int(args.get("cluster-size", 65536))  # type: ignore[call-overload]
    bits = (cluster_size & -cluster_size).bit_length() - 1 if cluster_size > 0 else -1
    if not 9 <= bits <= 21 or cluster_size != 1 << bits:
        raise CreateError("Cluster size must be a power of two between 512 and 2048k")
    prealloc = str(args.get("preallocation", "off"))
    backing_file = args.get("backing-file")
    if backing_file is not None and prealloc != "off":
        raise CreateError("Backing file and preallocation can only be used at the same "
                          "time if extended_l2 is on")
    backing_fmt = args.get("backing-fmt")
    if backing_fmt is not None and backing_file is None:
        raise CreateError("Backing format cannot be used without backing file")
    lazy = bool(args.get("lazy-refcounts", False))
    if version < 3 and lazy:
        raise CreateError("Lazy refcounts only supported with compatibility level 1.1 and "
                          "above (use version=v3 or greater)")
    refcount_bits = int(args.get("refcount-bits", 16))  # type: ignore[call-overload]
    if not 0 < refcount_bits <= 64 or refcount_bits & (refcount_bits - 1):
        raise CreateError("Refcount width must be a power of two and may not exceed 64 bits")
    if version < 3 and refcount_bits != 16:
        raise CreateError("Different refcount widths than 16 bits require compatibility "
                          "level 1.1 or above (use version=v3 or greater)")
    return Qcow2Options(
        size=as_int64(raw_size), cluster_size=cluster_size, refcount_bits=refcount_bits,
        version=version, lazy_refcounts=lazy,
        backing_file=None if backing_file is None else str(backing_file),
        backing_format=None if backing_fmt is None else str(backing_fmt),
        preallocation=prealloc)


def check_size(opts: Qcow2Options) -> None:
    """The truncate step's refusals ("Could not resize image: ...")."""
    size = opts.size
    if size < 0:
        raise CreateError("Could not resize image: Image size cannot be negative")
    if size > MAX_LENGTH:
        raise CreateError(f"Could not resize image: offset({size}) exceeds maximum({MAX_LENGTH})")
    cluster_bits = opts.cluster_size.bit_length() - 1
    if l1_size_for(size, cluster_bits) * 8 > QCOW_MAX_L1_SIZE:
        raise CreateError("Could not resize image: Failed to grow the L1 table: File too large",
                          27)


def _header(opts: Qcow2Options, l1_size: int, l1_offset: int, rt_offset: int,
            rt_clusters: int) -> bytes:
    cluster_bits = opts.cluster_size.bit_length() - 1
    hdr = Header(
        version=opts.version, backing_file_offset=0, backing_file_size=0,
        cluster_bits=cluster_bits, size=opts.size, crypt_method=0,
        l1_size=l1_size, l1_table_offset=l1_offset,
        refcount_table_offset=rt_offset, refcount_table_clusters=rt_clusters,
        nb_snapshots=0, snapshots_offset=0,
        refcount_order=opts.refcount_bits.bit_length() - 1,
        header_length=V3_HEADER_LENGTH if opts.version >= 3 else V2_HEADER_LENGTH,
        compatible_features=COMPAT_LAZY_REFCOUNTS if opts.lazy_refcounts else 0,
        backing_file=opts.backing_file, backing_format=opts.backing_format,
    )
    if opts.version >= 3 and opts.cluster_size > 4096:
        hdr.extensions.append(feature_table_extension())
    if opts.backing_file is not None:
        name = opts.backing_file
        fmt = opts.backing_format or "(null)"
        if len(name.encode("utf-8", "surrogateescape")) > MAX_BACKING_FILE_NAME:
            raise CreateError(f"Could not assign backing file '{name}' with format "
                              f"'{fmt}': Invalid argument")
        try:
            return build_header_cluster(hdr)
        except Qcow2FormatError:
            raise CreateError(f"Could not assign backing file '{name}' with format "
                              f"'{fmt}': No space left on device", 28) from None
    return build_header_cluster(hdr)


def _reftable(offsets: list[int], clusters: int, cluster_size: int) -> bytes:
    table = bytearray(clusters * cluster_size)
    for k, off in enumerate(offsets):
        table[k * 8:k * 8 + 8] = off.to_bytes(8, "big")
    return bytes(table)


def plan(opts: Qcow2Options) -> Layout:
    """The writes that make the new image (after :func:`check_options`)."""
    check_size(opts)
    return _allocated(opts)


class _Again(Exception):
    """QEMU's -EAGAIN: a new refcount block took clusters; search again."""


class _RefcountModel:
    """QEMU's cluster allocator on a new image (alloc_clusters_noref,
    update_refcount, alloc_refcount_block), to place every cluster where QEMU
    places it.  The refcount table keeps its one cluster: an image that would
    need it to grow is refused."""

    def __init__(self, cluster_size: int, order: int) -> None:
        self.block_bits = (cluster_size * 8 >> order).bit_length() - 1
        self.max_ref = (1 << (1 << order)) - 1
        self.cluster_size = cluster_size
        self.refs: dict[int, int] = {}
        self.table = [0] * (cluster_size // 8)
        self.table[0] = 2
        self.table_cluster = 1
        self.table_clusters = 1
        self.free = 0

    def get(self, cluster: int) -> int:
        index = cluster >> self.block_bits
        if index >= len(self.table) or not self.table[index]:
            return 0
        return self.refs.get(cluster, 0)

    def alloc_noref(self, n: int) -> int:
        found = 0
        while found < n:
            cluster = self.free
            self.free += 1
            found = 0 if self.get(cluster) else found + 1
        return self.free - n

    def alloc(self, n: int) -> int:
        """qcow2_alloc_clusters: ``n`` free clusters in a row, their refcount 1."""
        while True:
            start = self.alloc_noref(n)
            try:
                self.update(start, n, 1)
            except _Again:
                continue
            return start

    def update(self, start: int, n: int, addend: int) -> None:
        old_index = -1
        for cluster in range(start, start + n):
            index = cluster >> self.block_bits
            if index != old_index:
                try:
                    self._block_for(index)
                except _Again:
                    self.free = min(self.free, start)
                    if cluster > start:  # undo what this call did
                        self.update(start, cluster - start, -addend)
                    raise
            old_index = index
            ref = self.refs.get(cluster, 0) + addend
            if not 0 <= ref <= self.max_ref:
                raise CreateError("Could not resize image: refcount overflow")
            self.refs[cluster] = ref
            if ref == 0 and cluster < self.free:
                self.free = cluster

    def _block_for(self, index: int) -> None:
        if index < len(self.table) and self.table[index]:
            return
        if index >= len(self.table):
            raise CreateError("Could not resize image: qmpd does not grow the refcount "
                              "table of a new image (use larger clusters)", 27)
        new = self.alloc_noref(1)
        if new >> self.block_bits == index:
            self.refs[new] = 1  # the block describes itself
        else:
            self.update(new, 1, 1)
        self.table[index] = new
        raise _Again

    def refcount_area(self, start: int, additional: int) -> int:
        """qcow2_refcount_area (exact size, no new block given): refcount blocks
        for everything up to ``start + additional`` clusters and a new refcount
        table at ``start``; the old table is freed.  Returns the end (a cluster)."""
        per_block = 1 << self.block_bits
        per_table_cluster = self.cluster_size // 8
        blocks = table = n = 0
        while True:
            last = n
            blocks = -(-(start + additional + table + blocks) // per_block)
            table = -(-blocks // per_table_cluster)
            n = start + additional + blocks + table
            if n == last:
                break
        area_index = start // per_block
        table_size = -(-blocks // per_table_cluster) * per_table_cluster
        used = max((i for i, b in enumerate(self.table) if b), default=-1) + 1
        new_table = (self.table[:used] + [0] * table_size)[:table_size]
        missing = sum(1 for i in range(area_index, blocks) if not new_table[i])
        table_at = start + missing
        end = table_at + table_size * 8 // self.cluster_size
        nxt = start
        for i in range(area_index, blocks):
            if not new_table[i]:
                new_table[i] = nxt
                nxt += 1
        for cluster in range(start, end):
            self.refs[cluster] = 1
        old, old_clusters = self.table_cluster, self.table_clusters
        self.table = new_table
        self.table_cluster, self.table_clusters = table_at, end - table_at
        self.update(old, old_clusters, -1)
        return end

    def blocks(self) -> list[tuple[int, int]]:
        return [(index, block) for index, block in enumerate(self.table) if block]


def _l2_table(host: int, count: int, cluster_size: int) -> bytes:
    """An L2 table mapping ``count`` clusters to the host clusters from ``host`` on."""
    table = array("Q", range(host | QCOW_OFLAG_COPIED,
                             (host + count * cluster_size) | QCOW_OFLAG_COPIED, cluster_size))
    if sys.byteorder == "little":
        table.byteswap()
    return table.tobytes().ljust(cluster_size, b"\0")


def _empty_image(opts: Qcow2Options) -> bytes:
    layout = _allocated(opts)
    out = bytearray(layout.file_size)
    for offset, data in layout.writes:
        out[offset:offset + len(data)] = data
    return bytes(out)


def _allocated(opts: Qcow2Options) -> Layout:
    """qcow2_co_create with preallocation off or metadata, step by step."""
    cs = opts.cluster_size
    cluster_bits = cs.bit_length() - 1
    order = opts.refcount_bits.bit_length() - 1
    model = _RefcountModel(cs, order)
    model.alloc(3)  # header, refcount table, first refcount block
    l1_size = l1_size_for(opts.size, cluster_bits)
    l1_offset = model.alloc(-(-(l1_size * 8) // cs)) * cs if l1_size else 0
    layout = Layout()
    l1 = bytearray(l1_size * 8)
    if opts.preallocation == "metadata":
        l2_entries = cs // 8
        n_data = -(-opts.size // cs)
        for i in range(-(-n_data // l2_entries)):
            l2 = model.alloc(1) * cs
            count = min(l2_entries, n_data - i * l2_entries)
            first = model.alloc(count)
            l1[i * 8:i * 8 + 8] = (l2 | QCOW_OFLAG_COPIED).to_bytes(8, "big")
            layout.writes.append((l2, _l2_table(first * cs, count, cs)))
            layout.data.append((first * cs, count * cs))
            layout.file_size = (first + count) * cs
        tail = opts.size % cs
        if tail:
            # The copy-on-write of the last, partial cluster writes its tail.
            layout.writes.append((layout.file_size - cs + tail, bytes(cs - tail)))
    elif opts.preallocation != "off":
        # qcow2_co_truncate: refcount structures for the data and its L2 tables
        # (plus one) behind what is used, the data after them, then the tables.
        l2_entries = cs // 8
        n_data = -(-opts.size // cs)
        n_l2 = -(-n_data // l2_entries)
        start = max(cluster for cluster, ref in model.refs.items() if ref) + 1
        first = model.refcount_area(start, n_data + n_l2 + 1)
        for cluster in range(first, first + n_data):
            model.refs[cluster] = 1
        layout.data.append((first * cs, n_data * cs))
        layout.file_size = (first + n_data) * cs
        for i in range(n_l2):
            l2 = model.alloc(1) * cs
            count = min(l2_entries, n_data - i * l2_entries)
            l1[i * 8:i * 8 + 8] = (l2 | QCOW_OFLAG_COPIED).to_bytes(8, "big")
            layout.writes.append((l2, _l2_table((first + i * l2_entries) * cs, count, cs)))
    entries = cs * 8 >> order
    layout.writes[:0] = [
        (0, _header(opts, l1_size, l1_offset, model.table_cluster * cs, model.table_clusters)),
        (model.table_cluster * cs,
         _reftable([block * cs for block in model.table], model.table_clusters, cs)),
    ]
    by_block: dict[int, list[tuple[int, int]]] = {}
    for cluster, ref in model.refs.items():
        if ref:
            by_block.setdefault(cluster // entries, []).append((cluster % entries, ref))
    for index, block in model.blocks():
        blk = RefBlock.new(order, cs)
        for k, ref in by_block.get(index, ()):
            blk.set(k, ref)
        layout.writes.append((block * cs, blk.to_bytes()))
    if l1_size:
        layout.writes.append((l1_offset, bytes(l1)))
    end = max(offset + len(data) for offset, data in layout.writes)
    layout.file_size = max(layout.file_size, end)
    return layout


def image_bytes(
    size: int,
    cluster_size: int = 65536,
    refcount_bits: int = 16,
    version: int = 3,
    lazy_refcounts: bool = False,
    backing_file: str | None = None,
    backing_format: str | None = None,
) -> bytes:
    """The complete file of a new, empty image."""
    args: dict[str, object] = {
        "size": size, "cluster-size": cluster_size, "refcount-bits": refcount_bits,
        "version": "v2" if version < 3 else "v3", "lazy-refcounts": lazy_refcounts,
    }
    if backing_file is not None:
        args["backing-file"] = backing_file
    if backing_format is not None:
        args["backing-fmt"] = backing_format
    try:
        opts = check_options(args)
    except CreateError as exc:
        raise ValueError(exc.desc) from None
    return _empty_image(opts)


def create_image(path: str, size: int, **kw: object) -> None:
    """Write a new empty image to ``path`` (see :func:`image_bytes`)."""
    data = image_bytes(size, **kw)  # type: ignore[arg-type]
    with open(path, "wb") as f:
        f.write(data)
