"""Zero writes and discards on a qcow2 image (QEMU's ``qcow2_cluster_zeroize``
and ``qcow2_cluster_discard``): L2 entries rewritten, references dropped.

Functions of a :class:`~qmpd.block.qcow2.cluster.Qcow2Image`; the ``*_locked``
ones expect its metadata lock held.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from qmpd.block.qcow2.format import (
    L1E_OFFSET_MASK,
    QCOW_OFLAG_ZERO,
    ClusterType,
)
from qmpd.block.qcow2.format import cluster_type as entry_type
from qmpd.block.status import block_status_above

if TYPE_CHECKING:
    from qmpd.block.qcow2.cluster import Qcow2Image

#: Free-request types, for the pass-discard-* options.
DISCARD_NEVER = "never"
DISCARD_REQUEST = "request"
DISCARD_SNAPSHOT = "snapshot"
DISCARD_OTHER = "other"


async def rewrite_clusters(img: Qcow2Image, ci: int, n: int,
                           decide: Callable[[int], tuple[int, bool] | None],
                           kind: str) -> None:
    """Apply ``decide(old) -> (new, free_old) | None`` to ``n`` clusters' entries."""
    end = ci + n
    unallocated_change = decide(0)
    while ci < end:
        l1i = ci >> img.l2_bits
        o = ci & img.slice_mask
        k = min(end - ci, img.slice_entries - o)
        if not img.l1[l1i] & L1E_OFFSET_MASK and unallocated_change is None:
            ci += min(end - ci, img.l2_entries - (ci & img.l2_mask))
            continue
        entry = await img._writable_slice(ci)
        arr = entry.value
        frees = []
        changed = False
        for m in range(k):
            old = int(arr[o + m])
            r = decide(old)
            if r is None:
                continue
            arr[o + m] = r[0]
            changed = True
            if r[1]:
                frees.append(old)
        if changed:
            img.l2cache.mark_dirty(entry)
        if frees:
            await img._free_entries_pinned(entry, frees, kind)
        ci += k
    await img.l2cache.trim()
    await img.refs.cache.trim()


async def remainder_is_zero(img: Qcow2Image, ci: int, e: int, start: int, stop: int) -> bool:
    """Whether guest cluster ``ci`` reads as zeros outside [start, stop)."""
    t = entry_type(e)
    if t in (ClusterType.ZERO_PLAIN, ClusterType.ZERO_ALLOC):
        return True
    if t != ClusterType.UNALLOCATED:
        return False
    backing = img.node.backing
    if backing is None:
        return True
    base = ci << img.cluster_bits
    for a, b in ((base, base + start), (base + stop, base + img.cluster_size)):
        a = min(a, img.size)
        b = min(b, img.size)
        while a < b:
            if a >= backing.size():
                break
            st = await block_status_above(backing, a, min(b, backing.size()) - a)
            if not st.zero or st.length <= 0:
                return False
            a += st.length
    return True


async def write_zeroes(img: Qcow2Image, offset: int, length: int, may_unmap: bool) -> None:
    img.check_writable()
    if length <= 0:
        return
    cb = img.cluster_bits
    async with img._exclusive(offset >> cb, (offset + length - 1) >> cb):
        img.check_writable()
        await write_zeroes_locked(img, offset, length, may_unmap)


async def write_zeroes_locked(img: Qcow2Image, offset: int, length: int, may_unmap: bool) -> None:
    """QEMU's split: partial head, whole clusters, partial tail; a partial
    cluster becomes a zero cluster only if the rest of it already reads as
    zeros, otherwise zeros are written as data."""
    if length <= 0:
        return
    end = offset + length
    if img.version < 3:
        await write_zero_data(img, offset, end)
        return
    cb = img.cluster_bits
    cs = img.cluster_size
    cmask = img.cmask
    pos = offset
    while pos < end:
        cstart = pos & ~cmask
        if pos != cstart:
            stop = min(end, cstart + cs)
            await zero_partial(img, pos, stop, may_unmap)
        elif end - pos >= cs:
            stop = end & ~cmask
            await zeroize(img, pos >> cb, (stop - pos) >> cb, may_unmap)
        else:
            stop = end
            if stop == img.size:
                await zeroize(img, pos >> cb, 1, may_unmap)
            else:
                await zero_partial(img, pos, stop, may_unmap)
        pos = stop


async def zero_partial(img: Qcow2Image, pos: int, stop: int, may_unmap: bool) -> None:
    ci = pos >> img.cluster_bits
    cstart = ci << img.cluster_bits
    e = int((await img.entries(ci, 1))[0])
    t = entry_type(e)
    if t in (ClusterType.UNALLOCATED, ClusterType.ZERO_PLAIN, ClusterType.ZERO_ALLOC) and (
        await remainder_is_zero(img, ci, e, pos - cstart, stop - cstart)
    ):
        await zeroize(img, ci, 1, may_unmap)
    else:
        await write_zero_data(img, pos, stop)


async def write_zero_data(img: Qcow2Image, start: int, end: int) -> None:
    chunk = 8 << 20
    zeros = bytes(min(chunk, end - start))
    while start < end:
        n = min(chunk, end - start)
        await img._write_locked(start, memoryview(zeros)[:n])
        start += n


async def zeroize(img: Qcow2Image, ci: int, n: int, may_unmap: bool) -> None:
    def decide(old: int) -> tuple[int, bool] | None:
        t = entry_type(old)
        unmap = t == ClusterType.COMPRESSED or (
            may_unmap and t in (ClusterType.NORMAL, ClusterType.ZERO_ALLOC)
        )
        new = (0 if unmap else old) | QCOW_OFLAG_ZERO
        if new == old:
            return None
        return new, unmap

    await rewrite_clusters(img, ci, n, decide, DISCARD_REQUEST)


async def discard(img: Qcow2Image, offset: int, length: int, full: bool = False) -> None:
    img.check_writable()
    if length <= 0:
        return
    cb = img.cluster_bits
    async with img._exclusive(offset >> cb, (offset + length - 1) >> cb):
        img.check_writable()
        await discard_locked(img, offset, length, full)


async def discard_locked(img: Qcow2Image, offset: int, length: int, full: bool) -> None:
    cmask = img.cmask
    end = offset + length
    start = (offset + cmask) & ~cmask
    stop = end & ~cmask
    if end == img.size and end & cmask and (end & ~cmask) >= offset:
        stop = (end + cmask) & ~cmask  # the complete partial cluster at the image end
    if stop <= start:
        return
    backing = img.node.backing is not None
    if not full and img.version < 3 and backing:
        return  # QEMU: ENOTSUP, ignored by the generic layer
    v3 = img.version >= 3

    def decide(old: int) -> tuple[int, bool] | None:
        t = entry_type(old)
        allocated = t in (ClusterType.NORMAL, ClusterType.ZERO_ALLOC, ClusterType.COMPRESSED)
        new = old
        if full:
            new = 0
        elif backing or allocated:
            new = QCOW_OFLAG_ZERO if v3 else 0
        if new == old:
            return None
        return new, allocated

    cb = img.cluster_bits
    await rewrite_clusters(img, start >> cb, (stop - start) >> cb, decide, DISCARD_REQUEST)
