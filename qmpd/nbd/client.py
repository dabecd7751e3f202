"""A small asyncio NBD client, for tests and tooling, and for the coming ``nbd``
block driver (issue 12): that is why it lives here and not under tests/.

It depends on the sans-IO :mod:`qmpd.nbd.protocol` package and on
:mod:`qmpd.net` (which opens every socket, with QEMU's texts) only, never on
the server or the exports (tests/unit/test_nbd_layers.py checks it), so that
the block layer's ``nbd`` driver may use it.

It speaks the fixed newstyle handshake (structured replies, meta contexts,
NBD_OPT_GO with NBD_INFO_BLOCK_SIZE, NBD_OPT_LIST, NBD_OPT_INFO) and
pipelines requests: every command is a coroutine, any number may be in
flight, and replies are matched by cookie in whatever order they come.

::

    async with await NbdClient.connect("nbd+unix:///disk?socket=/run/nbd.sock") as c:
        data = await c.read(0, 4096)
        await c.write(0, b"x" * 512, fua=True)
        extents = await c.block_status(0, c.size)

Errors from the server raise :class:`NbdError` (``errno`` is the NBD error
value, ``message`` the text of a structured error chunk).

With ``tls`` (an ``ssl`` client context, from a ``tls-creds-x509`` object)
the client sends NBD_OPT_STARTTLS first and haggles over TLS; what goes
wrong there raises :class:`NbdTlsError` with QEMU 7.2's client texts.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import os
import socket
import ssl
import urllib.parse
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import TracebackType

from qmpd import net
from qmpd.nbd import protocol as p
from qmpd.nbd.protocol.options import option_name

#: The piece a large request's payload is handed to the transport in (TLS).
_PIECE = 256 << 10
#: Buffers per sendmsg when the socket could not take everything at once.
_IOV_BATCH = 64


class NbdError(Exception):
    """A request or option the server refused."""

    def __init__(self, errno: int, message: str = "") -> None:
        super().__init__(f"NBD error {errno}: {message}" if message else f"NBD error {errno}")
        self.errno = errno
        self.message = message


class NbdOptionError(NbdError):
    """An option answered with an NBD_REP_ERR_* reply (``errno`` is the reply type)."""

    def __init__(self, errno: int, message: str = "", option: int = 0) -> None:
        super().__init__(errno, message)
        self.option = option

    def qemu_text(self) -> str:
        """What QEMU 7.2's client reports for this reply (nbd_handle_reply_err;
        the server's message is only a hint there, not part of the error)."""
        if self.errno == p.Rep.ERR_UNKNOWN:
            return "Requested export not available"
        what = _OPTION_ERRORS.get(self.errno, "Unknown error code when asking for")
        return f"{what} option {self.option} ({option_name(self.option)})"


class NbdTlsError(Exception):
    """TLS could not be set up, or the server dropped us over it (QEMU's text)."""


#: What QEMU's client reads in GnuTLS's verdict on a certificate (the same
#: crypto/tlssession.c check runs on both ends): GnuTLS marks an expired or
#: not yet valid certificate "invalid", which QEMU words as not trusted.
_VERIFY_REASONS = {
    2: "The certificate hasn't got a known issuer",
    9: "The certificate is not trusted",
    10: "The certificate is not trusted",
    19: "The certificate hasn't got a known issuer",
    20: "The certificate hasn't got a known issuer",
    21: "The certificate hasn't got a known issuer",
    23: "The certificate has been revoked",
}
#: QEMU's client when the server drops the connection after the TLS handshake
#: (its authz check, or its verdict on our certificate).
TLS_DROPPED = "Failed to read option reply: Cannot read from TLS channel: Input/output error"


def tls_failure_reason(exc: BaseException, hostname: str | None = None) -> str:
    """Why a TLS handshake failed, in QEMU's words where it has them."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        if exc.verify_code == 62 and hostname is not None:  # hostname mismatch
            return f"Certificate does not match the hostname {hostname}"
        reason = _VERIFY_REASONS.get(exc.verify_code)
        if reason is not None:
            return reason
    if isinstance(exc, ssl.SSLError):
        text = exc.reason or ""
        if "PEER_DID_NOT_RETURN_A_CERTIFICATE" in text or "CERTIFICATE_REQUIRED" in text:
            return "Verify failed: No certificate was found."
    return net.tls_reason(exc)


_OPTION_ERRORS: dict[int, str] = {
    p.Rep.ERR_POLICY: "Denied by server for",
    p.Rep.ERR_INVALID: "Invalid parameters for",
    p.Rep.ERR_PLATFORM: "Server lacks support for",
    p.Rep.ERR_TLS_REQD: "TLS negotiation required before",
    p.Rep.ERR_SHUTDOWN: "Server shutting down before",
    p.Rep.ERR_BLOCK_SIZE_REQD: "Server requires INFO_BLOCK_SIZE for",
}


@dataclass(frozen=True)
class Address:
    """Where an NBD server listens: a UNIX socket path or a TCP host and port."""

    path: str | None = None
    host: str | None = None
    port: int = p.DEFAULT_PORT


def parse_uri(uri: str) -> tuple[Address, str]:
    """``nbd://host[:port]/name`` or ``nbd+unix:///name?socket=PATH`` -> (address, name)."""
    parsed = urllib.parse.urlsplit(uri)
    name = urllib.parse.unquote(parsed.path[1:] if parsed.path.startswith("/") else parsed.path)
    if parsed.scheme == "nbd+unix":
        query = urllib.parse.parse_qs(parsed.query)
        if "socket" not in query:
            raise ValueError(f"{uri}: nbd+unix needs ?socket=PATH")
        return Address(path=query["socket"][0]), name
    if parsed.scheme in ("nbd", "nbd+tcp"):
        host = parsed.hostname or "localhost"
        return Address(host=host, port=parsed.port or p.DEFAULT_PORT), name
    raise ValueError(f"{uri}: not an NBD URI")


@dataclass
class _Pending:
    kind: int
    length: int
    offset: int
    future: asyncio.Future[object]
    buffer: bytearray | memoryview | None = None
    #: The caller's buffer a read fills (holes zeroed), if it gave one.
    into: memoryview | None = None
    error: NbdError | None = None
    extents: dict[int, list[tuple[int, int]]] = field(default_factory=dict)
    covered: int = 0


class _Sender:
    """Requests written straight from the callers' buffers, on a duplicate of
    a plain connection's socket (its stream transport reads the replies).

    Python 3.11's stream transport copies what the socket does not take at
    once into a buffer of its own, and moves that buffer's rest to its front
    after every partial send: for a mirror's 1 MiB writes, a copy and several
    memmoves per request on the event loop.  Here what the socket does not
    take stays a view of the caller's buffer until the socket is writable.
    A request's parts are queued whole and in order, so requests never
    interleave on the wire.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, fd: int,
                 on_error: Callable[[BaseException], None]) -> None:
        self._loop = loop
        self._sock = socket.socket(fileno=os.dup(fd))
        self._sock.setblocking(False)
        self._on_error = on_error
        #: [view not yet sent, owner] in wire order.
        self._queue: collections.deque[list[object]] = collections.deque()
        self._waiting = False
        self._flushed: asyncio.Future[None] | None = None
        self.failure: BaseException | None = None

    def send(self, parts: Sequence[bytes | memoryview], owner: object) -> None:
        """Write ``parts`` (one request) now, or as soon as the socket takes them.

        The buffers must stay unchanged until the request's reply came (or
        :meth:`detach` was called for ``owner``)."""
        if self.failure is not None:
            raise ConnectionError(f"connection failed: {self.failure}")
        queue = self._queue
        sent = 0
        if not queue:
            try:
                sent = self._sock.sendmsg(parts)
            except (BlockingIOError, InterruptedError):
                pass
            except OSError as exc:
                self._fail(exc)
                raise ConnectionError(f"connection failed: {exc}") from None
        for part in parts:
            size = part.nbytes if isinstance(part, memoryview) else len(part)
            if sent >= size:
                sent -= size
                continue
            view = memoryview(part)
            if view.format != "B":
                view = view.cast("B")
            queue.append([view[sent:] if sent else view, owner])
            sent = 0
        if queue and not self._waiting:
            self._loop.add_writer(self._sock.fileno(), self._writable)
            self._waiting = True

    def detach(self, owner: object) -> None:
        """``owner``'s buffers may change from now on: what is left of them to
        send is copied (a cancelled request still goes out whole)."""
        for entry in self._queue:
            if entry[1] == owner:
                view = entry[0]
                assert isinstance(view, memoryview)
                entry[0] = memoryview(view.tobytes())

    def _writable(self) -> None:
        queue = self._queue
        while queue:
            batch = [entry[0] for entry in itertools.islice(queue, _IOV_BATCH)]
            try:
                sent = self._sock.sendmsg(batch)  # type: ignore[arg-type]
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self._fail(exc)
                return
            while sent:
                entry = queue[0]
                view = entry[0]
                assert isinstance(view, memoryview)
                if sent >= view.nbytes:
                    sent -= view.nbytes
                    queue.popleft()
                else:
                    entry[0] = view[sent:]
                    sent = 0
        self._stop_waiting()

    def _stop_waiting(self) -> None:
        if self._waiting:
            self._waiting = False
            self._loop.remove_writer(self._sock.fileno())
        if self._flushed is not None and not self._flushed.done():
            self._flushed.set_result(None)

    def _fail(self, exc: BaseException) -> None:
        self.failure = exc
        self._queue.clear()
        self._stop_waiting()
        self._on_error(exc)

    async def flushed(self) -> None:
        """Until everything queued is in the socket (or the connection failed)."""
        if not self._queue:
            return
        if self._flushed is None or self._flushed.done():
            self._flushed = self._loop.create_future()
        await self._flushed

    def close(self) -> None:
        self._queue.clear()
        if self._sock.fileno() >= 0:
            self._stop_waiting()
            self._sock.close()


class NbdClient:
    """One connection to one export (after a successful GO or EXPORT_NAME)."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, info: p.ExportInfo,
        structured: bool,
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.info = info
        self.structured = structured
        self._cookies = itertools.count(1)
        self._pending: dict[int, _Pending] = {}
        #: Held while a large request goes out in pieces (nothing may come between).
        self._sending = asyncio.Lock()
        self._failure: BaseException | None = None
        #: Done (with no result) once the connection is lost or closed.
        loop = asyncio.get_running_loop()
        self.lost: asyncio.Future[None] = loop.create_future()
        #: Requests go straight from their buffers on a plain connection
        #: (the handshake left nothing in the transport's buffer); over TLS,
        #: through the transport.
        self._sender: _Sender | None = None
        sock = writer.get_extra_info("socket")
        if sock is not None and writer.get_extra_info("ssl_object") is None \
                and writer.transport.get_write_buffer_size() == 0:
            self._sender = _Sender(loop, sock.fileno(), self._fail)
        self._reader_task = loop.create_task(self._read_replies())

    # --- connecting -----------------------------------------------------------------------

    @classmethod
    async def connect(
        cls,
        target: str | Address | net.SocketAddress,
        export: str | None = None,
        *,
        structured: bool = True,
        contexts: Sequence[str] = (p.BASE_ALLOCATION,),
        use_go: bool = True,
        tls: ssl.SSLContext | None = None,
        tls_hostname: str | None = None,
        tls_timeout: float = 10.0,
    ) -> NbdClient:
        """Connect to an export, given a URI or an address plus the export name.

        Connecting fails with :class:`qmpd.net.ConnectFailed` (QEMU's text).
        With ``tls``, the certificate is checked against ``tls_hostname``
        (QEMU's ``tls-hostname``; by default the host of a TCP address)."""
        address: Address | net.SocketAddress
        if isinstance(target, str):
            address, name = parse_uri(target)
            if export is not None:
                name = export
        else:
            address, name = target, export or ""
        if tls is not None:
            tls_hostname = tls_hostname or _default_hostname(address)
            if tls_hostname is None and tls.verify_mode != ssl.CERT_NONE:
                raise NbdTlsError("No hostname for certificate validation")
        reader, writer = await _open(address)
        try:
            hs = _ClientHandshake(reader, writer)
            await hs.start()
            if tls is not None:
                await hs.starttls(tls, tls_hostname, tls_timeout)
                try:
                    return await cls._haggle(hs, name, structured, contexts, use_go)
                except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
                    raise NbdTlsError(TLS_DROPPED) from None
            return await cls._haggle(hs, name, structured, contexts, use_go)
        except BaseException:
            writer.close()
            raise

    @classmethod
    async def _haggle(
        cls, hs: _ClientHandshake, name: str, structured: bool, contexts: Sequence[str],
        use_go: bool,
    ) -> NbdClient:
        """The options after the greeting (and STARTTLS): up to GO or EXPORT_NAME."""
        got_structured = structured and await hs.structured_reply()
        selected: dict[int, str] = {}
        if got_structured and contexts:
            selected = await hs.set_meta_context(name, contexts)
        if use_go:
            info = await hs.info_or_go(p.Opt.GO, name, [p.Info.BLOCK_SIZE, p.Info.NAME])
        else:
            info = await hs.export_name(name)
        info.contexts = selected
        return cls(hs.reader, hs.writer, info, got_structured)

    @staticmethod
    async def list_exports(
        target: str | Address, tls: ssl.SSLContext | None = None,
        tls_hostname: str | None = None,
    ) -> list[tuple[str, str]]:
        """NBD_OPT_LIST: ``(name, description)`` for every export, then ABORT."""
        address = parse_uri(target)[0] if isinstance(target, str) else target
        reader, writer = await _open(address)
        try:
            hs = _ClientHandshake(reader, writer)
            await hs.start()
            if tls is not None:
                await hs.starttls(tls, tls_hostname or _default_hostname(address), 10.0)
            return await hs.list()
        finally:
            await hs.abort()
            writer.close()

    @staticmethod
    async def export_info(target: str | Address, name: str) -> p.ExportInfo:
        """NBD_OPT_INFO for one export, then ABORT."""
        address = parse_uri(target)[0] if isinstance(target, str) else target
        reader, writer = await _open(address)
        try:
            hs = _ClientHandshake(reader, writer)
            await hs.start()
            await hs.structured_reply()
            return await hs.info_or_go(
                p.Opt.INFO, name, [p.Info.BLOCK_SIZE, p.Info.NAME, p.Info.DESCRIPTION]
            )
        finally:
            await hs.abort()
            writer.close()

    # --- properties -----------------------------------------------------------------------

    @property
    def size(self) -> int:
        return self.info.size

    @property
    def flags(self) -> int:
        return self.info.flags

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    # --- commands -------------------------------------------------------------------------

    async def read(self, offset: int, length: int, flags: int = 0) -> bytes:
        result = await self._submit(p.Cmd.READ, offset, length, flags)
        assert isinstance(result, bytearray)
        return bytes(result)

    async def read_into(self, offset: int, buf: memoryview, flags: int = 0) -> None:
        """A read of ``buf.nbytes`` bytes straight into ``buf``."""
        await self._submit(p.Cmd.READ, offset, buf.nbytes, flags, into=buf)

    async def write(self, offset: int, data: bytes | memoryview, fua: bool = False,
                    flags: int = 0) -> None:
        flags |= p.CmdFlag.FUA if fua else 0
        await self._submit(p.Cmd.WRITE, offset, len(data), flags, data)

    async def write_zeroes(self, offset: int, length: int, flags: int = 0) -> None:
        await self._submit(p.Cmd.WRITE_ZEROES, offset, length, flags)

    async def trim(self, offset: int, length: int, fua: bool = False) -> None:
        await self._submit(p.Cmd.TRIM, offset, length, p.CmdFlag.FUA if fua else 0)

    async def flush(self) -> None:
        await self._submit(p.Cmd.FLUSH, 0, 0, 0)

    async def cache(self, offset: int, length: int) -> None:
        await self._submit(p.Cmd.CACHE, offset, length, 0)

    async def block_status(
        self, offset: int, length: int, req_one: bool = False
    ) -> dict[str, list[tuple[int, int]]]:
        """Extents per selected context name: ``[(length, flags), ...]``."""
        flags = p.CmdFlag.REQ_ONE if req_one else 0
        result = await self._submit(p.Cmd.BLOCK_STATUS, offset, length, flags)
        assert isinstance(result, dict)
        return {self.info.contexts.get(cid, str(cid)): ext for cid, ext in result.items()}

    async def command(
        self, kind: int, offset: int = 0, length: int = 0, flags: int = 0,
        payload: bytes | None = None,
    ) -> object:
        """Any request, for tests that need unusual ones."""
        return await self._submit(kind, offset, length, flags, payload)

    async def disconnect(self, timeout: float = 10.0) -> None:
        """NBD_CMD_DISC (no reply), then wait up to ``timeout`` seconds for the
        server to close (0: close at once, as QEMU's client does)."""
        if self.writer.is_closing():
            return
        sender = self._sender
        if self._sending.locked():
            async with self._sending:  # not in the middle of a request
                pass
            if self.writer.is_closing():
                return
        disc = p.request_header(p.Cmd.DISC, next(self._cookies))
        try:
            if sender is not None:
                sender.send((disc,), None)
                await sender.flushed()
            else:
                self.writer.write(disc)
                await self.writer.drain()
            if timeout > 0:
                await asyncio.wait_for(asyncio.shield(self._reader_task), timeout)
        except (TimeoutError, ConnectionError, NbdError):
            pass
        self.close()

    def close(self) -> None:
        self._reader_task.cancel()
        if self._sender is not None:
            self._sender.close()
        self.writer.close()

    async def __aenter__(self) -> NbdClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.disconnect()

    # --- machinery ------------------------------------------------------------------------

    async def _submit(
        self, kind: int, offset: int, length: int, flags: int,
        payload: bytes | memoryview | None = None, into: memoryview | None = None,
    ) -> object:
        if self._failure is not None:
            raise ConnectionError(f"connection failed: {self._failure}")
        cookie = next(self._cookies)
        future: asyncio.Future[object] = asyncio.get_running_loop().create_future()
        header = p.request_header(kind, cookie, offset, length, flags)
        sender = self._sender
        if sender is not None:
            sender.send((header,) if payload is None else (header, payload), cookie)
            # After the send: a failed one must leave nothing pending (and no
            # reply can come before the loop runs the reader again).
            self._pending[cookie] = _Pending(kind, length, offset, future, into=into)
            try:
                return await future
            except asyncio.CancelledError:
                if payload is not None:
                    sender.detach(cookie)
                raise
        self._pending[cookie] = _Pending(kind, length, offset, future, into=into)
        if payload is not None and len(payload) > _PIECE:
            await self._send_big(header, payload)
        elif self._sending.locked():
            async with self._sending:  # after the big request being sent
                self._send_small(header, payload)
                await self.writer.drain()
        else:
            self._send_small(header, payload)
            await self.writer.drain()
        return await future

    def _send_small(self, header: bytes, payload: bytes | memoryview | None) -> None:
        if payload is not None:
            self.writer.writelines([header, payload])
        else:
            self.writer.write(header)

    async def _send_big(self, header: bytes, payload: bytes | memoryview) -> None:
        """A large request, a piece at a time, the transport drained in between.

        Handed over whole, the transport would keep most of it in its buffer
        and move the rest to the buffer's front after every partial send: for
        a 4 MiB write into a UNIX socket, tens of megabytes of memmove."""
        async with self._sending:
            self.writer.write(header)
            view = memoryview(payload)
            for start in range(0, len(view), _PIECE):
                self.writer.write(view[start:start + _PIECE])
                await self.writer.drain()

    async def _read_replies(self) -> None:
        try:
            while True:
                head = await self.reader.readexactly(4)
                magic = p.parse_reply_magic(head)
                if magic == p.SIMPLE_REPLY_MAGIC:
                    rest = await self.reader.readexactly(p.SIMPLE_REPLY_SIZE - 4)
                    reply = p.parse_simple_reply(head + rest)
                    await self._simple(reply)
                elif magic == p.STRUCTURED_REPLY_MAGIC:
                    rest = await self.reader.readexactly(p.CHUNK_HEADER_SIZE - 4)
                    reply = p.parse_chunk_header(head + rest)
                    payload = await self.reader.readexactly(reply.length)
                    self._chunk(reply, payload)
                else:
                    raise p.ProtocolError(f"bad reply magic 0x{magic:x}")
        except (asyncio.IncompleteReadError, ConnectionError, p.ProtocolError) as exc:
            self._fail(exc)
        except asyncio.CancelledError:
            self._fail(ConnectionError("client closed"))
            raise

    def _fail(self, exc: BaseException) -> None:
        self._failure = exc
        if not self.lost.done():
            self.lost.set_result(None)
        for pending in self._pending.values():
            if not pending.future.done():
                pending.future.set_exception(ConnectionError(f"connection lost: {exc}"))
                pending.future.exception()  # whoever still awaits it gets it; nobody else cares
        self._pending.clear()

    def _take(self, cookie: int) -> _Pending:
        pending = self._pending.get(cookie)
        if pending is None:
            raise p.ProtocolError(f"reply for unknown cookie {cookie}")
        return pending

    async def _simple(self, reply: p.ReplyHeader) -> None:
        pending = self._take(reply.cookie)
        del self._pending[reply.cookie]
        # A request whose caller gave up (cancelled) still gets its reply:
        # read, and dropped (for a read, its buffer is not ours any more).
        cancelled = pending.future.done()
        if reply.error:
            if not cancelled:
                pending.future.set_exception(NbdError(reply.error))
            return
        if pending.kind == p.Cmd.READ:
            if self.structured:
                raise p.ProtocolError("simple reply when structured reply chunk was expected")
            data = await self.reader.readexactly(pending.length)
            if pending.future.done():
                return
            if pending.into is not None:
                pending.into[:] = data
                pending.future.set_result(None)
                return
            pending.future.set_result(bytearray(data))
        elif cancelled:
            return
        elif pending.kind == p.Cmd.BLOCK_STATUS:
            pending.future.set_exception(
                NbdError(p.Errno.EIO, "Server did not reply with any status extents")
            )
        else:
            pending.future.set_result(None)

    def _chunk(self, reply: p.ReplyHeader, payload: bytes) -> None:
        pending = self._take(reply.cookie)
        kind = reply.type
        if kind in (p.ReplyType.ERROR, p.ReplyType.ERROR_OFFSET):
            errno, message = p.parse_error_payload(payload)
            pending.error = pending.error or NbdError(errno, message)
        elif kind == p.ReplyType.OFFSET_DATA:
            self._place(pending, int.from_bytes(payload[:8], "big"), payload[8:])
        elif kind == p.ReplyType.OFFSET_HOLE:
            offset = int.from_bytes(payload[:8], "big")
            size = int.from_bytes(payload[8:12], "big")
            if size == 0:
                raise p.ProtocolError("zero-length hole chunk")
            self._place(pending, offset, None, size)
        elif kind == p.ReplyType.BLOCK_STATUS:
            cid, extents = p.parse_extents(payload)
            if cid in pending.extents:
                raise p.ProtocolError("Several BLOCK_STATUS chunks in reply")
            pending.extents[cid] = extents
        elif kind != p.ReplyType.NONE:
            raise p.ProtocolError(f"unexpected chunk type {kind}")
        if reply.flags & p.ReplyFlag.DONE:
            del self._pending[reply.cookie]
            if pending.future.done():
                return  # cancelled: nobody waits for it
            if pending.error is not None:
                pending.future.set_exception(pending.error)
            elif pending.kind == p.Cmd.READ:
                if pending.covered != pending.length:
                    raise p.ProtocolError("read reply does not cover the request")
                pending.future.set_result(pending.buffer or bytearray())
            elif pending.kind == p.Cmd.BLOCK_STATUS:
                pending.future.set_result(pending.extents)
            else:
                pending.future.set_result(None)

    def _place(
        self, pending: _Pending, offset: int, data: bytes | None, size: int = 0
    ) -> None:
        length = len(data) if data is not None else size
        start = offset - pending.offset
        if pending.kind != p.Cmd.READ or start < 0 or start + length > pending.length:
            raise p.ProtocolError("read chunk outside the request")
        if pending.buffer is None:
            pending.buffer = pending.into if pending.into is not None \
                else bytearray(pending.length)
        if pending.future.done():
            pass  # the reader gave up (cancelled): its buffer may be in use again
        elif data is not None:
            pending.buffer[start : start + length] = data
        elif pending.into is not None:  # a fresh bytearray is zeros already
            pending.into[start : start + length] = bytes(length)
        pending.covered += length


def _default_hostname(address: Address | net.SocketAddress) -> str | None:
    """QEMU's default tls-hostname: the host of a TCP address."""
    if isinstance(address, Address):
        return address.host
    if isinstance(address, net.InetAddress):
        return address.host
    return None


async def _open(
    address: Address | net.SocketAddress,
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    if isinstance(address, Address):
        address = (net.UnixAddress(address.path) if address.path is not None
                   else net.InetAddress(address.host or "localhost", str(address.port)))
    sock = await net.connect(address)
    try:
        return await asyncio.open_connection(sock=sock, limit=64 * 1024 * 1024)
    except BaseException:
        sock.close()
        raise


class _ClientHandshake:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.fixed = True
        self.no_zeroes = False

    async def start(self) -> None:
        flags = p.parse_greeting(await self.reader.readexactly(18))
        self.fixed = bool(flags & p.HandshakeFlag.FIXED_NEWSTYLE)
        self.no_zeroes = bool(flags & p.HandshakeFlag.NO_ZEROES)
        self.writer.write(p.client_flags_bytes(self.no_zeroes))

    async def starttls(self, context: ssl.SSLContext, hostname: str | None,
                       timeout: float) -> None:
        """NBD_OPT_STARTTLS, then the TLS handshake on the same connection."""
        if not self.fixed:
            raise NbdTlsError("Server does not support STARTTLS")
        await self._send(p.Opt.STARTTLS)
        reply = await self._reply()
        if reply.reply & p.REP_ERR:
            raise NbdOptionError(reply.reply, reply.data.decode(errors="replace"), reply.option)
        if reply.reply != p.Rep.ACK:
            raise NbdTlsError(f"Server rejected request to start TLS {reply.reply}")
        try:
            await self.writer.start_tls(context, server_hostname=hostname,
                                        ssl_handshake_timeout=timeout)
        except (OSError, EOFError, TimeoutError) as exc:
            raise NbdTlsError(tls_failure_reason(exc, hostname)) from None

    async def _send(self, option: int, data: bytes = b"") -> None:
        self.writer.write(p.option_request(option, data))
        await self.writer.drain()

    async def _reply(self) -> p.OptionReply:
        option, reply, length = p.parse_option_reply_header(
            await self.reader.readexactly(p.OPTION_REPLY_HEADER_SIZE)
        )
        return p.OptionReply(option, reply, await self.reader.readexactly(length))

    async def structured_reply(self) -> bool:
        await self._send(p.Opt.STRUCTURED_REPLY)
        reply = await self._reply()
        return reply.reply == p.Rep.ACK

    async def set_meta_context(self, name: str, queries: Sequence[str]) -> dict[int, str]:
        await self._send(p.Opt.SET_META_CONTEXT, p.meta_request_data(name, queries))
        selected: dict[int, str] = {}
        while True:
            reply = await self._reply()
            if reply.reply == p.Rep.META_CONTEXT:
                cid = int.from_bytes(reply.data[:4], "big")
                selected[cid] = reply.data[4:].decode()
            elif reply.reply == p.Rep.ACK:
                return selected
            else:
                return {}

    async def list(self) -> list[tuple[str, str]]:
        await self._send(p.Opt.LIST)
        out: list[tuple[str, str]] = []
        while True:
            reply = await self._reply()
            if reply.reply == p.Rep.SERVER:
                length = int.from_bytes(reply.data[:4], "big")
                out.append(
                    (reply.data[4 : 4 + length].decode(), reply.data[4 + length :].decode())
                )
            elif reply.reply == p.Rep.ACK:
                return out
            else:
                raise NbdOptionError(reply.reply, reply.data.decode(errors="replace"), reply.option)

    async def info_or_go(self, option: int, name: str, infos: Sequence[int]) -> p.ExportInfo:
        await self._send(option, p.info_request_data(name, infos))
        info = p.ExportInfo(name)
        while True:
            reply = await self._reply()
            if reply.reply == p.Rep.INFO:
                kind = int.from_bytes(reply.data[:2], "big")
                body = reply.data[2:]
                if kind == p.Info.EXPORT:
                    info.size, info.flags = p.parse_export_info(body)
                elif kind == p.Info.NAME:
                    info.canonical_name = body.decode()
                elif kind == p.Info.DESCRIPTION:
                    info.description = body.decode()
                elif kind == p.Info.BLOCK_SIZE:
                    info.block_size = (
                        int.from_bytes(body[0:4], "big"),
                        int.from_bytes(body[4:8], "big"),
                        int.from_bytes(body[8:12], "big"),
                    )
            elif reply.reply == p.Rep.ACK:
                if not info.flags & p.TFlag.HAS_FLAGS:
                    raise p.ProtocolError("broken server omitted NBD_INFO_EXPORT")
                return info
            else:
                raise NbdOptionError(reply.reply, reply.data.decode(errors="replace"), option)

    async def export_name(self, name: str) -> p.ExportInfo:
        await self._send(p.Opt.EXPORT_NAME, name.encode())
        head = await self.reader.readexactly(10)
        info = p.ExportInfo(name)
        info.size, info.flags = p.parse_export_info(head)
        if not self.no_zeroes:
            await self.reader.readexactly(124)
        return info

    async def abort(self) -> None:
        try:
            self.writer.write(p.option_request(p.Opt.ABORT))
            await self.writer.drain()
        except (ConnectionError, RuntimeError):
            pass
