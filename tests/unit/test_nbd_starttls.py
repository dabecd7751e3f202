"""The sans-IO handshake with TLS required (issue 13): what QEMU 7.2's server answers
before NBD_OPT_STARTTLS, the StartTls event (with the bytes after it) and the
haggling that goes on once the I/O layer has put the connection under TLS."""

from __future__ import annotations

import struct

from qmpd.nbd import protocol as p
from tests.unit.test_nbd_protocol import GREETING, catalog, parse_replies


class TlsNegotiation:
    def __init__(self, flags: int = 3) -> None:
        self.hs = p.ServerHandshake(catalog(), tls=True)
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
            if isinstance(event, p.StartTls):
                break  # the I/O layer turns TLS on before feeding more
        return self.hs.data_to_send()

    def option(self, option: int, data: bytes = b"") -> list[tuple[int, int, bytes]]:
        return parse_replies(self.feed(p.option_request(option, data)))


def refused(option: int) -> list[tuple[int, int, bytes]]:
    return [(option, p.Rep.ERR_TLS_REQD, f"Option 0x{option:x} not permitted before TLS".encode())]


def test_every_option_but_starttls_is_refused_before_tls() -> None:
    n = TlsNegotiation()
    assert n.option(p.Opt.LIST) == refused(p.Opt.LIST)
    assert n.option(p.Opt.GO, b"\0\0\0\4disk\0\0") == refused(p.Opt.GO)
    assert n.option(p.Opt.INFO, b"\0\0\0\4disk\0\0") == refused(p.Opt.INFO)
    assert n.option(p.Opt.STRUCTURED_REPLY) == refused(p.Opt.STRUCTURED_REPLY)
    assert n.option(42, b"x" * 70000) == refused(42)  # long payloads are skipped
    assert n.events == []
    assert n.hs.structured is False and n.hs.meta is None


def test_abort_after_a_refusal_is_a_failure_for_want_of_tls() -> None:
    n = TlsNegotiation()
    n.option(p.Opt.GO, b"\0\0\0\4disk\0\0")
    assert n.option(p.Opt.ABORT) == refused(p.Opt.ABORT)
    assert n.events == [p.HandshakeClosed("Option 0x7 not permitted before TLS", graceful=True,
                                          failed=True)]
    quiet = TlsNegotiation()
    quiet.option(p.Opt.ABORT)
    assert quiet.events == [p.HandshakeClosed("client sent NBD_OPT_ABORT", graceful=True)]


def test_export_name_and_non_fixed_clients_are_dropped() -> None:
    n = TlsNegotiation()
    assert n.feed(p.option_request(p.Opt.EXPORT_NAME, b"disk")) == b""
    assert n.events == [p.HandshakeClosed("Option 0x1 not permitted before TLS", graceful=False)]
    old = TlsNegotiation(flags=0)
    assert old.feed(p.option_request(p.Opt.LIST)) == b""
    assert old.events == [p.HandshakeClosed("Unsupported option 0x3", graceful=False)]


def test_starttls_with_payload_is_answered_then_fatal() -> None:
    n = TlsNegotiation()
    assert n.option(p.Opt.STARTTLS, b"x") == [
        (p.Opt.STARTTLS, p.Rep.ERR_INVALID, b"option 'starttls' has unexpected length")]
    assert n.events == [p.HandshakeClosed("option 'starttls' has unexpected length",
                                          graceful=True, failed=True)]


def test_starttls_then_the_haggling_goes_on() -> None:
    n = TlsNegotiation()
    hello = b"\x16\x03\x01 client hello"
    out = n.feed(p.option_request(p.Opt.STARTTLS) + hello)
    assert parse_replies(out) == [(p.Opt.STARTTLS, p.Rep.ACK, b"")]
    assert n.events == [p.StartTls(hello)]
    # Now "over TLS": the decrypted options.
    n.events.clear()
    assert n.option(p.Opt.STARTTLS) == [
        (p.Opt.STARTTLS, p.Rep.ERR_INVALID, b"TLS already enabled")]
    assert n.option(p.Opt.LIST)[-1] == (p.Opt.LIST, p.Rep.ACK, b"")
    assert n.option(p.Opt.GO, b"\0\0\0\4disk\0\0")[-1] == (p.Opt.GO, p.Rep.ACK, b"")
    assert len(n.events) == 1 and isinstance(n.events[0], p.HandshakeDone)
    assert n.events[0].export.name == "disk"
