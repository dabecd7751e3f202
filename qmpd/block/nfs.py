"""The ``nfs`` protocol driver: a file on an NFSv3 server, through libnfs.

Each node owns one libnfs context.  Mount and open are synchronous libnfs
calls in an I/O thread; after that every request goes through libnfs's
asynchronous API on the event loop, as QEMU drives it (the context's socket
watched for ``nfs_which_events``, ``nfs_service`` on each event), so a slow
server never blocks the loop and many requests are in flight at once.
Activation drops libnfs's page cache and asks the server for the file's
size again: a migration source may have grown the file (QEMU 7.2 keeps the
old size; README: differences).
"""

from __future__ import annotations

import asyncio
import errno
import posixpath
import time
from collections.abc import Awaitable
from typing import Any, TypeVar

from qmpd.block.accounting import WriteGenerations
from qmpd.block.driver import BlockDriver, BlockDriverError, BlockStatus
from qmpd.block.libnfs import AsyncContext, NfsError, NfsFile, NfsUnavailable

T = TypeVar("T")

#: How long one libnfs call may wait for the server (ms): an unreachable
#: server fails blockdev-add, and a vanished one fails requests, in bounded time.
TIMEOUT_MS = 10_000


#: Errors about the file itself, which say nothing of the server's health.
_FILE_ERRORS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES,
                          errno.EPERM, errno.EINVAL, errno.ENOENT, errno.EISDIR, errno.EBADF})


def _driver_error(exc: OSError) -> BlockDriverError:
    return BlockDriverError(str(exc.strerror or exc), exc.errno or errno.EIO)


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
        self._options: dict[str, Any] = {}
        #: The context lost its server: the next request connects anew.
        self._broken = False
        self.stats = NfsStats()

    async def _call(self, request: Awaitable[T]) -> T:
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
                self._broken = self._async is not None
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
        self._options = options
        self._size, self._allocated = await self._connect()

    async def _connect(self) -> tuple[int, int]:
        """A new context: mount and open in an I/O thread (synchronous calls),
        then the asynchronous API on the loop.  Returns (size, allocated)."""
        options = self._options
        export, name = posixpath.split(self.path)
        try:
            nfs = NfsFile()
        except NfsUnavailable as exc:
            raise BlockDriverError(str(exc), errno.ENOTSUP) from None
        writable = not self.node.read_only

        def run() -> tuple[int, int]:
            nfs.configure(uid=options.get("user"), gid=options.get("group"),
                          syncnt=options.get("tcp-syn-count"),
                          readahead=options.get("readahead-size"),
                          pagecache=options.get("page-cache-size"),
                          debug=options.get("debug"), timeout_ms=TIMEOUT_MS)
            nfs.mount(self.host, export or "/")
            nfs.open("/" + name, writable)
            return nfs.stat()

        try:
            result = await self._call(self.node.graph.run_io(run))
        except BaseException:
            await self.node.graph.run_io(nfs.close)
            raise
        self._file = nfs
        self._async = AsyncContext(nfs, asyncio.get_running_loop())
        return result

    async def close(self) -> None:
        nfs, self._file = self._file, None
        ctx, self._async = self._async, None
        if ctx is not None:
            ctx.detach()
        if nfs is not None:
            await self.node.graph.run_io(nfs.close)

    def _nfs(self) -> AsyncContext:
        if self._async is None:
            raise BlockDriverError("The NFS file is not open", errno.EBADF)
        return self._async

    async def _ready(self) -> AsyncContext:
        """The context, connected again first if the server was lost (libnfs
        gives up on a context whose reconnection failed)."""
        if self._broken:
            await self.close()
            self._broken = False
            self.stats.reconnects += 1
            await self._connect()
        return self._nfs()

    # --- I/O --------------------------------------------------------------------

    async def read(self, offset: int, length: int) -> bytes:
        # Past the size the node knows reads as zeros, as in QEMU's block
        # layer: what another client appended is seen after activation only.
        valid = max(0, min(length, self._size - offset))
        if valid == 0:
            return bytes(length)
        data = await self._call((await self._ready()).pread(offset, valid))
        self.stats.read_bytes += valid
        return data if valid == length else data + bytes(length - valid)

    async def write(self, offset: int, data: bytes, fua: bool = False) -> None:
        await self._call((await self._ready()).pwrite(offset, data))
        self.stats.written_bytes += len(data)
        self._gens.written += 1
        self._size = max(self._size, offset + len(data))
        if fua:
            await self.flush()

    async def flush(self) -> None:
        await self._gens.flush(self._fsync)

    async def _fsync(self) -> None:
        await self._call((await self._ready()).fsync())

    def has_pending_writes(self) -> bool:
        return self._gens.pending()

    def inactivate_now(self) -> bool:
        return not self._gens.pending()

    async def truncate(self, size: int) -> None:
        await self._call((await self._ready()).truncate(size))
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
        size, allocated = await self._call(ctx.stat())
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
