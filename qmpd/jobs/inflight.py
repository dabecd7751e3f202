"""Byte ranges a job is working on, so that overlapping requests wait for
each other (QEMU's mirror in-flight ops and block-copy tasks)."""

from __future__ import annotations

import asyncio


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
