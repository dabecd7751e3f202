"""Guest writes, cluster allocation with copy-on-write, zeroing and discard
(QEMU's ``qcow2_alloc_host_offset``, ``perform_cow``, ``qcow2_cluster_zeroize``
and ``qcow2_cluster_discard`` in ``qcow2-cluster.c``, and the write path of
``qcow2.c``).

:class:`Qcow2Allocation` changes the metadata of a
:class:`~qmpd.block.qcow2.state.Qcow2State` (write ordering and locking are
described there); it reads through a :class:`~qmpd.block.qcow2.mapping.Qcow2Mapping`.
The ``*_locked`` methods expect the metadata lock held.
"""

from __future__ import annotations

import asyncio
from array import array
from collections.abc import Callable
from dataclasses import dataclass

from qmpd.block.driver import BlockDriverError
from qmpd.block.extent import HostSpan
from qmpd.block.qcow2.cache import CacheEntry
from qmpd.block.qcow2.fileio import META_ALIGN
from qmpd.block.qcow2.format import (
    L1E_OFFSET_MASK,
    L2E_OFFSET_MASK,
    QCOW_OFLAG_COMPRESSED,
    QCOW_OFLAG_COPIED,
    QCOW_OFLAG_ZERO,
    ClusterType,
)
from qmpd.block.qcow2.format import cluster_type as entry_type
from qmpd.block.qcow2.mapping import Qcow2Mapping
from qmpd.block.qcow2.overlap import OL_ACTIVE_L1, OL_ACTIVE_L2
from qmpd.block.qcow2.refcount import array_to_u64_be
from qmpd.block.qcow2.state import DISCARD_OTHER, DISCARD_REQUEST, Qcow2State
from qmpd.block.status import block_status_above

_FAST_WRITE_MASK = QCOW_OFLAG_COPIED | QCOW_OFLAG_COMPRESSED | QCOW_OFLAG_ZERO

# write-path categories of an L2 entry
_INPLACE = 0  # normal, owned (COPIED): overwrite in place
_REUSE = 1  # zero flag on an owned cluster: fill it, then clear the flag
_ALLOC = 2  # anything else: new cluster, COW, then point the entry at it


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


def _write_category(entry: int) -> int:
    if entry & QCOW_OFLAG_COMPRESSED or not entry & L2E_OFFSET_MASK:
        return _ALLOC
    if not entry & QCOW_OFLAG_COPIED:
        return _ALLOC
    return _REUSE if entry & QCOW_OFLAG_ZERO else _INPLACE


class Qcow2Allocation:
    """Everything that changes L1/L2 entries of one image state."""

    def __init__(self, st: Qcow2State, mapping: Qcow2Mapping) -> None:
        self.st = st
        self.mapping = mapping
        # fixed for the state's lifetime (see Qcow2Mapping)
        self.cluster_bits = st.cluster_bits
        self.cluster_size = st.cluster_size
        self.cmask = st.cmask
        self.l2cache = st.l2cache
        self.refs = st.refs
        self.lookup_cached = mapping.lookup_cached

    # --- writes ---------------------------------------------------------------------------

    async def write(self, offset: int, data: bytes | memoryview | HostSpan) -> None:
        """A guest write; a :class:`HostSpan` only cluster-aligned (no COW),
        on an image without O_DIRECT (see Qcow2Driver.write_span)."""
        st = self.st
        st.check_writable()
        n = len(data)
        if not n:
            return
        if not isinstance(data, (bytes, memoryview, HostSpan)):
            # A bytearray (an NBD server's payload): each slice of it, and the
            # file's write, would copy it; a view of it copies nothing.
            data = memoryview(data)
        if offset < 0 or offset + n > st.size:
            raise BlockDriverError("Input/output error: request beyond end of device", 5)
        cb = self.cluster_bits
        ci = offset >> cb
        in_off = offset & self.cmask
        last = (offset + n - 1) >> cb
        # Fast path: every cluster owned (COPIED) and contiguous on the host,
        # all in one cached L2 slice: no metadata changes, no lock.
        e = self.lookup_cached(ci)
        if e is None:
            await self.mapping.entries(ci, 1)
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
            if ok and not st.overlap.check(host + in_off, n):
                tok = st.enter()
                try:
                    await st.data_write(host + in_off, data)
                finally:
                    st.leave(tok)
                return
        await self._write_slow(
            offset, data if isinstance(data, (memoryview, HostSpan)) else memoryview(data))

    async def _write_slow(self, offset: int, data: memoryview | HostSpan) -> None:
        """Writes that change metadata.  Allocations drop the lock for the data
        write (like QEMU's in-flight ``QCowL2Meta``): the guest clusters are
        registered as in flight, so any other request touching them waits."""
        st = self.st
        cb = self.cluster_bits
        pos = offset
        end = offset + len(data)
        while pos < end:
            await st.lock_clusters(pos >> cb, (end - 1) >> cb)
            try:
                st.check_writable()
                pos, plan = await self._write_step(offset, data, pos, end, True)
            finally:
                st.lock.release()
            if plan is not None:
                await self._finish_alloc(plan, data[plan.pos - offset : plan.run_end - offset])

    async def write_locked(self, offset: int, data: memoryview) -> None:
        """A whole write with the lock held throughout (zero-write fallbacks)."""
        pos = offset
        end = offset + len(data)
        while pos < end:
            pos, _ = await self._write_step(offset, data, pos, end, False)
        await self.l2cache.trim()
        await self.refs.cache.trim()

    # --- L1 and L2 tables -----------------------------------------------------------------

    async def _l2_for_write(self, l1i: int) -> int:
        """The offset of a writable (owned) L2 table for L1 index ``l1i``."""
        st = self.st
        l1e = int(st.l1[l1i])
        if l1e & L1E_OFFSET_MASK & self.cmask:
            raise await st.bad_l2_offset(l1e & L1E_OFFSET_MASK, l1i)
        if l1e & QCOW_OFLAG_COPIED and l1e & L1E_OFFSET_MASK:
            return l1e & L1E_OFFSET_MASK
        old = l1e & L1E_OFFSET_MASK
        cs = self.cluster_size
        new = await self.refs.alloc(1)
        for k in range(0, cs, st.slice_bytes):
            self.l2cache.drop(new + k)
        if old:
            content = await st.file.read(old, cs)
        else:
            content = bytes(cs)
        # refcount of the new table, then the table, on disk before the L1 entry
        await st.pre_write_check(new, st.slice_bytes, OL_ACTIVE_L2)
        async with self.refs.freed_on_error(new, 1):
            await self.refs.cache.write_all()
            await st.file.write(new, content)
            await st.file.sync()
        st.l1[l1i] = new | QCOW_OFLAG_COPIED
        st.l1_generation += 1
        await self._write_l1_entry(l1i)
        if old:
            await st.drain()
            await self.refs.update(old >> self.cluster_bits, 1, -1)
        return new

    async def _write_l1_entry(self, l1i: int) -> None:
        st = self.st
        per_sector = META_ALIGN // 8
        first = l1i - l1i % per_sector
        data = array_to_u64_be(st.l1, first, first + per_sector)
        data += bytes(META_ALIGN - len(data))
        await st.pre_write_check(st.l1_table_offset + first * 8, META_ALIGN, OL_ACTIVE_L1)
        await st.file.write(st.l1_table_offset + first * 8, data)
        await st.file.sync()

    async def writable_slice(self, ci: int) -> CacheEntry[array[int]]:
        """The cached L2 slice of guest cluster ``ci``, in an owned L2 table."""
        st = self.st
        l2off = await self._l2_for_write(ci >> st.l2_bits)
        return await self.l2cache.get(st.slice_key(l2off, ci & st.l2_mask))

    # --- allocation and copy-on-write -----------------------------------------------------

    async def cow_part(self, ci: int, entry: int, start: int, stop: int) -> bytes:
        """Guest cluster ``ci``'s current bytes [start, stop) (for copy-on-write)."""
        if stop <= start:
            return b""
        t = entry_type(entry)
        if t == ClusterType.UNALLOCATED:
            return await self.mapping.read_backing((ci << self.cluster_bits) + start,
                                                   stop - start)
        if t == ClusterType.NORMAL:
            return await self.st.data_read((entry & L2E_OFFSET_MASK) + start, stop - start)
        if t == ClusterType.COMPRESSED:
            return (await self.mapping.read_compressed(entry))[start:stop]
        return bytes(stop - start)

    async def _write_step(self, offset: int, data: memoryview | HostSpan, pos: int, end: int,
                          defer_alloc: bool) -> tuple[int, _AllocPlan | None]:
        """Write from ``pos`` through one L2 slice (lock held).  With
        ``defer_alloc``, stop at the first run that needs new clusters: allocate
        them, register the run as in flight and return its plan."""
        st = self.st
        cb = self.cluster_bits
        cs = self.cluster_size
        cmask = self.cmask
        ci = pos >> cb
        entry = await self.writable_slice(ci)
        entry.pins += 1
        try:
            arr = entry.value
            o = ci & st.slice_mask
            m = min(((end - 1) >> cb) - ci + 1, st.slice_entries - o)
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
                    if not e and arr[o + i : o + m].count(0) == m - i:
                        j = m  # all unallocated (a fresh image): no loop
                    while j < m and _write_category(int(arr[o + j])) == _ALLOC:
                        j += 1
                run_end = min(end, (ci + j) << cb)
                chunk = data[pos - offset : run_end - offset]
                if cat == _INPLACE:
                    host = (e & L2E_OFFSET_MASK) + (pos & cmask)
                    if (e & L2E_OFFSET_MASK) & cmask:
                        raise await st.bad_data_cluster(e, pos)
                    await st.pre_write_check(host, len(chunk))
                    await st.data_write(host, chunk)
                elif cat == _REUSE:
                    host = e & L2E_OFFSET_MASK
                    if host & cmask:
                        raise await st.bad_data_cluster(e, pos)
                    await st.pre_write_check(host + (pos & cmask), len(chunk))
                    head = pos & cmask
                    tail = ((run_end - 1) & cmask) + 1
                    if head or tail != cs:
                        assert not isinstance(chunk, HostSpan)  # spans are whole clusters
                        await st.data_write(host, b"".join((bytes(head), chunk, bytes(cs - tail))))
                    else:
                        await st.data_write(host, chunk)
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
        st = self.st
        old = arr[slot : slot + k].tolist()
        host = await self.refs.alloc(k)
        # QEMU checks the guest data's range (its COW follows only if that passes)
        await st.pre_write_check(host + (pos & self.cmask), run_end - pos)
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        st.allocs.update(dict.fromkeys(range(ci, ci + k), fut))
        l2off = int(st.l1[ci >> st.l2_bits]) & L1E_OFFSET_MASK
        return _AllocPlan(ci, k, host, pos, run_end, old, l2off, fut)

    async def _finish_alloc(self, plan: _AllocPlan, chunk: memoryview | HostSpan) -> None:
        """COW + data into the new clusters (no lock), then link the L2 entries."""
        st = self.st
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
                if head or tail:
                    assert not isinstance(chunk, HostSpan)  # spans are whole clusters
                    await st.data_write(plan.host, b"".join((head, chunk, tail)))
                else:
                    await st.data_write(plan.host, chunk)
            except BaseException:
                async with st.lock:
                    await self.refs.update(plan.host >> cb, plan.k, -1)
                raise
            async with st.lock:
                st.check_writable()
                l1i = plan.ci >> st.l2_bits
                if int(st.l1[l1i]) & L1E_OFFSET_MASK != plan.l2off:
                    raise BlockDriverError("qcow2: L2 table moved during an allocation", 5)
                self.l2cache.set_depends_on_flush()
                await self.l2cache.set_dependency(self.refs.cache)
                idx = plan.ci & st.l2_mask
                entry = await self.l2cache.get(st.slice_key(plan.l2off, idx))
                arr = entry.value
                o = idx & st.slice_mask
                if arr[o : o + plan.k].tolist() != plan.old:
                    raise BlockDriverError("qcow2: L2 entry changed during an allocation", 5)
                first = plan.host | QCOW_OFLAG_COPIED
                arr[o : o + plan.k] = array(arr.typecode, range(first, first + (plan.k << cb), cs))
                self.l2cache.mark_dirty(entry)
                frees = [e for e in plan.old if e & L2E_OFFSET_MASK or e & QCOW_OFLAG_COMPRESSED]
                if frees:
                    await self.free_entries_pinned(entry, frees, DISCARD_OTHER)
                await self.l2cache.trim()
                await self.refs.cache.trim()
        finally:
            for c in range(plan.ci, plan.ci + plan.k):
                if st.allocs.get(c) is plan.fut:
                    del st.allocs[c]
            if not plan.fut.done():
                plan.fut.set_result(None)

    async def _alloc_run(self, ci: int, arr: array[int], slot: int, k: int, pos: int,
                         run_end: int, chunk: memoryview | HostSpan,
                         entry: CacheEntry[array[int]]) -> None:
        """Write guest clusters ``ci..ci+k-1`` into ``k`` new host clusters."""
        st = self.st
        cb = self.cluster_bits
        cs = self.cluster_size
        cmask = self.cmask
        old = [int(arr[slot + m]) for m in range(k)]
        host = await self.refs.alloc(k)
        await st.pre_write_check(host + (pos & cmask), len(chunk))
        head_len = pos & cmask
        tail_start = ((run_end - 1) & cmask) + 1
        async with self.refs.freed_on_error(host, k):
            head = await self.cow_part(ci, old[0], 0, head_len) if head_len else b""
            tail = (await self.cow_part(ci + k - 1, old[-1], tail_start, cs)
                    if tail_start < cs else b"")
            assert not isinstance(chunk, HostSpan)  # only writes of memory lock throughout
            buf = b"".join((head, chunk, tail)) if head or tail else bytes(chunk)
            await st.data_write(host, buf)
        # data before the L2 entry; refcount before the L2 entry
        self.l2cache.set_depends_on_flush()
        await self.l2cache.set_dependency(self.refs.cache)
        for m in range(k):
            arr[slot + m] = (host + (m << cb)) | QCOW_OFLAG_COPIED
        self.l2cache.mark_dirty(entry)
        frees = [e for e in old if e & L2E_OFFSET_MASK or e & QCOW_OFLAG_COMPRESSED]
        if frees:
            await self.free_entries(frees, DISCARD_OTHER)

    # --- freeing clusters -----------------------------------------------------------------

    async def free_entries_pinned(self, entry: CacheEntry[array[int]], olds: list[int],
                                  kind: str) -> None:
        """free_entries while ``entry``, the L2 slice that held them, stays cached."""
        entry.pins += 1
        try:
            await self.free_entries(olds, kind)
        finally:
            entry.pins -= 1

    async def free_entries(self, olds: list[int], kind: str) -> None:
        """Drop the references of removed L2 entries (already gone from the L2 cache)."""
        st = self.st
        refs = self.refs
        await refs.cache.set_dependency(self.l2cache)
        await st.drain()
        clusters: list[int] = []
        cb = self.cluster_bits
        for e in olds:
            if e & QCOW_OFLAG_COMPRESSED:
                clusters.extend(st.comp.host_clusters(e))
            elif e & L2E_OFFSET_MASK:
                clusters.append((e & L2E_OFFSET_MASK) >> cb)
        clusters.sort()
        passthrough = st.pass_discard[kind]
        old_pt = refs.discard_passthrough
        refs.discard_passthrough = passthrough
        try:
            i = 0
            while i < len(clusters):
                j = i + 1
                while j < len(clusters) and clusters[j] == clusters[j - 1] + 1:
                    j += 1
                await refs.update(clusters[i], j - i, -1)
                i = j
        finally:
            refs.discard_passthrough = old_pt

    # --- zeroing and discard --------------------------------------------------------------

    async def _rewrite_clusters(self, ci: int, n: int,
                                decide: Callable[[int], tuple[int, bool] | None],
                                kind: str) -> None:
        """Apply ``decide(old) -> (new, free_old) | None`` to ``n`` clusters' entries."""
        st = self.st
        end = ci + n
        unallocated_change = decide(0)
        while ci < end:
            l1i = ci >> st.l2_bits
            o = ci & st.slice_mask
            k = min(end - ci, st.slice_entries - o)
            if not st.l1[l1i] & L1E_OFFSET_MASK and unallocated_change is None:
                ci += min(end - ci, st.l2_entries - (ci & st.l2_mask))
                continue
            entry = await self.writable_slice(ci)
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
                self.l2cache.mark_dirty(entry)
            if frees:
                await self.free_entries_pinned(entry, frees, kind)
            ci += k
        await self.l2cache.trim()
        await self.refs.cache.trim()

    async def _remainder_is_zero(self, ci: int, e: int, start: int, stop: int) -> bool:
        """Whether guest cluster ``ci`` reads as zeros outside [start, stop)."""
        st = self.st
        t = entry_type(e)
        if t in (ClusterType.ZERO_PLAIN, ClusterType.ZERO_ALLOC):
            return True
        if t != ClusterType.UNALLOCATED:
            return False
        backing = st.node.backing
        if backing is None:
            return True
        base = ci << self.cluster_bits
        for a, b in ((base, base + start), (base + stop, base + self.cluster_size)):
            a = min(a, st.size)
            b = min(b, st.size)
            while a < b:
                if a >= backing.size():
                    break
                bs = await block_status_above(backing, a, min(b, backing.size()) - a)
                if not bs.zero or bs.length <= 0:
                    return False
                a += bs.length
        return True

    async def write_zeroes(self, offset: int, length: int, may_unmap: bool) -> None:
        st = self.st
        st.check_writable()
        if length <= 0:
            return
        cb = self.cluster_bits
        async with st.exclusive(offset >> cb, (offset + length - 1) >> cb):
            st.check_writable()
            await self.write_zeroes_locked(offset, length, may_unmap)

    async def write_zeroes_locked(self, offset: int, length: int, may_unmap: bool) -> None:
        """QEMU's split: partial head, whole clusters, partial tail; a partial
        cluster becomes a zero cluster only if the rest of it already reads as
        zeros, otherwise zeros are written as data."""
        if length <= 0:
            return
        end = offset + length
        if self.st.version < 3:
            await self.write_zero_data(offset, end)
            return
        cb = self.cluster_bits
        cs = self.cluster_size
        cmask = self.cmask
        pos = offset
        while pos < end:
            cstart = pos & ~cmask
            if pos != cstart:
                stop = min(end, cstart + cs)
                await self._zero_partial(pos, stop, may_unmap)
            elif end - pos >= cs:
                stop = end & ~cmask
                await self._zeroize(pos >> cb, (stop - pos) >> cb, may_unmap)
            else:
                stop = end
                if stop == self.st.size:
                    await self._zeroize(pos >> cb, 1, may_unmap)
                else:
                    await self._zero_partial(pos, stop, may_unmap)
            pos = stop

    async def _zero_partial(self, pos: int, stop: int, may_unmap: bool) -> None:
        ci = pos >> self.cluster_bits
        cstart = ci << self.cluster_bits
        e = int((await self.mapping.entries(ci, 1))[0])
        t = entry_type(e)
        if t in (ClusterType.UNALLOCATED, ClusterType.ZERO_PLAIN, ClusterType.ZERO_ALLOC) and (
            await self._remainder_is_zero(ci, e, pos - cstart, stop - cstart)
        ):
            await self._zeroize(ci, 1, may_unmap)
        else:
            await self.write_zero_data(pos, stop)

    async def write_zero_data(self, start: int, end: int) -> None:
        """Zeros written as guest data over [start, end) (lock held)."""
        chunk = 8 << 20
        zeros = bytes(min(chunk, end - start))
        while start < end:
            n = min(chunk, end - start)
            await self.write_locked(start, memoryview(zeros)[:n])
            start += n

    async def _zeroize(self, ci: int, n: int, may_unmap: bool) -> None:
        def decide(old: int) -> tuple[int, bool] | None:
            t = entry_type(old)
            unmap = t == ClusterType.COMPRESSED or (
                may_unmap and t in (ClusterType.NORMAL, ClusterType.ZERO_ALLOC)
            )
            new = (0 if unmap else old) | QCOW_OFLAG_ZERO
            if new == old:
                return None
            return new, unmap

        await self._rewrite_clusters(ci, n, decide, DISCARD_REQUEST)

    async def discard(self, offset: int, length: int, full: bool = False) -> None:
        st = self.st
        st.check_writable()
        if length <= 0:
            return
        cb = self.cluster_bits
        async with st.exclusive(offset >> cb, (offset + length - 1) >> cb):
            st.check_writable()
            await self.discard_locked(offset, length, full)

    async def discard_locked(self, offset: int, length: int, full: bool) -> None:
        st = self.st
        cmask = self.cmask
        end = offset + length
        start = (offset + cmask) & ~cmask
        stop = end & ~cmask
        if end == st.size and end & cmask and (end & ~cmask) >= offset:
            stop = (end + cmask) & ~cmask  # the complete partial cluster at the image end
        if stop <= start:
            return
        backing = st.node.backing is not None
        if not full and st.version < 3 and backing:
            return  # QEMU: ENOTSUP, ignored by the generic layer
        v3 = st.version >= 3

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

        cb = self.cluster_bits
        await self._rewrite_clusters(start >> cb, (stop - start) >> cb, decide, DISCARD_REQUEST)
