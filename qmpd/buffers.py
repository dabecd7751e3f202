"""Buffers that the kernel fills quickly.

The kernel copies a page-cache page into user memory with ``rep movsb``.
On this project's AMD EPYC test machine, that copy ran five times slower
when the destination started 1 to 31 bytes past a page boundary (a short
distance from the page-aligned source). A large ``bytearray``'s bytes
start 16 bytes into a page, so a 1 MiB ``preadv`` into one ran at 2.6 GB/s,
against 14 GB/s into a page-aligned buffer. Writes from such a buffer, and
socket receives, were not affected. QEMU reads into ``qemu_blockalign``
memory. Here, the bulk copies (the jobs' buffers, file data that the TLS
NBD server encrypts) use these.
"""

from __future__ import annotations

import ctypes

#: Page alignment, as qemu_blockalign's minimum for files opened with O_DIRECT.
ALIGNMENT = 4096

#: Below this, a plain bytearray costs less than the alignment does.
ALIGNED_MIN = 64 << 10


def address(buf: bytearray | memoryview) -> int:
    """Where ``buf``'s bytes start in memory (``buf`` must be writable)."""
    return ctypes.addressof(ctypes.c_char.from_buffer(buf))


def aligned_buffer(size: int) -> memoryview:
    """A zeroed, writable buffer of ``size`` bytes starting on a page boundary
    (a plain bytearray's view below :data:`ALIGNED_MIN`)."""
    if size < ALIGNED_MIN:
        return memoryview(bytearray(size))
    raw = bytearray(size + ALIGNMENT)
    skip = -address(raw) % ALIGNMENT
    return memoryview(raw)[skip : skip + size]
