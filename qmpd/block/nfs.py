"""The ``nfs`` protocol driver: a file on an NFSv3 server, through libnfs.

Each node owns one libnfs context.  Mount and open are synchronous libnfs
calls in an I/O thread; after that every request goes through libnfs's
asynchronous API on the event loop, as QEMU drives it (the context's socket
watched for ``nfs_which_events``, ``nfs_service`` on each event), so a slow
server never blocks the loop and many requests are in flight at once.
Activation drops libnfs's page cache and asks the server for the file's
size again: a migration source may have grown the file (QEMU 7.2 keeps the
old size; README: differences).  A context that lost its server (libnfs's
own reconnection is off) is replaced by the next request: one reconnection,
whose new context every request waiting for it uses.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import posixpath
import time
from collections.abc import Awaitable
from typing import Any, TypeVar

from qmpd.block.accounting import WriteGenerations
from qmpd.block.driver import BlockDriver, BlockDriverError, BlockStatus
from qmpd.block.libnfs import AsyncContext, NfsError, NfsFile, NfsUnavailable

log = logging.getLogger(__name__)

T = TypeVar("T")

#: QEMU 7.2's limits (block/nfs.c): larger values are lowered, with a warning.
#: libnfs itself hangs on a readahead or page cache past 2**31 (or negative),
#: and fails to allocate a large page cache, then crashes on the first write.
MAX_READAHEAD = 1048576
MAX_PAGECACHE = 8388608 // 4096  # pages of libnfs's NFS_BLKSIZE
MAX_DEBUG = 2

#: How long one libnfs call may wait for the server (ms): an unreachable
#: server fails blockdev-add, and a vanished one fails requests, in bounded time.
TIMEOUT_MS = 10_000


#: Errors about the file itself, which say nothing of the server's health.
_FILE_ERRORS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES,
                          errno.EPERM, errno.EINVAL, errno.ENOENT, errno.EISDIR, errno.EBADF})


def _driver_error(exc: OSError) -> BlockDriverError:
    return BlockDriverError(str(exc.strerror or exc), exc.errno or errno.EIO)


def _settings(options: dict[str, Any]) -> dict[str, int | None]:
    """The libnfs settings of the options, limited as QEMU 7.2 limits them.
    The QAPI members are ``int``: QEMU hands a negative readahead or page
    cache size to libnfs, which then never returns; qmpd refuses it."""
    for key in ("readahead-size", "page-cache-size"):
        value = options.get(key)
        if value is not None and value < 0:
            raise BlockDriverError(f"Parameter '{key}' must not be negative", errno.EINVAL)
    readahead = options.get("readahead-size")
    if readahead is not None and readahead > MAX_READAHEAD:
        log.warning("Truncating NFS readahead size to %d", MAX_READAHEAD)
        readahead = MAX_READAHEAD
    pagecache = options.get("page-cache-size")
    if pagecache is not None and pagecache > MAX_PAGECACHE:
        log.warning("Truncating NFS pagecache size to %d pages", MAX_PAGECACHE)
        pagecache = MAX_PAGECACHE
    debug = options.get("debug")
    if debug is not None and debug > MAX_DEBUG:
        log.warning("Limiting NFS debug level to %d", MAX_DEBUG)
        debug = MAX_DEBUG
    return {"uid": options.get("user"), "gid": options.get("group"),
            "syncnt": options.get("tcp-syn-count"), "readahead": readahead,
            "pagecache": pagecache, "debug": debug}


class NfsStats:
    """What the driver counts for /metrics (requests: every call to the
    server, the mount and activation's included)."""

    def __init__(self) -> None:
        self.in_flight = 0
        self.requests = 0
        self.errors = 0
        self.seconds = 0.0
        self.read_bytes = 0
        self.written_bytes = 0
        self.reconnects = 0
        self.cache_invalidations = 0
        self.size_changes = 0


class NfsDriver(BlockDriver):
    """Options: ``server`` {type inet, host}, ``path``, ``user``, ``group``,
    ``tcp-syn-count``, ``readahead-size``, ``page-cache-size``, ``debug``."""

    format_name = "nfs"
    is_protocol = True
    #: Activation re-reads the size (off only in the tests' negative control).
    refresh_size = True

    def __init__(self, node: Any) -> None:
        super().__init__(node)
        self.host = ""
        self.path = ""
        self._file: NfsFile | None = None
        self._async: AsyncContext | None = None
        self._size = 0
        self._allocated: int | None = None
        self._gens = WriteGenerations()
        self._unreachable: str | None = None
        self._settings: dict[str, int | None] = {}
        #: The context lost its server: the next request connects anew.
        self._broken = False
        #: Closed on purpose: no request connects again.
        self._closed = False
        #: One reconnection at a time: the requests waiting use its context.
        self._reconnecting = asyncio.Lock()
        #: Closings of contexts abandoned by a cancelled connect.
        self._discarding: set[asyncio.Future[None]] = set()
        self.stats = NfsStats()

    async def _call(self, request: Awaitable[T], ctx: AsyncContext | None = None) -> T:
        """Await one request on ``ctx`` (None: connecting).  A server error
        marks the node broken, unless ``ctx`` was replaced meanwhile."""
        stats = self.stats
        stats.in_flight += 1
        stats.requests += 1
        started = time.monotonic()
        try:
            result = await request
        except NfsError as exc:
            stats.errors += 1
            if exc.errno not in _FILE_ERRORS:
                self._unreachable = f"NFS server {self.host}: {exc.strerror}"
                if ctx is None or ctx is self._async:
                    self._broken = True
            raise _driver_error(exc) from None
        finally:
            stats.in_flight -= 1
            stats.seconds += time.monotonic() - started
        self._unreachable = None
        return result

    async def open(self, options: dict[str, Any]) -> None:
        server = options["server"]
        self.host = server["host"]
        self.path = options["path"]
        if not posixpath.basename(self.path):
            raise BlockDriverError(f"Invalid path: {self.path}", errno.EINVAL)
        self._settings = _settings(options)
        self._closed = False
        nfs, (self._size, self._allocated) = await self._connect()
        self._install(nfs)

    async def _connect(self) -> tuple[NfsFile, tuple[int, int]]:
        """A new context, mounted and opened in an I/O thread (synchronous
        calls); returns it with (size, allocated), not yet in use."""
        export, name = posixpath.split(self.path)
        try:
            nfs = NfsFile()
        except NfsUnavailable as exc:
            raise BlockDriverError(str(exc), errno.ENOTSUP) from None
        writable = not self.node.read_only
        settings = self._settings

        def run() -> tuple[int, int]:
            # A failure closes the context here, on the thread using it.
            try:
                nfs.configure(**settings, timeout_ms=TIMEOUT_MS)
                nfs.mount(self.host, export or "/")
                nfs.open("/" + name, writable)
                return nfs.stat()
            except BaseException:
                nfs.close()
                raise

        job = asyncio.ensure_future(self.node.graph.run_io(run))
        try:
            result = await self._call(asyncio.shield(job))
        except asyncio.CancelledError:
            # The thread goes on with the context: closed once it is done.
            job.add_done_callback(lambda _: self._discard(job, nfs))
            raise
        return nfs, result

    def _discard(self, job: asyncio.Future[tuple[int, int]], nfs: NfsFile) -> None:
        if job.cancelled():
            return  # the loop is closing: the thread may still use it
        if job.exception() is None:  # else the job closed it
            closing = asyncio.ensure_future(self.node.graph.run_io(nfs.close))
            self._discarding.add(closing)
            closing.add_done_callback(self._discarding.discard)

    def _install(self, nfs: NfsFile) -> None:
        self._file = nfs
        self._async = AsyncContext(nfs, asyncio.get_running_loop())
        self._broken = False

    async def close(self) -> None:
        self._closed = True
        await self._swap(None)

    async def _swap(self, nfs: NfsFile | None) -> AsyncContext | None:
        """Put ``nfs`` (None: nothing) in place of the context in use, then
        close that one; returns the new context."""
        old_file, old = self._file, self._async
        if nfs is None:
            self._file, self._async = None, None
        else:
            self._install(nfs)
        new = self._async
        if old is not None:
            old.detach()
        if old_file is not None:
            await self.node.graph.run_io(old_file.close)
        return new

    def _usable(self) -> AsyncContext | None:
        ctx = self._async
        if ctx is None or self._broken or ctx.broken:
            return None
        return ctx

    async def _ready(self) -> AsyncContext:
        """The context, replaced first if it lost its server (libnfs does not
        reconnect): one reconnection at a time, whose context every request
        waiting for it uses; the old context is closed once the new one is open."""
        ctx = self._usable()
        if ctx is not None:
            return ctx
        async with self._reconnecting:
            ctx = self._usable()
            if ctx is not None:
                return ctx
            if self._closed:
                raise BlockDriverError("The NFS file is not open", errno.EBADF)
            self.stats.reconnects += 1
            nfs, _ = await self._connect()
            if self._closed:  # closed meanwhile
                await self.node.graph.run_io(nfs.close)
                raise BlockDriverError("The NFS file is not open", errno.EBADF)
            ctx = await self._swap(nfs)
            assert ctx is not None
            return ctx

    # --- I/O --------------------------------------------------------------------

    async def read(self, offset: int, length: int) -> bytes:
        # Past the size the node knows reads as zeros, as in QEMU's block
        # layer: what another client appended is seen after activation only.
        valid = max(0, min(length, self._size - offset))
        if valid == 0:
            return bytes(length)
        ctx = await self._ready()
        data = await self._call(ctx.pread(offset, valid), ctx)
        self.stats.read_bytes += valid
        return data if valid == length else data + bytes(length - valid)

    async def write(self, offset: int, data: bytes, fua: bool = False) -> None:
        ctx = await self._ready()
        await self._call(ctx.pwrite(offset, data), ctx)
        self.stats.written_bytes += len(data)
        self._gens.written += 1
        self._size = max(self._size, offset + len(data))
        if fua:
            await self.flush()

    async def flush(self) -> None:
        await self._gens.flush(self._fsync)

    async def _fsync(self) -> None:
        ctx = await self._ready()
        await self._call(ctx.fsync(), ctx)

    def has_pending_writes(self) -> bool:
        return self._gens.pending()

    def inactivate_now(self) -> bool:
        return not self._gens.pending()

    async def truncate(self, size: int) -> None:
        ctx = await self._ready()
        await self._call(ctx.truncate(size), ctx)
        self._gens.written += 1
        self._size = size

    async def block_status(self, offset: int, length: int) -> BlockStatus:
        # NFSv3 cannot tell holes: everything up to the end is data.
        end = min(offset + length, self._size)
        if offset >= end:
            return BlockStatus(length=length, data=False, zero=True, offset=offset)
        return BlockStatus(length=end - offset, data=True, zero=False, offset=offset)

    # --- activation ---------------------------------------------------------------

    async def invalidate_cache(self) -> None:
        ctx = await self._ready()
        ctx.nfs.invalidate_pagecache()  # memory only: no request to the server
        size, allocated = await self._call(ctx.stat(), ctx)
        self.stats.cache_invalidations += 1
        if self.refresh_size and size != self._size:
            self.stats.size_changes += 1
            self._size = size
        self._allocated = allocated

    # --- information ------------------------------------------------------------

    def readiness(self) -> str | None:
        return self._unreachable

    def driver_metrics(self) -> dict[str, float]:
        s = self.stats
        return {
            "requests_in_flight": s.in_flight,
            "requests": s.requests,
            "request_errors": s.errors,
            "request_seconds": s.seconds,
            "read_bytes": s.read_bytes,
            "written_bytes": s.written_bytes,
            "reconnects": s.reconnects,
            "cache_invalidations": s.cache_invalidations,
            "size_changes": s.size_changes,
            "server_reachable": 0 if self._unreachable else 1,
        }

    def size(self) -> int:
        return self._size

    def allocated_size(self) -> int | None:
        return self._allocated

    def image_info(self) -> dict[str, Any]:
        return {}  # QEMU's nfs driver has no format-specific info, nor a dirty flag

    def filename(self) -> str:
        return f"nfs://{self.host}{self.path}"

    def exact_filename(self) -> str:
        return self.filename()

    def filename_options(self) -> dict[str, Any]:
        return {"server": {"type": "inet", "host": self.host},
                "path": self.path}
