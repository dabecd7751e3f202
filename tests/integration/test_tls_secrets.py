"""Secrets audit: key passwords and private keys appear nowhere, even at debug level.

One daemon at ``--log-level debug`` serves QMP over TLS and HTTPS, each with
the encrypted server key, its password a ``secret`` given as ``data`` for one
and as ``file`` (and base64) for the other.  Then everything that can fail
fails: wrong passwords, missing ones, bad certificates, refused handshakes,
bad secrets; and everything that can show something is asked: ``qom-get`` of
every property, ``qom-list``, the ``query-*`` commands, ``info qom-tree``,
``/metrics``, ``/health``, ``/ready``.  Neither a secret's value (raw or base64)
nor a line of private key material (the encrypted PEM or the key inside it)
may appear in stderr (the log), stdout, any reply, error text or page.
"""

from __future__ import annotations

import base64
import http.client
import json
import socket
import ssl
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.support.certs import KEY_PASSWORD, Pki

WRONG_PASSWORD = "wrong-but-still-secret-4711"




def _key_lines(path: Path) -> list[str]:
    """The base64 lines of a PEM private key (what a leak would show)."""
    return [line for line in path.read_text().splitlines()
            if line and not line.startswith("-----")]


def _https_get(port: int, ctx: ssl.SSLContext, path: str) -> str:
    conn = http.client.HTTPSConnection("localhost", port, context=ctx, timeout=15)
    try:
        conn.request("GET", path)
        return conn.getresponse().read().decode()
    finally:
        conn.close()


def _try_tls(port: int, ctx: ssl.SSLContext | None) -> None:
    sock = socket.create_connection(("127.0.0.1", port), timeout=15)
    try:
        if ctx is None:
            sock.sendall(b"GET / HTTP/1.0\r\n\r\n")
            sock.recv(4096)
        else:
            with ctx.wrap_socket(sock, server_hostname="localhost") as tls:
                tls.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
                tls.recv(4096)
    except (ssl.SSLError, OSError):
        pass
    finally:
        sock.close()


def test_no_secret_or_key_material_anywhere(qmpd_factory: Any, pki: Pki,
                                            tmp_path: Path) -> None:
    enc = pki.dir("server-encrypted")
    pw_file = tmp_path / "key-password"
    pw_file.write_text(KEY_PASSWORD)
    b64 = base64.b64encode(KEY_PASSWORD.encode()).decode()
    proc = qmpd_factory(
        "--log-level", "debug",
        "--object", f"secret,id=pwdata,data={KEY_PASSWORD}",
        "--object", f"secret,id=pwfile,file={pw_file}",
        "--object", f"secret,id=pwb64,data={b64},format=base64",
        "--object", f"tls-creds-x509,id=tlsqmp,dir={enc},endpoint=server,passwordid=pwdata",
        "--object", f"tls-creds-x509,id=tlshttp,dir={enc},endpoint=server,passwordid=pwfile",
        "--object", f"tls-creds-x509,id=tlsb64,dir={enc},endpoint=server,passwordid=pwb64",
        "--chardev", "socket,id=tlsmon,host=127.0.0.1,port=0,server=on,wait=off,"
                     "tls-creds=tlsqmp",
        "--monitor", "tlsmon",
        "--http", "127.0.0.1:0,tls-creds=tlshttp",
        "--tls-handshake-timeout", "2",
    )
    qmp_port = http_port = 0
    for part in proc.banner.split(", "):
        if part.startswith("QMP on tcp:"):
            qmp_port = int(part.rsplit(":", 1)[1])
        if part.startswith("HTTP on https://"):
            http_port = int(part.rsplit(":", 1)[1])
    assert qmp_port and http_port, proc.banner
    seen: list[str] = []
    c = proc.client()
    c.negotiate()

    def cmd(name: str, args: dict[str, Any] | None = None) -> dict[str, Any]:
        reply: dict[str, Any] = c.cmd(name, args or {})
        seen.append(json.dumps(reply))
        return reply

    x509 = {"qom-type": "tls-creds-x509", "endpoint": "server"}
    cmd("object-add", {"qom-type": "secret", "id": "wrong", "data": WRONG_PASSWORD})
    failures = [
        {**x509, "id": "f1", "dir": str(enc), "passwordid": "wrong"},
        {**x509, "id": "f2", "dir": str(enc)},
        {**x509, "id": "f3", "dir": str(enc), "passwordid": "nosuch"},
        {**x509, "id": "f4", "dir": str(pki.dir("server-expired"))},
        {**x509, "id": "f5", "dir": str(pki.dir("server-forged"))},
        {"qom-type": "secret", "id": "f6", "data": KEY_PASSWORD, "format": "base64"},
        {"qom-type": "secret", "id": "f7", "data": KEY_PASSWORD, "file": str(pw_file)},
        {"qom-type": "secret", "id": "pwdata", "data": KEY_PASSWORD},
        {"qom-type": "secret", "id": "f8", "data": KEY_PASSWORD, "bogus": KEY_PASSWORD},
    ]
    for args in failures:
        assert "error" in cmd("object-add", args), args
    for oid in ("pwdata", "pwfile", "pwb64", "wrong", "tlsqmp", "tlshttp", "tlsb64"):
        for prop in cmd("qom-list", {"path": f"/objects/{oid}"})["return"]:
            cmd("qom-get", {"path": f"/objects/{oid}", "property": prop["name"]})
    cmd("qom-list", {"path": "/objects"})
    for name in ("query-named-block-nodes", "query-block-exports", "query-status",
                 "query-commands", "query-migrate-parameters", "query-version"):
        cmd(name)
    cmd("human-monitor-command", {"command-line": "info qom-tree"})
    # Handshakes that fail, on both TLS paths.
    for port in (qmp_port, http_port):
        for ctx in (None, pki.client_context(None), pki.client_context("client-rogue"),
                    pki.client_context("client-expired")):
            _try_tls(port, ctx)
    good = pki.client_context("client")
    for path in ("/metrics", "/health", "/ready"):
        seen.append(_https_get(http_port, good, path))
    assert "qmpd_" in seen[-3]
    cmd("object-del", {"id": "wrong"})
    c.close()
    proc.stop()
    log = proc.stderr_path.read_text()
    assert "object tlsqmp (tls-creds-x509) added" in log  # debug logging was on
    assert "TLS handshake with" in log  # the failures were logged
    plain_key = tmp_path / "plain-key.pem"
    subprocess.run(["openssl", "pkey", "-in", str(enc / "server-key.pem"), "-passin",
                    f"pass:{KEY_PASSWORD}", "-out", str(plain_key)], check=True)
    forbidden = [KEY_PASSWORD, WRONG_PASSWORD, b64, "PRIVATE KEY",
                 *_key_lines(enc / "server-key.pem"), *_key_lines(plain_key),
                 *_key_lines(pki.dir("client") / "client-key.pem")]
    texts = {"stderr (the log)": log, "stdout": proc.read_stdout()}
    texts.update({f"reply {i}": text for i, text in enumerate(seen)})
    for where, text in texts.items():
        for secret in forbidden:
            assert secret not in text, (where, secret)


def test_command_line_errors_never_show_secret_data(qmpd_factory: Any, tmp_path: Path) -> None:
    """An --object secret that fails shows ``data=<redacted>``, in keyval and JSON alike."""
    for option in (
        f"secret,id=s,data={KEY_PASSWORD},bogus=1",
        f"secret,id=s,data={KEY_PASSWORD},format=base64",
        f"secret,id=s,data={KEY_PASSWORD[:8]},{KEY_PASSWORD[8:]}",
        f'{{"qom-type": "secret", "id": "s", "data": "{KEY_PASSWORD}", "x": 1}}',
        f"secret,id=s,data={KEY_PASSWORD},file={tmp_path}/nosuch",
    ):
        with pytest.raises(RuntimeError) as info:
            qmpd_factory("--log-level", "debug", "--object", option)
        text = str(info.value)
        assert "<redacted>" in text, text
        for piece in (KEY_PASSWORD, KEY_PASSWORD[:8], KEY_PASSWORD[8:]):
            assert piece not in text, (option, text)
    with pytest.raises(RuntimeError) as info:
        qmpd_factory("--object", f"secret,id=s,data={KEY_PASSWORD}",
                     "--object", f"secret,id=s,data={KEY_PASSWORD}")
    assert "attempt to add duplicate property 's'" in str(info.value)
    assert KEY_PASSWORD not in str(info.value)
