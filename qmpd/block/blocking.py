"""What a driver hands to the I/O threads: its open and its cache reload,
each as one blocking job and a finishing step on the loop."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class CacheReload:
    """A driver's cache invalidation as one blocking job and a finishing step.

    ``run`` goes to an I/O thread and touches no event-loop state; ``finish``
    gets what it returned and installs it on the loop.
    """

    run: Callable[[], Any]
    finish: Callable[[Any], Awaitable[None]]
    #: Whether ``run`` waits for a device (a dropped page cache, O_DIRECT, a
    #: network): such jobs go to the I/O threads; the others (page-cache
    #: hits) cost less than a thread hop, so they run on the loop.
    waits: bool = True

    async def start(self, run_io: Callable[[Callable[[], Any]], Awaitable[Any]]) -> Any:
        """``run``'s result: in an I/O thread (``run_io``) if it waits for a
        device, else right here."""
        return await run_io(self.run) if self.waits else self.run()


class WouldBlock(Exception):
    """A read that only the disk could answer, tried where nothing may wait:
    the caller does it again in an I/O thread."""


#: ``read([(offset, length), ...])``: blocks, returns each range's bytes
#: (or, for a reader that may not wait, raises :class:`WouldBlock`).
BlockingRead = Callable[[list[tuple[int, int]]], list[bytes]]


def _no_reader(_opened: Any) -> BlockingRead | None:
    return None


@dataclass(frozen=True)
class OpenJob:
    """A driver's open as one blocking job and a finishing step.

    ``run`` goes to an I/O thread, touches no event-loop state and raises the
    open's error; ``finish`` gets what it returned and installs it on the
    loop.  ``reader`` turns that result into the blocking reads of the opened
    node, so that a parent can read what it needs in the same job.
    """

    run: Callable[[], Any]
    finish: Callable[[Any], Awaitable[None]]
    reader: Callable[[Any], BlockingRead | None] = _no_reader
    #: Whether ``run`` may wait (for a network, a device): then it goes to
    #: the I/O threads; a quick open runs right on the loop.
    waits: bool = True

    async def start(self, run_io: Callable[[Callable[[], Any]], Awaitable[Any]]) -> Any:
        """``run``'s result: in an I/O thread if it may wait, else right here."""
        return await run_io(self.run) if self.waits else self.run()
