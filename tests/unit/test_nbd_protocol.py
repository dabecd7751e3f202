"""The sans-IO NBD core: handshake and transmission state machines, with bytes only."""

from __future__ import annotations

import itertools
import struct
from dataclasses import dataclass, field

import pytest
from hypothesis import given
from hypothesis import strategies as st

from qmpd.nbd import protocol as p

GREETING = struct.pack(">QQH", p.NBDMAGIC, p.IHAVEOPT, 3)


@dataclass
class Catalog:
    exports: dict[str, p.ExportDescription] = field(default_factory=dict)

    def lookup(self, name: str) -> p.ExportDescription | None:
        return self.exports.get(name)

    def listing(self) -> list[tuple[str, str]]:
        return [(e.name, e.description) for e in self.exports.values()]


RW_FLAGS = (
    p.TFlag.HAS_FLAGS | p.TFlag.SEND_FLUSH | p.TFlag.SEND_FUA | p.TFlag.SEND_CACHE
    | p.TFlag.SEND_TRIM | p.TFlag.SEND_WRITE_ZEROES | p.TFlag.SEND_FAST_ZERO
    | p.TFlag.CAN_MULTI_CONN
)


def catalog() -> Catalog:
    return Catalog({
        "disk": p.ExportDescription("disk", 1 << 20, RW_FLAGS),
        "ro": p.ExportDescription(
            "ro", 4096, p.TFlag.HAS_FLAGS | p.TFlag.READ_ONLY, description="read-only view",
            contexts=(p.BASE_ALLOCATION, p.ALLOCATION_DEPTH),
        ),
    })


def parse_replies(data: bytes) -> list[tuple[int, int, bytes]]:
    """Option replies in ``data``: (option, type, payload); asserts they are well-formed."""
    out = []
    pos = 0
    while pos < len(data):
        magic, option, kind, length = struct.unpack_from(">QIII", data, pos)
        assert magic == p.OPTION_REPLY_MAGIC
        pos += 20
        assert pos + length <= len(data)
        out.append((option, kind, data[pos : pos + length]))
        pos += length
    return out


class Negotiation:
    """Drive a ServerHandshake the way a client would."""

    def __init__(self, flags: int = 3) -> None:
        self.hs = p.ServerHandshake(catalog())
        assert self.hs.data_to_send() == GREETING
        self.events: list[p.HandshakeEvent] = []
        self.feed(struct.pack(">I", flags))

    def feed(self, data: bytes) -> bytes:
        self.hs.receive_data(data)
        while True:
            event = self.hs.next_event()
            if isinstance(event, p.NeedData):
                break
            self.events.append(event)
        return self.hs.data_to_send()

    def option(self, option: int, data: bytes = b"") -> list[tuple[int, int, bytes]]:
        return parse_replies(self.feed(p.option_request(option, data)))


def test_greeting_and_unknown_client_flags() -> None:
    n = Negotiation(flags=0x7)
    assert n.events == [p.HandshakeClosed("Unknown client flags 0x7 received", graceful=False)]
    n = Negotiation(flags=0x100)
    assert n.events == [p.HandshakeClosed("Unknown client flags 0x100 received", graceful=False)]


def test_bad_option_magic_and_oversized_option_close() -> None:
    n = Negotiation()
    n.feed(struct.pack(">QII", 0x1234, p.Opt.LIST, 0))
    assert n.events == [p.HandshakeClosed("Bad magic received", graceful=False)]
    n = Negotiation()
    n.feed(struct.pack(">QII", p.IHAVEOPT, p.Opt.GO, p.MAX_OPTION_LENGTH + 1))
    assert isinstance(n.events[0], p.HandshakeClosed) and not n.events[0].graceful


def test_long_option_is_skipped_with_too_big() -> None:
    n = Negotiation()
    length = p.MAX_BUFFERED_OPTION + 10
    out = n.feed(struct.pack(">QII", p.IHAVEOPT, p.Opt.INFO, length))
    assert out == b""
    out = n.feed(b"\0" * length)
    assert parse_replies(out) == [(p.Opt.INFO, p.Rep.ERR_TOO_BIG, b"option too long")]
    assert n.option(p.Opt.STRUCTURED_REPLY) == [(p.Opt.STRUCTURED_REPLY, p.Rep.ACK, b"")]


def test_export_name_with_and_without_zeroes() -> None:
    n = Negotiation(flags=3)
    out = n.feed(p.option_request(p.Opt.EXPORT_NAME, b"disk") + b"extra")
    assert out == struct.pack(">QH", 1 << 20, RW_FLAGS)
    (done,) = n.events
    assert isinstance(done, p.HandshakeDone) and done.leftover == b"extra"
    assert not done.structured and done.contexts == {}
    n = Negotiation(flags=1)
    out = n.feed(p.option_request(p.Opt.EXPORT_NAME, b"ro"))
    assert out == struct.pack(">QH", 4096, p.TFlag.HAS_FLAGS | p.TFlag.READ_ONLY) + bytes(124)


def test_export_name_unknown_hangs_up() -> None:
    n = Negotiation()
    assert n.feed(p.option_request(p.Opt.EXPORT_NAME, b"nosuch")) == b""
    assert n.events == [p.HandshakeClosed("export 'nosuch' not present", graceful=True)]


def test_abort_list_starttls_unknown() -> None:
    n = Negotiation()
    assert n.option(p.Opt.LIST) == [
        (p.Opt.LIST, p.Rep.SERVER, struct.pack(">I", 4) + b"disk"),
        (p.Opt.LIST, p.Rep.SERVER, struct.pack(">I", 2) + b"roread-only view"),
        (p.Opt.LIST, p.Rep.ACK, b""),
    ]
    assert n.option(p.Opt.LIST, b"x") == [
        (p.Opt.LIST, p.Rep.ERR_INVALID, b"option 'list' has unexpected length")]
    assert n.option(p.Opt.STARTTLS) == [(p.Opt.STARTTLS, p.Rep.ERR_POLICY, b"TLS not configured")]
    # QEMU 7.2 names only the options it implements.
    assert n.option(p.Opt.STARTTLS, b"x") == [
        (p.Opt.STARTTLS, p.Rep.ERR_INVALID, b"option 'starttls' has unexpected length")]
    assert n.option(p.Opt.EXTENDED_HEADERS) == [
        (11, p.Rep.ERR_UNSUP, b"Unsupported option 11 (<unknown>)")]
    assert n.option(77) == [(77, p.Rep.ERR_UNSUP, b"Unsupported option 77 (<unknown>)")]
    assert n.option(p.Opt.ABORT) == [(p.Opt.ABORT, p.Rep.ACK, b"")]
    assert n.events == [p.HandshakeClosed("client sent NBD_OPT_ABORT", graceful=True)]


def test_non_fixed_client_is_dropped_on_unknown_option() -> None:
    n = Negotiation(flags=0)
    n.option(77)
    assert isinstance(n.events[0], p.HandshakeClosed) and not n.events[0].graceful


def test_info_and_go_replies_in_qemu_order() -> None:
    n = Negotiation()
    assert n.option(p.Opt.STRUCTURED_REPLY) == [(p.Opt.STRUCTURED_REPLY, p.Rep.ACK, b"")]
    replies = n.option(p.Opt.INFO, p.info_request_data("ro", [p.Info.BLOCK_SIZE, p.Info.NAME, 99]))
    ro_flags = p.TFlag.HAS_FLAGS | p.TFlag.READ_ONLY | p.TFlag.SEND_DF
    assert replies == [
        (p.Opt.INFO, p.Rep.INFO, struct.pack(">H", p.Info.NAME) + b"ro"),
        (p.Opt.INFO, p.Rep.INFO, struct.pack(">H", p.Info.DESCRIPTION) + b"read-only view"),
        (p.Opt.INFO, p.Rep.INFO, struct.pack(">HIII", p.Info.BLOCK_SIZE, 1, 4096, 32 << 20)),
        (p.Opt.INFO, p.Rep.INFO, struct.pack(">HQH", p.Info.EXPORT, 4096, ro_flags)),
        (p.Opt.INFO, p.Rep.ACK, b""),
    ]
    assert n.events == []
    assert n.option(p.Opt.GO, p.info_request_data("nosuch", [])) == [
        (p.Opt.GO, p.Rep.ERR_UNKNOWN, b"export 'nosuch' not present")]
    replies = n.option(p.Opt.GO, p.info_request_data("disk", []))
    assert [r[1] for r in replies] == [p.Rep.INFO, p.Rep.INFO, p.Rep.ACK]
    (done,) = n.events
    assert isinstance(done, p.HandshakeDone)
    assert done.flags == RW_FLAGS | p.TFlag.SEND_DF and done.structured


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"\0\0", b"Inconsistent lengths in option go"),
        (struct.pack(">I", 100) + b"disk", b"Inconsistent lengths in option go"),
        (struct.pack(">I", 4) + b"disk" + struct.pack(">H", 2) + b"\0\3",
         b"Inconsistent lengths in option go"),
        (struct.pack(">I", 4) + b"disk\0\0zz", b"option 'go' has unexpected length"),
        (struct.pack(">I", 4) + b"di\0k\0\0", b"Unexpected embedded NUL in option go"),
        (struct.pack(">I", 5000) + bytes(5002), b"Invalid name length: 5000"),
    ],
)
def test_malformed_info(data: bytes, message: bytes) -> None:
    n = Negotiation()
    assert n.option(p.Opt.GO, data) == [(p.Opt.GO, p.Rep.ERR_INVALID, message)]


def test_structured_reply_twice_and_with_data() -> None:
    n = Negotiation()
    assert n.option(p.Opt.STRUCTURED_REPLY, b"x") == [
        (8, p.Rep.ERR_INVALID, b"option 'structured reply' has unexpected length")]
    n.option(p.Opt.STRUCTURED_REPLY)
    assert n.option(p.Opt.STRUCTURED_REPLY) == [
        (8, p.Rep.ERR_INVALID, b"structured reply already negotiated")]


def test_meta_context_rules() -> None:
    n = Negotiation()
    assert n.option(p.Opt.SET_META_CONTEXT, p.meta_request_data("disk", [p.BASE_ALLOCATION])) == [
        (10, p.Rep.ERR_INVALID,
         b"request option 'set meta context' when structured reply is not negotiated")]
    n.option(p.Opt.STRUCTURED_REPLY)
    ctx = lambda cid, name: (9, p.Rep.META_CONTEXT, struct.pack(">I", cid) + name)  # noqa: E731
    # LIST replies carry context id 0 (QEMU's).
    assert n.option(p.Opt.LIST_META_CONTEXT, p.meta_request_data("ro", [])) == [
        ctx(0, b"base:allocation"), ctx(0, b"qemu:allocation-depth"), (9, p.Rep.ACK, b"")]
    assert n.option(p.Opt.LIST_META_CONTEXT, p.meta_request_data("ro", ["base:", "x:y"])) == [
        ctx(0, b"base:allocation"), (9, p.Rep.ACK, b"")]
    assert n.option(p.Opt.LIST_META_CONTEXT, p.meta_request_data("nosuch", [])) == [
        (9, p.Rep.ERR_UNKNOWN, b"export 'nosuch' not present")]
    # SET: only exact names; a bare namespace selects nothing.
    assert n.option(p.Opt.SET_META_CONTEXT, p.meta_request_data("disk", ["base:"])) == [
        (10, p.Rep.ACK, b"")]
    replies = n.option(p.Opt.SET_META_CONTEXT, p.meta_request_data(
        "disk", ["qemu:allocation-depth", p.BASE_ALLOCATION, p.BASE_ALLOCATION]))
    assert replies == [(10, p.Rep.META_CONTEXT, struct.pack(">I", 0) + b"base:allocation"),
                       (10, p.Rep.ACK, b"")]
    # The selection belongs to the export named in SET.
    n.option(p.Opt.GO, p.info_request_data("ro", []))
    (done,) = n.events
    assert isinstance(done, p.HandshakeDone) and done.contexts == {}


def test_meta_context_applies_to_go_on_same_export() -> None:
    n = Negotiation()
    n.option(p.Opt.STRUCTURED_REPLY)
    n.option(p.Opt.SET_META_CONTEXT, p.meta_request_data("ro", [p.BASE_ALLOCATION, p.ALLOCATION_DEPTH]))
    n.option(p.Opt.GO, p.info_request_data("ro", [p.Info.BLOCK_SIZE]))
    (done,) = n.events
    assert isinstance(done, p.HandshakeDone)
    assert done.contexts == {0: p.BASE_ALLOCATION, 1: p.ALLOCATION_DEPTH}


def test_failed_set_clears_selection() -> None:
    n = Negotiation()
    n.option(p.Opt.STRUCTURED_REPLY)
    n.option(p.Opt.SET_META_CONTEXT, p.meta_request_data("disk", [p.BASE_ALLOCATION]))
    assert n.option(p.Opt.SET_META_CONTEXT, b"\0")[0][1] == p.Rep.ERR_INVALID
    n.option(p.Opt.GO, p.info_request_data("disk", []))
    assert isinstance(n.events[0], p.HandshakeDone) and n.events[0].contexts == {}


# --- transmission ------------------------------------------------------------------------


def tx(read_only: bool = False, structured: bool = True, size: int = 1 << 20) -> p.Transmission:
    return p.Transmission(lambda: size, read_only, structured, {0: p.BASE_ALLOCATION})


def events(t: p.Transmission) -> list[p.TransmissionEvent]:
    out = []
    while True:
        ev = t.next_event()
        if isinstance(ev, p.NeedData):
            return out
        out.append(ev)


def req(kind: int, cookie: int = 1, offset: int = 0, length: int = 0, flags: int = 0) -> bytes:
    return p.request_header(kind, cookie, offset, length, flags)


def test_requests_split_anywhere() -> None:
    data = req(p.Cmd.READ, 1, 0, 4096) + req(p.Cmd.WRITE, 2, 512, 5) + b"hello" + req(p.Cmd.FLUSH, 3)
    for split in range(len(data)):
        t = tx()
        t.receive_data(data[:split])
        got = events(t)
        t.receive_data(data[split:])
        got += events(t)
        assert [(e.type, e.cookie) for e in got if isinstance(e, p.Request)] == [(0, 1), (1, 2), (3, 3)]
        write = got[1]
        assert isinstance(write, p.Request) and write.payload == b"hello"


def test_zero_copy_buffer_interface() -> None:
    t = tx()
    payload = bytes(range(256)) * 1024
    data = req(p.Cmd.WRITE, 9, 0, len(payload)) + payload + req(p.Cmd.READ, 10, 0, 512)
    pos = 0
    got: list[p.TransmissionEvent] = []
    while pos < len(data):
        buf = t.get_buffer()
        assert len(buf) > 0
        n = min(len(buf), len(data) - pos, 5000)
        buf[:n] = data[pos : pos + n]
        t.buffer_updated(n)
        pos += n
        got += events(t)
    assert [e.cookie for e in got if isinstance(e, p.Request)] == [9, 10]
    assert isinstance(got[0], p.Request) and got[0].payload == payload
    assert t.buffered == 0


def test_disc_and_bad_magic_end_parsing() -> None:
    t = tx()
    t.receive_data(req(p.Cmd.DISC) + req(p.Cmd.READ, 5, 0, 1))
    assert events(t) == [p.Disconnect()]
    t.receive_data(req(p.Cmd.READ))
    assert events(t) == []
    t = tx()
    t.receive_data(b"\x11" * 28)
    assert events(t) == [p.Violation("invalid magic (got 0x11111111)", 0x1111111111111111)]


@pytest.mark.parametrize(
    ("request_bytes", "read_only", "structured", "message"),
    [
        (req(42, 1), False, True, "invalid request type (42) received"),
        (req(p.Cmd.READ, 1, 0, (32 << 20) + 1), False, True, "len (33554433) is larger than max len (33554432)"),
        (req(p.Cmd.TRIM, 1, 0, 512), True, True, "Export is read-only"),
        (req(p.Cmd.READ, 1, (1 << 20) - 511, 512), False, True,
         "operation past EOF; From: 1048065, Len: 512, Size: 1048576"),
        (req(p.Cmd.READ, 1, 0, 512, flags=0x10), False, True, "unsupported flags for command read (got 0x10)"),
        (req(p.Cmd.READ, 1, 0, 512, flags=0x40), False, True, "unsupported flags for command read (got 0x40)"),
        (req(p.Cmd.READ, 1, 0, 512, flags=p.CmdFlag.DF), False, False,
         "unsupported flags for command read (got 0x4)"),
        (req(p.Cmd.FLUSH, 1, flags=p.CmdFlag.NO_HOLE), False, True,
         "unsupported flags for command flush (got 0x2)"),
        (req(p.Cmd.BLOCK_STATUS, 1, 0, 512), False, False, "CMD_BLOCK_STATUS not negotiated"),
        (req(p.Cmd.BLOCK_STATUS, 1, 0, 0), False, True, "need non-zero length"),
    ],
)
def test_validation_messages(request_bytes: bytes, read_only: bool, structured: bool, message: str) -> None:
    t = tx(read_only=read_only, structured=structured)
    t.receive_data(request_bytes)
    (event,) = events(t)
    assert isinstance(event, p.Rejected)
    assert (event.error, event.message, event.fatal) == (p.Errno.EINVAL, message, False)


def check_verdict(kind: int, flags: int, offset: int, length: int, size: int,
                  read_only: bool, structured: bool) -> None:
    """What next_event returns for a request received whole is what validate
    returns for it (next_event answers the usual READ and WRITE in fewer steps)."""
    def fresh() -> p.Transmission:
        return p.Transmission(lambda: size, read_only, structured, {0: p.BASE_ALLOCATION},
                              max_payload=8192)
    payload = bytes(length) if kind == p.Cmd.WRITE and length <= 8192 else b""
    t = fresh()
    t.receive_data(req(kind, 7, offset, length, flags) + payload)
    (event,) = events(t)
    if kind == p.Cmd.WRITE and length > 8192:  # refused before validate: its payload is not read
        assert isinstance(event, p.Rejected) and event.fatal
        return
    expected = fresh().validate(p.Request(flags, kind, 7, offset, length, payload or None))
    if isinstance(expected, p.Rejected):
        assert isinstance(event, p.Rejected), (kind, flags, offset, length, size, read_only)
        assert (event.error, event.message, event.fatal) == (
            expected.error, expected.message, expected.fatal)
    else:
        assert isinstance(event, p.Request), (event, kind, flags, offset, length, size)
        assert (event.flags, event.type, event.offset, event.length) == (
            flags, kind, offset, length)
        assert (bytes(event.payload) if event.payload is not None else None) == (
            payload if kind == p.Cmd.WRITE else None)


def test_every_request_gets_validates_verdict_on_the_boundaries() -> None:
    for kind, flags, offset, length, size, read_only, structured in itertools.product(
        (p.Cmd.READ, p.Cmd.WRITE, p.Cmd.TRIM, p.Cmd.CACHE),
        (0, p.CmdFlag.FUA, p.CmdFlag.DF, 0x10),
        (0, 512, 4096, 8192), (0, 512, 4096, 8192, 9000), (0, 512, 4096, 8192, 16384),
        (False, True), (False, True),
    ):
        check_verdict(int(kind), int(flags), offset, length, size, read_only, structured)


@given(
    kind=st.sampled_from([p.Cmd.READ, p.Cmd.WRITE, p.Cmd.TRIM, p.Cmd.CACHE]),
    flags=st.integers(0, 0x7F),
    offset=st.integers(0, 20000),
    length=st.integers(0, 20000),
    size=st.integers(0, 20000),
    read_only=st.booleans(),
    structured=st.booleans(),
)
def test_every_request_gets_validates_verdict(
    kind: p.Cmd, flags: int, offset: int, length: int, size: int, read_only: bool,
    structured: bool,
) -> None:
    check_verdict(int(kind), flags, offset, length, size, read_only, structured)


def test_write_to_read_only_consumes_payload() -> None:
    t = tx(read_only=True)
    t.receive_data(req(p.Cmd.WRITE, 1, 0, 3) + b"abc" + req(p.Cmd.READ, 2, 0, 3))
    first, second = events(t)
    assert isinstance(first, p.Rejected) and first.message == "Export is read-only"
    assert isinstance(second, p.Request) and second.cookie == 2


def test_oversized_write_is_fatal() -> None:
    t = tx()
    t.receive_data(req(p.Cmd.WRITE, 1, 0, (32 << 20) + 1) + b"x" * 100)
    (event,) = events(t)
    assert isinstance(event, p.Rejected) and event.fatal and t.finished


def test_allowed_flags() -> None:
    t = tx()
    t.receive_data(
        req(p.Cmd.WRITE_ZEROES, 1, 0, 512, p.CmdFlag.FUA | p.CmdFlag.NO_HOLE | p.CmdFlag.FAST_ZERO)
        + req(p.Cmd.BLOCK_STATUS, 2, 0, 512, p.CmdFlag.REQ_ONE)
        + req(p.Cmd.READ, 3, 0, 512, p.CmdFlag.DF | p.CmdFlag.FUA)
        + req(p.Cmd.CACHE, 4, 0, 512, p.CmdFlag.FUA)
    )
    assert all(isinstance(e, p.Request) for e in events(t))


# --- replies ------------------------------------------------------------------------------


def test_reply_encoding() -> None:
    simple = p.Replies(structured=False)
    assert simple.ok(7) == struct.pack(">IIQ", p.SIMPLE_REPLY_MAGIC, 0, 7)
    assert simple.error(7, 22, "x") == struct.pack(">IIQ", p.SIMPLE_REPLY_MAGIC, 22, 7)
    assert simple.read_parts(7, 0, [(0, 2, b"ab"), (2, 3, None)]) == [simple.ok(7), b"ab", b"\0\0\0"]
    structured = p.Replies(structured=True)
    assert structured.error(7, 22, "bad") == struct.pack(
        ">IHHQIIH", p.STRUCTURED_REPLY_MAGIC, 1, p.ReplyType.ERROR, 7, 9, 22, 3) + b"bad"
    assert structured.read_parts(7, 0, []) == [struct.pack(">IHHQI", p.STRUCTURED_REPLY_MAGIC, 1, 0, 7, 0)]
    parts = structured.read_parts(7, 100, [(100, 2, b"ab"), (102, 8, None)])
    assert b"".join(bytes(x) for x in parts) == (
        struct.pack(">IHHQIQ", p.STRUCTURED_REPLY_MAGIC, 0, 1, 7, 10, 100) + b"ab"
        + struct.pack(">IHHQIQI", p.STRUCTURED_REPLY_MAGIC, 1, 2, 7, 12, 102, 8)
    )
    status = structured.block_status(7, [(0, [(4096, 0), (512, 3)])])
    assert status == struct.pack(">IHHQIIIIII", p.STRUCTURED_REPLY_MAGIC, 1, 5, 7, 20, 0, 4096, 0, 512, 3)


def test_merge_extents() -> None:
    assert p.merge_extents([(1, 0), (2, 0), (3, 3), (4, 3), (5, 0)]) == [(3, 0), (7, 3), (5, 0)]
    big = (1 << 31, 0)
    assert p.merge_extents([big, big]) == [big, big]  # lengths stay below 2^32


def test_errno_mapping() -> None:
    import errno

    assert p.errno_to_nbd(errno.EROFS) == p.Errno.EPERM
    assert p.errno_to_nbd(errno.EDQUOT) == p.Errno.ENOSPC
    assert p.errno_to_nbd(errno.EOPNOTSUPP) == p.Errno.ENOTSUP
    assert p.errno_to_nbd(errno.EIO) == p.Errno.EIO
    assert p.errno_to_nbd(errno.ENOENT) == p.Errno.EINVAL
    # As QEMU's system_errno_to_nbd_errno: EACCES is not EPERM; a full disk is ENOSPC.
    assert p.errno_to_nbd(errno.EACCES) == p.Errno.EINVAL
    assert p.errno_to_nbd(errno.ENOSPC) == p.Errno.ENOSPC
    assert p.errno_to_nbd(errno.EFBIG) == p.Errno.ENOSPC


def test_match_contexts() -> None:
    available = (p.BASE_ALLOCATION, p.ALLOCATION_DEPTH)
    assert p.match_contexts(available, [], listing=True) == list(available)
    assert p.match_contexts(available, [], listing=False) == []
    assert p.match_contexts(available, ["qemu:"], listing=True) == [p.ALLOCATION_DEPTH]
    assert p.match_contexts(available, ["qemu:"], listing=False) == []
