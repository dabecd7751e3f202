"""Migration transports: ``tcp:``, ``unix:``, ``exec:`` and ``fd:`` URIs.

A channel is a pair of asyncio streams.  Outgoing channels are connected
(or spawned) by :func:`connect`; incoming ones come from a
:class:`Listener`, which waits for exactly one peer.  With ``tls-creds``
set, socket channels are TLS: the source is the client, the destination
the server (checking ``tls-authz`` against the client's DN); a peer that
fails the handshake or the check is dropped and the listener waits on.
"""

from __future__ import annotations

import asyncio
import errno
import os
import signal
import socket
import stat
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from qmpd import logs, net
from qmpd.errors import GenericError
from qmpd.migration.deps import TlsObjects
from qmpd.objects.authz import check_peer


class ChannelError(Exception):
    """A transport failed; the message is QEMU's error-desc."""


@dataclass
class Channel:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter | None
    process: asyncio.subprocess.Process | None = None
    #: What QEMU's I/O channel would be: "socket", "command" (exec:) or "file".
    kind: str = "socket"
    #: Under TLS (the peer closing without close_notify is then a plain EOF).
    tls: bool = False
    #: Run once when the channel is closed or aborted (gives TLS objects back).
    on_close: list[Callable[[], None]] = field(default_factory=list)

    def _closed(self) -> None:
        while self.on_close:
            self.on_close.pop()()

    async def close(self) -> None:
        self._closed()
        if self.writer is not None:
            self.writer.close()
            try:
                await self.writer.wait_closed()
            except (OSError, ConnectionError):
                pass
        if self.process is not None:
            try:
                await asyncio.wait_for(self.process.wait(), 10)
            except TimeoutError:
                self._kill()

    def write_buffer_empty(self) -> bool:
        """Whether every byte written so far has been handed to the kernel."""
        return self.writer is None or self.writer.transport.get_write_buffer_size() == 0

    def abort(self) -> None:
        """Drop the connection at once; safe to call in any state, more than once."""
        self._closed()
        if self.writer is not None:
            transport = self.writer.transport
            if not transport.is_closing():
                try:
                    transport.abort()
                except Exception:  # a transport half torn down already
                    pass
        self._kill()

    def _kill(self) -> None:
        # os.kill, not Process.kill: Popen.send_signal polls first, which reaps
        # a command that has just exited under asyncio's child watcher (it then
        # logs "Unknown child process").  Until the watcher reaps it, the pid
        # is ours (a zombie at worst), so the signal cannot hit another process.
        if self.process is not None and self.process.returncode is None:
            try:
                os.kill(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    async def reap(self) -> None:
        """After abort(): wait (briefly) for an exec: command to be gone.

        Otherwise a daemon that exits right after a failure closes the
        subprocess transport first, which reaps the child under asyncio's
        child watcher ("Unknown child process pid N" on stderr).
        """
        if self.process is not None:
            try:
                await asyncio.wait_for(self.process.wait(), 5)
            except TimeoutError:
                pass

    def write_error(self, exc: BaseException) -> str:
        """QEMU's error-desc for a failed write (``Unable to write to socket: Broken pipe``).

        asyncio reports a lost connection as a bare ConnectionResetError; the
        real errno, if the transport saw one, is on the reader.
        """
        err = getattr(exc, "errno", None)
        if err is None:
            err = getattr(self.reader.exception(), "errno", None)
        if err == errno.ECONNRESET and self._family() == socket.AF_UNIX:
            # Our read side saw the reset (the peer died with data unread); a
            # write, which is what QEMU reports on, gets EPIPE on a unix socket.
            err = errno.EPIPE
        strerror = os.strerror(err) if err else os.strerror(errno.EPIPE)
        return f"Unable to write to {self.kind}: {strerror}"

    def _family(self) -> int | None:
        if self.writer is None:
            return None
        sock = self.writer.transport.get_extra_info("socket")
        return getattr(sock, "family", None)

    def check_peer(self) -> None:
        """Raise ChannelError if the peer is known to be gone (nothing is read or written).

        A socket peer that closed shows as EOF (or an error) on our reading
        side, an exec: command as an exited process.  A destination never
        sends anything before the end of the stream except return-path
        messages, which are still buffered then, so EOF is only taken as a
        hang-up when nothing is buffered.
        """
        if self.process is not None:
            if self.process.returncode is not None:
                raise ChannelError(f"Unable to write to {self.kind}: {os.strerror(errno.EPIPE)}")
            return
        if self.reader.exception() is not None or self.reader.at_eof():
            raise ChannelError(self.write_error(ChannelError()))


class FdStore:
    """File descriptors handed over with getfd, by name."""

    def __init__(self) -> None:
        self.fds: dict[str, int] = {}

    def add(self, name: str, fd: int) -> None:
        old = self.fds.pop(name, None)
        if old is not None:
            os.close(old)
        self.fds[name] = fd

    def has(self, name: str) -> bool:
        return name in self.fds

    def take(self, name: str) -> int:
        fd = self.fds.pop(name, None)
        if fd is None:
            raise ChannelError(f"File descriptor named '{name}' has not been found")
        return fd

    def close(self, name: str) -> None:
        fd = self.fds.pop(name, None)
        if fd is None:
            raise GenericError(f"File descriptor named '{name}' not found")
        os.close(fd)


async def _channel_from_fd(fd: int) -> Channel:
    mode = os.fstat(fd).st_mode
    if stat.S_ISSOCK(mode):
        sock = socket.socket(fileno=fd)
        reader, writer = await asyncio.open_connection(sock=sock)
        return Channel(reader, writer)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    pipe = os.fdopen(fd, "rb+", buffering=0)
    protocol = asyncio.StreamReaderProtocol(reader)
    transport, _ = await loop.connect_write_pipe(lambda: protocol, pipe)
    writer = asyncio.StreamWriter(transport, protocol, reader, loop)
    return Channel(reader, writer, kind="file")


def _no_delay(sock: socket.socket) -> None:
    """No Nagle on TCP: the switchover's last small writes go out at once.

    asyncio sets TCP_NODELAY only on sockets whose proto is IPPROTO_TCP,
    which sockets made with proto 0 are not; TLS records suffer most.
    """
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


@dataclass(frozen=True)
class TlsSettings:
    """migrate-set-parameters' TLS, read when a channel is made (as QEMU does)."""

    objects: TlsObjects
    creds: str
    hostname: str = ""
    authz: str = ""
    timeout: float = 10.0


#: SO_LINGER values: close resets the connection, or closes it in order.
_RESET = struct.pack("ii", 1, 0)
_ORDERLY = struct.pack("ii", 0, 0)

_TLS_SOCKETS_ONLY = ("qmpd puts TLS on socket migrations only (tcp: and unix: URIs), "
                     "not on exec: or fd:")


async def _tls_client(sock: socket.socket, uri: net.MigrationURI, tls: TlsSettings) -> Channel:
    """The source's TLS handshake on a connected socket; QEMU's texts on failure."""
    try:
        creds = tls.objects.tls_creds(tls.creds, "client")
    except GenericError as exc:
        sock.close()
        raise ChannelError(exc.desc) from None
    hostname = tls.hostname or (uri.host if uri.scheme == "tcp" else None)
    if not hostname:
        sock.close()
        raise ChannelError("No hostname available for TLS")
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    user = f"migration {id(reader)}"
    tls.objects.hold(creds, user)
    try:
        transport, protocol = await net.tls_connect(
            sock, creds.client_context(hostname),
            lambda: asyncio.StreamReaderProtocol(reader), hostname, tls.timeout)
    except net.TlsFailed as exc:
        tls.objects.release(creds, user)
        raise ChannelError(f"TLS handshake failed: {exc.reason}") from None
    except BaseException:
        tls.objects.release(creds, user)
        sock.close()
        raise
    assert isinstance(protocol, asyncio.StreamReaderProtocol)
    writer = asyncio.StreamWriter(transport, protocol, reader, loop)  # type: ignore[arg-type]
    return Channel(reader, writer, tls=True,
                   on_close=[lambda: tls.objects.release(creds, user)])


async def connect(uri: net.MigrationURI, fds: FdStore, tls: TlsSettings | None = None
                  ) -> Channel:
    """The source's channel to the destination (TLS on sockets with ``tls``)."""
    if tls is not None and uri.scheme not in ("unix", "tcp"):
        raise ChannelError(_TLS_SOCKETS_ONLY)
    try:
        if uri.scheme in ("unix", "tcp"):
            assert uri.address is not None
            sock = await net.connect(uri.address)
            _no_delay(sock)
            if tls is not None:
                return await _tls_client(sock, uri, tls)
            reader, writer = await asyncio.open_connection(sock=sock)
            return Channel(reader, writer)
        if uri.scheme == "exec":
            process = await asyncio.create_subprocess_exec(
                "/bin/sh", "-c", uri.target,
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            )
            assert process.stdout is not None and process.stdin is not None
            writer = process.stdin
            return Channel(process.stdout, writer, process, kind="command")
        return await _channel_from_fd(fds.take(uri.target))
    except net.ConnectFailed as exc:
        raise ChannelError(exc.strerror) from None
    except OSError as exc:
        target = f"{uri.host}:{uri.service}" if uri.scheme == "tcp" else uri.target
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        raise ChannelError(f"Failed to connect to '{target}': {reason}") from None


class Listener:
    """The destination's side: accepts one peer.

    ``tls`` is asked at each connection (the parameters may change between
    migrate-incoming and the source's connect, as in QEMU).
    """

    def __init__(self, uri: net.MigrationURI, fds: FdStore,
                 tls: Callable[[], TlsSettings | None] | None = None) -> None:
        self.uri = uri
        self.fds = fds
        self.tls = tls
        self.socks: list[socket.socket] = []
        self.tasks: set[asyncio.Task[None]] = set()
        self.unix: net.UnixListener | None = None
        self._accepted: asyncio.Future[Channel] | None = None
        self.addresses: list[dict[str, Any]] = []

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._accepted = loop.create_future()
        uri = self.uri
        try:
            if uri.scheme in ("unix", "tcp"):
                assert uri.address is not None
                # No host: every address, IPv6 and IPv4, as QEMU listens.
                listening = net.listen(uri.address, every_address=True)
                self.unix = listening.unix
                self.socks = list(listening.socks)
                for sock in self.socks:
                    sock.setblocking(False)
                    self._spawn(self._accept_loop(sock))
                self.addresses = _socket_addresses(listening)
            elif uri.scheme == "exec":
                self._check_no_tls()
                process = await asyncio.create_subprocess_exec(
                    "/bin/sh", "-c", uri.target, stdout=asyncio.subprocess.PIPE,
                )
                assert process.stdout is not None
                self._accepted.set_result(Channel(process.stdout, None, process, kind="command"))
            else:
                self._check_no_tls()
                self._accepted.set_result(await _channel_from_fd(self.fds.take(uri.target)))
        except net.ListenFailed as exc:
            raise GenericError(exc.desc) from None
        except ChannelError as exc:
            raise GenericError(str(exc)) from None

    def _check_no_tls(self) -> None:
        if self.tls is not None and self.tls() is not None:
            raise ChannelError(_TLS_SOCKETS_ONLY)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _accept_loop(self, sock: socket.socket) -> None:
        while self._accepted is not None and not self._accepted.done():
            try:
                conn, _ = await net.accept(sock)
            except OSError:
                return  # closed
            _no_delay(conn)
            tls = self.tls() if self.tls is not None else None
            if tls is None:
                reader, writer = await asyncio.open_connection(sock=conn)
                self._take(Channel(reader, writer))
            else:
                # Handshakes run side by side: a peer stalled in one (dropped
                # after the timeout) does not keep a good source out.
                self._spawn(self._tls_peer(conn, tls))

    async def _tls_peer(self, conn: socket.socket, tls: TlsSettings) -> None:
        """The server side of one source's handshake; refusals are logged, as QEMU does."""
        try:
            creds = tls.objects.tls_creds(tls.creds, "server")
            authz = tls.objects.authz(tls.authz) if tls.authz else None
            context = creds.server_context()
        except GenericError as exc:
            conn.close()
            logs.write_raw(f"{logs.ERROR}: {exc.desc}")
            return
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        # Until the source is accepted, closing resets the connection: a
        # refused source must see a reset, never the orderly close that tells
        # it the stream was taken (asyncio may have read all of it already).
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET)
        try:
            transport, protocol = await net.tls_accept(
                conn, context, lambda: asyncio.StreamReaderProtocol(reader), tls.timeout)
        except net.TlsFailed as exc:
            logs.write_raw(f"{logs.ERROR}: TLS handshake failed: {exc.reason}")
            return
        except asyncio.CancelledError:
            conn.close()  # another source got in first
            raise
        if authz is not None:
            refused = check_peer(authz, net.peer_certificate(transport))
            if refused is not None:
                assert isinstance(transport, asyncio.Transport)
                transport.abort()
                logs.write_raw(f"{logs.ERROR}: {refused}")
                return
        try:
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _ORDERLY)
        except OSError:
            pass  # the source sent everything and closed already: the reader has it all
        assert isinstance(protocol, asyncio.StreamReaderProtocol)
        writer = asyncio.StreamWriter(transport, protocol, reader, loop)  # type: ignore[arg-type]
        user = f"incoming migration {id(reader)}"
        tls.objects.hold(creds, user)
        if authz is not None:
            tls.objects.hold(authz, user)

        def release() -> None:
            tls.objects.release(creds, user)
            if authz is not None:
                tls.objects.release(authz, user)

        self._take(Channel(reader, writer, tls=True, on_close=[release]))

    def _take(self, channel: Channel) -> None:
        """The first peer in is the source; the listening sockets close."""
        assert self._accepted is not None
        if self._accepted.done():
            channel.abort()
            return
        self._accepted.set_result(channel)
        self._stop_listening()

    def _stop_listening(self) -> None:
        current = asyncio.current_task()
        for task in list(self.tasks):
            if task is not current:
                task.cancel()
        loop = asyncio.get_running_loop()
        for sock in self.socks:
            if sock.fileno() >= 0:
                loop.remove_reader(sock.fileno())
            sock.close()
        self.socks = []

    async def accept(self) -> Channel:
        assert self._accepted is not None
        return await self._accepted

    def close(self) -> None:
        self._stop_listening()
        if self._accepted is not None and not self._accepted.done():
            self._accepted.cancel()
        if self.unix is not None:
            self.unix.unlink()
            self.unix = None


def _socket_addresses(listening: net.Listener) -> list[dict[str, Any]]:
    """query-migrate's ``socket-address``: IPv6 addresses first."""
    if isinstance(listening.address, net.UnixAddress):
        return [{"path": listening.address.path, "type": "unix"}]
    sockets = sorted(listening.socks, key=lambda sock: sock.family != socket.AF_INET6)
    return [
        {"host": sock.getsockname()[0], "port": str(sock.getsockname()[1]),
         "ipv6" if sock.family == socket.AF_INET6 else "ipv4": True,
         "type": "inet"}
        for sock in sockets
    ]
