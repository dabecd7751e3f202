"""The ``rbd`` protocol driver: a Ceph RBD image through librbd.

QEMU 7.2's ``BlockdevOptionsRbd`` (``pool``, ``namespace``, ``image``,
``conf``, ``snapshot``, ``user``, ``auth-client-required``, ``key-secret``,
``server``), on Ceph's own Python bindings (:mod:`qmpd.block.ceph`; without
them ``driver=rbd`` is refused with an error naming the packages).

I/O uses librbd's asynchronous calls: a request is submitted from the event
loop and librbd's own threads complete it; completions come back to the loop
in batches (one wake-up for all that finished meanwhile), so many requests in
flight never queue on one thread.  Requests go through librbd's C calls
(:mod:`qmpd.block.rbd_aio`: librbd's threads then never take the GIL), or,
when the bindings' image object is not the layout that module knows, through
the bindings' own AIO calls.  Writes past the end grow the image first, as
QEMU's driver does, so that a qcow2 on it can grow.

Activation drops librbd's cache (``invalidate_cache``) and re-reads the size
and features; inactivation flushes.  With the ``exclusive-lock`` feature the
writable active node holds the lock explicitly (``lock_acquire``), so that
librbd does not hand it to another client that asks (another client's writes
fail with EROFS instead); an inactive node never takes it (its writes are
refused before they reach librbd), and inactivation releases it after the
flush, for the destination to take when it activates.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import ctypes
import errno
import functools
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from threading import get_ident
from types import ModuleType
from typing import Any, TypeVar

from qmpd.block import rbd_aio
from qmpd.block.accounting import WriteGenerations
from qmpd.block.blocking import BlockingRead, CacheReload
from qmpd.block.ceph import bindings
from qmpd.block.driver import (
    BlockDriver,
    BlockDriverError,
    BlockNode,
    BlockStatus,
    IoDone,
    NodeState,
    NodeStats,
    SoonRead,
    SoonWrite,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

#: librbd's feature bits and flags this driver looks at.
FEATURE_EXCLUSIVE_LOCK = 1 << 2
FEATURE_FAST_DIFF = 1 << 4
FLAG_FAST_DIFF_INVALID = 1 << 1
LOCK_MODE_EXCLUSIVE = 0
#: RBD_WRITE_ZEROES_FLAG_THICK_PROVISION: zeroes written, not a hole.
ZERO_THICK = 1 << 0
#: How often ``readiness`` may start a probe of the cluster, and how long a
#: probe waits for the monitor and the OSD before it calls them unreachable.
PROBE_INTERVAL = 2.0
PROBE_TIMEOUT = 3.0
#: At close, how long to try (and how many flushes at a time) to have
#: librbd's threads drop their pinned thread states (see _Completions).
UNPIN_TIMEOUT = 2.0
UNPIN_BATCH = 8
#: At close, how long to wait for requests librbd has not completed yet.
DRAIN_TIMEOUT = 10.0
#: Whether requests may go through librbd's C calls (tests turn it off to
#: run the bindings' own AIO calls).
C_AIO = True
#: errnos that mean the cluster did not answer (not a refused request).
_UNREACHABLE = frozenset({errno.ETIMEDOUT, errno.ESHUTDOWN, errno.ENOTCONN,
                          errno.ECONNREFUSED, errno.EHOSTUNREACH})


def drop_cache(image: Any) -> None:
    """Drop what librbd caches of the image (the negative control of the
    stale-cache test replaces this with a no-op)."""
    image.invalidate_cache()


def _retrieved(task: asyncio.Task[None]) -> None:
    if not task.cancelled():
        task.exception()


def _errno_of(exc: BaseException) -> int:
    code = getattr(exc, "errno", None)
    return abs(code) if isinstance(code, int) and code else errno.EIO


def _strerror(code: int) -> str:
    return os.strerror(code)


#: ``PyGILState_Ensure``: called without releasing the GIL (``pythonapi``).
_gil_state_ensure = ctypes.pythonapi.PyGILState_Ensure
_gil_state_release = ctypes.pythonapi.PyGILState_Release
_gil_state_release.argtypes = [ctypes.c_int]
#: PyGILState_LOCKED: the state a nested ``PyGILState_Ensure`` returns.
_GIL_LOCKED = 0


class _Completions:
    """Hands librbd's completions to the event loop, many per wake-up.

    librbd calls back from its own threads, and the bindings take the GIL
    there with ``PyGILState_Ensure``: on a thread Python does not know, that
    creates a thread state and the matching release destroys it again, which
    costs more than the rest of the callback.  The first callback on each of
    librbd's threads therefore takes one more reference (:meth:`_pin`), so the
    thread state lives as long as the connection; :meth:`unpin` drops them
    before librbd's threads end.  The callback itself only queues the
    completion; the loop reads the results, woken by an eventfd written only
    when the queue was empty.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.done: collections.deque[tuple[asyncio.Future[Any], Any, Any]] = \
            collections.deque()
        self.armed = False
        self.fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        loop.add_reader(self.fd, self._deliver)
        self.pinned: set[int] = set()
        self._main = threading.main_thread().ident
        self._unpinning = False

    def callback(self, future: asyncio.Future[Any]) -> Callable[..., None]:
        """librbd's ``oncomplete`` for one request (a read's gets its data too)."""
        done = self.done

        def complete(completion: Any, data: Any = None) -> None:
            if get_ident() not in self.pinned or self._unpinning:
                self._pin()
            done.append((future, completion, data))
            # No lock: under the GIL a wake-up is at worst sent twice, never
            # lost (_deliver clears the flag before it empties the queue).
            if not self.armed:
                self.armed = True
                try:
                    os.eventfd_write(self.fd, 1)
                except OSError:  # closed: nobody waits any more
                    pass

        return complete

    def _pin(self) -> None:
        ident = get_ident()
        if self._unpinning:
            if ident in self.pinned:
                self.pinned.discard(ident)
                _gil_state_release(_GIL_LOCKED)
            return
        if ident != self._main:
            self.pinned.add(ident)
            _gil_state_ensure()

    def _deliver(self) -> None:
        try:
            os.eventfd_read(self.fd)
        except BlockingIOError:
            pass
        self.armed = False
        done = self.done
        while done:
            future, completion, data = done.popleft()
            if future.cancelled():
                continue
            ret = completion.get_return_value()
            if ret < 0:
                future.set_exception(OSError(-ret, _strerror(-ret)))
            else:
                future.set_result(data)

    async def unpin(self, image: Any) -> None:
        """Before librbd's threads end, have each drop its pinned thread state:
        flushes, which complete on those threads, until every pinned thread
        has run one; given up after UNPIN_TIMEOUT s (a thread that ends
        pinned leaves its thread state behind, a little memory)."""
        self._unpinning = True
        deadline = time.monotonic() + UNPIN_TIMEOUT
        while self.pinned and time.monotonic() < deadline:
            futures = [self.loop.create_future() for _ in range(UNPIN_BATCH)]
            try:
                for future in futures:
                    image.aio_flush(self.callback(future))
                await asyncio.wait_for(asyncio.gather(*futures, return_exceptions=True),
                                       max(0.0, deadline - time.monotonic()))
            except Exception as exc:  # the cluster is gone: nothing completes
                log.debug("rbd: unpinning librbd's threads: %s", exc)
                return

    def close(self) -> None:
        """After the last callback (the image and connection are closed)."""
        self.loop.remove_reader(self.fd)
        os.close(self.fd)
        self.fd = -1


class _BindingsAio:
    """The requests of :class:`rbd_aio.ImageAio` through the bindings' own
    AIO calls (each returns a future the loop resolves)."""

    def __init__(self, image: Any, completions: _Completions) -> None:
        self.image = image
        self.completions = completions

    def _submit(self, submit: Callable[..., Any], *args: Any, **kwargs: Any
                ) -> asyncio.Future[Any]:
        future: asyncio.Future[Any] = self.completions.loop.create_future()
        submit(*args, self.completions.callback(future), **kwargs)
        return future

    def read(self, offset: int, length: int) -> asyncio.Future[Any]:
        return self._submit(self.image.aio_read, offset, length)

    def write(self, offset: int, data: bytes) -> asyncio.Future[Any]:
        return self._submit(self.image.aio_write, data, offset)

    def write_zeroes(self, offset: int, length: int, zero_flags: int) -> asyncio.Future[Any]:
        return self._submit(self.image.aio_write_zeroes, offset, length, zero_flags=zero_flags)

    def discard(self, offset: int, length: int) -> asyncio.Future[Any]:
        return self._submit(self.image.aio_discard, offset, length)

    def flush(self) -> asyncio.Future[Any]:
        return self._submit(self.image.aio_flush)


class RbdStats:
    """What the driver counts for /metrics."""

    def __init__(self) -> None:
        self.in_flight = 0
        self.requests = 0
        self.errors = 0
        self.seconds = 0.0
        self.resizes = 0
        self.cache_invalidations = 0
        self.lock_acquisitions = 0
        self.lock_releases = 0


class RbdDriver(BlockDriver):
    """A node on one RBD image."""

    format_name = "rbd"
    is_protocol = True
    strong_runtime_opts = ("pool", "namespace", "image", "conf", "snapshot", "user",
                           "server")

    def __init__(self, node: BlockNode) -> None:
        super().__init__(node)
        self._rados: ModuleType | None = None
        self._rbd: ModuleType | None = None
        self.cluster: Any = None
        self.ioctx: Any = None
        self.image: Any = None
        self.image_name = ""
        self.snapshot: str | None = None
        self._size = 0
        self._features = 0
        self._object_size = 0
        self._header = ""
        self._completions: _Completions | None = None
        self._io: rbd_aio.ImageAio | _BindingsAio | None = None
        self._plugged: rbd_aio.ImageAio | None = None
        self._grow_lock = asyncio.Lock()
        self.stats = RbdStats()
        self._unreachable: str | None = None
        self._probe_started = 0.0
        self._probing = False
        self._probe_task: asyncio.Task[None] | None = None
        #: Whether writes must first take the exclusive lock: from an
        #: inactivation (or an inactive open) until an attempt succeeds.
        self._lock_wanted = False
        #: The attempt under way (started by an activation or a write).
        self._locking: asyncio.Task[None] | None = None
        #: Writes submitted (librbd's flush covers the writes still in
        #: flight, so they count at once).
        self._gens = WriteGenerations()
        #: Thread jobs using the open image (see _on_image), and what the
        #: close waits on until there are none.
        self._image_jobs = 0
        self._image_idle: asyncio.Future[None] | None = None

    # --- open and close -------------------------------------------------------

    async def open(self, options: dict[str, Any]) -> None:
        rados, rbd = bindings()
        self._rados, self._rbd = rados, rbd
        self.image_name = options["image"]
        self.snapshot = options.get("snapshot")
        if self.snapshot is not None and not self.node.read_only \
                and options.get("_auto_read_only"):
            self.node.read_only = True
        key = None
        if "key-secret" in options:
            # QEMU hands librbd the secret's bytes in base64 (a secret object
            # made with format=base64 from a keyring's key gives that key).
            key = base64.b64encode(self.node.graph.objects.secret(options["key-secret"])).decode()
        writable = not self.node.read_only and self.node.active
        opened = await self.node.graph.run_io(self._open_blocking, options, key, writable)
        self.cluster, self.ioctx, self.image, self._size, self._features, \
            self._object_size, self._header = opened
        self._lock_wanted = not writable and self._needs_lock()
        loop = asyncio.get_running_loop()
        handle = rbd_aio.image_handle(self.image, self.ioctx, self.image_name) \
            if C_AIO else None
        if handle is not None:
            try:
                io = rbd_aio.ImageAio(handle, loop)
                io.failed, io.answered = self._failed, self._answered
                self._io = io
                self.calls_back = True
            except OSError as exc:
                log.warning("rbd %s: no completion notification (%s): using the "
                            "bindings' AIO calls", self.image_name, exc)
        if self._io is None:
            self._completions = _Completions(loop)
            self._io = _BindingsAio(self.image, self._completions)

    def _open_blocking(self, options: dict[str, Any], key: str | None,
                       writable: bool) -> tuple[Any, ...]:
        """Connect, open the pool and the image: QEMU's ``qemu_rbd_connect``
        and ``rbd_open``, with its error texts."""
        rados, rbd = self._rados, self._rbd
        assert rados is not None and rbd is not None
        cluster = rados.Rados(rados_id=options.get("user"), conffile=None)
        try:
            conf = options.get("conf")
            try:
                cluster.conf_read_file(conf)
            except rados.Error as exc:
                if conf is not None:
                    code = _errno_of(exc)
                    raise BlockDriverError(
                        f"error reading conf file {conf}: {_strerror(code)}", code) from None
            servers = options.get("server")
            if servers:
                cluster.conf_set("mon_host", ";".join(
                    f"[{s['host']}]:{s['port']}" if ":" in s["host"]
                    else f"{s['host']}:{s['port']}" for s in servers))
            modes = options.get("auth-client-required")
            if modes:
                cluster.conf_set("auth_client_required", ";".join(modes))
            if key is not None:
                cluster.conf_set("key", key)
            cluster.conf_set("rbd_cache", "false" if self.node.cache_direct else "true")
            try:
                cluster.connect()
            except rados.Error as exc:
                code = _errno_of(exc)
                raise BlockDriverError(f"error connecting: {_strerror(code)}", code) from None
            pool = options["pool"]
            try:
                ioctx = cluster.open_ioctx(pool)
            except rados.Error as exc:
                code = _errno_of(exc)
                raise BlockDriverError(
                    f"error opening pool {pool}: {_strerror(code)}", code) from None
            try:
                namespace = options.get("namespace", "")
                ioctx.set_namespace(namespace)
                if namespace:  # as QEMU: a missing one is named, not a missing image
                    try:
                        exists = rbd.RBD().namespace_exists(ioctx, namespace)
                    except (rbd.Error, rados.Error) as exc:
                        code = _errno_of(exc)
                        raise BlockDriverError(f"error checking namespace: {_strerror(code)}",
                                               code) from None
                    if not exists:
                        raise BlockDriverError(f"namespace '{namespace}' does not exist",
                                               errno.ENOENT)
                try:
                    image = rbd.Image(ioctx, self.image_name, snapshot=self.snapshot,
                                      read_only=self.node.read_only)
                except (rbd.Error, rados.Error) as exc:
                    code = _errno_of(exc)
                    raise BlockDriverError(
                        f"error reading header from {self.image_name}: {_strerror(code)}",
                        code) from None
                if self.snapshot is not None and not self.node.read_only:
                    image.close()
                    raise BlockDriverError("rbd snapshots are read-only", errno.EINVAL)
                try:
                    size, features, stat = image.size(), image.features(), image.stat()
                except (rbd.Error, rados.Error) as exc:
                    image.close()
                    code = _errno_of(exc)
                    raise BlockDriverError(f"error getting image info from {self.image_name}: "
                                           f"{_strerror(code)}", code) from None
                try:
                    if writable and features & FEATURE_EXCLUSIVE_LOCK:
                        self._take_lock(image)
                except (rbd.Error, rados.Error) as exc:
                    image.close()
                    code = _errno_of(exc)
                    raise BlockDriverError(
                        f"error opening {self.image_name}: {_strerror(code)}", code) from None
            except BaseException:
                ioctx.close()
                raise
        except BaseException:
            cluster.shutdown()
            raise
        header = f"rbd_header.{stat['block_name_prefix'].split('.', 1)[-1]}"
        return cluster, ioctx, image, size, features, stat["obj_size"], header

    def _take_lock(self, image: Any) -> None:
        """In an I/O thread: hold the exclusive lock, not giving it to others."""
        if not image.is_exclusive_lock_owner():
            image.lock_acquire(LOCK_MODE_EXCLUSIVE)
        self.stats.lock_acquisitions += 1

    def _needs_lock(self) -> bool:
        return not self.node.read_only and bool(self._features & FEATURE_EXCLUSIVE_LOCK)

    def _start_locking(self) -> asyncio.Task[None]:
        """Take the exclusive lock in the background (after an activation:
        reads need no lock, and the node resumes without waiting for it)."""
        task = asyncio.get_running_loop().create_task(self._lock_now(self._image()))
        # Its failure is logged and raised to the writes that wait for it: a
        # replaced or settled attempt need not be awaited by anyone.
        task.add_done_callback(_retrieved)
        self._locking = task
        return task

    async def _lock_now(self, image: Any) -> None:
        try:
            await self._on_image(functools.partial(self._take_lock, image))
        except Exception as exc:
            code = _errno_of(exc)
            log.warning("rbd %s: could not take the exclusive lock: %s",
                        self.image_name, _strerror(code))
            raise BlockDriverError(
                f"Failed to take the exclusive lock: {_strerror(code)}", code) from None
        if self._locking is asyncio.current_task():
            self._locking = None
            self._lock_wanted = False

    async def _lock_taken(self) -> None:
        """Before a write while the lock is wanted: wait for the attempt under
        way, or make one (again, after a failed one), its error raised if it
        fails.  Never for a node that is not active (a parent's driver calls
        this one's directly): it must not take the lock another host holds."""
        self._check_active()
        task = self._locking
        if task is None or task.done():
            task = self._start_locking()
        await asyncio.shield(task)

    async def _lock_settled(self) -> None:
        """Before the lock is given up or the image closes: no attempt runs.
        (A failed one stays: until the lock is held, writes still wait and
        try again.)"""
        task = self._locking
        if task is not None:
            await asyncio.wait([task])

    async def close(self) -> None:
        image, ioctx, cluster = self.image, self.ioctx, self.cluster
        if image is None:
            return
        probe = self._probe_task
        if probe is not None and not probe.done():
            # Its thread still uses the connection: shut down only after it.
            await asyncio.wait([probe])
        await self._lock_settled()
        io, completions = self._io, self._completions
        if isinstance(io, rbd_aio.ImageAio):
            await io.drain(DRAIN_TIMEOUT)
        await self._image_jobs_done(DRAIN_TIMEOUT)
        if completions is not None:
            await completions.unpin(image)
        self.image = self.ioctx = self.cluster = None
        self._io = None
        self.calls_back = False
        if isinstance(io, rbd_aio.ImageAio):  # its counts are the node's from now on
            self.stats.requests += io.requests
            self.stats.seconds += io.seconds

        def shut() -> None:
            try:
                image.close()  # flushes librbd's cache and releases the lock
            finally:
                ioctx.close()
                cluster.shutdown()

        if isinstance(io, rbd_aio.ImageAio):
            io.detach()

        try:
            await self.node.graph.run_io(shut)
        except Exception as exc:
            log.warning("rbd %s: close: %s", self.image_name, exc)
        if isinstance(io, rbd_aio.ImageAio):
            io.close()
        if completions is not None:
            completions.close()

    async def _on_image(self, fn: Callable[[], T]) -> T:
        """``fn``, which uses the open image, in an I/O thread.  The close waits
        until the thread is done with it, also when this caller was cancelled
        meanwhile (the thread goes on, and librbd's close frees the image)."""
        loop = asyncio.get_running_loop()

        def job() -> T:
            try:
                return fn()
            finally:
                with contextlib.suppress(RuntimeError):  # the loop is closed
                    loop.call_soon_threadsafe(self._image_job_ended)

        self._image_jobs += 1
        return await self.node.graph.run_io(job)

    def _image_job_ended(self) -> None:
        self._image_jobs -= 1
        idle = self._image_idle
        if not self._image_jobs and idle is not None and not idle.done():
            idle.set_result(None)

    async def _image_jobs_done(self, timeout: float) -> None:
        if not self._image_jobs:
            return
        self._image_idle = asyncio.get_running_loop().create_future()
        try:
            await asyncio.wait_for(asyncio.shield(self._image_idle), timeout)
        except TimeoutError:
            log.warning("rbd %s: closing with %d jobs still using the image",
                        self.image_name, self._image_jobs)

    # --- asynchronous requests ---------------------------------------------------

    def _image(self) -> Any:
        image = self.image
        if image is None:
            raise BlockDriverError("Input/output error", errno.EIO)
        return image

    def _check_active(self) -> None:
        if self.node.state is not NodeState.ACTIVE:
            raise BlockDriverError("Block node is inactive", errno.EPERM)

    def _requests(self) -> rbd_aio.ImageAio | _BindingsAio:
        io = self._io
        if io is None:
            raise BlockDriverError("Input/output error", errno.EIO)
        return io

    async def _aio(self, submit: Callable[..., asyncio.Future[Any]], *args: Any) -> Any:
        """Submit one request (``submit(*args)`` gives its future) and wait
        for its completion."""
        if isinstance(self._io, rbd_aio.ImageAio):  # it counts and maps errors itself
            return await submit(*args)
        stats = self.stats
        stats.requests += 1
        try:
            future = submit(*args)
        except Exception as exc:  # refused before it was queued
            raise self._failed(exc) from None
        stats.in_flight += 1
        started = time.monotonic()
        try:
            value = await future
        except OSError as exc:
            raise self._failed(exc) from None
        finally:
            stats.in_flight -= 1
            stats.seconds += time.monotonic() - started
        self._unreachable = None
        return value

    def _failed(self, exc: BaseException) -> BlockDriverError:
        """The error to report for a request that failed with ``exc`` (counted)."""
        self.stats.errors += 1
        code = _errno_of(exc)
        if code in _UNREACHABLE:
            self._unreachable = f"Ceph cluster unreachable: {_strerror(code)}"
        return BlockDriverError(_strerror(code), code)

    def _answered(self) -> None:
        self._unreachable = None

    async def read(self, offset: int, length: int) -> bytes:
        io = self._requests()
        size = self._size
        if offset >= size or length == 0:
            return bytes(length)
        n = min(length, size - offset)
        data: bytes = await self._aio(io.read, offset, n)
        if len(data) < length:
            data += bytes(length - len(data))
        return data

    def io_plug(self) -> None:
        io = self._io
        if isinstance(io, rbd_aio.ImageAio):
            io.plug()
            self._plugged = io

    def io_unplug(self) -> None:
        io, self._plugged = self._plugged, None
        if io is not None:
            io.unplug()

    def read_many(self, reads: Sequence[SoonRead], stats: NodeStats) -> int:
        io = self._io
        if not isinstance(io, rbd_aio.ImageAio):
            return 0
        size = self._size
        n = 0
        for offset, length, _ in reads:
            if offset + length > size:  # (read() fills what is past the end)
                break
            n += 1
        if n:
            io.read_many(reads if n == len(reads) else reads[:n], stats)
        return n

    def write_many(self, writes: Sequence[SoonWrite]) -> int:
        io = self._io
        if not isinstance(io, rbd_aio.ImageAio) or self._lock_wanted:
            return 0
        size = self._size
        todo: list[rbd_aio.AioWrite] = []
        for offset, data, fua, done in writes:
            if offset + len(data) > size:  # (write() grows the image first)
                break
            if fua:  # as write(): the flush follows the write's completion
                done = functools.partial(self._flush_soon, done)
            todo.append((offset, data, done))
        if todo:
            # Counted when submitted: librbd's flush covers the writes in flight.
            self._gens.written += len(todo)
            io.write_many(todo)
        return len(todo)

    def _flush_soon(self, done: IoDone, _: Any, error: BaseException | None) -> None:
        io = self._io
        if error is not None:
            done(None, error)
            return
        if not isinstance(io, rbd_aio.ImageAio):  # closing: the FUA is not kept
            done(None, BlockDriverError("Input/output error", errno.EIO))
            return
        io.flush_cb(functools.partial(self._flushed_soon, self._gens.written, done))

    def _flushed_soon(self, generation: int, done: IoDone, value: Any,
                      error: BaseException | None) -> None:
        if error is None:
            self._gens.covered(generation)
        done(value, error)

    async def _grow(self, end: int) -> None:
        """Resize the image to ``end`` before a write past its end (QEMU's
        driver does the same, so that a qcow2 on it grows)."""
        async with self._grow_lock:
            if end > self._size:
                await self._resize(end, "")

    async def _resize(self, size: int, failure: str) -> None:
        """Resize the image (the grow lock held: not alongside another resize
        nor an inactivation, which may have run while the caller waited);
        ``failure`` prefixes librbd's error."""
        self._check_active()
        image = self._image()
        try:
            await self._on_image(functools.partial(image.resize, size))
        except Exception as exc:
            code = _errno_of(exc)
            raise BlockDriverError(f"{failure}{_strerror(code)}", code) from None
        self.stats.resizes += 1
        self._size = size
        self._gens.written += 1

    async def write(self, offset: int, data: bytes, fua: bool = False) -> None:
        if self._lock_wanted:
            await self._lock_taken()
        if offset + len(data) > self._size:
            await self._grow(offset + len(data))
        # After the waits: the node may have been inactivated, or closed, meanwhile.
        self._check_active()
        io = self._requests()
        self._gens.written += 1  # counted when submitted (see write_many)
        await self._aio(io.write, offset, data)
        if fua:
            await self.flush()

    async def write_zeroes(self, offset: int, length: int, may_unmap: bool = False,
                           fua: bool = False) -> None:
        if self._lock_wanted:
            await self._lock_taken()
        if offset + length > self._size:
            await self._grow(offset + length)
        self._check_active()  # (after the waits, as write)
        io = self._requests()
        flags = 0 if may_unmap else ZERO_THICK
        self._gens.written += 1
        await self._aio(io.write_zeroes, offset, length, flags)
        if fua:
            await self.flush()

    async def discard(self, offset: int, length: int) -> None:
        if not self.node.discard_unmap:
            return  # discard=ignore, QEMU's default
        if self._lock_wanted:
            await self._lock_taken()
        self._check_active()  # (after the wait, as write)
        io = self._requests()
        end = min(offset + length, self._size)
        if end > offset:
            self._gens.written += 1
            await self._aio(io.discard, offset, end - offset)

    async def flush(self) -> None:
        io = self._io
        if io is None:
            return
        await self._gens.flush(lambda: self._aio(io.flush))

    def has_pending_writes(self) -> bool:
        return self._gens.pending()

    async def truncate(self, size: int) -> None:
        if self._lock_wanted:
            await self._lock_taken()
        async with self._grow_lock:
            await self._resize(size, "Failed to resize file: ")

    async def block_status(self, offset: int, length: int) -> BlockStatus:
        """With fast-diff (and a valid object map), what ``diff_iterate`` says
        of whole objects, as QEMU 7.2 does; else every range is data."""
        size = self._size
        end = min(offset + length, size)
        if offset >= end:
            return BlockStatus(length=length, data=False, zero=True, offset=offset)
        if not self._features & FEATURE_FAST_DIFF:
            return BlockStatus(length=end - offset, data=True, zero=False, offset=offset)
        image = self._image()

        def probe() -> BlockStatus:
            if image.flags() & FLAG_FAST_DIFF_INVALID:
                return BlockStatus(length=end - offset, data=True, zero=False, offset=offset)
            extents: list[tuple[int, int]] = []

            def seen(ext_offset: int, ext_length: int, exists: bool) -> None:
                if exists:
                    extents.append((ext_offset, ext_length))

            image.diff_iterate(offset, end - offset, None, seen, include_parent=True,
                               whole_object=True)
            extents.sort()
            # The first extent that is data, or the hole before it.
            for ext_offset, ext_length in extents:
                ext_end = ext_offset + ext_length
                if ext_end <= offset:
                    continue
                if ext_offset > offset:
                    return BlockStatus(length=min(ext_offset, end) - offset, data=False,
                                       zero=True, offset=offset)
                data_end = ext_end
                for next_offset, next_length in extents:
                    if next_offset <= data_end < next_offset + next_length:
                        data_end = next_offset + next_length
                return BlockStatus(length=min(data_end, end) - offset, data=True, zero=False,
                                   offset=offset)
            return BlockStatus(length=end - offset, data=False, zero=True, offset=offset)

        try:
            return await self._on_image(probe)
        except Exception as exc:
            code = _errno_of(exc)
            raise BlockDriverError(_strerror(code), code) from None

    # --- information ------------------------------------------------------------------

    def size(self) -> int:
        return self._size

    def image_info(self) -> dict[str, Any]:
        return {"cluster-size": self._object_size, "dirty-flag": False,
                "format-specific": {"type": "rbd", "data": {}}}

    def cluster_size(self) -> int | None:
        return self._object_size or None

    def blocking_reader(self) -> BlockingRead | None:
        image = self.image
        if image is None:
            return None
        size = self._size

        def read(ranges: list[tuple[int, int]]) -> list[bytes]:
            out = []
            for offset, length in ranges:
                n = max(0, min(length, size - offset))
                data = image.read(offset, n) if n else b""
                out.append(data + bytes(length - len(data)))
            return out

        return read

    # --- activation ---------------------------------------------------------------------

    async def inactivate(self) -> None:
        """Flush librbd's cache, then give the exclusive lock up; a resize
        under way (a write's growth, a truncate) ends first: librbd would
        otherwise take the lock back for it, after the release."""
        await self._lock_settled()
        async with self._grow_lock:
            await self._write_back()

    async def _write_back(self) -> None:
        await self.flush()
        image = self.image
        if image is None or not self._features & FEATURE_EXCLUSIVE_LOCK:
            return

        def release() -> None:
            if image.is_exclusive_lock_owner():
                image.lock_release()
                self.stats.lock_releases += 1

        # From here on, until an attempt succeeds, a write takes the lock
        # first: also one that comes before the next activation's reload.
        self._lock_wanted = self._needs_lock()
        try:
            await self._on_image(release)
        except Exception as exc:
            code = _errno_of(exc)
            raise BlockDriverError(f"Failed to release the exclusive lock: {_strerror(code)}",
                                   code) from None

    async def refresh_inactive(self) -> None:
        """Before each read of an inactive node: another host may own the
        image and write it, so what librbd cached (and the size) is dropped."""
        image = self.image
        if image is None:
            return

        def run() -> int:
            drop_cache(image)
            return int(image.size())

        try:
            self._size = await self._on_image(run)
        except Exception as exc:
            code = _errno_of(exc)
            raise BlockDriverError(f"Failed to invalidate the cache: {_strerror(code)}",
                                   code) from None

    def begin_reload(self) -> CacheReload | None:
        image = self.image
        if image is None:
            return None
        writable = not self.node.read_only
        rbd = self._rbd
        assert rbd is not None

        def run() -> tuple[int, int]:
            try:
                drop_cache(image)
                size, features = image.size(), image.features()
            except Exception as exc:
                code = _errno_of(exc)
                raise BlockDriverError(
                    f"Failed to invalidate the cache: {_strerror(code)}", code) from None
            return size, features

        async def finish(result: tuple[int, int]) -> None:
            self._size, self._features = result
            self.stats.cache_invalidations += 1
            self._lock_wanted = writable and self._needs_lock()
            if self._lock_wanted:
                # Writes wait for it; the node resumes without (an OSD round
                # trip or two, most of a handover's activation on rbd).
                self._start_locking()

        return CacheReload(run, finish)

    # --- health and metrics -------------------------------------------------------------

    def readiness(self) -> str | None:
        """The last probe's verdict (or the last request's); starts a new
        probe of the monitor and the OSD at most every PROBE_INTERVAL s."""
        now = time.monotonic()
        if not self._probing and self.cluster is not None \
                and now - self._probe_started >= PROBE_INTERVAL:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # asked from outside the loop: no probe
                return self._unreachable
            self._probe_started = now
            self._probing = True
            self._probe_task = loop.create_task(self._probe())
        return self._unreachable

    async def _probe(self) -> None:
        cluster, ioctx, header = self.cluster, self.ioctx, self._header
        rados = self._rados
        assert rados is not None

        def check() -> str | None:
            answered = threading.Event()
            outcome: list[str | None] = []

            def stat_done(completion: Any, *_: Any) -> None:
                ret = completion.get_return_value()
                outcome.append(None if ret >= 0 or ret == -errno.ENOENT
                               else f"Ceph OSD error: {_strerror(-ret)}")
                answered.set()

            try:
                cluster.mon_command(json.dumps({"prefix": "mon stat"}), b"",
                                    timeout=int(PROBE_TIMEOUT))
            except rados.Error as exc:
                return f"Ceph monitor unreachable: {exc}"
            try:
                ioctx.aio_stat(header, stat_done)
            except rados.Error as exc:
                return f"Ceph OSD unreachable: {exc}"
            if not answered.wait(PROBE_TIMEOUT):
                return f"Ceph OSD unreachable: no answer within {PROBE_TIMEOUT:g} s"
            return outcome[0]

        try:
            if cluster is not None:
                self._unreachable = await self.node.graph.run_io(check)
        except Exception as exc:  # the node closed under the probe
            log.debug("rbd %s: probe: %s", self.image_name, exc)
        finally:
            self._probing = False

    def driver_metrics(self) -> dict[str, float]:
        s, io = self.stats, self._io
        counted = (io.in_flight, io.requests, io.seconds) \
            if isinstance(io, rbd_aio.ImageAio) else (0, 0, 0.0)
        return {
            "requests_in_flight": s.in_flight + counted[0],
            "requests": s.requests + counted[1],
            "request_errors": s.errors,
            "request_seconds": s.seconds + counted[2],
            "resizes": s.resizes,
            "cache_invalidations": s.cache_invalidations,
            "lock_acquisitions": s.lock_acquisitions,
            "lock_releases": s.lock_releases,
            "cluster_reachable": 0 if self._unreachable else 1,
        }
