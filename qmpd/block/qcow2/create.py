"""Creating qcow2 images the way QEMU 7.2's ``qcow2_co_create`` leaves them.

Cluster 0 holds the header, extensions and backing file name; then come the
refcount table, the refcount block(s) and the L1 table, each starting on a
cluster boundary.  For a 1 GiB image with 64 KiB clusters that is reftable at
0x10000, refblock at 0x20000, L1 at 0x30000 (as QEMU 7.2 lays it out).  A
zero-sized image has no L1 table at all.

Preallocation follows ``qcow2_co_truncate``: ``metadata`` places each L2
table right before the data clusters it maps; ``falloc`` and ``full`` first
move the refcount table behind the L1 table (``qcow2_refcount_area``), put
the data clusters after it and the first L2 table in the freed cluster 1.
qmpd lays out preallocated images whose clusters one refcount block covers
(2 GiB of file with the default options); larger ones are refused.

:func:`check_options` validates options in QEMU's order with its texts;
:func:`plan` says what to write where (:class:`Layout`), so that the caller
writes through a node.
"""

from __future__ import annotations

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


def _refblocks(order: int, cluster_size: int, used: int, count: int) -> bytes:
    """``count`` refcount blocks giving clusters 0..used-1 a refcount of 1."""
    entries = cluster_size * 8 >> order
    out = []
    for k in range(count):
        blk = RefBlock.new(order, cluster_size)
        base = k * entries
        for c in range(base, min(used, base + entries)):
            blk.set(c - base, 1)
        out.append(blk.to_bytes())
    return b"".join(out)


def _reftable(offsets: list[int], clusters: int, cluster_size: int) -> bytes:
    table = bytearray(clusters * cluster_size)
    for k, off in enumerate(offsets):
        table[k * 8:k * 8 + 8] = off.to_bytes(8, "big")
    return bytes(table)


def plan(opts: Qcow2Options) -> Layout:
    """The writes that make the new image (after :func:`check_options`)."""
    check_size(opts)
    if opts.preallocation == "off":
        data = _empty_image(opts)
        return Layout(writes=[(0, data)], file_size=len(data))
    return _preallocated(opts)


def _empty_image(opts: Qcow2Options) -> bytes:
    cs = opts.cluster_size
    cluster_bits = cs.bit_length() - 1
    order = opts.refcount_bits.bit_length() - 1
    l1_size = l1_size_for(opts.size, cluster_bits)
    l1_clusters = -(-(l1_size * 8) // cs)
    rb_entries = cs * 8 // opts.refcount_bits
    rt_clusters = 1
    rb_count = 1
    while True:
        total = 1 + rt_clusters + rb_count + l1_clusters
        need_rb = -(-total // rb_entries)
        need_rt = max(1, -(-(need_rb * 8) // cs))
        if need_rb <= rb_count and need_rt <= rt_clusters:
            break
        rb_count, rt_clusters = max(rb_count, need_rb), max(rt_clusters, need_rt)
    total = 1 + rt_clusters + rb_count + l1_clusters
    rt_offset = cs
    rb_offset = rt_offset + rt_clusters * cs
    l1_offset = rb_offset + rb_count * cs if l1_size else 0
    parts = [
        _header(opts, l1_size, l1_offset, rt_offset, rt_clusters),
        _reftable([rb_offset + k * cs for k in range(rb_count)], rt_clusters, cs),
        _refblocks(order, cs, total, rb_count),
    ]
    # The L1 table (all zeros): like QEMU, the file ends right after its last
    # entry, part-way through a cluster.
    parts.append(bytes(l1_size * 8))
    return b"".join(parts)


def _preallocated(opts: Qcow2Options) -> Layout:
    cs = opts.cluster_size
    cluster_bits = cs.bit_length() - 1
    order = opts.refcount_bits.bit_length() - 1
    l1_size = l1_size_for(opts.size, cluster_bits)
    l1_clusters = -(-(l1_size * 8) // cs)
    l2_entries = cs // 8
    n_data = -(-opts.size // cs)
    n_l2 = -(-n_data // l2_entries)
    first_l1 = 3
    if opts.preallocation == "metadata":
        # L2 table, then its data clusters, table after table.
        l2_offsets, data_starts = [], []
        nxt = first_l1 + l1_clusters
        for i in range(n_l2):
            l2_offsets.append(nxt)
            data_starts.append(nxt + 1)
            nxt += 1 + min(l2_entries, n_data - i * l2_entries)
        used = nxt
        rt_cluster = 1
        last_guest = (n_l2 - 1) * l2_entries * cs
        file_size = data_starts[-1] * cs + (opts.size - last_guest)
    else:
        # qcow2_refcount_area moves the reftable behind the L1 table; the
        # data follows it; the first L2 table takes the freed cluster 1.
        rt_cluster = first_l1 + l1_clusters
        start = rt_cluster + 1
        data_starts = [start + i * l2_entries for i in range(n_l2)]
        l2_offsets = [1] + [start + n_data + i for i in range(n_l2 - 1)]
        used = start + n_data + max(0, n_l2 - 1)
        file_size = (start + n_data) * cs
    # falloc/full: the refcount structures are made to cover one more L2 table.
    covered = used if opts.preallocation == "metadata" else used + 2
    if covered > cs * 8 // opts.refcount_bits:
        raise CreateError("Could not resize image: qmpd preallocates only images whose "
                          "clusters one refcount block covers", 27)
    layout = Layout(file_size=file_size)
    l1 = bytearray(l1_clusters * cs)
    for i, l2 in enumerate(l2_offsets):
        l1[i * 8:i * 8 + 8] = ((l2 * cs) | QCOW_OFLAG_COPIED).to_bytes(8, "big")
        table = bytearray(cs)
        count = min(l2_entries, n_data - i * l2_entries)
        for k in range(count):
            entry = ((data_starts[i] + k) * cs) | QCOW_OFLAG_COPIED
            table[k * 8:k * 8 + 8] = entry.to_bytes(8, "big")
        layout.writes.append((l2 * cs, bytes(table)))
        layout.data.append((data_starts[i] * cs, count * cs))
    layout.writes[:0] = [
        (0, _header(opts, l1_size, first_l1 * cs, rt_cluster * cs, 1)),
        (rt_cluster * cs, _reftable([2 * cs], 1, cs)),
        (2 * cs, _refblocks(order, cs, used, 1)),
        (first_l1 * cs, bytes(l1[:l1_size * 8])),
    ]
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
