"""The ``nbd`` protocol driver: a node whose data is an export of an NBD server.

Built on :class:`qmpd.nbd.client.NbdClient` (pipelined requests, structured
replies, ``base:allocation``), with QEMU 7.2's options and behaviour:

* ``server`` is a flat SocketAddress (opened by :mod:`qmpd.net`), ``export``
  the export's name (default ``""``);
* ``reconnect-delay``: when the connection drops, a background task
  reconnects; requests wait up to that many seconds for it, then fail with
  EIO, as do all requests while disconnected after that (0: at once);
  requests interrupted by the drop are sent again on the new connection;
* ``open-timeout``: blockdev-add retries connecting for that many seconds;
* ``x-dirty-bitmap``: block status reports that meta context instead of
  ``base:allocation`` (its dirty bit reads as a hole, as in QEMU);
* ``tls-creds`` (a ``tls-creds-x509`` object with ``endpoint=client``) and
  ``tls-hostname``: NBD_OPT_STARTTLS, then everything over TLS; the server's
  certificate is checked against ``tls-hostname``, by default the host of a
  TCP address (a UNIX socket needs it, or ``verify-peer=off``); the object
  is held while the node is open, so object-del refuses it.

The node takes no image locks and caches no mutable metadata: the default
permission, inactivation and invalidation hooks fit.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import ssl
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from qmpd import net
from qmpd.block.driver import BlockDriver, BlockDriverError, BlockNode, BlockStatus
from qmpd.errors import QMPError
from qmpd.nbd import protocol as p
from qmpd.nbd.client import NbdClient, NbdError, NbdOptionError, NbdTlsError
from qmpd.objects.tls import TlsCredsX509

log = logging.getLogger(__name__)

T = TypeVar("T")

#: QEMU's NBD_MAX_BUFFER_SIZE: the largest read or write sent in one request.
MAX_REQUEST = 32 * 1024 * 1024
#: Largest block-status and zero/trim request (below 4 GiB, 512-aligned).
MAX_STATUS = (1 << 31) - 512
#: Pause between reconnection attempts: doubling from the first to the last
#: (shorter than QEMU's, and a waiting request cuts it short).
RETRY_FIRST, RETRY_MAX = 0.05, 1.0
#: Pause between attempts within open-timeout: QEMU's connection thread's
#: (so a timeout during a pause reports the last attempt's error, as there).
OPEN_RETRY_FIRST, OPEN_RETRY_MAX = 1.0, 16.0

_HOLE, _ZERO = 1, 2


def _eio(what: str = "Input/output error") -> BlockDriverError:
    return BlockDriverError(what, errno.EIO)


class NbdDriver(BlockDriver):
    """An NBD client node."""

    format_name = "nbd"
    is_protocol = True

    def __init__(self, node: BlockNode) -> None:
        super().__init__(node)
        self.address: net.SocketAddress = net.UnixAddress("")
        self.server: dict[str, Any] = {}
        self.export: str | None = None
        self.bitmap: str | None = None
        self.reconnect_delay = 0
        self._client: NbdClient | None = None
        self._size = 0
        self._flags = 0
        self._max_block = MAX_REQUEST
        self._context = p.BASE_ALLOCATION
        self._closing = False
        #: Set while connected; cleared when the connection drops.
        self._connected = asyncio.Event()
        #: When requests stop waiting for a reconnection (monotonic time).
        self._wait_until = 0.0
        self._reconnector: asyncio.Task[None] | None = None
        #: Shutting down: requests no longer wait for a reconnection.
        self._no_wait = False
        self._retry_now = asyncio.Event()
        self._tls: ssl.SSLContext | None = None
        self._tls_hostname: str | None = None
        self._tls_creds: TlsCredsX509 | None = None

    # --- opening and closing --------------------------------------------------------

    async def open(self, options: dict[str, Any]) -> None:
        self.server = options["server"]
        self.address = net.parse_socket_address(self.server)
        self.export = options.get("export")
        creds = options.get("tls-creds")
        if creds is not None:
            try:
                tls = self.node.graph.objects.tls_creds(creds, "client")
                self._tls_hostname = options.get("tls-hostname")
                host = self.address.host if isinstance(self.address, net.InetAddress) else None
                self._tls = tls.client_context(self._tls_hostname or host)
            except QMPError as exc:
                raise BlockDriverError(exc.desc, errno.EINVAL) from None
        self.bitmap = options.get("x-dirty-bitmap")
        if self.bitmap is not None:
            self._context = self.bitmap
        self.reconnect_delay = options.get("reconnect-delay", 0)
        client = await self._open_connection(options.get("open-timeout", 0))
        try:
            self._check_export(client, options)
        except BaseException:
            await client.disconnect(0)
            raise
        if creds is not None:
            self._tls_creds = self.node.graph.objects.tls_creds(creds)
            self.node.graph.objects.hold(self._tls_creds, f"nbd node {self.node.node_name}")
        self._install(client)

    async def _open_connection(self, timeout: int) -> NbdClient:
        """The first connection; with an open timeout, attempts are repeated
        until it expires, then the last one's error is reported (QEMU 7.2)."""
        if not timeout:
            return await self._connect()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        pause = OPEN_RETRY_FIRST
        while True:
            try:
                return await asyncio.wait_for(self._connect(), deadline - loop.time())
            except TimeoutError:
                raise BlockDriverError("Connection attempt cancelled by timeout",
                                       errno.ETIMEDOUT) from None
            except BlockDriverError:
                if deadline - loop.time() <= pause:  # it expires during the pause
                    await asyncio.sleep(max(deadline - loop.time(), 0))
                    raise
                await asyncio.sleep(pause)
                pause = min(pause * 2, OPEN_RETRY_MAX)

    async def _connect(self) -> NbdClient:
        """A connection to the export; QEMU's texts for what may fail."""
        try:
            return await NbdClient.connect(
                self.address, self.export or "", contexts=(self._context,),
                tls=self._tls, tls_hostname=self._tls_hostname)
        except net.ConnectFailed as exc:
            raise BlockDriverError(str(exc), exc.errno or errno.EIO) from None
        except NbdTlsError as exc:
            raise BlockDriverError(str(exc)) from None
        except NbdOptionError as exc:
            raise BlockDriverError(exc.qemu_text(), errno.EINVAL) from None
        except (asyncio.IncompleteReadError, OSError, p.ProtocolError) as exc:
            raise BlockDriverError(f"Failed to read initial magic: {exc}") from None

    def _check_export(self, client: NbdClient, options: dict[str, Any]) -> None:
        # QEMU 7.2 loses these two errors' texts (nbd_handle_updated_info):
        # only the errno reaches blockdev-add.
        if self.bitmap is not None and self.bitmap not in client.info.contexts.values():
            raise BlockDriverError("Could not open image: Invalid argument", errno.EINVAL)
        if client.flags & p.TFlag.READ_ONLY and not self.node.read_only:
            if not options.get("_auto_read_only"):
                raise BlockDriverError("Could not open image: Permission denied", errno.EACCES)
            self.node.read_only = True

    def _install(self, client: NbdClient) -> None:
        """Take ``client`` as the connection (at open and after reconnecting)."""
        info = client.info
        self._client = client
        self._size = info.size
        self._flags = info.flags
        max_block = info.block_size[2] if info.block_size else 0
        self._max_block = min(max_block or MAX_REQUEST, MAX_REQUEST)
        self._connected.set()
        client.lost.add_done_callback(lambda _f: self._lost(client))

    def _lost(self, client: NbdClient) -> None:
        """The connection dropped (or was closed): start reconnecting."""
        if client is not self._client or self._closing:
            return
        log.warning("nbd node %s: connection to %s lost", self.node.node_name, self.address)
        self._client = None
        self._connected.clear()
        self._wait_until = time.monotonic() + (0 if self._no_wait else self.reconnect_delay)
        if self._reconnector is None or self._reconnector.done():
            self._reconnector = asyncio.get_running_loop().create_task(self._reconnect())

    async def _reconnect(self) -> None:
        pause = RETRY_FIRST
        while not self._closing:
            try:
                client = await self._connect()
            except BlockDriverError as exc:
                log.debug("nbd node %s: reconnecting: %s", self.node.node_name, exc)
            else:
                if self._closing:
                    await client.disconnect(0)
                    return
                if client.size != self._size:
                    # QEMU 7.2 refuses an export whose size changed under the node.
                    log.warning("nbd node %s: export size changed", self.node.node_name)
                    await client.disconnect(0)
                else:
                    log.info("nbd node %s: reconnected", self.node.node_name)
                    self._install(client)
                    return
            self._retry_now.clear()
            try:
                await asyncio.wait_for(self._retry_now.wait(), pause)
                pause = RETRY_FIRST
            except TimeoutError:
                pause = min(pause * 2, RETRY_MAX)

    def stop_waiting(self) -> None:
        self._no_wait = True
        self._wait_until = 0.0
        if self._client is None:
            self._connected.set()  # wakes the waiters, who find no connection: EIO

    async def close(self) -> None:
        self._closing = True
        if self._tls_creds is not None:
            self.node.graph.objects.release(self._tls_creds, f"nbd node {self.node.node_name}")
            self._tls_creds = None
        if self._reconnector is not None:
            self._reconnector.cancel()
        client, self._client = self._client, None
        self._connected.clear()
        if client is not None:
            await client.disconnect(0)

    # --- requests --------------------------------------------------------------------

    async def _usable(self) -> NbdClient:
        """The connection, waiting for a reconnection while reconnect-delay allows."""
        client = self._client
        while client is None and not self._closing:
            self._retry_now.set()
            left = self._wait_until - time.monotonic()
            if left <= 0:
                break
            try:
                await asyncio.wait_for(self._connected.wait(), left)
            except TimeoutError:
                break
            client = self._client
        if client is None:
            raise _eio()
        return client

    async def _request(self, send: Callable[[NbdClient], Awaitable[T]]) -> T:
        """One request; sent again on a new connection if this one drops, as
        long as requests wait for reconnection (QEMU's nbd_co_request)."""
        while True:
            client = await self._usable()
            try:
                return await send(client)
            except NbdError as exc:
                code = exc.errno or errno.EIO
                raise BlockDriverError(os.strerror(code), code) from None
            except (ConnectionError, p.ProtocolError):
                self._lost(client)  # now, not when the reader's callback runs
                client.close()
                if time.monotonic() >= self._wait_until:
                    raise _eio() from None

    async def read(self, offset: int, length: int) -> bytes:
        if length <= self._max_block:
            return await self._request(lambda c: c.read(offset, length))
        parts = await asyncio.gather(*(
            self._read_part(o, min(self._max_block, offset + length - o))
            for o in range(offset, offset + length, self._max_block)))
        return b"".join(parts)

    async def read_into(self, offset: int, buf: memoryview) -> None:
        step = self._max_block
        if buf.nbytes <= step:
            await self._request(lambda c: c.read_into(offset, buf))
            return
        await asyncio.gather(*(self._read_into_part(offset + o, buf[o:o + step])
                               for o in range(0, buf.nbytes, step)))

    async def _read_into_part(self, offset: int, buf: memoryview) -> None:
        await self._request(lambda c: c.read_into(offset, buf))

    async def write_view(self, offset: int, view: memoryview, fua: bool = False) -> None:
        if fua and not self._flags & p.TFlag.SEND_FUA:
            await self.write_view(offset, view)
            await self.flush()
            return
        step = self._max_block
        if view.nbytes <= step:
            await self._request(lambda c: c.write(offset, view, fua))
            return
        await asyncio.gather(*(self._write_view_part(offset + o, view[o:o + step], fua)
                               for o in range(0, view.nbytes, step)))

    async def _write_view_part(self, offset: int, view: memoryview, fua: bool) -> None:
        await self._request(lambda c: c.write(offset, view, fua))

    async def _read_part(self, offset: int, length: int) -> bytes:
        return await self._request(lambda c: c.read(offset, length))

    async def _write_part(self, offset: int, data: bytes, fua: bool) -> None:
        await self._request(lambda c: c.write(offset, data, fua))

    async def write(self, offset: int, data: bytes, fua: bool = False) -> None:
        if fua and not self._flags & p.TFlag.SEND_FUA:
            await self.write(offset, data)
            await self.flush()
            return
        step = self._max_block
        if len(data) <= step:
            await self._write_part(offset, data, fua)  # no copy: the usual case
            return
        view = memoryview(data)
        await asyncio.gather(*(
            self._write_part(offset + o, bytes(view[o:o + step]), fua)
            for o in range(0, len(data), step)))

    async def write_zeroes(
        self, offset: int, length: int, may_unmap: bool = False, fua: bool = False
    ) -> None:
        if not self._flags & p.TFlag.SEND_WRITE_ZEROES:
            step = self._max_block
            for start in range(offset, offset + length, step):
                await self.write(start, bytes(min(step, offset + length - start)), fua)
            return
        flags = 0 if may_unmap else p.CmdFlag.NO_HOLE
        if fua:
            if not self._flags & p.TFlag.SEND_FUA:
                await self.write_zeroes(offset, length, may_unmap)
                await self.flush()
                return
            flags |= p.CmdFlag.FUA
        for start in range(offset, offset + length, MAX_STATUS):
            size = min(MAX_STATUS, offset + length - start)
            await self._zero_part(start, size, flags)

    async def discard(self, offset: int, length: int) -> None:
        if not self._flags & p.TFlag.SEND_TRIM:
            return
        for start in range(offset, offset + length, MAX_STATUS):
            size = min(MAX_STATUS, offset + length - start)
            await self._trim_part(start, size)

    async def _zero_part(self, offset: int, length: int, flags: int) -> None:
        await self._request(lambda c: c.write_zeroes(offset, length, flags))

    async def _trim_part(self, offset: int, length: int) -> None:
        await self._request(lambda c: c.trim(offset, length))

    async def flush(self) -> None:
        if self._flags & p.TFlag.SEND_FLUSH:
            await self._request(lambda c: c.flush())

    async def block_status(self, offset: int, length: int) -> BlockStatus:
        length = min(length, MAX_STATUS, self._size - offset)
        if length <= 0:
            return BlockStatus(length=0, data=True, zero=False)
        result = await self._request(lambda c: self._status(c, offset, length))
        if result is None:
            return BlockStatus(length=length, data=True, zero=False)
        size, flags = result
        data, zero = not flags & _HOLE, bool(flags & _ZERO)
        return BlockStatus(length=max(1, min(size, length)), data=data, zero=zero,
                           allocated=data or zero, offset=offset)

    async def _status(
        self, client: NbdClient, offset: int, length: int
    ) -> tuple[int, int] | None:
        """The first extent in the negotiated context; None without one (all data)."""
        if self._context not in client.info.contexts.values():
            return None
        extents = (await client.block_status(offset, length, req_one=True)).get(self._context)
        if not extents:
            raise NbdError(errno.EIO, "Server did not reply with any status extents")
        return extents[0]

    # --- information -----------------------------------------------------------------

    def size(self) -> int:
        return self._size

    def filename(self) -> str:
        return self.exact_filename()

    def exact_filename(self) -> str:
        """nbd_refresh_filename: a URI when the address can be one, else ""."""
        address = self.address
        export = self.export
        if isinstance(address, net.UnixAddress):
            tail = f"/{export}" if export is not None else ""
            return f"nbd+unix://{tail}?socket={address.path}"
        if isinstance(address, net.InetAddress):
            if any(key in self.server for key in ("ipv4", "ipv6", "to")):
                return ""
            tail = f"/{export}" if export is not None else ""
            return f"nbd://{address.host}:{address.port}{tail}"
        return ""

    def filename_options(self) -> dict[str, Any]:
        # QEMU's strong options: every server.* key (flattened), the export
        # and the TLS settings.
        options: dict[str, Any] = {f"server.{k}": v for k, v in self.server.items()}
        for key in ("export", "tls-creds", "tls-hostname"):
            if key in self.node.options:
                options[key] = self.node.options[key]
        return options
