"""A thin ctypes layer over the system's libnfs (``libnfs.so.13``, NFSv3).

Mount and open use the synchronous calls (in a thread); I/O uses the
asynchronous ones on the event loop (:class:`AsyncContext`).  A context is
used by one thread at a time (libnfs contexts are not thread-safe).
Without the library, :func:`load` raises :class:`NfsUnavailable` naming the package.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import errno
import os
import threading
from collections.abc import Callable
from typing import Any

PACKAGE = "libnfs13"

_lib: Any = None
_load_lock = threading.Lock()


#: void (*nfs_cb)(int err, struct nfs_context *nfs, void *data, void *private_data)
NFS_CB = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p)


class NfsUnavailable(Exception):
    """libnfs cannot be loaded."""


class NfsError(OSError):
    """A failed libnfs call: its (negative) errno and libnfs's message."""


def load() -> Any:
    """The library, loaded once; raises :class:`NfsUnavailable` without it."""
    global _lib
    with _load_lock:
        if _lib is not None:
            return _lib
        names = ["libnfs.so.13"]
        found = ctypes.util.find_library("nfs")
        if found:
            names.append(found)
        lib = None
        for name in names:
            try:
                lib = ctypes.CDLL(name, use_errno=True)
                break
            except OSError:
                continue
        if lib is None:
            raise NfsUnavailable(
                f"NFS support needs libnfs (libnfs.so.13, package {PACKAGE}), "
                "which is not installed")
        c_p, c_int, u64, u32 = ctypes.c_void_p, ctypes.c_int, ctypes.c_uint64, ctypes.c_uint32
        sigs: dict[str, tuple[Any, list[Any]]] = {
            "nfs_init_context": (c_p, []),
            "nfs_destroy_context": (None, [c_p]),
            "nfs_get_error": (ctypes.c_char_p, [c_p]),
            "nfs_set_uid": (None, [c_p, c_int]),
            "nfs_set_gid": (None, [c_p, c_int]),
            "nfs_set_tcp_syncnt": (None, [c_p, c_int]),
            "nfs_set_readahead": (None, [c_p, u32]),
            "nfs_set_pagecache": (None, [c_p, u32]),
            "nfs_set_debug": (None, [c_p, c_int]),
            "nfs_set_timeout": (None, [c_p, c_int]),
            "nfs_mount": (c_int, [c_p, ctypes.c_char_p, ctypes.c_char_p]),
            "nfs_open": (c_int, [c_p, ctypes.c_char_p, c_int, ctypes.POINTER(c_p)]),
            "nfs_close": (c_int, [c_p, c_p]),
            "nfs_pread": (c_int, [c_p, c_p, u64, u64, c_p]),
            "nfs_pwrite": (c_int, [c_p, c_p, u64, u64, c_p]),
            "nfs_fsync": (c_int, [c_p, c_p]),
            "nfs_ftruncate": (c_int, [c_p, c_p, u64]),
            "nfs_fstat64": (c_int, [c_p, c_p, c_p]),
            "nfs_pagecache_invalidate": (None, [c_p, c_p]),
            "nfs_get_fd": (c_int, [c_p]),
            "nfs_which_events": (c_int, [c_p]),
            "nfs_service": (c_int, [c_p, c_int]),
            "nfs_pread_async": (c_int, [c_p, c_p, u64, u64, NFS_CB, c_p]),
            "nfs_pwrite_async": (c_int, [c_p, c_p, u64, u64, c_p, NFS_CB, c_p]),
            "nfs_fsync_async": (c_int, [c_p, c_p, NFS_CB, c_p]),
            "nfs_ftruncate_async": (c_int, [c_p, c_p, u64, NFS_CB, c_p]),
            "nfs_fstat64_async": (c_int, [c_p, c_p, NFS_CB, c_p]),
        }
        for fname, (res, args) in sigs.items():
            fn = getattr(lib, fname)
            fn.restype = res
            fn.argtypes = args
        # Not in every libnfs: without it, libnfs reconnects on its own.
        fn = getattr(lib, "nfs_set_autoreconnect", None)
        if fn is not None:
            fn.restype, fn.argtypes = None, [c_p, c_int]
        _lib = lib
        return lib


#: struct nfs_stat_64: 17 uint64 fields (room left for more); size is the
#: 8th, blocks the 10th.
STAT_FIELDS = 32
ST_SIZE = 7
ST_BLOCKS = 9

#: Largest single pread/pwrite (libnfs splits further by the server's limits).
CHUNK = 1 << 20


def _copy(data: bytes | bytearray, start: int, length: int) -> ctypes.Array[ctypes.c_char]:
    """``length`` bytes of ``data`` from ``start`` in memory libnfs may keep
    until the request is answered (a WRITE's payload may be a bytearray the
    NBD server lends, or bytes)."""
    return (ctypes.c_char * length).from_buffer_copy(data, start)


class NfsFile:
    """One context, mounted, with one open file.  Every method blocks: call
    them from the context's own thread."""

    def __init__(self) -> None:
        self.lib = load()
        self.ctx: Any = self.lib.nfs_init_context()
        if not self.ctx:
            raise NfsError(errno.ENOMEM, "Failed to init NFS context")
        self.fh: Any = None
        #: What libnfs may still use until ``nfs_destroy_context`` returned:
        #: the asynchronous callback, and write payloads by request (a
        #: payload leaves when its request's callback ran).
        self.callback: Any = None
        self.buffers: dict[int, Any] = {}

    def _error(self, ret: int, what: str) -> NfsError:
        msg = self.lib.nfs_get_error(self.ctx) or b""
        err = -ret if ret < 0 else errno.EIO
        return NfsError(err, f"{what}: {msg.decode(errors='replace') or os.strerror(err)}")

    def configure(self, *, uid: int | None, gid: int | None, syncnt: int | None,
                  readahead: int | None, pagecache: int | None, debug: int | None,
                  timeout_ms: int) -> None:
        lib, ctx = self.lib, self.ctx
        lib.nfs_set_timeout(ctx, timeout_ms)
        if uid is not None:
            lib.nfs_set_uid(ctx, uid)
        if gid is not None:
            lib.nfs_set_gid(ctx, gid)
        if syncnt is not None:
            lib.nfs_set_tcp_syncnt(ctx, syncnt)
        if readahead is not None:
            lib.nfs_set_readahead(ctx, readahead)
        if pagecache is not None:
            lib.nfs_set_pagecache(ctx, pagecache)
        if debug is not None:
            lib.nfs_set_debug(ctx, debug)
        self.no_autoreconnect()

    def no_autoreconnect(self) -> None:
        """Turn libnfs's own reconnection off (where libnfs can): it
        would put a new socket under the same fd number, unknown to the event
        loop's watch.  A lost connection fails the context instead, and the
        driver opens a new one."""
        fn = getattr(self.lib, "nfs_set_autoreconnect", None)
        if fn is not None:
            fn(self.ctx, 0)

    def mount(self, host: str, export: str) -> None:
        ret = self.lib.nfs_mount(self.ctx, host.encode(), export.encode())
        if ret != 0:
            raise self._error(ret, "Failed to mount nfs share")

    def open(self, path: str, writable: bool) -> None:
        fh = ctypes.c_void_p()
        flags = os.O_RDWR if writable else os.O_RDONLY
        ret = self.lib.nfs_open(self.ctx, path.encode(), flags, ctypes.byref(fh))
        if ret != 0:
            raise self._error(ret, f"Failed to open file {path}")
        self.fh = fh

    def stat(self) -> tuple[int, int]:
        """(size, allocated bytes) of the open file, asked of the server."""
        buf = (ctypes.c_uint64 * STAT_FIELDS)()
        ret = self.lib.nfs_fstat64(self.ctx, self.fh, ctypes.byref(buf))
        if ret != 0:
            raise self._error(ret, "Failed to fstat file")
        return int(buf[ST_SIZE]), int(buf[ST_BLOCKS]) * 512

    def pread(self, offset: int, length: int) -> bytes:
        """``length`` bytes; past the end of the file reads as zeros."""
        buf = ctypes.create_string_buffer(length)
        got = 0
        while got < length:
            n = min(length - got, CHUNK)
            ret = self.lib.nfs_pread(self.ctx, self.fh, offset + got, n,
                                     ctypes.byref(buf, got))
            if ret < 0:
                raise self._error(ret, "NFS read failed")
            if ret == 0:
                break  # end of file: the buffer is zeros already
            got += ret
        return buf.raw

    def pwrite(self, offset: int, data: bytes | bytearray) -> None:
        buf = _copy(data, 0, len(data))
        done = 0
        while done < len(data):
            n = min(len(data) - done, CHUNK)
            ret = self.lib.nfs_pwrite(self.ctx, self.fh, offset + done, n,
                                      ctypes.byref(buf, done))
            if ret < 0:
                raise self._error(ret, "NFS write failed")
            if ret == 0:
                raise NfsError(errno.EIO, "NFS write failed: nothing written")
            done += ret

    def fsync(self) -> None:
        ret = self.lib.nfs_fsync(self.ctx, self.fh)
        if ret != 0:
            raise self._error(ret, "NFS fsync failed")

    def truncate(self, size: int) -> None:
        ret = self.lib.nfs_ftruncate(self.ctx, self.fh, size)
        if ret != 0:
            raise self._error(ret, "NFS truncate failed")

    def invalidate_pagecache(self) -> None:
        self.lib.nfs_pagecache_invalidate(self.ctx, self.fh)

    def close(self) -> None:
        if self.fh is not None:
            self.lib.nfs_close(self.ctx, self.fh)
            self.fh = None
        if self.ctx:
            # Cancels what is in flight: libnfs calls the callbacks (on this
            # thread), and reads no payload after it returned.
            self.lib.nfs_destroy_context(self.ctx)
            self.ctx = None
        self.buffers.clear()
        self.callback = None


_POLLIN = 0x001
_POLLOUT = 0x004
#: How often a context with requests in flight is serviced without events,
#: so that libnfs's timeouts fire when the server has gone silent.
_TICK = 0.5


class AsyncContext:
    """libnfs's asynchronous calls driven by the event loop, as QEMU's nfs
    driver drives them from its AioContext: the context's socket is watched
    for what ``nfs_which_events`` asks, ``nfs_service`` runs the callbacks."""

    def __init__(self, nfs: NfsFile, loop: asyncio.AbstractEventLoop) -> None:
        self.nfs = nfs
        self.lib = nfs.lib
        self.ctx = nfs.ctx
        self.loop = loop
        self._pending: dict[int, tuple[asyncio.Future[Any], str]] = {}
        self._next = 1
        self._cb = NFS_CB(self._done)
        nfs.callback = self._cb  # alive as long as the context, not this object
        #: The connection is lost (libnfs does not reconnect it): the driver
        #: replaces the context.
        self.broken = False
        self._fd = -1
        self._reading = False
        self._writing = False
        self._timer: asyncio.TimerHandle | None = None

    def _done(self, err: int, _ctx: Any, data: Any, private: Any) -> None:
        # Also called on the closing thread by nfs_destroy_context, after
        # detach(): then only the payload is let go.
        key = int(private or 0)
        self.nfs.buffers.pop(key, None)
        entry = self._pending.pop(key, None)
        if entry is None:
            return
        fut, kind = entry
        if fut.done():
            return
        if err < 0:
            msg = self.lib.nfs_get_error(self.ctx) or b""
            text = msg.decode(errors="replace") or os.strerror(-err)
            fut.set_exception(NfsError(-err, f"NFS {kind} failed: {text}"))
        elif kind == "read":
            fut.set_result(ctypes.string_at(data, err) if err else b"")
        elif kind == "stat":
            st = (ctypes.c_uint64 * STAT_FIELDS).from_address(data)
            fut.set_result((int(st[ST_SIZE]), int(st[ST_BLOCKS]) * 512))
        else:
            fut.set_result(err)

    def _service(self, revents: int) -> None:
        if self.ctx is None or self.broken:
            return
        if self.lib.nfs_service(self.ctx, revents) < 0:
            # The connection is gone: stop watching its fd at once (libnfs
            # may have closed it), fail what waits, and leave the context
            # to the driver to replace.
            msg = (self.lib.nfs_get_error(self.ctx) or b"").decode(errors="replace")
            self.broken = True
            self._stop()
            self._fail_all(NfsError(errno.EIO, f"NFS service failed: {msg}"))
            return
        self._update()

    def _fail_all(self, exc: NfsError) -> None:
        """Fail the waiting requests (their payloads stay in ``nfs.buffers``)."""
        pending, self._pending = self._pending, {}
        for fut, _kind in pending.values():
            if not fut.done():
                fut.set_exception(exc)

    def _update(self) -> None:
        if self.ctx is None or self.broken:
            return
        fd = self.lib.nfs_get_fd(self.ctx)
        if fd != self._fd:
            self._unwatch()
            self._fd = fd
        events = self.lib.nfs_which_events(self.ctx) if fd >= 0 else 0
        try:
            self._watch(fd, events)
        except OSError:
            # The fd number has another socket under it (a libnfs without
            # nfs_set_autoreconnect reconnected): watch the new one afresh.
            self._unwatch()
            self._watch(fd, events)
        if self._pending and self._timer is None:
            self._timer = self.loop.call_later(_TICK, self._tick)

    def _watch(self, fd: int, events: int) -> None:
        want_read, want_write = bool(events & _POLLIN), bool(events & _POLLOUT)
        if want_read != self._reading:
            if want_read:
                self.loop.add_reader(fd, self._service, _POLLIN)
            else:
                self.loop.remove_reader(fd)
            self._reading = want_read
        if want_write != self._writing:
            if want_write:
                self.loop.add_writer(fd, self._service, _POLLOUT)
            else:
                self.loop.remove_writer(fd)
            self._writing = want_write

    def _tick(self) -> None:
        self._timer = None
        self._service(0)

    def _unwatch(self) -> None:
        if self._fd >= 0:
            for watching, remove in ((self._reading, self.loop.remove_reader),
                                     (self._writing, self.loop.remove_writer)):
                if watching:
                    try:
                        remove(self._fd)
                    except OSError:  # libnfs closed the fd: the selector dropped it
                        pass
        self._reading = self._writing = False

    def _stop(self) -> None:
        self._unwatch()
        self._fd = -1
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    async def call(self, kind: str, start: Callable[[Any, int], int], keep: Any = None) -> Any:
        """Start one request (``start(callback, private)``) and await its
        callback; ``keep`` (a payload libnfs reads) stays alive until the
        callback ran or the context is destroyed."""
        if self.ctx is None:
            raise NfsError(errno.EBADF, "NFS context closed")
        if self.broken:
            raise NfsError(errno.EIO, f"NFS {kind} failed: the connection to the server is lost")
        key, self._next = self._next, self._next + 1
        fut: asyncio.Future[Any] = self.loop.create_future()
        self._pending[key] = (fut, kind)
        if keep is not None:
            self.nfs.buffers[key] = keep
        if start(self._cb, key) != 0:
            self._pending.pop(key, None)
            self.nfs.buffers.pop(key, None)
            msg = (self.lib.nfs_get_error(self.ctx) or b"").decode(errors="replace")
            raise NfsError(errno.EIO, f"NFS {kind} failed: {msg}")
        self._update()
        return await fut

    def _starter(self, fn: Any, *args: Any) -> Callable[[Any, int], int]:
        """``start(callback, private)`` calling ``fn(ctx, *args, callback, private)``."""
        ctx = self.ctx
        return lambda cb, key: int(fn(ctx, *args, cb, key))

    async def pread(self, offset: int, length: int) -> bytes:
        parts = []
        got = 0
        while got < length:
            n = min(length - got, CHUNK)
            chunk: bytes = await self.call("read", self._starter(
                self.lib.nfs_pread_async, self.nfs.fh, offset + got, n))
            if not chunk:
                break  # end of file
            parts.append(chunk)
            got += len(chunk)
        data = b"".join(parts)
        return data if len(data) == length else data + bytes(length - len(data))

    async def pwrite(self, offset: int, data: bytes | bytearray) -> None:
        done = 0
        while done < len(data):
            n = min(len(data) - done, CHUNK)
            buf = _copy(data, done, n)
            wrote: int = await self.call("write", self._starter(
                self.lib.nfs_pwrite_async, self.nfs.fh, offset + done, n, buf), buf)
            if wrote <= 0:
                raise NfsError(errno.EIO, "NFS write failed: nothing written")
            done += wrote

    async def fsync(self) -> None:
        await self.call("fsync", lambda cb, key: self.lib.nfs_fsync_async(
            self.ctx, self.nfs.fh, cb, key))

    async def truncate(self, size: int) -> None:
        await self.call("truncate", lambda cb, key: self.lib.nfs_ftruncate_async(
            self.ctx, self.nfs.fh, size, cb, key))

    async def stat(self) -> tuple[int, int]:
        result: tuple[int, int] = await self.call(
            "stat", lambda cb, key: self.lib.nfs_fstat64_async(self.ctx, self.nfs.fh, cb, key))
        return result

    def detach(self) -> None:
        """Stop watching the socket (before the context is closed); the
        payloads in flight stay with the context until it is destroyed."""
        self._stop()
        self._fail_all(NfsError(errno.EBADF, "NFS context closed"))
        self.ctx = None
