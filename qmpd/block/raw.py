"""The ``raw`` format driver: the file child's bytes, optionally a window of them."""

from __future__ import annotations

import errno
from typing import Any

from qmpd.block.driver import (
    BlockDriverError,
    BlockStatus,
    ChildRole,
    Perm,
)
from qmpd.block.extent import HostSpan
from qmpd.block.passthrough import FileChildDriver


class RawDriver(FileChildDriver):
    """Options: ``offset`` and ``size`` (bytes); neither makes raw a pure filter."""

    format_name = "raw"
    strong_runtime_opts = ("offset", "size")

    def __init__(self, node: Any) -> None:
        super().__init__(node)
        self.offset = 0
        self.fixed_size: int | None = None

    @property
    def is_filter(self) -> bool:
        return self.offset == 0 and self.fixed_size is None

    def child_role(self) -> ChildRole:
        kind = ChildRole.FILTERED if self.is_filter else ChildRole.DATA
        return kind | ChildRole.PRIMARY

    async def open(self, options: dict[str, Any]) -> None:
        file = self.node.file
        assert file is not None
        real = file.size()
        offset = options.get("offset")
        size = options.get("size")
        if offset is not None:
            if offset < 0:
                raise BlockDriverError(
                    "Parameter 'offset' expects a non-negative number below 2^64",
                    errno.EINVAL,
                )
            if offset > real:
                raise BlockDriverError(
                    f"Offset ({offset}) cannot be greater than size of the containing file "
                    f"({real})",
                    errno.EINVAL,
                )
            self.offset = offset
        if size is not None:
            if size < 0:
                raise BlockDriverError(
                    "Parameter 'size' expects a non-negative number below 2^64", errno.EINVAL
                )
            if size % 512:
                raise BlockDriverError("Specified size is not multiple of 512", errno.EINVAL)
            if self.offset + size > real:
                raise BlockDriverError(
                    f"The sum of offset ({self.offset}) and size ({size}) has to be smaller or "
                    f"equal to the  actual size of the containing file ({real})",
                    errno.EINVAL,
                )
            self.fixed_size = size

    async def read(self, offset: int, length: int) -> bytes:
        return await self._file().driver.read(self.offset + offset, length)

    async def read_into(self, offset: int, buf: memoryview) -> None:
        await self._file().driver.read_into(self.offset + offset, buf)

    async def write(self, offset: int, data: bytes, fua: bool = False) -> None:
        await self._file().driver.write(self.offset + offset, data, fua)

    async def write_view(self, offset: int, view: memoryview, fua: bool = False) -> None:
        await self._file().driver.write_view(self.offset + offset, view, fua)

    async def write_span(self, offset: int, span: HostSpan, fua: bool = False) -> None:
        await self._file().driver.write_span(self.offset + offset, span, fua)

    def read_now(self, offset: int, length: int) -> bytes | None:
        return self._file().driver.read_now(self.offset + offset, length)

    def write_now(self, offset: int, data: bytes, fua: bool) -> bool:
        return self._file().driver.write_now(self.offset + offset, data, fua)

    async def write_zeroes(
        self, offset: int, length: int, may_unmap: bool = False, fua: bool = False
    ) -> None:
        await self._file().driver.write_zeroes(self.offset + offset, length, may_unmap, fua)

    async def discard(self, offset: int, length: int) -> None:
        await self._file().driver.discard(self.offset + offset, length)

    async def flush(self) -> None:
        await self._file().flush()

    def has_pending_writes(self) -> bool:
        return False  # raw caches nothing: its file child speaks for the writes

    async def truncate(self, size: int) -> None:
        if not self.is_filter:
            raise BlockDriverError("Cannot resize fixed-size raw disks", errno.EINVAL)
        await self._file().driver.truncate(size)

    def host_file(self, offset: int, length: int) -> tuple[int, int] | None:
        if offset + length > self.size():
            return None
        return self._file().driver.host_file(self.offset + offset, length)

    async def block_status(self, offset: int, length: int) -> BlockStatus:
        status: BlockStatus = await self._file().driver.block_status(self.offset + offset, length)
        return BlockStatus(
            length=status.length, data=status.data, zero=status.zero,
            offset=status.offset, allocated=True,
        )

    def image_info(self) -> dict[str, Any]:
        # raw_get_info is the file's bdrv_get_info: no dirty flag where the
        # file has no info (nbd, null-co).
        if "dirty-flag" not in self._file().driver.image_info():
            return {}
        return {"dirty-flag": False}

    def cluster_size(self) -> int | None:
        # raw_get_info asks the file below.
        return self._file().driver.cluster_size()

    def size(self) -> int:
        if self.fixed_size is not None:
            return self.fixed_size
        return max(self._file().size() - self.offset, 0)

    def allocated_size(self) -> int | None:
        return self._file().driver.allocated_size()

    def child_perms(
        self, role: ChildRole, parent_perm: Perm, parent_shared: Perm
    ) -> tuple[Perm, Perm]:
        # As a filter, raw passes its users' needs straight through: a raw
        # node nobody uses takes no lock at all (as QEMU).
        return super().child_perms(self.child_role(), parent_perm, parent_shared)
