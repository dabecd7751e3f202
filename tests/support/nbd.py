"""A raw NBD client's pieces, for tests that drive the server byte by byte."""

from __future__ import annotations

import asyncio
import socket
import struct
from pathlib import Path

from qmpd.daemon import Daemon
from qmpd.nbd import protocol as p
from qmpd.nbd.server import NbdConnection


async def recv_exactly(sock: socket.socket, n: int) -> bytes:
    loop = asyncio.get_running_loop()
    data = b""
    while len(data) < n:
        chunk = await asyncio.wait_for(loop.sock_recv(sock, n - len(data)), 10)
        assert chunk, "the server closed the connection"
        data += chunk
    return data


async def negotiate(sock: socket.socket, size: int, name: bytes = b"e") -> None:
    """Fixed newstyle, NBD_OPT_EXPORT_NAME (simple replies) of an export of ``size`` bytes."""
    loop = asyncio.get_running_loop()
    greeting = await recv_exactly(sock, 18)
    assert greeting[:16] == struct.pack(">QQ", p.NBDMAGIC, p.IHAVEOPT)
    await loop.sock_sendall(sock, struct.pack(">I", int(p.ClientFlag.FIXED_NEWSTYLE
                                                         | p.ClientFlag.NO_ZEROES)))
    await loop.sock_sendall(sock, struct.pack(">QII", p.IHAVEOPT, int(p.Opt.EXPORT_NAME),
                                              len(name)) + name)
    got, _flags = struct.unpack(">QH", await recv_exactly(sock, 10))
    assert got == size


def pending(sock: socket.socket) -> bytes:
    """What the server has sent so far, without waiting for more."""
    try:
        return sock.recv(1 << 20, socket.MSG_DONTWAIT)
    except BlockingIOError:
        return b""


async def raw_connection(daemon: Daemon, path: Path, size: int
                         ) -> tuple[socket.socket, NbdConnection]:
    """A client's non-blocking socket to the daemon's NBD server at ``path``,
    past the handshake (export ``e``), and the server's side of it."""
    client = socket.socket(socket.AF_UNIX)
    client.setblocking(False)
    try:
        await asyncio.get_running_loop().sock_connect(client, str(path))
        await negotiate(client, size)
        server = daemon.exports.get().server
        assert server is not None
        conns: list[NbdConnection] = []
        for _ in range(100):
            conns = [c for c in server.connections if c.tx is not None]
            if conns:
                break
            await asyncio.sleep(0.01)
        (conn,) = conns
        return client, conn
    except BaseException:
        client.close()
        raise
