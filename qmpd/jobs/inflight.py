"""Byte ranges a job is working on, so that overlapping requests wait for
each other (QEMU's mirror in-flight ops and block-copy tasks), and the
search for the next dirty granule of a bitmap."""

from __future__ import annotations

import asyncio
import re

from qmpd.block.dirty_bitmap import DirtyBitmap
from qmpd.block.driver import BlockNode
from qmpd.buffers import aligned_buffer


class RangeLocks:
    """Ranges in flight; :meth:`lock` waits until no other holds an overlap."""

    def __init__(self) -> None:
        self._held: dict[int, tuple[int, int, asyncio.Event]] = {}
        self._next = 0

    def busy(self, start: int, end: int) -> asyncio.Event | None:
        for lo, hi, done in self._held.values():
            if lo < end and start < hi:
                return done
        return None

    def next_start(self, pos: int) -> int | None:
        """Where the first range held at or after ``pos`` begins (None: none is)."""
        found: int | None = None
        for lo, _, _ in self._held.values():
            if lo >= pos and (found is None or lo < found):
                found = lo
        return found

    async def lock(self, start: int, end: int) -> int:
        while True:
            done = self.busy(start, end)
            if done is None:
                return self.take(start, end)
            await done.wait()

    def take(self, start: int, end: int) -> int:
        """Hold ``[start, end)`` now (the caller checked :meth:`busy`)."""
        self._next += 1
        self._held[self._next] = (start, end, asyncio.Event())
        return self._next

    def release(self, token: int) -> None:
        held = self._held.pop(token, None)
        if held is not None:
            held[2].set()

    def __len__(self) -> int:
        return len(self._held)


_NONZERO = re.compile(rb"[^\x00]")


def next_dirty(bits: bytearray, k: int, granules: int) -> int | None:
    """The first dirty granule at or after ``k``."""
    if k >= granules:
        return None
    i = k >> 3
    first = bits[i] >> (k & 7)
    if first:
        found = k + (first & -first).bit_length() - 1
    else:
        match = _NONZERO.search(bits, i + 1)
        if match is None:
            return None
        j = match.start()
        byte = bits[j]
        found = j * 8 + (byte & -byte).bit_length() - 1
    return found if found < granules else None


class CountedBitmap(DirtyBitmap):
    """A job's own dirty bitmap that keeps its count as it changes: the job
    asks for it at every step, and counting a large disk's bits each time
    would cost in proportion to the disk (QEMU's hbitmap keeps a count too).
    Change it only through set_range, reset_range and set_all."""

    __slots__ = ("_dirty",)

    def __init__(self, name: str, size: int, granularity: int) -> None:
        super().__init__(name, size, granularity)
        self._dirty = 0

    def _fill(self, first: int, end: int, value: bool) -> None:
        if end <= first:
            return
        lo, hi = first >> 3, (end + 7) >> 3
        chunk = int.from_bytes(self.bits[lo:hi], "little") >> (first & 7)
        before = (chunk & ((1 << (end - first)) - 1)).bit_count()
        super()._fill(first, end, value)
        self._dirty += (end - first - before) if value else -before

    def dirty_granules(self) -> int:
        return self._dirty


#: What :func:`is_zero` compares with, a piece at a time.
_ZEROS = bytes(1 << 20)


def is_zero(buf: bytearray | memoryview, start: int, length: int) -> bool:
    """Whether ``buf[start:start + length]`` is all zero bytes (a memcmp per
    MiB, no copy: counting the zero bytes costs ten times as much)."""
    end = start + length
    if end > len(buf):
        raise ValueError("range beyond the buffer")
    view = memoryview(buf)
    zeros = len(_ZEROS)
    while start < end:
        n = min(zeros, end - start)
        if not _ZEROS.startswith(view[start : start + n]):
            return False
        start += n
    return True


async def write_copied(target: BlockNode, offset: int, buf: memoryview, n: int) -> None:
    """Write ``buf[:n]`` (what a copy read) at ``offset``: as zeroes when it is
    all zero bytes."""
    if is_zero(buf, 0, n):
        await target.write_zeroes(offset, n)
    else:
        await target.write_view(offset, buf[:n])


class CopyBuffers:
    """A job's copy buffers of one size, reused (as QEMU's jobs keep theirs): a
    read fills one in place and the target is written from it, with no bytes
    object made per chunk.  Give a buffer back only once no request may still
    fill it (not after a failed or cancelled read).  They are page-aligned
    (:func:`~qmpd.buffers.aligned_buffer`)."""

    def __init__(self, size: int, keep: int = 1) -> None:
        self.size = size
        self.keep = keep
        self._free: list[memoryview] = []

    def take(self) -> memoryview:
        return self._free.pop() if self._free else aligned_buffer(self.size)

    def give(self, buf: memoryview) -> None:
        if len(self._free) < self.keep:
            self._free.append(buf)
