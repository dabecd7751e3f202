"""Migration transports: ``tcp:``, ``unix:``, ``exec:`` and ``fd:`` URIs.

A channel is a pair of asyncio streams.  Outgoing channels are connected
(or spawned) by :func:`connect`; incoming ones come from a
:class:`Listener`, which waits for exactly one peer.
"""

from __future__ import annotations

import asyncio
import os
import socket
import stat
from dataclasses import dataclass
from typing import Any

from qmpd.errors import GenericError


class ChannelError(Exception):
    """A transport failed; the message is QEMU's error-desc."""


@dataclass(frozen=True)
class MigrationURI:
    scheme: str  # tcp, unix, exec, fd
    target: str  # path, "host:port", command or fd name
    host: str = ""
    port: int = 0


def parse_uri(uri: str) -> MigrationURI:
    for scheme in ("tcp", "unix", "exec", "fd"):
        prefix = scheme + ":"
        if uri.startswith(prefix):
            rest = uri[len(prefix):]
            if scheme == "tcp":
                host, sep, port = rest.rpartition(":")
                if not sep or not port.isdigit():
                    raise GenericError("Parameter 'uri' expects a valid migration protocol")
                host = host.strip("[]") or "0.0.0.0"
                return MigrationURI(scheme, rest, host, int(port))
            return MigrationURI(scheme, rest)
    raise GenericError("Parameter 'uri' expects a valid migration protocol")


@dataclass
class Channel:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter | None
    process: asyncio.subprocess.Process | None = None

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            try:
                await self.writer.wait_closed()
            except (OSError, ConnectionError):
                pass
        if self.process is not None:
            try:
                await asyncio.wait_for(self.process.wait(), 10)
            except asyncio.TimeoutError:
                self.process.kill()

    def abort(self) -> None:
        if self.writer is not None:
            transport = self.writer.transport
            transport.abort()
        if self.process is not None and self.process.returncode is None:
            self.process.kill()


class FdStore:
    """File descriptors handed over with getfd, by name."""

    def __init__(self) -> None:
        self.fds: dict[str, int] = {}

    def add(self, name: str, fd: int) -> None:
        old = self.fds.pop(name, None)
        if old is not None:
            os.close(old)
        self.fds[name] = fd

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
    return Channel(reader, writer)


async def connect(uri: MigrationURI, fds: FdStore) -> Channel:
    """The source's channel to the destination."""
    try:
        if uri.scheme == "unix":
            reader, writer = await asyncio.open_unix_connection(uri.target)
            return Channel(reader, writer)
        if uri.scheme == "tcp":
            reader, writer = await asyncio.open_connection(uri.host, uri.port)
            return Channel(reader, writer)
        if uri.scheme == "exec":
            process = await asyncio.create_subprocess_exec(
                "/bin/sh", "-c", uri.target,
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            )
            assert process.stdout is not None and process.stdin is not None
            writer = process.stdin
            return Channel(process.stdout, writer, process)
        return await _channel_from_fd(fds.take(uri.target))
    except OSError as exc:
        raise ChannelError(f"Failed to connect to '{uri.target}': {exc.strerror}") from None


class Listener:
    """The destination's side: accepts one peer."""

    def __init__(self, uri: MigrationURI, fds: FdStore) -> None:
        self.uri = uri
        self.fds = fds
        self.server: asyncio.AbstractServer | None = None
        self._accepted: asyncio.Future[Channel] | None = None
        self.addresses: list[dict[str, Any]] = []

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._accepted = loop.create_future()
        uri = self.uri

        def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            assert self._accepted is not None
            if self._accepted.done():
                writer.close()
                return
            self._accepted.set_result(Channel(reader, writer))
            if self.server is not None:
                self.server.close()

        try:
            if uri.scheme == "unix":
                try:
                    if stat.S_ISSOCK(os.lstat(uri.target).st_mode):
                        os.unlink(uri.target)
                except FileNotFoundError:
                    pass
                self.server = await asyncio.start_unix_server(on_client, uri.target)
                self.addresses = [{"path": uri.target, "type": "unix"}]
            elif uri.scheme == "tcp":
                self.server = await asyncio.start_server(on_client, uri.host, uri.port)
                self.addresses = [
                    {"host": sock.getsockname()[0], "port": str(sock.getsockname()[1]),
                     "type": "inet"}
                    for sock in self.server.sockets
                ]
            elif uri.scheme == "exec":
                process = await asyncio.create_subprocess_exec(
                    "/bin/sh", "-c", uri.target, stdout=asyncio.subprocess.PIPE,
                )
                assert process.stdout is not None
                self._accepted.set_result(Channel(process.stdout, None, process))
            else:
                self._accepted.set_result(await _channel_from_fd(self.fds.take(uri.target)))
        except OSError as exc:
            raise GenericError(
                f"Failed to bind socket to {uri.target}: {exc.strerror}"
            ) from None
        except ChannelError as exc:
            raise GenericError(str(exc)) from None

    async def accept(self) -> Channel:
        assert self._accepted is not None
        return await self._accepted

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
        if self._accepted is not None and not self._accepted.done():
            self._accepted.cancel()
        if self.uri.scheme == "unix":
            try:
                os.unlink(self.uri.target)
            except OSError:
                pass
