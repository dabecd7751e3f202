"""The asyncio NBD server: a listener and one protocol object per connection.

Everything protocol-shaped happens in :mod:`qmpd.nbd.protocol`; this module
moves bytes and runs the validated requests against the export
(:class:`qmpd.nbd.exports.NbdExport`).

Per connection:

* requests run concurrently (one task each) and are answered as soon as they
  finish, so replies may overtake each other (cookies match them up);
* at most :data:`MAX_IN_FLIGHT` requests and :data:`MAX_IN_FLIGHT_BYTES` of
  payload are in flight; beyond that, and whenever the client does not read
  its replies (the transport's write buffer is above its high-water mark),
  the server stops reading the socket.  So a connection's memory is bounded
  and a client that stops reading only ever stalls itself;
* a protocol violation (bad magic, unknown client flags, an option or WRITE
  too large to skip) closes the connection; an invalid request gets an error
  reply and the connection goes on, as with QEMU.

The listener accepts connections itself so that it can stop accepting while
``max-connections`` clients are connected (QEMU leaves further clients in the
listen backlog, and so does qmpd).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
import stat
from collections.abc import Callable
from typing import TYPE_CHECKING, cast

from qmpd.block.driver import BlockDriverError
from qmpd.errors import GenericError
from qmpd.nbd import protocol as p
from qmpd.nbd.config import FdAddr, InetAddr, ServerAddress, UnixAddr, VsockAddr

if TYPE_CHECKING:
    from qmpd.nbd.exports import BlockExports, NbdExport

log = logging.getLogger(__name__)

#: Requests one connection may have in flight (nbdcopy pipelines 64).
MAX_IN_FLIGHT = 64
#: Payload bytes (READ and WRITE lengths) one connection may have in flight;
#: a single request is always admitted, up to the protocol's 32 MiB.
MAX_IN_FLIGHT_BYTES = 64 * 1024 * 1024
#: Replies queued for a client before it counts as not reading.
WRITE_HIGH_WATER = 4 * 1024 * 1024
#: A client must finish its handshake within this many seconds.
HANDSHAKE_TIMEOUT = 10.0
#: How long a drain waits for in-flight requests and unread replies.
DRAIN_TIMEOUT = 5.0


class NbdFailure(Exception):
    """A request that failed: the NBD error value and QEMU's message."""

    def __init__(self, error: int, message: str) -> None:
        super().__init__(message)
        self.error = error
        self.message = message


_IO_MESSAGES = {
    p.Cmd.READ: "reading from file failed",
    p.Cmd.WRITE: "writing to file failed",
    p.Cmd.WRITE_ZEROES: "writing to file failed",
    p.Cmd.TRIM: "discard failed",
    p.Cmd.FLUSH: "flush failed",
    p.Cmd.CACHE: "caching failed",
    p.Cmd.BLOCK_STATUS: "can't get block status",
}


class NbdConnection(asyncio.Protocol):
    """One client: handshake, then transmission."""

    def __init__(self, server: NbdServer) -> None:
        self.server = server
        self.exports = server.exports
        self.handshake: p.ServerHandshake | None = p.ServerHandshake(server.exports)
        self.tx: p.Transmission | None = None
        self.replies = p.Replies(False)
        self.export: NbdExport | None = None
        self.transport: asyncio.Transport | None = None
        self.in_flight = 0
        self.in_flight_bytes = 0
        self.write_paused = False
        self.read_paused = False
        self.draining = False
        self.closed = False
        self._close_when_idle = False
        self._tasks: set[asyncio.Task[None]] = set()
        self._idle: asyncio.Event = asyncio.Event()
        self._idle.set()
        self._lost = asyncio.get_running_loop().create_future()
        self._timer: asyncio.TimerHandle | None = None
        self.peer = "?"

    # --- asyncio callbacks ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        stream = cast(asyncio.Transport, transport)
        self.transport = stream
        stream.set_write_buffer_limits(high=WRITE_HIGH_WATER)
        sock = stream.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
        self.peer = str(stream.get_extra_info("peername") or "unix")
        self.server.connections.add(self)
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(HANDSHAKE_TIMEOUT, self._handshake_timeout)
        assert self.handshake is not None
        stream.write(self.handshake.data_to_send())

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        try:
            if self.tx is not None:
                self.tx.receive_data(data)
                self._pump()
            elif self.handshake is not None:
                self.handshake.receive_data(data)
                self._pump_handshake()
        except Exception:  # a bug must not take the daemon down: drop this client
            log.exception("NBD client %s: internal error; disconnecting", self.peer)
            self._abort()

    def eof_received(self) -> bool | None:
        # The client will send nothing more: answer what it sent, then close.
        if self.tx is None or self.closed:
            return False
        self._close_when_idle = True
        self._pump()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._timer is not None:
            self._timer.cancel()
        self.server.connections.discard(self)
        if self.export is not None:
            self.export.connection_closed(self)
        if not self._lost.done():
            self._lost.set_result(None)
        self.server.connection_gone()

    def pause_writing(self) -> None:
        self.write_paused = True
        self._set_reading(False)

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.tx is not None:
            self._pump()
        elif self.handshake is not None:
            self._set_reading(True)
            self._pump_handshake()

    # --- handshake ------------------------------------------------------------------------

    def _handshake_timeout(self) -> None:
        if self.tx is None and not self.closed:
            log.info("NBD client %s: handshake timed out", self.peer)
            self._abort()

    def _pump_handshake(self) -> None:
        hs = self.handshake
        assert hs is not None and self.transport is not None
        while not self.write_paused:
            event = hs.next_event()
            out = hs.data_to_send()
            if out:
                self.transport.write(out)
            if isinstance(event, p.NeedData):
                return
            self.handshake = None
            if isinstance(event, p.HandshakeClosed):
                if event.graceful:
                    log.debug("NBD client %s: %s", self.peer, event.reason)
                    self.transport.close()
                else:
                    log.info("NBD client %s: %s; disconnecting", self.peer, event.reason)
                    self.server.exports.stats_protocol_error()
                    self._abort()
                return
            self._start_transmission(event)
            return
        self._set_reading(False)

    def _start_transmission(self, done: p.HandshakeDone) -> None:
        export = self.exports.export_by_name(done.export.name)
        if export is None:  # pragma: no cover - looked up in this very turn
            self._abort()
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.export = export
        export.connection_opened(self)
        self.replies = p.Replies(done.structured)
        self.tx = p.Transmission(
            export.size, bool(done.flags & p.TFlag.READ_ONLY), done.structured, done.contexts
        )
        if done.leftover:
            self.tx.receive_data(done.leftover)
        self._pump()

    # --- transmission ---------------------------------------------------------------------

    def _admit(self) -> bool:
        return (
            not self.draining
            and not self.write_paused
            and self.in_flight < MAX_IN_FLIGHT
            and self.in_flight_bytes < MAX_IN_FLIGHT_BYTES
        )

    def _pump(self) -> None:
        tx = self.tx
        assert tx is not None
        while self._admit():
            event = tx.next_event()
            if isinstance(event, p.Request):
                self._start(event)
            elif isinstance(event, p.NeedData):
                break
            elif isinstance(event, p.Rejected):
                self._rejected(event)
            elif isinstance(event, p.Disconnect):
                self._close_when_idle = True
                self.draining = True
            else:
                log.info("NBD client %s: %s; disconnecting", self.peer, event.reason)
                self.exports.stats_protocol_error()
                self._abort()
                return
        self._set_reading(self._admit() and not tx.finished)
        if self._close_when_idle and self.in_flight == 0 and self.transport is not None:
            self.transport.close()

    def _set_reading(self, on: bool) -> None:
        transport = self.transport
        if transport is None or self.closed or on != self.read_paused:
            return
        if on:
            transport.resume_reading()
            self.read_paused = False
        else:
            transport.pause_reading()
            self.read_paused = True

    def _rejected(self, event: p.Rejected) -> None:
        assert self.export is not None and self.transport is not None
        request = event.request
        self.export.count_error(request.command_name)
        self.transport.write(self.replies.error(request.cookie, event.error, event.message))
        if event.fatal:
            # The payload was not read: nothing after it can be parsed.
            log.info("NBD client %s: %s; disconnecting", self.peer, event.message)
            self.draining = True
            self._close_when_idle = True

    def _start(self, request: p.Request) -> None:
        self.in_flight += 1
        size = request.length if request.type in (p.Cmd.READ, p.Cmd.WRITE) else 0
        self.in_flight_bytes += size
        self._idle.clear()
        task = asyncio.get_running_loop().create_task(self._execute(request, size))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _execute(self, request: p.Request, size: int) -> None:
        export = self.export
        assert export is not None
        try:
            parts = await self._run(export, request)
        except NbdFailure as exc:
            export.count_error(request.command_name)
            parts = [self.replies.error(request.cookie, exc.error, exc.message)]
        except BlockDriverError as exc:
            export.count_error(request.command_name)
            message = _IO_MESSAGES.get(p.Cmd(request.type), "request failed")
            log.debug("NBD %s on export %s: %s", request.command_name, export.id, exc)
            parts = [self.replies.error(request.cookie, p.errno_to_nbd(exc.errno), message)]
        except Exception:
            export.count_error(request.command_name)
            log.exception("NBD %s on export %s failed", request.command_name, export.id)
            message = _IO_MESSAGES.get(p.Cmd(request.type), "request failed")
            parts = [self.replies.error(request.cookie, p.Errno.EIO, message)]
        finally:
            self.in_flight -= 1
            self.in_flight_bytes -= size
        transport = self.transport
        if transport is not None and not self.closed:
            if len(parts) == 1:
                transport.write(parts[0])
            elif sum(len(x) for x in parts) <= 65536:
                transport.write(b"".join(parts))
            else:
                for part in parts:
                    transport.write(part)
        if self.in_flight == 0:
            self._idle.set()
        if not self.closed and self.tx is not None:
            self._pump()

    async def _run(self, export: NbdExport, request: p.Request) -> list[bytes]:
        kind = request.type
        cookie = request.cookie
        flags = request.flags
        if kind == p.Cmd.READ:
            pieces = await export.read(
                request.offset, request.length,
                sparse=self.replies.structured and not flags & p.CmdFlag.DF,
            )
            return self.replies.read_parts(cookie, request.offset, pieces)
        if kind == p.Cmd.WRITE:
            assert request.payload is not None
            await export.write(request.offset, request.payload, bool(flags & p.CmdFlag.FUA))
        elif kind == p.Cmd.WRITE_ZEROES:
            await export.write_zeroes(
                request.offset, request.length,
                no_hole=bool(flags & p.CmdFlag.NO_HOLE),
                fast=bool(flags & p.CmdFlag.FAST_ZERO),
                fua=bool(flags & p.CmdFlag.FUA),
            )
        elif kind == p.Cmd.TRIM:
            await export.trim(request.offset, request.length, bool(flags & p.CmdFlag.FUA))
        elif kind == p.Cmd.FLUSH:
            await export.flush()
        elif kind == p.Cmd.CACHE:
            await export.cache(request.offset, request.length)
        elif kind == p.Cmd.BLOCK_STATUS:
            assert self.tx is not None
            per_context = await export.block_status(
                request.offset, request.length, bool(flags & p.CmdFlag.REQ_ONE),
                self.tx.contexts,
            )
            return [self.replies.block_status(cookie, per_context)]
        return [self.replies.ok(cookie)]

    # --- shutdown -------------------------------------------------------------------------

    def _abort(self) -> None:
        self.draining = True
        if self.transport is not None and not self.closed:
            self.transport.abort()

    async def drain(self, timeout: float = DRAIN_TIMEOUT) -> None:
        """Stop taking requests, answer those in flight, flush replies, close."""
        self.draining = True
        self._set_reading(False)
        if self.transport is None or self.closed:
            return
        if self.tx is None:  # still negotiating: nothing to finish
            self._abort()
            await self._lost
            return
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
            self.transport.close()  # sends what is queued first
            await asyncio.wait_for(asyncio.shield(self._lost), timeout)
        except TimeoutError:
            log.warning("NBD client %s did not finish in %.0f s; dropped", self.peer, timeout)
            self._abort()
            await self._lost


class NbdServer:
    """The daemon's NBD server: one listening socket, any number of exports."""

    def __init__(
        self, exports: BlockExports, address: ServerAddress, max_connections: int = 0
    ) -> None:
        self.exports = exports
        self.address = address
        self.max_connections = max_connections
        self.connections: set[NbdConnection] = set()
        self.sock: socket.socket | None = None
        self.bound = str(address)
        self._accept_task: asyncio.Task[None] | None = None
        self._slot_free = asyncio.Event()
        self._unlink_path: str | None = None

    @property
    def multi_conn(self) -> bool:
        """Every connection goes through the same node: FLUSH/FUA are global."""
        return self.max_connections != 1

    async def start(self) -> None:
        self.sock = bind(self.address)
        if isinstance(self.address, UnixAddr) and not self.address.abstract:
            self._unlink_path = self.address.path
        elif isinstance(self.address, InetAddr):
            host, port = self.sock.getsockname()[:2]
            self.bound = str(InetAddr(host, str(port)))
        self._accept_task = asyncio.get_running_loop().create_task(self._accept_loop())

    def connection_gone(self) -> None:
        self._slot_free.set()

    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        assert self.sock is not None
        listener = self.sock
        while True:
            while self.max_connections and len(self.connections) >= self.max_connections:
                self._slot_free.clear()
                await self._slot_free.wait()
            try:
                conn, _addr = await loop.sock_accept(listener)
            except asyncio.CancelledError:
                raise
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    log.warning("NBD server: cannot accept: %s", exc.strerror)
                    await asyncio.sleep(0.1)
                    continue
                if listener.fileno() < 0:
                    return
                log.warning("NBD server: accept failed: %s", exc)
                continue
            try:
                await loop.connect_accepted_socket(lambda: NbdConnection(self), conn)
            except OSError as exc:  # pragma: no cover - the client went away at once
                log.debug("NBD server: connection setup failed: %s", exc)
                conn.close()

    def stop_listening(self) -> None:
        """Close the listening socket (synchronously); connections stay."""
        if self._accept_task is not None:
            self._accept_task.cancel()
            self._accept_task = None
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        if self._unlink_path is not None:
            _unlink_socket(self._unlink_path)
            self._unlink_path = None

    def abort_negotiating(self) -> None:
        """Drop clients that have not reached an export yet."""
        for conn in list(self.connections):
            if conn.export is None:
                conn._abort()

    async def close(self) -> None:
        self.stop_listening()
        conns = list(self.connections)
        await asyncio.gather(*(c.drain() for c in conns), return_exceptions=True)


# --- binding ------------------------------------------------------------------------------


def bind(address: ServerAddress) -> socket.socket:
    """A listening, non-blocking socket at ``address``; GenericError in QEMU's words."""
    if isinstance(address, UnixAddr):
        return _bind_unix(address)
    if isinstance(address, InetAddr):
        return _bind_inet(address)
    if isinstance(address, VsockAddr):
        return _bind_vsock(address)
    assert isinstance(address, FdAddr)
    raise GenericError("only QEMU supports file descriptor passing")


_UNIX_PATH_MAX = 108


def _bind_unix(address: UnixAddr) -> socket.socket:
    path = address.path
    if len(path.encode()) >= _UNIX_PATH_MAX:
        raise GenericError(f"UNIX socket path '{path}' is too long")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        if address.abstract:
            name = b"\0" + path.encode()
            if not address.tight:
                name = name.ljust(_UNIX_PATH_MAX, b"\0")
            sock.bind(name)
        else:
            _unlink_socket(path)
            sock.bind(path)
        sock.listen(128)
    except OSError as exc:
        sock.close()
        raise GenericError(f"Failed to bind socket to {path}: {exc.strerror}") from None
    sock.setblocking(False)
    return sock


def _bind_inet(address: InetAddr) -> socket.socket:
    family = socket.AF_UNSPEC
    if address.ipv4 and not address.ipv6:
        family = socket.AF_INET
    elif address.ipv6 and not address.ipv4:
        family = socket.AF_INET6
    flags = socket.AI_PASSIVE | (socket.AI_NUMERICHOST if address.numeric else 0)
    try:
        infos = socket.getaddrinfo(
            address.host or None, address.port, family, socket.SOCK_STREAM, 0, flags
        )
    except socket.gaierror as exc:
        raise GenericError(
            f"address resolution failed for {address.host}:{address.port}: {exc.strerror}"
        ) from None
    last: OSError | None = None
    for fam, kind, proto, _canon, sockaddr in infos:
        try:
            sock = socket.socket(fam, kind, proto)
        except OSError as exc:
            last = exc
            continue
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if fam == socket.AF_INET6 and address.ipv4 is not False and address.ipv6 is None:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            sock.bind(sockaddr)
            sock.listen(128)
        except OSError as exc:
            sock.close()
            if exc.errno != errno.EADDRINUSE:
                raise GenericError(f"Failed to bind socket: {exc.strerror}") from None
            last = exc
            continue
        sock.setblocking(False)
        return sock
    if last is not None and last.errno == errno.EADDRINUSE:
        raise GenericError("Failed to find an available port: Address already in use")
    strerror = last.strerror if last is not None else "no address"
    raise GenericError(f"Failed to create a socket: {strerror}")


def _bind_vsock(address: VsockAddr) -> socket.socket:
    try:
        cid, port = int(address.cid), int(address.port)
    except ValueError:
        raise GenericError(f"Invalid CID '{address.cid}' or port '{address.port}'") from None
    family = getattr(socket, "AF_VSOCK", None)
    if family is None:  # pragma: no cover - Linux has it
        raise GenericError("Failed to create socket: Address family not supported by protocol")
    try:
        sock = socket.socket(family, socket.SOCK_STREAM)
    except OSError as exc:
        raise GenericError(f"Failed to create socket: {exc.strerror}") from None
    try:
        sock.bind((cid, port))
        sock.listen(128)
    except OSError as exc:
        sock.close()
        raise GenericError(f"Failed to bind socket: {exc.strerror}") from None
    sock.setblocking(False)
    return sock


def _unlink_socket(path: str) -> None:
    """Remove a stale socket at ``path``; never anything that is not a socket."""
    try:
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)
    except OSError:
        pass


ConnectionFactory = Callable[[], NbdConnection]
