"""Serialising requests on one node (QEMU's BDRV_REQ_SERIALISING, as copy-on-read uses them).

A job that copies a range into a node (a stream's copy-on-read: read the
backing chain's data through the node, write it into the node) must not
overlap in time with a write to that range, or its stale data could land
after the write and undo it.  While a job has a :class:`RangeSerialiser` on
the node, every write waits for the copies it overlaps, and a copy waits
for the writes in flight it overlaps.  The copying task's own writes pass.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager


class RangeSerialiser:
    """Writes and copies of one node, by byte range."""

    def __init__(self) -> None:
        self._writes: dict[int, tuple[int, int]] = {}
        self._copies: dict[int, tuple[int, int, asyncio.Task[object] | None]] = {}
        self._next = 0
        self._changed: asyncio.Future[None] | None = None

    @staticmethod
    def _overlap(a: int, alen: int, b: int, blen: int) -> bool:
        return a < b + blen and b < a + alen

    async def _wait_change(self) -> None:
        if self._changed is None or self._changed.done():
            self._changed = asyncio.get_running_loop().create_future()
        await asyncio.shield(self._changed)

    def _notify(self) -> None:
        if self._changed is not None and not self._changed.done():
            self._changed.set_result(None)

    async def begin_write(self, offset: int, length: int) -> int:
        """Wait for the copies this write overlaps (not the caller's own); a token."""
        me = asyncio.current_task()
        while any(owner is not me and self._overlap(offset, length, o, n)
                  for o, n, owner in self._copies.values()):
            await self._wait_change()
        self._next += 1
        self._writes[self._next] = (offset, length)
        return self._next

    def end_write(self, token: int) -> None:
        del self._writes[token]
        self._notify()

    @asynccontextmanager
    async def copy(self, offset: int, length: int) -> AsyncIterator[None]:
        """Hold the range against writes while the caller copies it."""
        while any(self._overlap(offset, length, o, n) for o, n in self._writes.values()) \
                or any(self._overlap(offset, length, o, n) for o, n, _ in self._copies.values()):
            await self._wait_change()
        self._next += 1
        token = self._next
        self._copies[token] = (offset, length, asyncio.current_task())
        try:
            yield
        finally:
            del self._copies[token]
            self._notify()
