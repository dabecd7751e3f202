"""The ``throttle`` filter driver: I/O to its file child waits for its throttle group."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from qmpd.block.driver import BlockStatus, ChildRole, Perm
from qmpd.block.passthrough import FileChildDriver
from qmpd.block.status import layer_status

if TYPE_CHECKING:
    from qmpd.block.graph import BlockNode
    from qmpd.objects.throttle import ThrottleGroup

_ROLE = ChildRole.FILTERED | ChildRole.PRIMARY


class ThrottleDriver(FileChildDriver):
    """Options: ``throttle-group`` (an object id) and ``file``."""

    format_name = "throttle"

    def __init__(self, node: BlockNode) -> None:
        super().__init__(node)
        self.group: ThrottleGroup | None = None

    async def open(self, options: dict[str, Any]) -> None:
        group = self.node.graph.objects.throttle_group(options["throttle-group"])
        # No await between the lookup and this: object-del sees the member.
        group.members.add(self.node.node_name)
        self.group = group

    async def close(self) -> None:
        if self.group is not None:
            self.group.members.discard(self.node.node_name)
            self.group = None

    async def _intercept(self, is_write: bool, size: int) -> None:
        if self.group is not None:
            await self.group.intercept(is_write, size)

    async def read(self, offset: int, length: int) -> bytes:
        await self._intercept(False, length)
        return await self._file().driver.read(offset, length)

    async def write(self, offset: int, data: bytes, fua: bool = False) -> None:
        await self._intercept(True, len(data))
        await self._file().driver.write(offset, data, fua)

    async def write_zeroes(
        self, offset: int, length: int, may_unmap: bool = False, fua: bool = False
    ) -> None:
        await self._intercept(True, length)
        await self._file().driver.write_zeroes(offset, length, may_unmap, fua)

    async def discard(self, offset: int, length: int) -> None:
        await self._intercept(True, length)
        await self._file().driver.discard(offset, length)

    async def flush(self) -> None:
        await self._file().flush()

    async def truncate(self, size: int) -> None:
        await self._file().driver.truncate(size)

    async def block_status(self, offset: int, length: int) -> BlockStatus:
        # The child's answer as this layer's (QEMU's BDRV_BLOCK_RAW); what it
        # leaves unallocated is asked of it again through status_fallback,
        # which makes the depths QEMU reports.
        status = await layer_status(self._file(), offset, length)
        assert status is not None  # the range lies inside the child
        return status

    def status_fallback(self) -> BlockNode | None:
        return self._file()

    def size(self) -> int:
        return self._file().size()

    def allocated_size(self) -> int | None:
        return self._file().driver.allocated_size()

    def image_info(self) -> dict[str, Any]:
        return {"dirty-flag": False}

    def child_perms(
        self, role: ChildRole, parent_perm: Perm, parent_shared: Perm
    ) -> tuple[Perm, Perm]:
        # A filter: its users' needs pass straight through to the child.
        return super().child_perms(_ROLE, parent_perm, parent_shared)
