"""What the block layer counts per node, as QEMU's ``block/accounting.c``."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass


@dataclass
class NodeStats:
    """I/O counters of one node (exported as metrics)."""

    rd_bytes: int = 0
    wr_bytes: int = 0
    rd_operations: int = 0
    wr_operations: int = 0
    flush_operations: int = 0
    invalidations: int = 0
    #: How long the last activation of the node took (None: never activated).
    activation_seconds: float | None = None


class WriteGenerations:
    """Writes made through a driver, and how many of them its last successful
    flush covered: a flush with nothing new to write back is skipped, as QEMU's
    ``bdrv_co_flush`` skips it with its write generations."""

    __slots__ = ("flushed", "written")

    def __init__(self) -> None:
        self.written = 0
        self.flushed = 0

    def pending(self) -> bool:
        """Whether something was written since the last flush."""
        return self.written != self.flushed

    def covered(self, generation: int) -> None:
        """A flush begun when ``written`` was ``generation`` succeeded."""
        if generation > self.flushed:
            self.flushed = generation

    async def flush(self, flush: Callable[[], Awaitable[object]]) -> None:
        """``flush()``, unless nothing was written since the last one."""
        generation = self.written
        if generation != self.flushed:
            await flush()
            self.covered(generation)
