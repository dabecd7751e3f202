"""What the drivers that pass requests to their ``file`` child's driver share
(``raw``, ``throttle``): they go past the child's node, so its checks are
theirs to make."""

from __future__ import annotations

from qmpd.block.driver import BlockDriver, BlockNode, NodeState


class FileChildDriver(BlockDriver):
    """A driver whose requests go to its ``file`` child's driver."""

    def _file(self) -> BlockNode:
        file = self.node.file
        assert file is not None
        return file

    async def refresh_inactive(self) -> None:
        # The child's node would refresh an inactive child before a read.
        child = self._file()
        if child.state is NodeState.INACTIVE:
            await child.driver.refresh_inactive()
        if child.reloading is not None:  # the child alone is being activated
            await child.reloaded()
