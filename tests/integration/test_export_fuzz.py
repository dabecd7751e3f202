"""Fuzzing a live NBD server over real sockets: every reply well-formed, nothing hangs.

The server (block layer, exports, NBD listener) runs in a thread of this
process; hypothesis drives raw client sockets against it.  Each example
half-closes its socket after sending, so the server must answer everything
it accepted and then close: the test reads to EOF (a hang fails the
example by timeout) and parses every byte.  After each example a well-
behaved client must still be served.

Reduced counts by default; ``QMPD_SLOW=1`` runs the full ones.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qmpd.block.core import BlockLayer
from qmpd.nbd import protocol as p
from qmpd.nbd.exports import BlockExports
from qmpd.qmp.events import EventBus

SIZE = 1 << 20
FAST = settings(max_examples=40, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
FULL = settings(max_examples=1500, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


class Server:
    """qmpd's NBD server on its own event loop thread."""

    def __init__(self, tmp: Path) -> None:
        self.sock = str(tmp / "fuzz.sock")
        image = tmp / "fuzz.raw"
        with open(image, "wb") as f:
            f.write(bytes(range(256)) * (SIZE // 256 // 2))
            f.truncate(SIZE)
        self.image = image
        self.check_image = tmp / "check.raw"
        self.check_image.write_bytes(bytes(range(256)) * 16)
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        assert self.ready.wait(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self._setup())
        self.ready.set()
        self.loop.run_forever()

    async def _setup(self) -> None:
        self.block = BlockLayer()
        await self.block.add({"driver": "raw", "node-name": "disk",
                              "file": {"driver": "file", "filename": str(self.image)}})
        self.exports = BlockExports(self.block, EventBus())
        await self.exports.start_server({"addr": {"type": "unix", "path": self.sock}})
        await self.exports.add({"type": "nbd", "id": "w", "node-name": "disk", "writable": True})
        await self.exports.add({"type": "nbd", "id": "r", "node-name": "disk", "name": "ro",
                                "allocation-depth": True})
        await self.block.add({"driver": "raw", "node-name": "check", "read-only": True,
                              "file": {"driver": "file", "filename": str(self.check_image)}})
        await self.exports.add({"type": "nbd", "id": "c", "node-name": "check"})

    def stop(self) -> None:
        async def teardown() -> None:
            await self.exports.shutdown()
            await self.block.close_all()

        asyncio.run_coroutine_threadsafe(teardown(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)

    def connections(self) -> int:
        async def count() -> int:
            server = self.exports.server
            return len(server.connections) if server is not None else 0

        return asyncio.run_coroutine_threadsafe(count(), self.loop).result(10)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = Server(tmp_path_factory.mktemp("fuzz"))
    yield srv
    srv.stop()


def exchange(server: Server, data: bytes, timeout: float = 10.0) -> bytes:
    """Send ``data``, half-close, read until the server closes."""
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(timeout)
    s.connect(server.sock)
    try:
        try:
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server already hung up: fine, what it sent is checked
        out = bytearray()
        while True:
            try:
                chunk = s.recv(1 << 20)
            except ConnectionResetError:
                break
            if not chunk:
                break
            out += chunk
        return bytes(out)
    finally:
        s.close()


def parse_option_replies(data: bytes, pos: int) -> int:
    while len(data) - pos >= 20:
        magic, _option, _kind, length = struct.unpack_from(">QIII", data, pos)
        if magic != p.OPTION_REPLY_MAGIC:
            break
        assert pos + 20 + length <= len(data), "truncated option reply"
        pos += 20 + length
    return pos


def parse_transmission(data: bytes, pos: int, requests: dict[int, tuple[int, int]],
                       structured: bool) -> set[int]:
    """Check every reply; the cookies completely answered."""
    done: set[int] = set()
    partial: dict[int, int] = {}
    while pos < len(data):
        assert len(data) - pos >= 4, "truncated reply"
        magic = struct.unpack_from(">I", data, pos)[0]
        if magic == p.SIMPLE_REPLY_MAGIC:
            _magic, error, cookie = struct.unpack_from(">IIQ", data, pos)
            pos += 16
            assert cookie in requests and cookie not in done and cookie not in partial
            kind, length = requests[cookie]
            if kind == p.Cmd.READ and not error:
                assert not structured, "simple reply to a structured READ"
                pos += length
                assert pos <= len(data), "truncated read data"
            done.add(cookie)
            continue
        assert magic == p.STRUCTURED_REPLY_MAGIC, f"bad reply magic {magic:#x}"
        assert structured
        _magic, flags, kind, cookie, length = struct.unpack_from(">IHHQI", data, pos)
        pos += 20
        body = data[pos : pos + length]
        assert len(body) == length, "truncated chunk"
        pos += length
        assert cookie in requests and cookie not in done
        rkind, rlen = requests[cookie]
        if kind == p.ReplyType.OFFSET_DATA:
            assert rkind == p.Cmd.READ and length > 8
            partial[cookie] = partial.get(cookie, 0) + length - 8
        elif kind == p.ReplyType.OFFSET_HOLE:
            assert rkind == p.Cmd.READ and length == 12
            size = struct.unpack_from(">I", body, 8)[0]
            assert size > 0
            partial[cookie] = partial.get(cookie, 0) + size
        elif kind == p.ReplyType.BLOCK_STATUS:
            assert rkind == p.Cmd.BLOCK_STATUS and length >= 12 and (length - 4) % 8 == 0
            extents = [struct.unpack_from(">II", body, 4 + 8 * i) for i in range((length - 4) // 8)]
            assert all(n > 0 for n, _flags in extents)
        elif kind == p.ReplyType.ERROR:
            error, msg_len = struct.unpack_from(">IH", body)
            assert error and msg_len == length - 6
            partial[cookie] = -1
        elif kind == p.ReplyType.NONE:
            assert length == 0 and flags & p.ReplyFlag.DONE
        else:
            raise AssertionError(f"unexpected chunk type {kind}")
        if flags & p.ReplyFlag.DONE:
            got = partial.pop(cookie, 0)
            if rkind == p.Cmd.READ and got >= 0:
                assert got == rlen, "READ chunks do not cover the request"
            done.add(cookie)
    assert not partial, "chunks without DONE"
    return done


def handshake(structured: bool) -> bytes:
    if not structured:
        return struct.pack(">I", 3) + p.option_request(p.Opt.EXPORT_NAME, b"disk")
    return (struct.pack(">I", 3) + p.option_request(p.Opt.STRUCTURED_REPLY)
            + p.option_request(p.Opt.SET_META_CONTEXT,
                               p.meta_request_data("disk", [p.BASE_ALLOCATION]))
            + p.option_request(p.Opt.GO, p.info_request_data("disk", [p.Info.BLOCK_SIZE])))


@st.composite
def requests(draw: st.DrawFn) -> tuple[bytes, dict[int, tuple[int, int]], bool]:
    """Well-framed requests, maybe followed by garbage; their cookies are distinct."""
    out = []
    expected: dict[int, tuple[int, int]] = {}
    for cookie in range(draw(st.integers(0, 24))):
        kind = draw(st.sampled_from([0, 0, 1, 1, 3, 4, 5, 6, 7, 7, 9, 200]))
        flags = draw(st.one_of(st.sampled_from([0, 1, 2, 4, 8, 16, 3, 0x13]), st.integers(0, 0xFFFF)))
        length = draw(st.one_of(st.integers(0, 70000), st.sampled_from([SIZE, 1 << 25, (1 << 25) + 1])))
        offset = draw(st.one_of(st.integers(0, SIZE), st.sampled_from([SIZE - 1, 1 << 40])))
        if kind == p.Cmd.WRITE:
            length = min(length, 70000)
            payload = draw(st.binary(max_size=64)).ljust(length, b"\x07")[:length]
        else:
            payload = b""
        out.append(p.request_header(kind, cookie, offset, length, flags) + payload)
        expected[cookie] = (kind, length)
    bad_magic = b"\xde\xad" * 14
    tail = draw(st.sampled_from([b"", p.request_header(p.Cmd.DISC, 999), bad_magic, b"junk"]))
    if tail == bad_magic:  # QEMU's EINVAL reply, under the cookie of the bad header
        expected[int.from_bytes(bad_magic[8:16], "big")] = (-1, 0)
    return b"".join(out) + tail, expected, draw(st.booleans())


def check_transmission(server: Server, case: tuple[bytes, dict[int, tuple[int, int]], bool]) -> None:
    data, expected, structured = case
    out = exchange(server, handshake(structured) + data)
    pos = 18  # greeting
    if structured:
        pos = parse_option_replies(out, pos)
    else:
        pos += 10
    answered = parse_transmission(out, pos, expected, structured)
    assert answered == set(expected)  # every request answered exactly once


@FAST
@given(case=requests())
def test_request_fuzz(server: Server, case: Any) -> None:
    check_transmission(server, case)
    assert_still_serving(server)


@pytest.mark.slow
@FULL
@given(case=requests())
def test_request_fuzz_full(server: Server, case: Any) -> None:
    check_transmission(server, case)
    assert_still_serving(server)


@st.composite
def negotiation(draw: st.DrawFn) -> bytes:
    flags = draw(st.sampled_from([3, 1, 0, 0xFF]))
    parts = [struct.pack(">I", flags)]
    for _ in range(draw(st.integers(0, 6))):
        code = draw(st.one_of(st.integers(0, 12), st.just(0x80000001)))
        body = draw(st.one_of(
            st.binary(max_size=40),
            st.builds(p.info_request_data, st.sampled_from(["disk", "ro", "", "x"]),
                      st.lists(st.integers(0, 5), max_size=3)),
            st.builds(p.meta_request_data, st.sampled_from(["disk", "ro", "nosuch"]),
                      st.lists(st.sampled_from(["base:", "base:allocation", "qemu:", "qemu:allocation-depth"]),
                               max_size=3)),
        ))
        parts.append(p.option_request(code, body))
    if draw(st.booleans()):
        parts.append(draw(st.binary(max_size=64)))
    return b"".join(parts)


def check_negotiation(server: Server, data: bytes) -> None:
    out = exchange(server, data)
    assert out[:18] == struct.pack(">QQH", p.NBDMAGIC, p.IHAVEOPT, 3)
    pos = parse_option_replies(out, 18)
    # Anything after the option replies is an EXPORT_NAME reply (or a
    # transmission that began with GO and then saw junk: replies of it).
    rest = len(out) - pos
    if rest:
        assert rest in (10, 134) or out[pos : pos + 4] in (
            struct.pack(">I", p.SIMPLE_REPLY_MAGIC), struct.pack(">I", p.STRUCTURED_REPLY_MAGIC))


@FAST
@given(data=negotiation())
def test_handshake_fuzz_live(server: Server, data: bytes) -> None:
    check_negotiation(server, data)
    assert_still_serving(server)


@pytest.mark.slow
@FULL
@given(data=negotiation())
def test_handshake_fuzz_live_full(server: Server, data: bytes) -> None:
    check_negotiation(server, data)
    assert_still_serving(server)


def assert_still_serving(server: Server) -> None:
    good = (struct.pack(">I", 3) + p.option_request(p.Opt.EXPORT_NAME, b"check")
            + p.request_header(p.Cmd.READ, 1, 0, 256) + p.request_header(p.Cmd.DISC, 2))
    out = exchange(server, good)
    assert out[18 + 10 : 18 + 10 + 16] == struct.pack(">IIQ", p.SIMPLE_REPLY_MAGIC, 0, 1)
    assert out[18 + 10 + 16 :] == bytes(range(256))
