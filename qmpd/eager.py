"""Eager start of coroutines (Python 3.12's eager tasks, which 3.11 lacks).

:func:`start` runs a coroutine's first step in the caller's stack.  Most
cheap commands and uncontended graph operations finish there and then, and
cost no task and no turn of the event loop.  One that has to wait comes
back as an awaitable that picks it up where it stopped; wrapped in a task,
it continues exactly as if the task had run it from the start (a task that
waits on a future, cancellable through it).
"""

from __future__ import annotations

from collections.abc import Coroutine, Generator
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class Started(Generic[T]):
    """A coroutine suspended at ``waited``: awaiting this carries it on."""

    __slots__ = ("_waited", "coro")

    def __init__(self, coro: Coroutine[Any, Any, T], waited: Any) -> None:
        self.coro = coro
        self._waited = waited

    def __await__(self) -> Generator[Any, Any, T]:
        coro = self.coro
        waited, self._waited = self._waited, None
        while True:
            # What the coroutine yielded goes to whoever drives us (a task);
            # what it sends or throws back goes to the coroutine.
            try:
                sent = yield waited
            except GeneratorExit:
                coro.close()
                raise
            except BaseException as exc:  # thrown in (a cancel): handed on
                try:
                    waited = coro.throw(exc)
                except StopIteration as stop:
                    return stop.value  # type: ignore[no-any-return]
                continue
            try:
                waited = coro.send(sent)
            except StopIteration as stop:
                return stop.value  # type: ignore[no-any-return]


async def resume(started: Started[T]) -> T:
    """A coroutine for a task to carry ``started`` on in."""
    return await started


def start(coro: Coroutine[Any, Any, T]) -> tuple[bool, T | Started[T]]:
    """Run ``coro``'s first step now: (True, its result) if it finished,
    else (False, a :class:`Started` to await, in a task or another coroutine).
    Its exceptions propagate from here if it fails in the first step."""
    try:
        waited = coro.send(None)
    except StopIteration as stop:
        return True, stop.value
    return False, Started(coro, waited)
