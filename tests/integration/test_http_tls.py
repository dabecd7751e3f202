"""HTTPS for /health, /ready and /metrics: tls-creds and tls-authz on --http, and the refused.

One daemon serves HTTPS with the tls-creds-x509 object (verify-peer: clients
present certificates of the CA) and an authz that allows only ``CN=client``.
A good client is served (Python's ssl and curl); a client without TLS, one
without a certificate, one of another CA, an expired one, one whose DN the
authz refuses and one that stalls mid-handshake each get no HTTP answer,
while the good client keeps being served.  Plain HTTP stays on loopback unless
``insecure=on`` says otherwise.
"""

from __future__ import annotations

import http.client
import json
import socket
import ssl
import subprocess
import time
from typing import Any

import pytest

from tests.conftest import QmpdProcess
from tests.support.certs import CLIENT_DN, Pki
from tests.support.tools import require_tool

HANDSHAKE_TIMEOUT = 1.5




def _start(factory: Any, pki: Pki, *, authz: bool = True) -> tuple[QmpdProcess, int]:
    objects = ["--object", f"tls-creds-x509,id=tls0,dir={pki.dir('server')},endpoint=server"]
    http = "127.0.0.1:0,tls-creds=tls0"
    if authz:
        objects += ["--object", "authz-simple,id=authz0,identity=" + CLIENT_DN.replace(",", ",,")]
        http += ",tls-authz=authz0"
    proc: QmpdProcess = factory("--log-level", "info", *objects, "--http", http,
                                "--tls-handshake-timeout", str(HANDSHAKE_TIMEOUT))
    url = proc.http_url()
    assert url.startswith("https://127.0.0.1:"), url
    return proc, int(url.rsplit(":", 1)[1])


def _get(port: int, ctx: ssl.SSLContext, path: str = "/health") -> tuple[int, bytes]:
    conn = http.client.HTTPSConnection("localhost", port, context=ctx, timeout=15)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def _refused(port: int, ctx: ssl.SSLContext | None) -> bytes:
    """Everything a client gets for its request before the server hangs up."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=15)
    got = b""
    try:
        if ctx is not None:
            try:
                sock = ctx.wrap_socket(sock, server_hostname="localhost")
            except (ssl.SSLError, OSError):
                return got  # refused during the handshake
        try:
            sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n")
        except (ssl.SSLError, OSError):
            return got
        while True:
            try:
                chunk = sock.recv(4096)
            except (ssl.SSLError, OSError):
                return got
            if not chunk:
                return got
            got += chunk
    finally:
        sock.close()


def _alive(port: int, good: ssl.SSLContext) -> None:
    status, body = _get(port, good)
    assert status == 200 and json.loads(body)["status"] == "ok"


def test_https_good_client_and_the_refused(qmpd_factory: Any, pki: Pki) -> None:
    proc, port = _start(qmpd_factory, pki)
    good = pki.client_context("client")
    _alive(port, good)
    status, body = _get(port, good, "/ready")
    assert status == 200 and json.loads(body)["status"] == "ready"
    status, body = _get(port, good, "/metrics")
    assert status == 200 and b"qmpd_qmp_commands_total" in body
    cases = {
        "no TLS": None,
        "no certificate": pki.client_context(None),
        "another CA": pki.client_context("client-rogue"),
        "expired": pki.client_context("client-expired"),
        "DN refused": pki.client_context("client-wrongdn"),
    }
    for name, ctx in cases.items():
        got = _refused(port, ctx)
        assert b"HTTP/" not in got and b"qmpd_" not in got, (name, got)
        _alive(port, good)
    # A client that does not trust the server's CA refuses it.
    rogue = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    rogue.load_verify_locations(cafile=str(pki.dir("rogue-ca") / "ca-cert.pem"))
    with pytest.raises(ssl.SSLCertVerificationError):
        _get(port, rogue)
    # The credentials and the authz are in use: object-del refuses them.
    control = proc.client()
    control.negotiate()
    for oid in ("tls0", "authz0"):
        assert control.cmd("object-del", {"id": oid})["error"]["desc"] == (
            f"object '{oid}' is in use, can not be deleted")
    control.close()
    _alive(port, good)
    proc.stop()
    log = proc.stderr_path.read_text()
    for reason in ("the peer does not speak TLS",
                   "No certificate was found.",
                   "The certificate hasn't got a known issuer",
                   "The certificate has expired",
                   "TLS x509 authz check for C=GB,O=Example,CN=intruder is denied"):
        assert reason in log, (reason, log)


def test_https_stalled_handshakes_are_dropped(qmpd_factory: Any, pki: Pki) -> None:
    _proc, port = _start(qmpd_factory, pki)
    stalled = [socket.create_connection(("127.0.0.1", port), timeout=15) for _ in range(3)]
    stalled[0].sendall(b"\x16\x03\x01\x02")  # half a record header
    started = time.monotonic()
    good = pki.client_context("client")
    _alive(port, good)  # served while the others stall
    for sock in stalled:
        try:
            data = sock.recv(4096)
        except ConnectionResetError:
            data = b""
        assert data == b""  # dropped, with nothing said
        sock.close()
    elapsed = time.monotonic() - started
    assert HANDSHAKE_TIMEOUT * 0.8 <= elapsed < HANDSHAKE_TIMEOUT + 10, elapsed
    _alive(port, good)
    _proc.stop()
    assert "the TLS handshake took too long" in _proc.stderr_path.read_text()


def test_https_with_curl(qmpd_factory: Any, pki: Pki) -> None:
    require_tool("curl")
    _proc, port = _start(qmpd_factory, pki)
    client = pki.dir("client")
    base = ["curl", "-sS", "--max-time", "15", "--cacert", str(pki.ca_cert)]
    good = [*base, "--cert", str(client / "client-cert.pem"),
            "--key", str(client / "client-key.pem")]
    out = subprocess.run([*good, f"https://localhost:{port}/metrics"], capture_output=True,
                         check=True, text=True).stdout
    assert "qmpd_ready 1.0" in out
    bad = subprocess.run([*base, f"https://localhost:{port}/metrics"], capture_output=True,
                         text=True)
    assert bad.returncode != 0 and "qmpd_" not in bad.stdout
    plain = subprocess.run(["curl", "-sS", "--max-time", "15", f"http://localhost:{port}/health"],
                           capture_output=True, text=True)
    assert plain.returncode != 0 and "status" not in plain.stdout


def test_https_without_authz_takes_any_client_of_the_ca(qmpd_factory: Any, pki: Pki) -> None:
    _proc, port = _start(qmpd_factory, pki, authz=False)
    _alive(port, pki.client_context("client-wrongdn"))
    assert _refused(port, pki.client_context("client-rogue")) == b""
    assert _refused(port, pki.client_context(None)) == b""


def test_http_tls_startup_errors(qmpd_factory: Any, pki: Pki) -> None:
    for objects, option, text in (
        ((), "127.0.0.1:0,tls-creds=t", "No TLS credentials with id 't'"),
        (("--object", "secret,id=t,data=x"), "127.0.0.1:0,tls-creds=t",
         "Object with id 't' is not TLS credentials"),
        (("--object", f"tls-creds-x509,id=t,dir={pki.dir('client')},endpoint=client"),
         "127.0.0.1:0,tls-creds=t", "Expected TLS credentials for a server endpoint"),
        (("--object", f"tls-creds-x509,id=t,dir={pki.dir('server')},endpoint=server"),
         "127.0.0.1:0,tls-creds=t,tls-authz=a", "No authorization object with id 'a'"),
        ((), "127.0.0.1:0,tls-authz=a", "'tls-authz' requires 'tls-creds'"),
        ((), "127.0.0.1:0,tls=on", "Invalid parameter 'tls'"),
    ):
        with pytest.raises(RuntimeError) as info:
            qmpd_factory(*objects, "--http", option)
        assert f"--http {option}: {text}" in str(info.value)


def _non_loopback_ipv4() -> str | None:
    """An address of this host that is not loopback (None if it has none)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("192.0.2.1", 9))  # no packet is sent: only a route is chosen
            host: str = s.getsockname()[0]
    except OSError:
        return None
    return None if host.startswith("127.") else host


def test_plain_http_stays_on_loopback(qmpd_factory: Any) -> None:
    """Plain HTTP on a non-loopback address needs insecure=on; loopback needs nothing."""
    for host in ("0.0.0.0", "[::]"):
        with pytest.raises(RuntimeError) as info:
            qmpd_factory("--http", f"{host}:0")
        assert "which is not a loopback address: serve HTTPS with tls-creds=ID, " \
               "or add insecure=on" in str(info.value)
    public = _non_loopback_ipv4()
    if public is not None:
        with pytest.raises(RuntimeError):
            qmpd_factory("--http", f"{public}:0")
    for host in ("127.0.0.1", "localhost", "[::1]", ""):
        if host == "[::1]" and not socket.has_ipv6:
            continue
        proc = qmpd_factory("--http", f"{host}:0", "--log-level", "info")
        assert proc.http_url().startswith("http://")
        proc.stop()
    exposed = qmpd_factory("--http", "0.0.0.0:0,insecure=on", "--log-level", "info")
    port = int(exposed.http_url().rsplit(":", 1)[1])
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=15)
    conn.request("GET", "/health")
    assert conn.getresponse().status == 200
    conn.close()

