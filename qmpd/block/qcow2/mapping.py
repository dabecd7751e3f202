"""Guest-to-host translation, reads and block status (QEMU's
``qcow2_get_host_offset`` in ``qcow2-cluster.c``, and the read and
block-status paths of ``qcow2.c``).

:class:`Qcow2Mapping` works on a :class:`~qmpd.block.qcow2.state.Qcow2State`;
it never changes metadata, and reads never take the metadata lock.
"""

from __future__ import annotations

import zlib
from array import array

from qmpd.block.driver import BlockDriverError, BlockStatus
from qmpd.block.qcow2.fileio import META_ALIGN
from qmpd.block.qcow2.format import (
    L1E_OFFSET_MASK,
    L2E_OFFSET_MASK,
    QCOW_OFLAG_COMPRESSED,
    QCOW_OFLAG_ZERO,
    ClusterType,
)
from qmpd.block.qcow2.format import cluster_type as entry_type
from qmpd.block.qcow2.state import Qcow2State

_CZ = QCOW_OFLAG_COMPRESSED | QCOW_OFLAG_ZERO


_ZEROS = memoryview(bytes(1 << 20))


def run_of(ents: array[int], i: int, cs: int, cmask: int) -> tuple[int, int]:
    """The type of L2 entry ``i`` and the index just past the run of entries
    read the same way (contiguous data, unallocated, or zero; a compressed
    cluster is a run of one); -1 for data at a host offset not cluster-aligned."""
    m = len(ents)
    e = int(ents[i])
    t = entry_type(e)
    j = i + 1
    if t == ClusterType.NORMAL:
        host = e & L2E_OFFSET_MASK
        if host & cmask:
            return t, -1
        nxt = host + cs
        while j < m and int(ents[j]) & (L2E_OFFSET_MASK | _CZ) == nxt:
            j += 1
            nxt += cs
    elif t == ClusterType.UNALLOCATED:
        while j < m and entry_type(int(ents[j])) == ClusterType.UNALLOCATED:
            j += 1
    elif t != ClusterType.COMPRESSED:
        while j < m and entry_type(int(ents[j])) in (
            ClusterType.ZERO_PLAIN, ClusterType.ZERO_ALLOC
        ):
            j += 1
    return t, j


def zero_fill(buf: memoryview) -> None:
    """Set every byte of ``buf`` to zero."""
    n = buf.nbytes
    step = len(_ZEROS)
    for start in range(0, n, step):
        stop = min(n, start + step)
        buf[start:stop] = _ZEROS[: stop - start]


class Qcow2Mapping:
    """L2 lookups, guest reads and block status of one image state."""

    def __init__(self, st: Qcow2State) -> None:
        self.st = st
        # The geometry and the cache objects never change while the state
        # lives: local copies keep the hot paths to one attribute lookup.
        self.cluster_bits = st.cluster_bits
        self.cluster_size = st.cluster_size
        self.cmask = st.cmask
        self.l2_bits = st.l2_bits
        self.l2_mask = st.l2_mask
        self.slice_bits = st.slice_bits
        self.slice_mask = st.slice_mask
        self.slice_shift = st.slice_shift
        self.slice_entries = st.slice_entries
        self.l2cache = st.l2cache

    # --- L2 lookups ------------------------------------------------------------------------

    def lookup_cached(self, ci: int) -> int | None:
        """The L2 entry of guest cluster ``ci`` if its slice is cached (0 if no L2 table)."""
        l2off = self.st.l1[ci >> self.l2_bits] & L1E_OFFSET_MASK
        if not l2off:
            return 0
        idx = ci & self.l2_mask
        key = l2off + ((idx >> self.slice_bits) << self.slice_shift)
        cache = self.l2cache
        ent = cache.entries.get(key)
        if ent is None:
            return None
        cache.entries.move_to_end(key)
        cache.hits += 1
        return int(ent.value[idx & self.slice_mask])

    def host_run(self, offset: int, length: int) -> int | None:
        """The host offset of guest range [offset, offset+length) if it is stored
        in contiguous normal clusters whose L2 entries are cached, else None."""
        cb = self.cluster_bits
        ci = offset >> cb
        last = (offset + length - 1) >> cb
        e = self.lookup_cached(ci)
        if e is None or e & _CZ or not e & L2E_OFFSET_MASK or e & L2E_OFFSET_MASK & self.cmask:
            return None
        host = e & L2E_OFFSET_MASK
        nxt = host
        cs = self.cluster_size
        mask = _CZ | L2E_OFFSET_MASK
        l1 = self.st.l1
        entries = self.l2cache.entries
        c = ci + 1
        while c <= last:
            # The rest of the run a cached slice at a time, not a lookup per cluster.
            l2off = l1[c >> self.l2_bits] & L1E_OFFSET_MASK
            idx = c & self.l2_mask
            key = l2off + ((idx >> self.slice_bits) << self.slice_shift)
            ent = entries.get(key) if l2off else None
            if ent is None:
                return None
            o = idx & self.slice_mask
            k = min(last - c + 1, self.slice_entries - o)
            for f in ent.value[o : o + k]:
                nxt += cs
                if f & mask != nxt:
                    return None
            c += k
        return host + (offset & self.cmask)

    async def entries(self, ci: int, n: int) -> array[int]:
        """L2 entries of up to ``n`` clusters from ``ci`` (never crossing a slice)."""
        l1 = self.st.l1
        l1i = ci >> self.l2_bits
        if l1i >= len(l1):
            raise BlockDriverError("qcow2: access beyond the L1 table", 5)
        l2off = l1[l1i] & L1E_OFFSET_MASK
        idx = ci & self.l2_mask
        o = idx & self.slice_mask
        k = min(n, self.slice_entries - o)
        if not l2off:
            return array("Q", bytes(8 * k))
        if l2off & self.cmask:
            raise await self.st.bad_l2_offset(l2off, l1i)
        key = l2off + ((idx >> self.slice_bits) << self.slice_shift)
        ent = self.l2cache.lookup(key)
        if ent is None:
            ent = await self.l2cache.get(key)
        return ent.value[o : o + k]

    # --- reads -------------------------------------------------------------------------------

    async def read(self, offset: int, length: int) -> bytes:
        st = self.st
        if st.broken is not None:
            raise BlockDriverError(st.broken, st.broken_errno)
        if length <= 0 or offset < 0 or offset + length > st.size:
            if length == 0:
                return b""
            raise BlockDriverError("Input/output error: request beyond end of device", 5)
        cb = self.cluster_bits
        ci = offset >> cb
        in_off = offset & self.cmask
        tok = st.enter()
        try:
            if in_off + length <= self.cluster_size:
                e = self.lookup_cached(ci)
                if e is None:
                    e = int((await self.entries(ci, 1))[0])
                host = e & L2E_OFFSET_MASK
                if host and not e & _CZ:
                    if host & self.cmask:
                        raise await st.bad_host(e, ci)
                    return await st.data_read(host + in_off, length)
            return await self._read_general(offset, length)
        finally:
            st.leave(tok)

    async def read_into(self, offset: int, buf: memoryview) -> None:
        """:meth:`read` into ``buf``, run by run as :meth:`_read_general`."""
        st = self.st
        if st.broken is not None:
            raise BlockDriverError(st.broken, st.broken_errno)
        length = buf.nbytes
        if length <= 0 or offset < 0 or offset + length > st.size:
            if length == 0:
                return
            raise BlockDriverError("Input/output error: request beyond end of device", 5)
        cb = self.cluster_bits
        cs = self.cluster_size
        cmask = self.cmask
        tok = st.enter()
        try:
            pos = offset
            end = offset + length
            while pos < end:
                ci = pos >> cb
                ents = await self.entries(ci, ((end - 1) >> cb) - ci + 1)
                m = len(ents)
                i = 0
                while i < m:
                    e = int(ents[i])
                    t, j = run_of(ents, i, cs, cmask)
                    if j < 0:
                        raise await st.bad_host(e, ci + i)
                    run_end = min(end, (ci + j) << cb)
                    part = buf[pos - offset : run_end - offset]
                    if t == ClusterType.NORMAL:
                        await st.data_read_into((e & L2E_OFFSET_MASK) + (pos & cmask), part)
                    elif t == ClusterType.UNALLOCATED:
                        await self.read_backing_into(pos, part)
                    elif t == ClusterType.COMPRESSED:
                        data = await self.read_compressed(e)
                        part[:] = memoryview(data)[pos & cmask : (pos & cmask) + part.nbytes]
                    else:
                        zero_fill(part)
                    pos = run_end
                    i = j
        finally:
            st.leave(tok)

    async def read_backing_into(self, offset: int, buf: memoryview) -> None:
        """:meth:`read_backing` into ``buf``."""
        backing = self.st.node.backing
        length = buf.nbytes
        n = 0
        if backing is not None:
            n = max(0, min(length, backing.size() - offset))
            if n:
                await backing.read_into(offset, buf[:n])
        if n < length:
            zero_fill(buf[n:])

    async def read_backing(self, offset: int, length: int) -> bytes:
        backing = self.st.node.backing
        if backing is None:
            return bytes(length)
        bsize = backing.size()
        if offset >= bsize:
            return bytes(length)
        n = min(length, bsize - offset)
        data = await backing.read(offset, n)
        if n < length:
            data += bytes(length - n)
        return data

    async def read_compressed(self, entry: int) -> bytes:
        """The whole decompressed cluster of a compressed L2 entry."""
        st = self.st
        coffset, csize = st.comp.parse(entry)
        start = coffset & ~(META_ALIGN - 1)
        end = (coffset + csize + META_ALIGN - 1) & ~(META_ALIGN - 1)
        raw = await st.file.read(start, end - start)
        data = memoryview(raw)[coffset - start : coffset - start + csize]
        cs = self.cluster_size

        def inflate() -> bytes:
            try:
                d = zlib.decompressobj(-15)
                return d.decompress(data, cs)
            except zlib.error:
                return b""

        out = inflate() if cs <= 65536 else await st.node.graph.run_io(inflate)
        if len(out) != cs:
            raise BlockDriverError("qcow2: could not decompress cluster", 5)
        return out

    async def _read_general(self, offset: int, length: int) -> bytes:
        st = self.st
        cb = self.cluster_bits
        cs = self.cluster_size
        cmask = self.cmask
        parts: list[bytes] = []
        pos = offset
        end = offset + length
        while pos < end:
            ci = pos >> cb
            ents = await self.entries(ci, ((end - 1) >> cb) - ci + 1)
            m = len(ents)
            i = 0
            while i < m:
                e = int(ents[i])
                t, j = run_of(ents, i, cs, cmask)
                if j < 0:
                    raise await st.bad_host(e, ci + i)
                run_end = min(end, (ci + j) << cb)
                n = run_end - pos
                if t == ClusterType.NORMAL:
                    parts.append(await st.data_read((e & L2E_OFFSET_MASK) + (pos & cmask), n))
                elif t == ClusterType.UNALLOCATED:
                    parts.append(await self.read_backing(pos, n))
                elif t == ClusterType.COMPRESSED:
                    data = await self.read_compressed(e)
                    parts.append(data[pos & cmask : (pos & cmask) + n])
                else:
                    parts.append(bytes(n))
                pos = run_end
                i = j
        return parts[0] if len(parts) == 1 else b"".join(parts)

    # --- block status --------------------------------------------------------------------------

    async def block_status(self, offset: int, length: int) -> BlockStatus:
        st = self.st
        st.check_usable()
        cb = self.cluster_bits
        cs = self.cluster_size
        end = min(offset + length, st.size)
        if offset >= end:
            return BlockStatus(length=0, data=False, zero=True)
        ci = offset >> cb
        ents = await self.entries(ci, ((end - 1) >> cb) - ci + 1)
        e = int(ents[0])
        t = entry_type(e)
        j = 1
        m = len(ents)
        if t == ClusterType.NORMAL:
            nxt = (e & L2E_OFFSET_MASK) + cs
            while j < m and int(ents[j]) & (L2E_OFFSET_MASK | _CZ) == nxt:
                j += 1
                nxt += cs
        elif t == ClusterType.ZERO_ALLOC:
            nxt = (e & L2E_OFFSET_MASK) + cs
            while j < m and entry_type(int(ents[j])) == ClusterType.ZERO_ALLOC and (
                int(ents[j]) & L2E_OFFSET_MASK == nxt
            ):
                j += 1
                nxt += cs
        elif t != ClusterType.COMPRESSED:
            while j < m and entry_type(int(ents[j])) == t:
                j += 1
        n = min(end, (ci + j) << cb) - offset
        in_off = offset & self.cmask
        if t == ClusterType.NORMAL:
            return BlockStatus(length=n, data=True, zero=False,
                               offset=(e & L2E_OFFSET_MASK) + in_off)
        if t == ClusterType.COMPRESSED:
            return BlockStatus(length=n, data=True, zero=False)
        if t == ClusterType.ZERO_ALLOC:
            return BlockStatus(length=n, data=False, zero=True,
                               offset=(e & L2E_OFFSET_MASK) + in_off)
        if t == ClusterType.ZERO_PLAIN:
            return BlockStatus(length=n, data=False, zero=True)
        backing = st.node.backing
        if backing is None:
            return BlockStatus(length=n, data=False, zero=True, allocated=False)
        bsize = backing.size()
        if offset >= bsize:
            return BlockStatus(length=n, data=False, zero=True, allocated=False)
        return BlockStatus(length=min(n, bsize - offset), data=False, zero=False,
                           allocated=False)
