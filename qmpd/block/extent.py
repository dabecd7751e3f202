"""What a range of a node is: its block status, and where its bytes lie.

:class:`HostSpan`: bytes that lie unchanged in a host file, as a write's data.

A job copying between two nodes over local files (a mirror) hands the
target one of these instead of bytes: where the target stores its data in
a file too, one I/O thread reads the source file and writes the target file
in a single job, each piece while it is still in the CPU's cache, instead of
a read job and a write job with the event loop in between.  A driver that
cannot take a span reads it into the caller's buffer first.
"""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class HostSpan:
    """``length`` bytes at ``offset`` of the open host file ``fd`` (page-cached,
    no O_DIRECT; see :meth:`~qmpd.block.driver.BlockDriver.host_file`), with
    ``scratch``: the caller's buffer of as many bytes, which the write may
    fill with them on the way (its contents are undefined afterwards)."""

    fd: int
    offset: int
    length: int
    scratch: memoryview

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, key: slice) -> HostSpan:
        start, stop, step = key.indices(self.length)
        if step != 1:
            raise ValueError("a span has no strides")
        stop = max(start, stop)
        return HostSpan(self.fd, self.offset + start, stop - start, self.scratch[start:stop])


def preadv_full(fd: int, buf: memoryview, offset: int, flags: int = 0) -> None:
    """Fill ``buf`` from ``offset`` of ``fd``; blocking.  What lies past the end
    of the file reads as zeros."""
    got = os.preadv(fd, [buf], offset, flags)
    length = buf.nbytes
    while got < length:
        n = os.preadv(fd, [buf[got:]], offset + got, flags)
        if not n:
            buf[got:] = bytes(length - got)
            return
        got += n


def read_span(span: HostSpan, buf: memoryview, at: int = 0) -> None:
    """Fill ``buf`` with the span's bytes from ``at`` on (:func:`preadv_full`);
    a failure is a :class:`SpanReadError`."""
    try:
        preadv_full(span.fd, buf, span.offset + at)
    except OSError as err:
        raise SpanReadError(err.errno, err.strerror) from err


@dataclass(frozen=True)
class BlockStatus:
    """What ``block_status`` reports for ``length`` bytes from the offset asked.

    ``allocated``: the data comes from this node (or its file), not from a
    backing node.  ``zero``: it reads as zeros.  ``data``: it is stored data
    (not a hole).  ``depth``: how many backing levels down it was found
    (:func:`qmpd.block.status.block_status_above`; 0 from a driver).
    ``offset``: where the range lives in the file child, when known.
    ``recurse``: the file child's status at ``offset`` tells whether the data
    reads as zeros (QEMU's BDRV_BLOCK_RECURSE: preallocated metadata).
    """

    length: int
    data: bool
    zero: bool
    allocated: bool = True
    depth: int = 0
    offset: int | None = None
    recurse: bool = False


class SpanReadError(OSError):
    """Reading a span's source failed (its target was not written there)."""
