"""Fuzzing the sans-IO NBD core with hypothesis: no crash, no hang, well-formed output.

The default runs use reduced example counts; ``QMPD_SLOW=1`` runs the full
counts (the ``slow`` variants).
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qmpd.nbd import protocol as p
from tests.unit.test_nbd_protocol import catalog

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FULL = settings(max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.too_slow])

NAMES = st.sampled_from(["disk", "ro", "", "nosuch", "d" * 5000])
QUERIES = st.lists(
    st.sampled_from(["base:allocation", "base:", "qemu:", "qemu:allocation-depth", "x:y", "", "base"]),
    max_size=4,
)


@st.composite
def option(draw: st.DrawFn) -> tuple[int, bytes]:
    code = draw(st.one_of(st.integers(0, 12), st.sampled_from([1 << 31, 0xFFFFFFFF])))
    kind = draw(st.sampled_from(["good", "random", "empty"]))
    if kind == "empty":
        return code, b""
    if kind == "random":
        return code, draw(st.binary(max_size=64))
    if code in (p.Opt.INFO, p.Opt.GO):
        infos = draw(st.lists(st.integers(0, 0xFFFF), max_size=4))
        return code, p.info_request_data(draw(NAMES), infos)
    if code in (p.Opt.LIST_META_CONTEXT, p.Opt.SET_META_CONTEXT):
        return code, p.meta_request_data(draw(NAMES), draw(QUERIES))
    if code == p.Opt.EXPORT_NAME:
        return code, draw(NAMES).encode()
    return code, b""


def chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    pieces, last = [], 0
    for point in [*points, len(data)]:
        pieces.append(data[last:point])
        last = point
    return pieces


def run_handshake(flags: int, options: list[tuple[int, bytes]], cuts: list[int]) -> None:
    hs = p.ServerHandshake(catalog())
    out = bytearray(hs.data_to_send())
    stream = struct.pack(">I", flags) + b"".join(p.option_request(c, d) for c, d in options)
    events: list[p.HandshakeEvent] = []
    for piece in chunked(stream, cuts):
        hs.receive_data(piece)
        for _ in range(len(options) + 2):  # never more events than options
            event = hs.next_event()
            if isinstance(event, p.NeedData):
                break
            events.append(event)
        else:
            raise AssertionError("handshake produced events without end")
        out += hs.data_to_send()
    assert len(events) <= 1
    # The output: greeting, then one final reply per option handled, in order.
    assert bytes(out[:18]) == struct.pack(">QQH", p.NBDMAGIC, p.IHAVEOPT, 3)
    pos = 18
    done = events[0] if events else None
    for code, _data in options:
        if flags & ~3 or (pos == len(out) and isinstance(done, p.HandshakeClosed)):
            break
        if code == p.Opt.EXPORT_NAME:
            if isinstance(done, p.HandshakeDone):
                tail = 10 if flags & p.ClientFlag.NO_ZEROES else 134
                assert len(out) - pos == tail
                size, tflags = struct.unpack_from(">QH", out, pos)
                assert tflags & p.TFlag.HAS_FLAGS and size == done.export.size
                pos += tail
            break
        saw_export_info = False
        while True:
            assert len(out) - pos >= 20, (code, out[pos:])
            magic, echoed, reply, length = struct.unpack_from(">QIII", out, pos)
            assert magic == p.OPTION_REPLY_MAGIC and echoed == code
            body = bytes(out[pos + 20 : pos + 20 + length])
            assert len(body) == length
            pos += 20 + length
            if reply == p.Rep.INFO:
                assert code in (p.Opt.INFO, p.Opt.GO)
                if struct.unpack_from(">H", body)[0] == p.Info.EXPORT:
                    saw_export_info = True
                continue
            if reply == p.Rep.SERVER:
                assert code == p.Opt.LIST
                continue
            if reply == p.Rep.META_CONTEXT:
                assert code in (p.Opt.LIST_META_CONTEXT, p.Opt.SET_META_CONTEXT)
                continue
            assert reply == p.Rep.ACK or reply & (1 << 31)
            if reply == p.Rep.ACK and code in (p.Opt.INFO, p.Opt.GO):
                assert saw_export_info  # NBD_INFO_EXPORT always precedes the ACK
            break
        if isinstance(done, p.HandshakeDone) and code == p.Opt.GO and reply == p.Rep.ACK:
            break
        if code == p.Opt.ABORT:
            break
    assert pos == len(out)


handshake_property = given(
    flags=st.one_of(st.just(3), st.just(1), st.integers(0, 0xFFFFFFFF)),
    options=st.lists(option(), max_size=8),
    cuts=st.lists(st.integers(0, 1 << 16), max_size=6),
)


@FAST
@handshake_property
def test_handshake_fuzz(flags: int, options: list[tuple[int, bytes]], cuts: list[int]) -> None:
    run_handshake(flags, options, cuts)


@pytest.mark.slow
@FULL
@handshake_property
def test_handshake_fuzz_full(flags: int, options: list[tuple[int, bytes]], cuts: list[int]) -> None:
    run_handshake(flags, options, cuts)


@FAST
@given(data=st.binary(max_size=400), cuts=st.lists(st.integers(0, 400), max_size=5))
def test_handshake_random_bytes(data: bytes, cuts: list[int]) -> None:
    hs = p.ServerHandshake(catalog())
    hs.data_to_send()
    for piece in chunked(data, cuts):
        hs.receive_data(piece)
        for _ in range(100):
            if isinstance(hs.next_event(), p.NeedData):
                break
        else:
            raise AssertionError("no end of events")
        out = hs.data_to_send()
        if out and not out.startswith(struct.pack(">Q", p.OPTION_REPLY_MAGIC)):
            assert len(out) in (10, 134)  # an EXPORT_NAME reply


# --- transmission --------------------------------------------------------------------------

SIZE = 1 << 20


@st.composite
def request(draw: st.DrawFn) -> tuple[bytes, int, int]:
    """(wire bytes, cookie, type) of one well-framed request."""
    kind = draw(st.one_of(st.integers(0, 9), st.integers(10, 0xFFFF)))
    if kind == p.Cmd.DISC:
        kind = p.Cmd.READ
    cookie = draw(st.integers(0, (1 << 64) - 1))
    flags = draw(st.one_of(st.integers(0, 31), st.integers(0, 0xFFFF)))
    offset = draw(st.one_of(st.integers(0, SIZE), st.integers(0, (1 << 64) - 1)))
    if kind == p.Cmd.WRITE:
        length = draw(st.integers(0, 2048))
        payload = draw(st.binary(min_size=length, max_size=length))
    else:
        length = draw(st.one_of(st.integers(0, SIZE), st.integers(0, (1 << 32) - 1)))
        payload = b""
    return p.request_header(kind, cookie, offset, length, flags) + payload, cookie, kind


def check_request(event: p.Request, structured: bool, read_only: bool) -> None:
    cmd = p.Cmd(event.type)
    allowed = {
        p.Cmd.READ: 0x1 | (0x4 if structured else 0), p.Cmd.WRITE: 1, p.Cmd.FLUSH: 1,
        p.Cmd.TRIM: 1, p.Cmd.CACHE: 1, p.Cmd.WRITE_ZEROES: 0x13, p.Cmd.BLOCK_STATUS: 0x9,
    }[cmd]
    assert not event.flags & ~allowed
    if cmd not in (p.Cmd.FLUSH,):
        assert event.offset + event.length <= SIZE
    if cmd in (p.Cmd.READ, p.Cmd.WRITE, p.Cmd.CACHE):
        assert event.length <= p.MAX_PAYLOAD
    if cmd == p.Cmd.WRITE:
        assert event.payload is not None and len(event.payload) == event.length
        assert not read_only
    if cmd in (p.Cmd.TRIM, p.Cmd.WRITE_ZEROES):
        assert not read_only
    if cmd == p.Cmd.BLOCK_STATUS:
        assert structured and event.length > 0


def run_transmission(
    requests: list[tuple[bytes, int, int]], tail: bytes, structured: bool, read_only: bool,
    cuts: list[int], feed: Callable[[p.Transmission, bytes], None],
) -> None:
    t = p.Transmission(lambda: SIZE, read_only, structured, {0: p.BASE_ALLOCATION})
    stream = b"".join(r[0] for r in requests) + tail
    got: list[Any] = []
    for piece in chunked(stream, cuts):
        feed(t, piece)
        for _ in range(len(requests) + 2):
            event = t.next_event()
            if isinstance(event, p.NeedData):
                break
            got.append(event)
        else:
            raise AssertionError("more events than requests")
    # One event per well-framed request, in order, with its cookie.
    for (_, cookie, _kind), event in zip(requests, got, strict=False):
        assert isinstance(event, p.Request | p.Rejected)
        req = event if isinstance(event, p.Request) else event.request
        assert req.cookie == cookie
        if isinstance(event, p.Request):
            check_request(event, structured, read_only)
        else:
            assert event.error == p.Errno.EINVAL and event.message
    assert len(got) >= len(requests)
    for extra in got[len(requests):]:
        assert isinstance(extra, p.Request | p.Rejected | p.Violation | p.Disconnect)


def feed_bytes(t: p.Transmission, data: bytes) -> None:
    t.receive_data(data)


def feed_buffers(t: p.Transmission, data: bytes) -> None:
    view = memoryview(data)
    while view:
        buf = t.get_buffer()
        n = min(len(buf), len(view))
        assert n > 0
        buf[:n] = view[:n]
        t.buffer_updated(n)
        view = view[n:]


transmission_property = given(
    requests=st.lists(request(), max_size=12),
    tail=st.binary(max_size=64),
    structured=st.booleans(),
    read_only=st.booleans(),
    cuts=st.lists(st.integers(0, 1 << 16), max_size=6),
    feed=st.sampled_from([feed_bytes, feed_buffers]),
)


@FAST
@transmission_property
def test_transmission_fuzz(**kw: Any) -> None:
    run_transmission(**kw)


@pytest.mark.slow
@FULL
@transmission_property
def test_transmission_fuzz_full(**kw: Any) -> None:
    run_transmission(**kw)
