"""The thread pool for blocking block I/O, built for many small requests.

``loop.run_in_executor`` costs a concurrent.futures round trip and one
wake-up of the event loop per request.  Here worker threads hand their
results back in batches: the first completion arms a single wake-up, and
everything that completes before the loop runs it is delivered together.
"""

from __future__ import annotations

import asyncio
import collections
import queue
import signal
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

_Job = tuple["asyncio.Future[Any]", Callable[..., Any], tuple[Any, ...]]


class IOPool:
    """Worker threads started on first use; results delivered to the loop in batches."""

    def __init__(self, threads: int = 16, name: str = "qmpd-io") -> None:
        self.threads = threads
        self.name = name
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._done: collections.deque[tuple[asyncio.Future[Any], bool, Any]] = (
            collections.deque()
        )
        self._lock = threading.Lock()
        self._armed = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._workers: list[threading.Thread] = []

    def _start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        for i in range(self.threads):
            worker = threading.Thread(target=self._work, name=f"{self.name}-{i}", daemon=True)
            worker.start()
            self._workers.append(worker)

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            if self._loop is not None:
                # A new event loop (tests run several): start over.
                self.shutdown()
            self._start(loop)
        future: asyncio.Future[T] = loop.create_future()
        self._jobs.put((future, fn, args))
        return await future

    def _work(self) -> None:
        block_signals()
        while True:
            job = self._jobs.get()
            if job is None:
                return
            future, fn, args = job
            try:
                outcome = (future, True, fn(*args))
            except BaseException as exc:  # handed to the awaiting coroutine
                outcome = (future, False, exc)
            self._done.append(outcome)
            with self._lock:
                if self._armed:
                    continue
                self._armed = True
            loop = self._loop
            if loop is None:
                continue
            try:
                loop.call_soon_threadsafe(self._deliver)
            except RuntimeError:  # the loop is closed: nobody is waiting any more
                return

    def _deliver(self) -> None:
        with self._lock:
            self._armed = False
        done = self._done
        while done:
            future, ok, value = done.popleft()
            if future.cancelled():
                continue
            if ok:
                future.set_result(value)
            else:
                future.set_exception(value)

    def shutdown(self) -> None:
        for _ in self._workers:
            self._jobs.put(None)
        self._workers.clear()
        self._loop = None
        with self._lock:
            self._armed = False


def block_signals() -> None:
    """Keep process signals off this (worker) thread, as QEMU's threads do.

    The main thread alone handles them; a worker that took a SIGTERM after the
    main thread stopped handling it would kill the process with it.
    """
    signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
