"""The qcow2 driver's view of its ``file`` child (QEMU's ``bdrv_pread``,
``bdrv_pwrite`` and ``bdrv_flush`` on ``bs->file``).

Metadata and data I/O go straight to the child's driver (skipping the
node-level range and permission checks, which do not fit a format driver
that grows its file), while the child's I/O counters are kept up to date.
Ordering syncs go through the child node, so ``cache.no-flush`` is honoured
like QEMU's ``bdrv_flush`` on the file child.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from qmpd.block.extent import HostSpan
    from qmpd.block.graph import BlockNode

#: Every metadata write is widened to this alignment (O_DIRECT safe).
META_ALIGN = 512


class ImageFile:
    """Read, write and sync the host file under a qcow2 node."""

    __slots__ = ("driver", "node", "stats")

    def __init__(self, node: BlockNode) -> None:
        self.node = node
        self.driver = node.driver
        self.stats = node.stats

    async def read(self, offset: int, length: int) -> bytes:
        data = await self.driver.read(offset, length)
        stats = self.stats
        stats.rd_bytes += length
        stats.rd_operations += 1
        return data

    async def read_into(self, offset: int, buf: memoryview) -> None:
        await self.driver.read_into(offset, buf)
        stats = self.stats
        stats.rd_bytes += buf.nbytes
        stats.rd_operations += 1

    async def write_view(self, offset: int, view: memoryview) -> None:
        """A write from a view valid until this returns (no copy)."""
        await self.driver.write_view(offset, view)
        stats = self.stats
        stats.wr_bytes += view.nbytes
        stats.wr_operations += 1

    async def write_span(self, offset: int, span: HostSpan) -> None:
        """A write of the bytes a host file span holds."""
        await self.driver.write_span(offset, span)
        stats = self.stats
        stats.wr_bytes += span.length
        stats.wr_operations += 1

    async def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        await self.driver.write(offset, bytes(data) if not isinstance(data, bytes) else data)
        stats = self.stats
        stats.wr_bytes += len(data)
        stats.wr_operations += 1

    async def write_zeroes(self, offset: int, length: int) -> None:
        await self.driver.write_zeroes(offset, length)
        self.stats.wr_bytes += length
        self.stats.wr_operations += 1

    async def sync(self) -> None:
        await self.node.flush()

    async def discard(self, offset: int, length: int) -> None:
        await self.driver.discard(offset, length)

    async def truncate(self, size: int) -> None:
        await self.driver.truncate(size)

    def size(self) -> int:
        return self.node.size()
