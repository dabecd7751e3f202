"""librbd's C asynchronous I/O calls (ctypes), for the ``rbd`` driver's requests.

Through Ceph's Python bindings every completion runs a Python callback on one
of librbd's threads: that thread must take the GIL from the event loop, which
then waits to get it back, once or twice per request.  Here the requests go
to librbd's C calls on the image the bindings opened, with completions that
have no callback: librbd queues them and writes an eventfd
(``rbd_set_image_notification``, as QEMU's driver once did), and the loop
collects all that finished with ``rbd_poll_io_events``.  librbd's threads
never run Python.

The bindings do not expose the image's ``rbd_image_t``; :func:`image_handle`
reads it from the binding's object when its layout is the one this module
knows (checked against the image name and ioctx the object holds, and the
size librbd reports), and returns None otherwise: the driver then stays on
the bindings' own AIO calls.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import errno
import functools
import logging
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

from qmpd.block.accounting import NodeStats
from qmpd.block.common import IoDone, SoonRead

#: A write for librbd: ``(offset, data, done)``.
AioWrite = tuple[int, bytes | bytearray, IoDone]

log = logging.getLogger(__name__)

#: rbd_set_image_notification's type for an eventfd.
EVENT_TYPE_EVENTFD = 2
#: Completions collected per rbd_poll_io_events call.
POLL_BATCH = 64
#: Reads up to this size get a zeroed buffer (bytes(n)), larger ones one
#: that librbd is the first to write (PyBytes_FromStringAndSize(NULL, n)).
SMALL_READ = 65536
#: How often drain looks whether librbd completed the last requests.
DRAIN_POLL = 0.005
#: Where the Cython ``rbd.Image`` keeps its fields (verified on Ceph 16.2;
#: image_handle checks them before use):
#: ``rbd_image_t image`` right after the object header, then ``bint closed``,
#: ``name`` (bytes) and ``ioctx`` (the rados.Ioctx it was opened on).
_HEADER = object.__basicsize__
_OFF_IMAGE, _OFF_NAME, _OFF_IOCTX = _HEADER, _HEADER + 16, _HEADER + 24
#: Where a bytes object's characters start (PyBytesObject.ob_sval).
_BYTES_DATA = bytes.__basicsize__ - 1
#: Where a bytearray's pointer to its bytes is (PyByteArrayObject.ob_start,
#: before ob_exports), once _load has checked it (0: not this layout).
_BYTEARRAY_START = 0

_vp = ctypes.c_void_p
#: A request for librbd: the call, its arguments but the completion, the
#: callback, what librbd reads from or writes into, whether that is the
#: result, and the stats a successful read is added to.
_Entry = tuple[Any, tuple[Any, ...], IoDone, Any, bool, NodeStats | None]
#: A request in flight: its callback, what librbd reads from or writes
#: into, whether that is the result (a read's data), when it was submitted,
#: and the stats a successful read is added to.
_Pending = tuple[IoDone, Any, bool, float, NodeStats | None]
_lib: Any = None
_new_bytes: Any = None
#: Requests of an image whose close failed, not completed by librbd: their
#: completions and buffers, never released (librbd may still write into them).
_ABANDONED: list[tuple[int | None, Any]] = []


def _load() -> Any:
    """librbd with the prototypes used here (None if it cannot be loaded)."""
    global _lib, _new_bytes
    if _lib is None:
        try:
            lib = ctypes.CDLL(ctypes.util.find_library("rbd") or "librbd.so.1")
        except OSError as exc:
            log.debug("rbd: no librbd for ctypes: %s", exc)
            _lib = False
            return None
        u64, size_t, cint = ctypes.c_uint64, ctypes.c_size_t, ctypes.c_int
        for name, args in (
            ("rbd_aio_create_completion", [_vp, _vp, ctypes.POINTER(_vp)]),
            ("rbd_aio_read", [_vp, u64, size_t, _vp, _vp]),
            ("rbd_aio_write", [_vp, u64, size_t, _vp, _vp]),
            ("rbd_aio_discard", [_vp, u64, u64, _vp]),
            ("rbd_aio_write_zeroes", [_vp, u64, size_t, _vp, cint, cint]),
            ("rbd_aio_flush", [_vp, _vp]),
            ("rbd_aio_release", [_vp]),
            ("rbd_aio_get_return_value", [_vp]),
            ("rbd_aio_is_complete", [_vp]),
            ("rbd_poll_io_events", [_vp, ctypes.POINTER(_vp), cint]),
            ("rbd_set_image_notification", [_vp, cint, cint]),
            ("rbd_get_size", [_vp, ctypes.POINTER(u64)]),
        ):
            getattr(lib, name).argtypes = args
        lib.rbd_aio_get_return_value.restype = ctypes.c_ssize_t
        lib.rbd_aio_release.restype = None
        _new_bytes = ctypes.pythonapi.PyBytes_FromStringAndSize
        _new_bytes.argtypes = [_vp, ctypes.c_ssize_t]
        _new_bytes.restype = ctypes.py_object
        _check_bytearray()
        _lib = lib
    return _lib or None


def _check_bytearray() -> None:
    global _BYTEARRAY_START
    offset = bytearray.__basicsize__ - 16
    sample = bytearray(64)
    held = ctypes.c_char.from_buffer(sample)
    if _word(id(sample) + offset) == ctypes.addressof(held):
        _BYTEARRAY_START = offset
    del held


def _word(address: int) -> int:
    return _vp.from_address(address).value or 0


def image_handle(image: Any, ioctx: Any, name: str) -> int | None:
    """The ``rbd_image_t`` of the bindings' open ``image`` (opened on
    ``ioctx`` as ``name``), or None when its layout is not the known one."""
    lib = _load()
    if lib is None or type(image).__basicsize__ < _OFF_IOCTX + 8:
        return None
    base = id(image)
    if _word(base + _OFF_IOCTX) != id(ioctx):
        return None
    held = _word(base + _OFF_NAME)
    if held == 0 or ctypes.cast(held, ctypes.py_object).value != name.encode():
        return None
    handle = _word(base + _OFF_IMAGE)
    size = ctypes.c_uint64()
    if not handle or lib.rbd_get_size(handle, ctypes.byref(size)) != 0 \
            or size.value != image.size():
        return None
    return handle


class ImageAio:
    """Requests on one image through librbd's C calls: each calls back (or
    resolves a future) from the event loop once librbd has completed it.

    Once this is set up, the image must not get requests through the
    bindings' ``aio_*`` calls (their completions would come out of
    rbd_poll_io_events too); their synchronous calls are fine.

    It counts its requests and their time itself (per batch of completions,
    not per request), and maps a failure's OSError with :attr:`failed`.
    """

    def __init__(self, handle: int, loop: asyncio.AbstractEventLoop) -> None:
        lib = _load()
        assert lib is not None
        self._lib = lib
        self.handle = handle
        self.loop = loop
        #: completion -> the request
        self.pending: dict[int | None, _Pending] = {}
        #: Requests submitted, and the seconds they took, all together.
        self.requests = 0
        self.seconds = 0.0
        #: What a request that failed with an OSError fails with instead.
        self.failed: Callable[[OSError], BaseException] = _same
        #: Called once per batch of completions in which one succeeded.
        self.answered: Callable[[], None] = _nothing
        #: plug's depth, and what waits for unplug
        self.plugged = 0
        self.held: list[_Entry] = []
        self._out = _vp()
        self._batch = (_vp * POLL_BATCH)()
        self.fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        ret = lib.rbd_set_image_notification(handle, self.fd, EVENT_TYPE_EVENTFD)
        if ret < 0:
            os.close(self.fd)
            raise OSError(-ret, os.strerror(-ret))
        loop.add_reader(self.fd, self._deliver)

    def _submit(self, entries: list[_Entry]) -> None:
        """Give librbd the requests now, or when :meth:`unplug` submits what
        is held back."""
        if self.plugged:
            self.held += entries
        else:
            self._launch(entries, time.monotonic())

    def _launch(self, entries: list[_Entry], now: float) -> None:
        """``call(*args, completion)`` for each request, in order: in flight
        from now on; one that librbd refuses completes with its error, soon
        (never before its submission returned), as a failure later does."""
        lib, out, pending = self._lib, self._out, self.pending
        self.requests += len(entries)
        for call, args, done, keep, reading, stats in entries:
            try:
                if lib.rbd_aio_create_completion(None, None, out) < 0:
                    ret = -errno.ENOMEM
                else:
                    comp = out.value
                    ret = int(call(*args, comp))
                    if ret >= 0:
                        pending[comp] = (done, keep, reading, now, stats)
                        continue
                    lib.rbd_aio_release(comp)
                error = self.failed(OSError(-ret, os.strerror(-ret)))
            except Exception as exc:  # (a bug) the others are still submitted
                log.exception("rbd: a request could not be submitted")
                error = exc
            self.loop.call_soon(_call, done, None, error)

    def plug(self) -> None:
        """Hold requests back until the matching :meth:`unplug`: submitted one
        right after the other, they wake librbd's thread once, not each."""
        self.plugged += 1

    def unplug(self) -> None:
        self.plugged -= 1
        if self.plugged or not self.held:
            return
        held, self.held = self.held, []
        self._launch(held, time.monotonic())

    def _future(self) -> tuple[asyncio.Future[Any], IoDone]:
        future = self.loop.create_future()
        return future, functools.partial(_settle, future)

    def read_many(self, reads: Sequence[SoonRead], stats: NodeStats | None = None) -> None:
        """Read each ``(offset, length, done)``: ``done(data, None)`` (a fresh
        bytes object that librbd fills, as the bindings' own aio_read does),
        having added the read to ``stats`` (if given), or ``done(None,
        error)``, from the event loop."""
        read, handle = self._lib.rbd_aio_read, self.handle
        entries: list[_Entry] = []
        for offset, length, done in reads:
            # Zeroing a small one costs less than the call that skips it.
            data = bytes(length) if length <= SMALL_READ else _new_bytes(None, length)
            entries.append((read, (handle, offset, length, id(data) + _BYTES_DATA),
                            done, data, True, stats))
        self._submit(entries)

    def write_many(self, writes: Sequence[AioWrite]) -> None:
        """Write each ``(offset, data, done)``: ``data`` is bytes, or a buffer
        the caller does not change until ``done(None, None)`` or ``done(None,
        error)``, from the event loop."""
        write, handle = self._lib.rbd_aio_write, self.handle
        entries: list[_Entry] = []
        for offset, data, done in writes:
            keep: Any = data
            if type(data) is bytearray and data and _BYTEARRAY_START:
                # Where its bytes are (the caller neither changes nor resizes it).
                address = _vp.from_address(id(data) + _BYTEARRAY_START).value
            else:
                if type(data) is not bytes:
                    try:  # a writable buffer: librbd reads it where it is (a
                        # c_char on its first byte holds it: 4x cheaper than
                        # an array type)
                        keep = ctypes.c_char.from_buffer(data)
                    except TypeError:  # read-only
                        data = keep = bytes(data)
                    except ValueError:  # empty: nothing to point at
                        data = keep = b""
                address = id(data) + _BYTES_DATA if keep is data else ctypes.addressof(keep)
            entries.append((write, (handle, offset, len(data), address), done, keep, False, None))
        self._submit(entries)

    def flush_cb(self, done: IoDone) -> None:
        """Flush what was written before: ``done(None, None)`` or ``done(None, OSError)``."""
        self._submit([(self._lib.rbd_aio_flush, (self.handle,), done, None, False, None)])

    def read(self, offset: int, length: int) -> asyncio.Future[Any]:
        """One read of :meth:`read_many`, as a future."""
        future, done = self._future()
        self.read_many(((offset, length, done),))
        return future

    def write(self, offset: int, data: bytes) -> asyncio.Future[Any]:
        """One write of :meth:`write_many`, as a future."""
        future, done = self._future()
        self.write_many(((offset, data, done),))
        return future

    def write_zeroes(self, offset: int, length: int, zero_flags: int) -> asyncio.Future[Any]:
        future, done = self._future()
        self._submit([(_write_zeroes, (self._lib, self.handle, offset, length, zero_flags),
                       done, None, False, None)])
        return future

    def discard(self, offset: int, length: int) -> asyncio.Future[Any]:
        future, done = self._future()
        self._submit([(self._lib.rbd_aio_discard, (self.handle, offset, length),
                       done, None, False, None)])
        return future

    def flush(self) -> asyncio.Future[Any]:
        future, done = self._future()
        self.flush_cb(done)
        return future

    def _deliver(self) -> None:
        try:
            os.eventfd_read(self.fd)
        except BlockingIOError:
            pass
        # What the callbacks submit (the next requests of a client that got
        # its replies) leaves together at the end.
        self.plug()
        try:
            self._collect()
        finally:
            self.unplug()

    def _collect(self) -> None:
        lib, batch, pending = self._lib, self._batch, self.pending
        now = time.monotonic()
        answered = False
        seconds = 0.0
        while True:
            n = lib.rbd_poll_io_events(self.handle, batch, POLL_BATCH)
            for i in range(max(n, 0)):
                comp = batch[i]
                entry = pending.pop(comp, None)
                if entry is None:  # not ours to release (cannot happen, see the class)
                    continue
                ret = lib.rbd_aio_get_return_value(comp)
                lib.rbd_aio_release(comp)
                seconds += now - entry[3]
                # As per request: the last completion of the batch says
                # whether the cluster answers.
                answered = ret >= 0
                self._complete(entry, ret)
            if n < POLL_BATCH:
                break
        self.seconds += seconds
        if answered:
            self.answered()

    def _complete(self, entry: _Pending, ret: int) -> None:
        done, data, reading, _, stats = entry
        # One caller's bug must not stop the completions of the others.
        try:
            if ret < 0:
                done(None, self.failed(OSError(-ret, os.strerror(-ret))))
            elif not reading:
                done(None, None)
            else:
                if ret < len(data):  # short: librbd left the rest unwritten
                    data = data[:ret] + bytes(len(data) - ret)
                if stats is not None:
                    stats.rd_bytes += len(data)
                    stats.rd_operations += 1
                done(data, None)
        except Exception:
            log.exception("rbd: a completion callback failed")

    @property
    def in_flight(self) -> int:
        return len(self.pending) + len(self.held)

    async def drain(self, timeout: float) -> None:
        """Wait (at most ``timeout`` s) until librbd has completed every
        request in flight, cancelled or not (before the image closes)."""
        deadline = self.loop.time() + timeout
        while self.pending and self.loop.time() < deadline:
            await asyncio.sleep(DRAIN_POLL)

    def detach(self) -> None:
        """Before the image closes: nothing is collected from it any more (the
        close frees its handle, which a completion's wake-up would then poll)."""
        if self.fd >= 0:
            self.loop.remove_reader(self.fd)  # (a no-op once removed)

    def close(self) -> None:
        """After the image closed (librbd's close waits for its requests):
        each request still pending completes with its own result; one that
        librbd has not completed (a close that failed) fails, and keeps its
        buffer and completion for good, as librbd may still write into it."""
        self.detach()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        lib = self._lib
        pending, self.pending = self.pending, {}
        held, self.held = self.held, []
        eio = OSError(errno.EIO, os.strerror(errno.EIO))
        for comp, entry in pending.items():
            if lib.rbd_aio_is_complete(comp):
                ret = lib.rbd_aio_get_return_value(comp)
                lib.rbd_aio_release(comp)
                self._complete(entry, ret)
            else:
                _ABANDONED.append((comp, entry[1]))
                _call(entry[0], None, self.failed(eio))
        for held_entry in held:
            _call(held_entry[2], None, self.failed(eio))


def _write_zeroes(lib: Any, handle: int, offset: int, length: int, zero_flags: int,
                  comp: int) -> int:
    # The completion comes before the flags here.
    return int(lib.rbd_aio_write_zeroes(handle, offset, length, comp, zero_flags, 0))


def _same(exc: OSError) -> BaseException:
    return exc


def _nothing() -> None:
    return None


def _settle(future: asyncio.Future[Any], value: Any, error: BaseException | None) -> None:
    if future.cancelled():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(value)


def _call(done: IoDone, value: Any, error: BaseException | None) -> None:
    # One caller's bug must not stop the completions of the others.
    try:
        done(value, error)
    except Exception:
        log.exception("rbd: a completion callback failed")
