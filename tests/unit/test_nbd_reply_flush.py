"""The NBD server sends the replies of the requests one reader callback
completed when that callback ends: none is held back for a timer while the
client (which may be waiting for exactly those replies) sends more (issue 13:
held-back replies made the client and the server take turns instead of
working side by side).  A real daemon, a real export of a file, a raw socket.

The image lives in /dev/shm (tmpfs): there the file driver reads and writes
without the I/O thread pool, so these requests complete inside the callback
(elsewhere a request that waits for the pool is answered when it completes)."""

from __future__ import annotations

import os
import shutil
import struct
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from qmpd.cli import parse_args
from qmpd.daemon import Daemon
from qmpd.nbd import protocol as p
from tests.support.nbd import pending, raw_connection

SIZE = 1 << 20


@pytest.fixture
def shm() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="qmpd-test-", dir="/dev/shm"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _same(got: bytes, expected: bytes) -> bool:
    # (no 4 KiB diff of random bytes when it fails)
    return got == expected


async def test_replies_leave_when_the_reader_callback_ends(tmp_path: Path, shm: Path) -> None:
    image = shm / "disk.raw"
    content = os.urandom(SIZE)
    image.write_bytes(content)
    sock_path = tmp_path / "nbd.sock"
    daemon = Daemon(parse_args([
        "--qmp", f"unix:{tmp_path}/qmp.sock",
        "--blockdev", f"driver=file,node-name=f,filename={image}",
        "--nbd-server", f"addr.type=unix,addr.path={sock_path}",
        "--export", "type=nbd,id=e0,node-name=f,name=e,writable=on",
    ]))
    await daemon.start()
    client, conn = await raw_connection(daemon, sock_path, SIZE)
    try:
        # Take the reader callback over: the test runs it, with no turn of the
        # event loop between the bytes arriving and the callback returning.
        conn.loop.remove_reader(conn.fd)

        payload = os.urandom(4096)
        third = p.request_header(p.Cmd.READ, 3, 8192, 512)
        client.sendall(
            p.request_header(p.Cmd.WRITE, 1, 4096, 4096) + payload
            + p.request_header(p.Cmd.READ, 2, 0, 4096)
            + third[:10]  # the client is still sending
        )
        conn._readable()
        ok = struct.pack(">IIQ", p.SIMPLE_REPLY_MAGIC, 0, 1)
        read = struct.pack(">IIQ", p.SIMPLE_REPLY_MAGIC, 0, 2) + content[:4096]
        # Both replies are in the socket when the callback returns.
        got = pending(client)
        assert got[:16] == ok and _same(got, ok + read), len(got)

        client.sendall(third[10:])
        conn._readable()
        got = pending(client)
        assert _same(got, struct.pack(">IIQ", p.SIMPLE_REPLY_MAGIC, 0, 3)
                     + content[8192:8192 + 512]), len(got)
        # A WRITE whose payload is still on its way: whatever waited for it
        # leaves, at the latest, with its own reply when the payload is in.
        second = os.urandom(4096)
        client.sendall(p.request_header(p.Cmd.WRITE, 4, 12288, 1000) + second[:1000]
                       + p.request_header(p.Cmd.WRITE, 5, 12288, 4096) + second[:1000])
        conn._readable()
        got = pending(client)
        client.sendall(second[1000:])
        conn._readable()
        got += pending(client)
        assert got == struct.pack(">IIQ", p.SIMPLE_REPLY_MAGIC, 0, 4) \
            + struct.pack(">IIQ", p.SIMPLE_REPLY_MAGIC, 0, 5)
        # ... but not for a long payload: what is done leaves now.
        big = os.urandom(SIZE // 2)
        client.sendall(p.request_header(p.Cmd.WRITE, 6, 0, 512) + second[:512]
                       + p.request_header(p.Cmd.WRITE, 7, SIZE // 2, len(big)) + big[:1000])
        conn._readable()
        assert pending(client) == struct.pack(">IIQ", p.SIMPLE_REPLY_MAGIC, 0, 6)
        got = b""
        rest = memoryview(big)[1000:]
        for _ in range(10000):  # the socket takes the rest in pieces
            if rest:
                try:
                    rest = rest[client.send(rest):]
                except BlockingIOError:
                    pass
            conn._readable()
            got += pending(client)
            if got:
                break
        assert not rest and got == struct.pack(">IIQ", p.SIMPLE_REPLY_MAGIC, 0, 7)
        with open(image, "rb") as f:
            f.seek(4096)
            assert _same(f.read(4096), payload)
            f.seek(12288)
            assert _same(f.read(4096), second)
            f.seek(SIZE // 2)
            assert _same(f.read(len(big)), big)
        conn.loop.add_reader(conn.fd, conn._readable)
    finally:
        client.close()
        await daemon.shutdown()


def test_a_recycled_payload_takes_the_next_write_of_its_size_whole() -> None:
    """Sans-IO: a payload handed back with recycle() receives the next WRITE of
    the same length, which arrives in pieces; every byte is the new WRITE's."""
    size = 128 * 1024
    tx = p.Transmission(lambda: 1 << 30, read_only=False, structured=True)
    first, second = os.urandom(size), os.urandom(size)
    tx.receive_data(p.request_header(p.Cmd.WRITE, 1, 0, size) + first[:1000])
    assert tx.next_event() is p.NEED_DATA
    tx.receive_data(first[1000:])
    one = tx.next_event()
    assert isinstance(one, p.Request) and one.payload == first
    buffer = one.payload
    assert isinstance(buffer, bytearray)
    tx.recycle(buffer)
    tx.receive_data(p.request_header(p.Cmd.WRITE, 2, size, size) + second[:5000])
    assert tx.next_event() is p.NEED_DATA
    for pos in range(5000, size, 30000):
        tx.receive_data(second[pos:pos + 30000])
    two = tx.next_event()
    assert isinstance(two, p.Request) and two.cookie == 2
    assert two.payload is buffer and _same(bytes(buffer), second)
    # A WRITE of another size gets a buffer of its own.
    tx.recycle(buffer)
    tx.receive_data(p.request_header(p.Cmd.WRITE, 3, 0, size // 2) + first[:10])
    tx.receive_data(first[10:size // 2])
    three = tx.next_event()
    assert isinstance(three, p.Request) and three.payload is not buffer
    assert three.payload == first[:size // 2]


def test_recycled_payloads_are_kept_several_and_bounded() -> None:
    """Sans-IO: completions come in bunches, so several recycled payloads are
    kept (each handed to one WRITE only, even if recycled twice), within
    SPARES and SPARE_BYTES beyond the first."""
    size = 1 << 20
    tx = p.Transmission(lambda: 1 << 30, read_only=False, structured=True)

    def write(cookie: int, data: bytes) -> bytearray:
        tx.receive_data(p.request_header(p.Cmd.WRITE, cookie, 0, len(data)) + data[:10])
        assert tx.next_event() is p.NEED_DATA
        tx.receive_data(data[10:])
        got = tx.next_event()
        assert isinstance(got, p.Request) and got.payload == data
        assert isinstance(got.payload, bytearray)
        return got.payload

    datas = [os.urandom(size) for _ in range(6)]
    first = [write(i, datas[i]) for i in range(4)]
    tx.recycle(first[0])
    tx.recycle(first[0])  # again: still one spare
    for buffer in first[1:]:
        tx.recycle(buffer)
    again = [write(10 + i, datas[4 + i % 2]) for i in range(4)]
    assert {id(b) for b in again} == {id(b) for b in first}
    fresh = write(20, datas[0])  # all taken: a new one
    assert all(fresh is not b for b in first)
    # Beyond SPARES, or beyond SPARE_BYTES after the first, none is kept.
    big = [write(30 + i, os.urandom(6 << 20)) for i in range(2)]
    for buffer in big:
        tx.recycle(buffer)
    assert write(40, bytes(6 << 20)) is big[0]
    other = write(41, bytes(6 << 20))
    assert all(other is not b for b in big)


def test_read_data_is_read_parts_of_one_piece() -> None:
    data = os.urandom(4096)
    for structured in (False, True):
        replies = p.Replies(structured)
        fast = replies.read_data(0x1122334455667788, 1 << 40, data)
        slow = replies.read_parts(0x1122334455667788, 1 << 40, [(1 << 40, 4096, data)])
        assert b"".join(fast) == b"".join(bytes(x) for x in slow if isinstance(x, bytes))
        assert fast[1] is data  # the data itself, not a copy
