"""The NBD server's TLS receive path (issue 13): records decrypted straight into
the protocol's buffers, a WRITE's payload filled whole in one call, and after a
large WRITE the next header parsed before its payload is taken, so that the
payload lands in its own buffer instead of being copied out of the header buffer.
Both ends are real OpenSSL sessions (certificates made with openssl)."""

from __future__ import annotations

import os
import ssl

from qmpd.nbd import protocol as p
from qmpd.nbd.tls import TlsConnection, TlsSession
from tests.support.certs import Pki

RECORD = 16384


def sessions(pki: Pki) -> tuple[TlsSession, TlsSession]:
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(pki.dir("server") / "server-cert.pem",
                               pki.dir("server") / "server-key.pem")
    client_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client_ctx.load_verify_locations(pki.dir("server") / "ca-cert.pem")
    client_ctx.check_hostname = False
    server, client = TlsSession(server_ctx, True), TlsSession(client_ctx, False)
    for _ in range(10):
        client.handshake()
        out = client.outgoing()
        if out:
            server.feed(out)  # (empty would be the end of the stream)
        server.handshake()
        out = server.outgoing()
        if out:
            client.feed(out)
    assert server.established and client.established
    return server, client


def write_request(cookie: int, offset: int, length: int) -> bytes:
    return p.request_header(p.Cmd.WRITE, cookie, offset, length)


def test_read_into_all_takes_many_records_in_one_call(pki: Pki) -> None:
    server, client = sessions(pki)
    data = os.urandom(10 * RECORD + 123)
    client.obj.write(data)
    server.feed(client.outgoing())
    buf = bytearray(len(data) + 1000)
    n = server.read_into_all(memoryview(buf), len(buf))
    assert n == len(data) and bytes(buf[:n]) == data
    assert server.read_into_all(memoryview(buf), len(buf)) == 0 and not server.eof
    # A limit stops it after the record that reaches it.
    client.obj.write(data)
    server.feed(client.outgoing())
    assert server.read_into_all(memoryview(buf), 1) == RECORD
    # The end of the stream.
    server.feed(b"")
    assert server.read_into_all(memoryview(buf), len(buf)) == len(data) - RECORD
    assert server.read_into_all(memoryview(buf), len(buf)) == 0 and server.eof


def test_large_write_payloads_are_received_in_place(pki: Pki) -> None:
    """A stream of 256 KiB WRITEs, each header its own record as libnbd and QEMU send
    them: every payload arrives whole, and none passes through the header buffer."""
    server, client = sessions(pki)
    size = 256 * 1024
    payloads = [os.urandom(size) for _ in range(4)]
    for i, data in enumerate(payloads):
        client.obj.write(write_request(i, i * size, size))
        client.obj.write(data)
    server.feed(client.outgoing())
    tx = p.Transmission(lambda: 1 << 30, read_only=False, structured=True)
    received: list[p.Request] = []
    taken: list[int] = []
    while True:
        n = TlsConnection._decrypt(server, tx)
        if not n:
            break
        taken.append(n)
        while isinstance(event := tx.next_event(), p.Request):
            received.append(event)
        # Never more than a header's record is parsed from the header buffer.
        assert tx.buffered <= size
    assert [r.cookie for r in received] == [0, 1, 2, 3]
    assert [bytes(r.payload or b"") for r in received] == payloads
    # The first WRITE is not known to be large before it is parsed: it fills
    # a batch of the header buffer.  From then on: its header alone, then
    # the whole payload in one call.
    assert taken[2:] == [size, p.REQUEST_SIZE, size, p.REQUEST_SIZE, size], taken


def test_small_requests_are_taken_in_batches(pki: Pki) -> None:
    """4 KiB WRITEs: many records per call (one parse for many requests)."""
    server, client = sessions(pki)
    for i in range(32):
        client.obj.write(write_request(i, i * 4096, 4096))
        client.obj.write(bytes([i]) * 4096)
    server.feed(client.outgoing())
    tx = p.Transmission(lambda: 1 << 30, read_only=False, structured=True)
    n = TlsConnection._decrypt(server, tx)
    assert n == 32 * (4096 + p.REQUEST_SIZE)
    cookies = []
    while isinstance(event := tx.next_event(), p.Request):
        assert event.payload == bytes([event.cookie]) * 4096
        cookies.append(event.cookie)
    assert cookies == list(range(32))
