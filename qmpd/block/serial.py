"""One serialisation point for everything that changes the block graph.

QEMU's monitor runs one command at a time under the big lock; qmpd serves
many clients at once.  Every operation that adds, deletes, exports,
activates or inactivates nodes runs under :class:`GraphLock`, so concurrent
commands end as if they had run one after the other.  Each operation also
runs to its end (started in the caller's stack, then if it must wait in a
task the lock owns): a caller that goes away (a client
disconnecting, shutdown cancelling its command) never leaves a flush or a
close half done.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar, cast

from qmpd import eager
from qmpd.errors import GenericError

log = logging.getLogger(__name__)

T = TypeVar("T")


class GraphLock:
    """Serialises graph changes; owns the tasks that carry them out."""

    def __init__(self) -> None:
        self._lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[object]] = set()
        self._closed = False
        #: Bumped when an operation takes the lock and when it lets go: what
        #: was derived from node state while it stayed the same is still true.
        self.generation = 0

    @property
    def locked(self) -> bool:
        return self._lock.locked()

    async def run(self, operation: Callable[[], Awaitable[T]]) -> T:
        """Run ``operation`` alone, to completion even if the caller is cancelled.

        It starts right here, in the caller's stack: an operation that finds
        the lock free and need not wait ends without a task or a turn of the
        loop.  One that waits (for the lock, a disk, a thread) goes on in a
        task the lock owns, which the caller awaits through a shield.
        """
        if self._closed:
            raise GenericError("qmpd is shutting down")
        finished, value = eager.start(self._locked(operation))
        if finished:
            return cast(T, value)
        task: asyncio.Task[T] = asyncio.get_running_loop().create_task(
            eager.resume(cast("eager.Started[T]", value)))
        self._tasks.add(task)
        task.add_done_callback(self._finished)
        return await asyncio.shield(task)

    async def _locked(self, operation: Callable[[], Awaitable[T]]) -> T:
        async with self._lock:
            self.generation += 1
            try:
                return await operation()
            finally:
                self.generation += 1

    def _finished(self, task: asyncio.Task[object]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            # Retrieved here so an abandoned caller's error is not reported
            # as "never retrieved"; the caller (if any) still gets it.
            log.debug("graph operation failed: %s", task.exception())

    @contextlib.asynccontextmanager
    async def held(self) -> AsyncIterator[None]:
        """Hold the lock in the caller's own task (migration's switchover)."""
        async with self._lock:
            self.generation += 1
            try:
                yield
            finally:
                self.generation += 1

    async def close(self) -> None:
        """Refuse new operations and wait for those in flight to finish."""
        self._closed = True
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
