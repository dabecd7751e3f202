"""QMP over TLS: tls-creds and tls-authz on TCP monitors, and the clients that must get nothing.

One daemon serves a TLS monitor (server key encrypted, its password a
``secret``; an authz-list that allows only ``CN=client``) next to a plain
UNIX one.  A good client (the project's and qemu.qmp's) works; a client
without TLS, one with a certificate of another CA, an expired one, one
whose DN the authz refuses, one without a certificate and one that stalls
mid-handshake each get no greeting, while the good client keeps being
served.  Every refusal is logged with its reason; the key's password never
appears anywhere.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import time
from typing import Any

import pytest
from qemu.qmp import QMPClient
from qemu.qmp.util import flush

from tests.conftest import QmpdProcess
from tests.support.certs import CLIENT_DN, KEY_PASSWORD, Pki
from tests.support.qmp import QmpClient

HANDSHAKE_TIMEOUT = 1.5


class TlsQMPClient(QMPClient):
    """qemu.qmp's QMPClient, whose disconnect does not wait on an empty TLS write buffer.

    qemu.qmp's disconnect flushes its writer by setting the write-buffer
    limits to 0 and awaiting drain().  CPython's SSL transport (3.11 to 3.13,
    ``asyncio/sslproto.py``, ``_control_app_writing``) pauses writing when the
    buffered size is ``>=`` the high-water mark, so with a mark of 0 it pauses
    on an empty buffer as well, and resumes only when the next TLS record
    arrives from the peer.  A server with nothing more to say (qmpd, QEMU, or
    asyncio's own TLS server) never sends one, and disconnect() waits forever:
    the client's bug, which no server can cure without sending unasked bytes.
    Only that empty-buffer wait is skipped here; queued output is still flushed.
    """

    async def _bh_flush_writer(self) -> None:
        await self._outgoing.join()
        writer = self._writer
        if writer is not None and writer.transport.get_write_buffer_size():
            await flush(writer)




def _start(factory: Any, pki: Pki, *extra: str) -> tuple[QmpdProcess, int]:
    proc: QmpdProcess = factory(
        "--log-level", "info",
        "--object", f"secret,id=pw,data={KEY_PASSWORD}",
        "--object", f"tls-creds-x509,id=tls0,dir={pki.dir('server-encrypted')},"
                    "endpoint=server,passwordid=pw",
        "--object", "authz-simple,id=authz0,identity=" + CLIENT_DN.replace(",", ",,"),
        "--chardev", "socket,id=tlsmon,host=127.0.0.1,port=0,server=on,wait=off,"
                     "tls-creds=tls0,tls-authz=authz0",
        "--monitor", "tlsmon",
        "--tls-handshake-timeout", str(HANDSHAKE_TIMEOUT),
        *extra,
    )
    for part in proc.banner.split(", "):
        if part.startswith("QMP on tcp:"):
            return proc, int(part.rsplit(":", 1)[1])
    raise AssertionError(proc.banner)


def _refused(port: int, ctx: ssl.SSLContext | None) -> bytes:
    """Everything a client gets before the server hangs up (it must not be a greeting)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=15)
    got = b""
    try:
        if ctx is None:
            sock.sendall(b'{"execute": "qmp_capabilities"}\r\n')
        else:
            try:
                sock = ctx.wrap_socket(sock, server_hostname="localhost")
            except (ssl.SSLError, OSError):
                return got  # refused during the handshake
        while True:
            try:
                chunk = sock.recv(4096)
            except (ssl.SSLError, ConnectionResetError):
                return got
            if not chunk:
                return got
            got += chunk
    finally:
        sock.close()


def _alive(good: QmpClient) -> None:
    assert good.cmd("query-status")["return"]["status"] == "running"


def test_good_clients_and_the_refused(qmpd_factory: Any, pki: Pki) -> None:
    proc, port = _start(qmpd_factory, pki)
    good = QmpClient(("127.0.0.1", port), tls=pki.client_context("client"),
                     server_hostname="localhost", negotiate=True)
    assert good.greeting["QMP"]["version"]["qemu"]["major"] == 7
    _alive(good)

    async def with_qemu_qmp() -> Any:
        client = TlsQMPClient("tls-test")
        await asyncio.wait_for(
            client.connect(("localhost", port), ssl=pki.client_context("client")), 15)
        try:
            return await asyncio.wait_for(client.execute("query-name"), 15)
        finally:
            await asyncio.wait_for(client.disconnect(), 15)

    assert asyncio.run(with_qemu_qmp()) == {}

    cases = {
        "no TLS": None,
        "another CA": pki.client_context("client-rogue"),
        "expired": pki.client_context("client-expired"),
        "DN refused": pki.client_context("client-wrongdn"),
        "no certificate": pki.client_context(None),
    }
    for name, ctx in cases.items():
        got = _refused(port, ctx)
        assert b"QMP" not in got, (name, got)
        _alive(good)
    # A server certificate the client does not trust: the client refuses.
    rogue = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    rogue.load_verify_locations(cafile=str(pki.dir("rogue-ca") / "ca-cert.pem"))
    with pytest.raises(ssl.SSLCertVerificationError):
        QmpClient(("127.0.0.1", port), tls=rogue, server_hostname="localhost")
    _alive(good)
    # The credentials and the authz are in use: object-del refuses (QEMU 7.2 deletes them).
    control = proc.client()
    control.negotiate()
    for oid in ("tls0", "authz0"):
        assert control.cmd("object-del", {"id": oid})["error"]["desc"] == (
            f"object '{oid}' is in use, can not be deleted")
    assert control.cmd("object-del", {"id": "pw"}) == {"return": {}}  # read at load time
    _alive(good)
    good.close()
    control.close()
    proc.stop()
    log = proc.stderr_path.read_text()
    for reason in ("the peer does not speak TLS",
                   "The certificate hasn't got a known issuer",
                   "The certificate has expired",
                   "TLS x509 authz check for C=GB,O=Example,CN=intruder is denied",
                   "No certificate was found."):
        assert reason in log, (reason, log)
    assert KEY_PASSWORD not in log and KEY_PASSWORD not in proc.read_stdout()


def test_stalled_handshake_is_dropped_and_blocks_nobody(qmpd_factory: Any, pki: Pki) -> None:
    proc, port = _start(qmpd_factory, pki)
    stalled = [socket.create_connection(("127.0.0.1", port), timeout=15) for _ in range(3)]
    # One sends half a ClientHello record header, the others nothing at all.
    stalled[0].sendall(b"\x16\x03\x01\x02")
    started = time.monotonic()
    # Meanwhile a good client connects and is served.
    good = QmpClient(("127.0.0.1", port), tls=pki.client_context("client"),
                     server_hostname="localhost", negotiate=True)
    _alive(good)
    for sock in stalled:
        try:
            data = sock.recv(4096)
        except ConnectionResetError:
            data = b""
        assert b"QMP" not in data
        sock.close()
    elapsed = time.monotonic() - started
    assert HANDSHAKE_TIMEOUT * 0.8 <= elapsed < HANDSHAKE_TIMEOUT + 10, elapsed
    _alive(good)
    good.close()
    proc.stop()
    assert "the TLS handshake took too long" in proc.stderr_path.read_text()


def test_startup_errors_as_qsd(qmpd_factory: Any, pki: Pki, tmp_path: Any) -> None:
    """Monitors naming missing or wrong objects: QSD 7.2's texts for --chardev."""
    chardev = "socket,id=m,host=127.0.0.1,port=0,server=on,wait=off,tls-creds=t"
    for objects, text in (
        ((), "No TLS credentials with id 't'"),
        (("--object", "secret,id=t,data=x"), "Object with id 't' is not TLS credentials"),
        (("--object", f"tls-creds-x509,id=t,dir={pki.dir('client')},endpoint=client"),
         "Expected TLS credentials for a server endpoint"),
    ):
        with pytest.raises(RuntimeError) as info:
            qmpd_factory(*objects, "--chardev", chardev, "--monitor", "m")
        assert f"--chardev {chardev}: {text}" in str(info.value)


def test_qemu_qmp_over_tls_commands_events_and_disconnect(qmpd_factory: Any, pki: Pki) -> None:
    """qemu.qmp with an ssl context: greeting, commands, an event, and a clean disconnect."""
    proc, port = _start(qmpd_factory, pki)

    async def session() -> list[str]:
        client = TlsQMPClient("tls-events")
        seen: list[str] = []
        await asyncio.wait_for(
            client.connect(("localhost", port), ssl=pki.client_context("client")), 15)
        listener = client.events
        assert (await asyncio.wait_for(client.execute("query-status"), 15))[
            "status"] == "running"
        assert await asyncio.wait_for(client.execute("stop"), 15) == {}
        seen.append((await asyncio.wait_for(listener.get(), 15))["event"])
        assert await asyncio.wait_for(client.execute("cont"), 15) == {}
        seen.append((await asyncio.wait_for(listener.get(), 15))["event"])
        names = {o["name"] for o in await asyncio.wait_for(
            client.execute("qom-list", {"path": "/objects"}), 15)}
        assert {"tls0", "authz0"} <= names
        await asyncio.wait_for(client.disconnect(), 15)
        return seen

    for _ in range(3):  # reconnecting works every time: nothing is left behind
        assert asyncio.run(session()) == ["STOP", "RESUME"]
    control = proc.client()
    control.negotiate()
    assert control.cmd("query-status")["return"]["status"] == "running"
    control.close()


def test_tls_close_notify_is_answered(qmpd_factory: Any, pki: Pki) -> None:
    """A client that ends TLS with close_notify gets qmpd's close_notify, then EOF."""
    _proc, port = _start(qmpd_factory, pki)
    raw = socket.create_connection(("127.0.0.1", port), timeout=15)
    sock = pki.client_context("client").wrap_socket(raw, server_hostname="localhost")
    buf = b""
    while b"\n" not in buf:
        buf += sock.recv(4096)
    assert b'"QMP"' in buf
    sock.sendall(b'{"execute": "qmp_capabilities"}\r\n')
    buf = b""
    while b"\n" not in buf:
        buf += sock.recv(4096)
    assert buf.startswith(b'{"return": {}}')
    plain = sock.unwrap()  # sends close_notify, returns once qmpd's arrives
    assert plain.recv(4096) == b""  # and then qmpd closes the connection
    plain.close()
