"""NBD over TLS (issue 13), server side: qmpd next to qemu-storage-daemon 7.2.

Both serve the same image with the same certificates (tests/support/certs.py),
``tls-creds`` and an ``authz-simple`` for the good client's DN:

* raw option transcripts before and after NBD_OPT_STARTTLS are byte for byte
  QEMU's (NBD_REP_ERR_TLS_REQD and its texts, hang-ups, "TLS already enabled");
* QEMU's tools (qemu-img and qemu-io with ``--object tls-creds-x509`` and
  ``--image-opts ...,tls-creds=``, ``qemu-nbd --list --tls-creds``) and
  libnbd's (``nbdinfo``, ``nbdcopy`` with ``nbds://`` and ``nbds+unix://``)
  read and write over TLS;
* the negative matrix (no TLS, the wrong CA, an expired certificate, a
  certificate from an untrusted CA, a DN the authz refuses, a client that
  stalls mid-handshake) is refused by both, the daemon logs why in QEMU's
  words, and a good client is served meanwhile and afterwards.
"""

from __future__ import annotations

import os
import socket
import ssl
import struct
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import QmpdProcess
from tests.support.certs import CLIENT_DN, Pki
from tests.support.tools import QSD, qemu_img, qemu_io, require_tool, run_tool, wait_for_socket

pytestmark = pytest.mark.qemu

IHAVEOPT = 0x49484156454F5054
SIZE = 4 * 1024 * 1024
#: qmpd's --tls-handshake-timeout here (a stalled client is dropped after it).
HANDSHAKE_TIMEOUT = 2.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def server_args(pki: Pki, image: Path, addr: str) -> list[str]:
    return [
        "--object", f"tls-creds-x509,id=tls0,dir={pki.dir('server')},endpoint=server",
        "--object", "authz-simple,id=authz0,identity=" + CLIENT_DN.replace(",", ",,"),
        "--blockdev", f"driver=file,node-name=disk,filename={image}",
        "--nbd-server", f"{addr},tls-creds=tls0,tls-authz=authz0",
        "--export", "type=nbd,id=e,node-name=disk,name=e,writable=on",
    ]


@dataclass
class Server:
    impl: str
    port: int
    sock: Path
    image: Path
    log: Path

    @property
    def uri(self) -> str:
        return f"nbd://127.0.0.1:{self.port}/e"

    def stderr(self) -> str:
        return self.log.read_text(errors="replace")


class Servers:
    """A qemu-storage-daemon and a qmpd, each on TCP and on a UNIX socket (two listeners:
    ``nbd-server-start`` takes one address, so each has a TCP and a UNIX instance)."""

    def __init__(self, root: Path, pki: Pki) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []
        self.daemons: list[QmpdProcess] = []
        self.by_impl: dict[str, dict[str, Server]] = {}
        try:
            self._start(root, pki)
        except BaseException:
            self.stop()
            raise

    def _start(self, root: Path, pki: Pki) -> None:
        for impl in ("qsd", "qmpd"):
            work = root / impl
            work.mkdir()
            image = work / "disk.raw"
            qemu_img("create", "-q", "-f", "raw", image, str(SIZE))
            qemu_io("-f", "raw", "-c", "write -P 0x5a 0 1M", image, check=True)
            servers = {}
            for kind in ("tcp", "unix"):
                port = free_port()
                sock = work / f"{kind}.sock"
                addr = (f"addr.type=inet,addr.host=127.0.0.1,addr.port={port}" if kind == "tcp"
                        else f"addr.type=unix,addr.path={sock}")
                args = server_args(pki, image, addr)
                log = work / f"{kind}.log"
                if impl == "qsd":
                    # Both share the image: the second opens it without locking.
                    if kind == "unix":
                        args[args.index("--blockdev") + 1] += ",locking=off"
                    proc = subprocess.Popen([require_tool(QSD), *args],
                                            stdout=subprocess.DEVNULL,
                                            stderr=open(log, "wb"))
                    self.procs.append(proc)
                    if kind == "unix":
                        wait_for_socket(proc, sock)
                    else:
                        _wait_port(port, proc)
                else:
                    if kind == "unix":
                        args[args.index("--blockdev") + 1] += ",locking=off"
                    daemon = QmpdProcess(work, *args, "--tls-handshake-timeout",
                                         str(HANDSHAKE_TIMEOUT), default_qmp=False)
                    self.daemons.append(daemon)
                    log = daemon.stderr_path
                servers[kind] = Server(impl, port, sock, image, log)
            self.by_impl[impl] = servers

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
            proc.wait(10)
        for daemon in self.daemons:
            daemon.stop()


def _wait_port(port: int, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert proc.poll() is None, "server exited"
        try:
            socket.create_connection(("127.0.0.1", port), 1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"nothing listens on port {port}")


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[Servers]:
    require_tool(QSD)
    both = Servers(tmp_path_factory.mktemp("nbdtls"), pki)
    try:
        yield both
    finally:
        both.stop()


IMPLS = ["qsd", "qmpd"]


def client_ctx(pki: Pki, name: str = "client") -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_verify_locations(cafile=str(pki.dir("ca") / "ca-cert.pem"))
    d = pki.dir(name)
    ctx.load_cert_chain(str(d / "client-cert.pem"), str(d / "client-key.pem"))
    return ctx


# --- raw transcripts ---------------------------------------------------------------------


class Peer:
    """A raw NBD client; :meth:`starttls` puts its socket under TLS."""

    def __init__(self, server: Server, flags: int = 3) -> None:
        self.sock: socket.socket = socket.create_connection(("127.0.0.1", server.port), 10)
        self.sock.settimeout(10)
        assert self.recv(18)[:8] == b"NBDMAGIC"
        self.sock.sendall(struct.pack(">I", flags))

    def recv(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            if not chunk:
                raise EOFError
            data += chunk
        return data

    def option(self, option: int, data: bytes = b"") -> list[Any]:
        self.sock.sendall(struct.pack(">QII", IHAVEOPT, option, len(data)) + data)
        out: list[Any] = []
        try:
            if option == 1:
                return [("export-name", self.recv(10).hex())]
            while True:
                _, echoed, kind, length = struct.unpack(">QIII", self.recv(20))
                out.append((echoed, kind, self.recv(length)))
                if kind == 1 or kind & 0x80000000:
                    return out
        except (EOFError, ConnectionError, ssl.SSLError):
            return [*out, "hang-up"]

    def starttls(self, ctx: ssl.SSLContext) -> None:
        self.sock = ctx.wrap_socket(self.sock)

    def close(self) -> None:
        self.sock.close()


def _name(raw: bytes) -> bytes:
    return struct.pack(">I", len(raw)) + raw


GO = (7, _name(b"e") + b"\0\0")
#: name -> options in order; "tls" marks where the client turns TLS on.
CASES: dict[str, list[Any]] = {
    "list": [(3, b"")],
    "go": [GO],
    "info": [(6, _name(b"e") + b"\0\0")],
    "structured": [(8, b"")],
    "list-meta": [(9, _name(b"e") + b"\0\0\0\0")],
    "unknown": [(42, b"abc")],
    "abort": [(3, b""), (2, b"")],
    "export-name": [(1, b"e")],
    "starttls-with-data": [(5, b"x")],
    "options-then-go-over-tls": [(3, b""), (8, b""), (5, b""), "tls", (3, b""), (5, b""),
                                 (5, b"x"), (8, b""), GO],
    "export-name-over-tls": [(5, b""), "tls", (1, b"e")],
}


def play(server: Server, pki: Pki, steps: list[Any], flags: int = 3) -> list[Any]:
    peer = Peer(server, flags)
    try:
        out: list[Any] = []
        for step in steps:
            if step == "tls":
                peer.starttls(client_ctx(pki))
                out.append("tls")
                continue
            option, data = step
            replies = peer.option(option, data)
            if option == 1 and replies[-1:] != ["hang-up"]:
                replies = [("export-name", replies[0][1][:4])]  # size differs: the image is shared
            out.append(replies)
            if replies[-1:] == ["hang-up"] or option == 2:
                break
        return out
    finally:
        peer.close()


@pytest.mark.parametrize("case", list(CASES))
def test_option_replies_as_qsd(servers: Servers, pki: Pki, case: str) -> None:
    got = {impl: play(servers.by_impl[impl]["tcp"], pki, CASES[case]) for impl in IMPLS}
    assert got["qmpd"] == got["qsd"]
    if case == "list":
        assert got["qmpd"] == [[(3, 0x80000005, b"Option 0x3 not permitted before TLS")]]


def test_non_fixed_client_is_dropped_as_qsd(servers: Servers, pki: Pki) -> None:
    got = {impl: play(servers.by_impl[impl]["tcp"], pki, [(3, b"")], flags=0) for impl in IMPLS}
    assert got["qmpd"] == got["qsd"] == [["hang-up"]]


# --- QEMU's and libnbd's tools ------------------------------------------------------------


def creds(pki: Pki, name: str = "client") -> list[str]:
    return ["--object",
            f"tls-creds-x509,id=c0,dir={pki.dir(name)},endpoint=client,sanity-check=off"]


def image_opts(server: Server, unix: bool = False, extra: str = "") -> str:
    if unix:
        addr = f"server.type=unix,server.path={server.sock},tls-hostname=localhost"
    else:
        addr = f"server.type=inet,server.host=127.0.0.1,server.port={server.port}"
    return f"driver=nbd,{addr},export=e,tls-creds=c0{extra}"


@pytest.mark.parametrize("impl", IMPLS)
def test_qemu_tools_over_tls(servers: Servers, pki: Pki, tmp_path: Path, impl: str) -> None:
    tcp, unix = servers.by_impl[impl]["tcp"], servers.by_impl[impl]["unix"]
    for server, over_unix in ((tcp, False), (unix, True)):
        info = qemu_img("info", *creds(pki), "--image-opts", image_opts(server, over_unix))
        assert f"virtual size: 4 MiB ({SIZE} bytes)" in info.stdout
    out = qemu_io(*creds(pki), "--image-opts", image_opts(tcp), "-c", "write -P 0x33 1M 64k",
                  "-c", "read -P 0x5a 0 1M", "-c", "read -P 0x33 1M 64k", check=True)
    assert "Pattern verification failed" not in out.stdout, out.stdout
    copy = tmp_path / "copy.raw"
    qemu_img("convert", *creds(pki), "--image-opts", image_opts(unix, True), "-O", "raw", copy)
    qemu_img("compare", "-f", "raw", "-F", "raw", tcp.image, copy)
    listing = run_tool("qemu-nbd", "--list", "-b", "127.0.0.1", "-p", str(tcp.port),
                       *creds(pki), "--tls-creds", "c0")
    assert "exports available: 1" in listing.stdout and "export: 'e'" in listing.stdout


@pytest.mark.parametrize("impl", IMPLS)
def test_libnbd_over_tls(servers: Servers, pki: Pki, tmp_path: Path, impl: str) -> None:
    tcp, unix = servers.by_impl[impl]["tcp"], servers.by_impl[impl]["unix"]
    certs = f"tls-certificates={pki.dir('client')}"
    nbds = f"nbds://127.0.0.1:{tcp.port}/e?{certs}"
    info = run_tool("nbdinfo", nbds)
    assert "with TLS" in info.stdout and f"export-size: {SIZE}" in info.stdout, info.stdout
    listing = run_tool("nbdinfo", "--list", f"nbds+unix:///?socket={unix.sock}&{certs}")
    assert 'export="e"' in listing.stdout
    copy = tmp_path / "copy.raw"
    run_tool("nbdcopy", f"nbds+unix:///e?socket={unix.sock}&{certs}", copy)
    qemu_img("compare", "-f", "raw", "-F", "raw", tcp.image, copy)
    source = tmp_path / "source.raw"
    qemu_img("create", "-q", "-f", "raw", source, str(SIZE))
    qemu_io("-f", "raw", "-c", "write -P 0x77 2M 1M", source, check=True)
    run_tool("nbdcopy", source, nbds)
    qemu_img("compare", "-f", "raw", "-F", "raw", source, tcp.image)
    # Put the first megabyte back for the other tests.
    qemu_io(*creds(pki), "--image-opts", image_opts(tcp), "-c", "write -P 0x5a 0 1M", check=True)


# --- refusals ----------------------------------------------------------------------------


def good_client_works(server: Server, pki: Pki) -> None:
    out = qemu_io(*creds(pki), "--image-opts", image_opts(server), "-c", "read -P 0x5a 0 64k",
                  check=True)
    assert "read 65536/65536" in out.stdout


#: case -> (credentials directory or None for a plain client, what the server logs:
#: QEMU's words, or where OpenSSL and GnuTLS part, each its own).
REFUSALS: dict[str, tuple[str | None, dict[str, str]]] = {
    "no-tls": (None, {"qmpd": "option negotiation failed: Option 0x7 not permitted before TLS"}),
    "wrong-ca": ("rogue-ca", {
        impl: "option negotiation failed: Verify failed: No certificate was found."
        for impl in ("qsd", "qmpd")}),
    "expired": ("client-expired", {"qsd": "The certificate is not trusted",
                                   "qmpd": "option negotiation failed: The certificate is not "
                                           "trusted"}),
    "untrusted-issuer": ("client-rogue", {
        "qsd": "option negotiation failed: Verify failed: No certificate was found.",
        "qmpd": "option negotiation failed: The certificate hasn't got a known issuer"}),
    "dn-refused": ("client-wrongdn", {
        "qsd": "option negotiation failed: TLS x509 authz check for C=GB,O=Example,CN=intruder "
               "is denied",
        "qmpd": "option negotiation failed: TLS x509 authz check for C=GB,O=Example,CN=intruder "
                "is denied"}),
}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", list(REFUSALS))
def test_refused_and_logged(servers: Servers, pki: Pki, impl: str, case: str) -> None:
    server = servers.by_impl[impl]["tcp"]
    directory, logged = REFUSALS[case]
    before = server.stderr()
    if directory is None:
        result = qemu_img("info", server.uri, check=False)
        assert "TLS negotiation required before option 7 (go)" in result.stderr
    else:
        result = qemu_img("info", *creds(pki, directory), "--image-opts", image_opts(server),
                          check=False)
    assert result.returncode != 0, result.stdout
    assert "virtual size" not in result.stdout
    want = logged.get(impl)
    if want is not None:
        deadline = time.monotonic() + 10
        while want not in server.stderr()[len(before):] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert want in server.stderr()[len(before):], server.stderr()[len(before):]
    good_client_works(server, pki)


def test_stalled_handshake_is_dropped_and_blocks_nobody(servers: Servers, pki: Pki) -> None:
    """STARTTLS, then half a ClientHello: dropped after the timeout, logged; others served."""
    server = servers.by_impl["qmpd"]["tcp"]
    before = server.stderr()
    stalled = Peer(server)
    silent = Peer(server)
    try:
        assert stalled.option(5) == [(5, 1, b"")]
        assert silent.option(5) == [(5, 1, b"")]
        stalled.sock.sendall(b"\x16\x03\x01\x02\x00\x01")  # a record header, then nothing
        started = time.monotonic()
        good_client_works(server, pki)  # while both stall
        for peer in (stalled, silent):
            peer.sock.settimeout(HANDSHAKE_TIMEOUT + 15)
            assert peer.sock.recv(100) == b""  # the server hung up
        assert time.monotonic() - started >= HANDSHAKE_TIMEOUT * 0.5
    finally:
        stalled.close()
        silent.close()
    log = server.stderr()[len(before):]
    assert log.count("option negotiation failed: the TLS handshake took too long") == 2, log
    good_client_works(server, pki)


def _records(data: bytes) -> list[bytes]:
    """TLS records, whole, in order."""
    out = []
    while data:
        length = struct.unpack(">H", data[3:5])[0]
        out.append(data[:5 + length])
        data = data[5 + length:]
    return out


@pytest.mark.parametrize("impl", IMPLS)
def test_refused_certificate_mid_flight_is_not_reset(servers: Servers, pki: Pki,
                                                     impl: str) -> None:
    """A client whose certificate is refused is not reset in the middle of its
    handshake, and reads qmpd's alert to a clean end.

    OpenSSL (qmpd) refuses an expired certificate as soon as it arrives, GnuTLS
    (QSD) once the handshake is done.  Here the client sends its last flight a
    record at a time, with pauses between.  A server that closed as it refused
    would answer the next record with a reset, and the client's send after that
    fails (EPIPE): QEMU 7.2's own client, hit so in the middle of its handshake,
    hangs in blockdev-add for ever.  qmpd lingers, so the client's first
    options go through too.
    """
    server = servers.by_impl[impl]["tcp"]
    before = server.stderr()
    peer = Peer(server)
    try:
        assert peer.option(5) == [(5, 1, b"")]
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        tls = client_ctx(pki, "client-expired").wrap_bio(incoming, outgoing)
        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                peer.sock.sendall(outgoing.read())
                incoming.write(peer.sock.recv(65536))
        flight = _records(outgoing.read())
        assert len(flight) >= 3  # Certificate, CertificateVerify, Finished
        if impl == "qmpd":  # and options: QEMU's server resets those (it has checked)
            for _ in range(2):
                tls.write(struct.pack(">QII", IHAVEOPT, 3, 0))  # NBD_OPT_LIST
                flight.append(outgoing.read())
        for record in flight:  # one at a time: a reset would be back before the next
            peer.sock.sendall(record)
            time.sleep(0.15)
        received = b""
        while chunk := peer.sock.recv(65536):
            received += chunk
    finally:
        peer.close()
    if impl == "qmpd":
        incoming.write(received)
        with pytest.raises(ssl.SSLError, match="CERTIFICATE_EXPIRED"):
            tls.read(100)
    logged = REFUSALS["expired"][1][impl]
    deadline = time.monotonic() + 10
    while logged not in server.stderr()[len(before):] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert logged in server.stderr()[len(before):]
    good_client_works(server, pki)


def _refused(server: Server, pki: Pki) -> socket.socket:
    """A client refused in its TLS handshake (an expired certificate) that has
    read the alert and the server's end of stream, and neither sends nor hangs
    up: its own socket, outside TLS."""
    peer = Peer(server)
    assert peer.option(5) == [(5, 1, b"")]
    raw = socket.socket(fileno=os.dup(peer.sock.fileno()))
    peer.starttls(client_ctx(pki, "client-expired"))
    with pytest.raises(ssl.SSLError, match="CERTIFICATE_EXPIRED"):
        peer.sock.recv(100)
    peer.sock.detach()
    return raw


def _server_closed(raw: socket.socket) -> bool:
    """Whether the server has closed its end: what we send then gets a reset
    (while it lingers, it reads and drops what we send)."""
    try:
        raw.sendall(b"x")
        time.sleep(0.2)  # for the reset (on loopback it is back at once)
        raw.recv(1)
        raw.sendall(b"x")
    except (ConnectionResetError, BrokenPipeError):
        return True
    return False


def test_refused_clients_that_stay_keep_no_connection_slot(tmp_path: Path, pki: Pki) -> None:
    """With ``max-connections=1``, a client whose certificate is refused and
    that then neither sends nor hangs up (qmpd reads it until it does, see
    above) does not keep the next client out: QEMU's server has dropped such
    a client, so its slot is free at once, not when the lingering ends.  At
    most MAX_LINGERING linger (those beyond are closed at once), and
    nbd-server-stop closes those that do."""
    from qmpd.nbd.tls import LINGER_TIMEOUT, MAX_LINGERING

    image = tmp_path / "disk.raw"
    qemu_img("create", "-q", "-f", "raw", image, str(SIZE))
    qemu_io("-f", "raw", "-c", "write -P 0x5a 0 1M", image, check=True)
    port = free_port()
    addr = f"addr.type=inet,addr.host=127.0.0.1,addr.port={port},max-connections=1"
    daemon = QmpdProcess(tmp_path, *server_args(pki, image, addr))
    server = Server("qmpd", port, tmp_path / "unused.sock", image, daemon.stderr_path)
    refused: list[socket.socket] = []
    try:
        refused.append(_refused(server, pki))
        started = time.monotonic()
        Peer(server).close()  # greeted, so the refused one holds no slot
        greeted = time.monotonic() - started
        good_client_works(server, pki)
        assert greeted < LINGER_TIMEOUT / 2, greeted
        while len(refused) <= MAX_LINGERING:
            refused.append(_refused(server, pki))
        started = time.monotonic()
        assert _server_closed(refused[-1])  # one too many: closed at once
        assert not _server_closed(refused[-2])  # still lingering
        assert time.monotonic() - started < LINGER_TIMEOUT / 2
        qmp = daemon.client()
        try:
            qmp.cmd("qmp_capabilities")
            assert qmp.cmd("nbd-server-stop") == {"return": {}}
        finally:
            qmp.close()
        assert _server_closed(refused[-2])
    finally:
        for raw in refused:
            raw.close()
        daemon.stop()
