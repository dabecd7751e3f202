"""Creating empty qcow2 images (the layout ``qemu-img create`` produces).

Cluster 0 holds the header, extensions and backing file name; then come the
refcount table, the refcount block(s) and the L1 table, each starting on a
cluster boundary.  For a 1 GiB image with 64 KiB clusters that is reftable at
0x10000, refblock at 0x20000, L1 at 0x30000 (as QEMU 7.2 lays it out).
"""

from __future__ import annotations

from qmpd.block.qcow2.format import (
    COMPAT_LAZY_REFCOUNTS,
    V2_HEADER_LENGTH,
    V3_HEADER_LENGTH,
    Header,
    build_header_cluster,
    feature_table_extension,
    l1_size_for,
)
from qmpd.block.qcow2.refcount import RefBlock


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
    cluster_bits = cluster_size.bit_length() - 1
    if 1 << cluster_bits != cluster_size or not 9 <= cluster_bits <= 21:
        raise ValueError("Cluster size must be a power of two between 512 and 2048k")
    order = refcount_bits.bit_length() - 1
    if 1 << order != refcount_bits or order > 6:
        raise ValueError("Refcount width must be a power of two and may not exceed 64 bits")
    if version < 3 and refcount_bits != 16:
        raise ValueError("Different refcount widths than 16 bits require compatibility "
                         "level 1.1 or above (use compat=1.1 or greater)")
    l1_size = l1_size_for(size, cluster_bits)
    l1_clusters = max(1, -(-(l1_size * 8) // cluster_size))
    rb_entries = cluster_size * 8 // refcount_bits
    rt_clusters = 1
    rb_count = 1
    while True:
        total = 1 + rt_clusters + rb_count + l1_clusters
        need_rb = -(-total // rb_entries)
        need_rt = max(1, -(-(need_rb * 8) // cluster_size))
        if need_rb <= rb_count and need_rt <= rt_clusters:
            break
        rb_count, rt_clusters = max(rb_count, need_rb), max(rt_clusters, need_rt)
    total = 1 + rt_clusters + rb_count + l1_clusters
    rt_offset = cluster_size
    rb_offset = rt_offset + rt_clusters * cluster_size
    l1_offset = rb_offset + rb_count * cluster_size
    hdr = Header(
        version=version,
        backing_file_offset=0,
        backing_file_size=0,
        cluster_bits=cluster_bits,
        size=size,
        crypt_method=0,
        l1_size=l1_size,
        l1_table_offset=l1_offset,
        refcount_table_offset=rt_offset,
        refcount_table_clusters=rt_clusters,
        nb_snapshots=0,
        snapshots_offset=0,
        refcount_order=order,
        header_length=V3_HEADER_LENGTH if version >= 3 else V2_HEADER_LENGTH,
        compatible_features=COMPAT_LAZY_REFCOUNTS if lazy_refcounts else 0,
        backing_file=backing_file,
        backing_format=backing_format,
    )
    if version >= 3 and cluster_size > 4096:
        hdr.extensions.append(feature_table_extension())
    parts = [build_header_cluster(hdr)]
    table = bytearray(rt_clusters * cluster_size)
    for k in range(rb_count):
        table[k * 8 : k * 8 + 8] = (rb_offset + k * cluster_size).to_bytes(8, "big")
    parts.append(bytes(table))
    for k in range(rb_count):
        blk = RefBlock.new(order, cluster_size)
        base = k * rb_entries
        for c in range(base, min(total, base + rb_entries)):
            blk.set(c - base, 1)
        parts.append(blk.to_bytes())
    # The L1 table (all zeros): like QEMU, the file ends right after its last
    # entry, part-way through a cluster.
    parts.append(bytes(max(l1_size * 8, 8)))
    return b"".join(parts)


def create_image(path: str, size: int, **kw: object) -> None:
    """Write a new empty image to ``path`` (see :func:`image_bytes`)."""
    data = image_bytes(size, **kw)  # type: ignore[arg-type]
    with open(path, "wb") as f:
        f.write(data)
