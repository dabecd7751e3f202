"""The NBD server's batches on an rbd export (issue 14's 4 KiB targets): the
requests of one reader callback go to librbd together at its end (the node
is plugged meanwhile, down to the rbd node under a format node), and a
reply that librbd's completion finishes leaves at once, inside the callback
that delivered it, not with the others of that callback at the next turn of
the loop (the client works on it while the rest are answered).

A real daemon with a real cluster; the test takes the connection's reader
callback and the image's completion callback over, so that no turn of the
event loop runs between what it sends and what it checks."""

from __future__ import annotations

import asyncio
import os
import select
import socket
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from qmpd.block import rbd_aio
from qmpd.block.rbd import RbdDriver
from qmpd.cli import parse_args
from qmpd.daemon import Daemon
from qmpd.nbd import protocol as p
from qmpd.nbd.server import NbdConnection
from tests.support.ceph import POOL, CephCluster
from tests.support.nbd import pending, raw_connection

SIZE = 1 << 20
#: Fewer than 8: the pump looks at its time budget every 8 requests, and
#: past it leaves the rest to a later turn of the loop.
COUNT = 7


@asynccontextmanager
async def served(ceph: CephCluster, tmp_path: Path, raw: bool
                 ) -> AsyncIterator[tuple[NbdConnection, socket.socket, rbd_aio.ImageAio, bytes]]:
    """An NBD connection to an export of an rbd node (under a raw node with
    ``raw``) holding random data, the client's socket, the image's ImageAio."""
    content = os.urandom(SIZE)
    tmp_path.mkdir(exist_ok=True)
    source = tmp_path / "content"
    source.write_bytes(content)
    image = await asyncio.to_thread(ceph.import_image, source)
    sock_path = tmp_path / "nbd.sock"
    blockdevs = ["--blockdev", f"driver=rbd,node-name=r,pool={POOL},image={image},"
                 f"conf={ceph.client_conf}"]
    if raw:
        blockdevs += ["--blockdev", "driver=raw,node-name=fmt,file=r"]
    daemon = Daemon(parse_args([
        "--qmp", f"unix:{tmp_path}/qmp.sock", *blockdevs,
        "--nbd-server", f"addr.type=unix,addr.path={sock_path}",
        "--export", f"type=nbd,id=e0,node-name={'fmt' if raw else 'r'},name=e,writable=on",
    ]))
    await daemon.start()
    client: socket.socket | None = None
    try:
        client, conn = await raw_connection(daemon, sock_path, SIZE)
        driver = daemon.block.graph.nodes["r"].driver
        assert isinstance(driver, RbdDriver)
        io = driver._io
        assert isinstance(io, rbd_aio.ImageAio)
        conn.loop.remove_reader(conn.fd)
        conn.loop.remove_reader(io.fd)
        try:
            yield conn, client, io, content
        finally:
            conn.loop.add_reader(io.fd, io._deliver)
            conn.loop.add_reader(conn.fd, conn._readable)
    finally:
        if client is not None:
            client.close()
        await daemon.shutdown()
        ceph.remove_image(image)


def _reads() -> bytes:
    return b"".join(p.request_header(p.Cmd.READ, i + 1, i * 65536, 4096) for i in range(COUNT))


def _reply(cookie: int, content: bytes) -> bytes:
    offset = (cookie - 1) * 65536
    return struct.pack(">IIQ", p.SIMPLE_REPLY_MAGIC, 0, cookie) + content[offset:offset + 4096]


async def deliver_all(io: rbd_aio.ImageAio, attempts: int = 200) -> None:
    """Run the image's completion callback until nothing is in flight (the
    test took it over from the loop)."""
    for _ in range(attempts):
        if not io.pending:
            return
        await asyncio.to_thread(select.select, [io.fd], [], [], 1)
        io._deliver()
        await asyncio.sleep(0)  # the raw node's coroutines go on


async def received(client: socket.socket, length: int, attempts: int) -> bytes:
    """What the server sent, once ``length`` bytes are in (or ``attempts`` turns
    of the loop later: it sends the rest as the socket drains)."""
    got = b""
    for _ in range(attempts):
        got += pending(client)
        if len(got) >= length:
            break
        await asyncio.sleep(0.005)
    return got


def by_cookie(got: bytes, size: int) -> dict[int, bytes]:
    """Simple replies of ``size`` bytes of data each, by cookie."""
    return {struct.unpack(">Q", got[i + 8:i + 16])[0]: got[i:i + 16 + size]
            for i in range(0, len(got), 16 + size)}


async def test_a_reader_callback_submits_its_requests_together(
        ceph: CephCluster, tmp_path: Path) -> None:
    for raw in (False, True):
        async with served(ceph, tmp_path / ("raw" if raw else "rbd"), raw) as (
                conn, client, io, content):
            client.sendall(_reads())
            conn._readable()
            # All in librbd's hands, submitted as one batch (one timestamp),
            # through the raw node's coroutines too.
            assert not io.held and len(io.pending) == COUNT, raw
            assert len({entry[3] for entry in io.pending.values()}) == 1, raw
            await deliver_all(io, 1000)
            got = await received(client, COUNT * (16 + 4096), 200)
            assert by_cookie(got, 4096) == {c: _reply(c, content)
                                            for c in range(1, COUNT + 1)}, raw


async def test_a_reply_leaves_in_the_completion_callback(
        ceph: CephCluster, tmp_path: Path) -> None:
    async with served(ceph, tmp_path, raw=False) as (conn, client, io, content):
        client.sendall(_reads())
        conn._readable()
        got = b""
        for _ in range(200):
            if not io.pending:
                break
            await asyncio.to_thread(select.select, [io.fd], [], [], 1)
            io._deliver()
            completed = COUNT - len(io.pending)
            # Every reply of what completed so far is in the socket already.
            got += pending(client)
            assert len(got) == completed * (16 + 4096), (len(got), completed)
        assert by_cookie(got, 4096) == {c: _reply(c, content) for c in range(1, COUNT + 1)}


async def test_replies_the_socket_cannot_take_at_once_stay_whole(
        ceph: CephCluster, tmp_path: Path) -> None:
    """Replies larger than the socket's buffer takes, while the client reads
    nothing: the one sent at once stops short, the rest waits its turn, and
    the client gets every reply whole, none inside another."""
    size = 32768
    async with served(ceph, tmp_path, raw=False) as (conn, client, io, content):
        # As small as it gets: a 32 KiB reply leaves in pieces.
        conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1)
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1)
        for _ in range(3):
            client.sendall(b"".join(p.request_header(p.Cmd.READ, c, (c - 1) * 65536, size)
                                    for c in range(1, COUNT + 1)))
            conn._readable()
            await deliver_all(io)
            assert not io.pending and conn._out  # short of room: some wait
            got = await received(client, COUNT * (16 + size), 2000)
            assert by_cookie(got, size) == {
                c: struct.pack(">IIQ", p.SIMPLE_REPLY_MAGIC, 0, c)
                + content[(c - 1) * 65536:(c - 1) * 65536 + size] for c in range(1, COUNT + 1)}
            assert not conn._out


async def test_the_requests_of_a_reader_callback_cross_the_graph_together(
        ceph: CephCluster, tmp_path: Path) -> None:
    """READs and WRITEs parsed in one reader callback reach the driver in one
    call per run of one kind (export, node and driver each loop over them,
    instead of a call per request and layer), in the client's order: librbd
    gets them in that order, and each is answered."""
    async with served(ceph, tmp_path, raw=False) as (conn, client, io, content):
        driver = conn.export.node.driver  # type: ignore[union-attr]
        batches: list[tuple[str, list[int]]] = []
        launched: list[str] = []
        read_many, write_many, launch = driver.read_many, driver.write_many, io._launch

        def observe_reads(reads: list[tuple[int, int, object]], stats: object) -> int:
            batches.append(("read", [offset for offset, _, _ in reads]))
            return read_many(reads, stats)  # type: ignore[arg-type]

        def observe_writes(writes: list[tuple[int, bytes, bool, object]]) -> int:
            batches.append(("write", [offset for offset, _, _, _ in writes]))
            return write_many(writes)  # type: ignore[arg-type]

        def observe_launch(entries: list[tuple[object, ...]], now: float) -> None:
            launched.extend("write" if entry[0] is io._lib.rbd_aio_write else "read"
                            for entry in entries)
            launch(entries, now)  # type: ignore[arg-type]

        driver.read_many = observe_reads  # type: ignore[method-assign]
        driver.write_many = observe_writes  # type: ignore[method-assign]
        io._launch = observe_launch  # type: ignore[method-assign]
        written = {c: bytes([c]) * 4096 for c in (4, 5)}
        client.sendall(
            b"".join(p.request_header(p.Cmd.READ, c, (c - 1) * 65536, 4096) for c in (1, 2, 3))
            + b"".join(p.request_header(p.Cmd.WRITE, c, (10 + c) * 65536, 4096) + written[c]
                       for c in (4, 5))
            + b"".join(p.request_header(p.Cmd.READ, c, (c - 1) * 65536, 4096) for c in (6, 7)))
        conn._readable()
        assert batches == [("read", [0, 65536, 131072]), ("write", [14 * 65536, 15 * 65536]),
                           ("read", [5 * 65536, 6 * 65536])]
        assert launched == ["read"] * 3 + ["write"] * 2 + ["read"] * 2
        await deliver_all(io, 1000)
        got = await received(client, 5 * (16 + 4096) + 2 * 16, 200)
        for c in (4, 5):
            write_reply = struct.pack(">IIQ", p.SIMPLE_REPLY_MAGIC, 0, c)
            assert write_reply in got
            got = got.replace(write_reply, b"", 1)
        assert by_cookie(got, 4096) == {c: _reply(c, content) for c in (1, 2, 3, 6, 7)}
        node = conn.export.node  # type: ignore[union-attr]
        assert node.stats.rd_operations == 5 and node.stats.rd_bytes == 5 * 4096
        assert node.stats.wr_operations == 2 and node.plain_writes == 0
        assert conn.export.stats.requests["read"] == 5  # type: ignore[union-attr]
        assert conn.export.stats.requests["write"] == 2  # type: ignore[union-attr]
        reads = [asyncio.ensure_future(node.read((10 + c) * 65536, 4096)) for c in (4, 5)]
        await asyncio.sleep(0)
        await deliver_all(io, 1000)
        assert [await read for read in reads] == [written[4], written[5]]


def _replies(got: bytes) -> list[tuple[int, int]]:
    """(cookie, error) of each reply in ``got``: simple replies without data."""
    return [struct.unpack(">IIQ", got[i:i + 16])[1:][::-1] for i in range(0, len(got), 16)]


async def test_a_full_window_answered_at_once_lets_the_rest_in(
        ceph: CephCluster, tmp_path: Path) -> None:
    """More requests than may be in flight arrive in one read, and those the
    batch sends the awaited way are answered at once (zero-length READs):
    the freed room takes the rest, with no further read of the socket."""
    async with served(ceph, tmp_path, raw=False) as (conn, client, io, _content):
        count = 3 * 64 + 5
        client.sendall(b"".join(p.request_header(p.Cmd.READ, c, 0, 0)
                                for c in range(1, count + 1)))
        conn._readable()
        got = await received(client, count * 16, 200)
        assert sorted(_replies(got)) == [(c, 0) for c in range(1, count + 1)]
        assert conn.in_flight == 0 and not io.pending


async def test_a_batch_that_raises_is_answered_once(
        ceph: CephCluster, tmp_path: Path) -> None:
    """A bug below the server raising while it starts a batch: what started
    before is answered as usual, what raised is answered with EIO, each
    request exactly once, and nothing stays counted in flight."""
    async with served(ceph, tmp_path, raw=False) as (conn, client, io, content):
        driver = conn.export.node.driver  # type: ignore[union-attr]
        read_many = driver.read_many
        calls: list[int] = []

        def failing_second(reads: list[tuple[int, int, object]], stats: object) -> int:
            calls.append(len(reads))
            if len(calls) == 2:
                raise RuntimeError("injected")
            return read_many(reads, stats)  # type: ignore[arg-type]

        driver.read_many = failing_second  # type: ignore[method-assign]
        client.sendall(p.request_header(p.Cmd.READ, 1, 0, 4096)
                       + p.request_header(p.Cmd.READ, 2, 0, 0)
                       + p.request_header(p.Cmd.READ, 3, 65536, 4096)
                       + p.request_header(p.Cmd.READ, 4, 131072, 4096))
        conn._readable()
        assert calls == [1, 2]
        await deliver_all(io, 1000)
        got = await received(client, 16 + 4096 + 3 * 16, 200)
        first = struct.pack(">IIQ", p.SIMPLE_REPLY_MAGIC, 0, 1) + content[:4096]
        assert got.count(first) == 1
        assert sorted(_replies(got.replace(first, b""))) == [(2, 0), (3, 5), (4, 5)]
        assert conn.in_flight == 0 and conn.in_flight_bytes == 0
