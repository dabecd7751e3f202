"""Migration over TLS (tls-creds, tls-hostname, tls-authz), qmpd and QEMU 7.2 as peers.

The source is the TLS client (hostname: tls-hostname, else the URI's host),
the destination the server, checking tls-authz against the client's DN.
The good path runs the stale-cache test over TLS in every direction with
QEMU.  The negative matrix (no TLS, a certificate of another CA, an expired
one, a DN the authz refuses) fails cleanly: a qmpd source ends ``failed``
and runs on with its image active (it writes, and holds the write lock);
the destination, qmpd or QEMU, stays waiting and then takes a good source.
QEMU 7.2's source may report ``completed`` there (it does not wait for the
destination); qmpd's never does.  Peers stalled mid-handshake hang nothing.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.migration_helpers import (
    Cluster,
    Peer,
    assert_one_writer,
    create_qcow2,
    image_check,
    need_qemu,
    start,
    wait_until,
)
from tests.integration.test_migration_stale import check_after_handover, stale_run
from tests.support.certs import CLIENT_DN, Pki

pytestmark = pytest.mark.qemu("qemu-img")

TLS_KEYS = ("tls-creds", "tls-hostname", "tls-authz")
#: The client credentials directories that a good destination refuses.
BAD_CLIENTS = {"rogue": "client-rogue", "expired": "client-expired", "wrongdn": "client-wrongdn"}


def objects(kind: str, pki: Pki, *specs: tuple[str, str, str]) -> list[str]:
    """``--object``/``-object`` options: (id, credentials directory, endpoint) each;
    the bad certificates need sanity-check=off to be loaded at all."""
    flag = "--object" if kind == "qmpd" else "-object"
    out: list[str] = []
    for ident, directory, endpoint in specs:
        sanity = "" if directory in ("client", "server") else ",sanity-check=off"
        out += [flag, f"tls-creds-x509,id={ident},dir={pki.dir(directory)},"
                      f"endpoint={endpoint}{sanity}"]
    return out


def authz(kind: str) -> list[str]:
    flag = "--object" if kind == "qmpd" else "-object"
    return [flag, "authz-simple,id=az0,identity=" + CLIENT_DN.replace(",", ",,")]


def tls_params(peer: Peer) -> dict[str, object]:
    params = peer.ok("query-migrate-parameters")
    return {key: params[key] for key in TLS_KEYS}


def port_of(dst: Peer) -> str:
    return str(dst.migrate_info()["socket-address"][0]["port"])


# ---------------------------------------------------------------------------
# Parameters and the source's errors, side by side with QEMU
# ---------------------------------------------------------------------------


def test_tls_parameters_are_reported_as_qemu_does(mig: Cluster, pki: Pki) -> None:
    need_qemu()
    seen: dict[str, list[object]] = {}
    for kind in ("qmpd", "qemu"):
        peer = mig(kind, kind, extra=objects(kind, pki, ("c0", "client", "client")))
        out: list[object] = [tls_params(peer)]
        for change in ({"tls-creds": "c0"}, {"tls-hostname": "localhost", "tls-authz": "x"},
                       {"tls-creds": None}, {"tls-hostname": ""}, {"tls-creds": "nope"},
                       {"tls-authz": None, "tls-creds": None}):
            peer.params(**{k.replace("-", "_"): v for k, v in change.items()})
            out.append(tls_params(peer))
        seen[kind] = out
    assert seen["qmpd"] == seen["qemu"]
    assert seen["qmpd"][0] == {"tls-creds": "", "tls-hostname": "", "tls-authz": ""}


class Sink:
    """A listening socket that accepts and never answers (a peer stalled mid-handshake)."""

    def __init__(self, path: Path | None = None) -> None:
        if path is None:
            self.sock = socket.create_server(("127.0.0.1", 0))
            self.uri = f"tcp:127.0.0.1:{self.sock.getsockname()[1]}"
        else:
            self.sock = socket.socket(socket.AF_UNIX)
            self.sock.bind(str(path))
            self.sock.listen()
            self.uri = f"unix:{path}"
        self.conns: list[socket.socket] = []
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(conn)

    def close(self) -> None:
        self.sock.close()
        for conn in self.conns:
            conn.close()


@pytest.fixture
def sink() -> Iterator[Sink]:
    s = Sink()
    yield s
    s.close()


@pytest.mark.parametrize("params", [{"tls_creds": "nope"}, {"tls_creds": "s0"}])
def test_source_errors_are_qemus(mig: Cluster, pki: Pki, params: dict[str, str]) -> None:
    """Unknown credentials, server credentials on a source: the migration fails
    after the connection, with QEMU's error-desc."""
    need_qemu()
    descs = {}
    for kind in ("qmpd", "qemu"):
        sink = Sink()
        try:
            peer = mig(kind, kind, extra=objects(kind, pki, ("c0", "client", "client"),
                                                 ("s0", "server", "server")))
            peer.params(**params)
            peer.ok("migrate", {"uri": sink.uri})
            info = peer.wait_migration()
            assert info["status"] == "failed"
            descs[kind] = info["error-desc"]
            assert peer.status() == "running"
        finally:
            sink.close()
    assert descs["qmpd"] == descs["qemu"], descs


def test_unix_needs_a_hostname(mig: Cluster, pki: Pki) -> None:
    """TLS on unix: needs tls-hostname (QEMU 7.2's text; its monitor hangs there)."""
    image = create_qcow2(mig.dir / "disk.qcow2")
    sink = Sink(mig.dir / "sink.sock")
    try:
        src = mig("qmpd", "src", extra=objects("qmpd", pki, ("c0", "client", "client")))
        src.add_disk(image)
        src.params(tls_creds="c0")
        src.ok("migrate", {"uri": sink.uri})
        assert src.wait_migration() == {"status": "failed",
                                        "error-desc": "No hostname available for TLS"}
        assert src.status() == "running"
    finally:
        sink.close()
    # With tls-hostname, unix: works (QEMU 7.2 does the same).
    dst = mig("qmpd", "dst", incoming=f"unix:{mig.dir / 'mig.sock'}",
              extra=objects("qmpd", pki, ("s0", "server", "server")))
    dst.add_disk(image)
    dst.params(tls_creds="s0")
    src.params(tls_hostname="localhost")
    src.ok("migrate", {"uri": f"unix:{mig.dir / 'mig.sock'}"})
    assert src.wait_migration()["status"] == "completed"
    assert dst.wait_migration()["status"] == "completed"
    assert_one_writer(image, [src, dst], dst)


# ---------------------------------------------------------------------------
# The good path: the stale-cache test over TLS, every direction with QEMU
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(("src_kind", "dst_kind"),
                         [("qmpd", "qmpd"), ("qemu", "qmpd"), ("qmpd", "qemu")])
def test_stale_cache_over_tls(mig: Cluster, pki: Pki, src_kind: str, dst_kind: str) -> None:
    if "qemu" in (src_kind, dst_kind):
        need_qemu()

    def tls(src: Peer, dst: Peer) -> str:
        dst.params(tls_creds="s0", tls_authz="az0")
        src.params(tls_creds="c0", tls_hostname="localhost")
        return f"tcp:127.0.0.1:{port_of(dst)}"

    src, dst, image = stale_run(
        mig, src_kind, dst_kind,
        src_extra=objects(src_kind, pki, ("c0", "client", "client")),
        dst_extra=objects(dst_kind, pki, ("s0", "server", "server")) + authz(dst_kind),
        uri="tcp:127.0.0.1:0", before_migrate=tls)
    check_after_handover(mig, src, dst, image)


def test_hostname_comes_from_the_uri_and_is_checked(mig: Cluster, pki: Pki) -> None:
    """Without tls-hostname the URI's host (127.0.0.1, in the certificate) is checked;
    a tls-hostname the certificate does not name fails the handshake."""
    image = create_qcow2(mig.dir / "disk.qcow2")
    src = mig.spawn("qmpd", "src", extra=objects("qmpd", pki, ("c0", "client", "client")))
    dst = mig.spawn("qmpd", "dst", incoming="tcp:127.0.0.1:0",
                    extra=objects("qmpd", pki, ("s0", "server", "server")))
    start(src, dst)
    src.add_disk(image)
    dst.add_disk(image)
    dst.params(tls_creds="s0")
    uri = f"tcp:127.0.0.1:{port_of(dst)}"
    src.params(tls_creds="c0", tls_hostname="example.org")
    src.ok("migrate", {"uri": uri})
    info = src.wait_migration()
    assert info["status"] == "failed"
    assert info["error-desc"].startswith("TLS handshake failed: "), info
    assert src.status() == "running"
    src.params(tls_hostname=None)
    src.ok("migrate", {"uri": uri})
    assert src.wait_migration()["status"] == "completed"
    assert dst.wait_migration()["status"] == "completed"
    assert_one_writer(image, [src, dst], dst)


# ---------------------------------------------------------------------------
# The negative matrix
# ---------------------------------------------------------------------------


def refused_then_good(mig: Cluster, pki: Pki, case: str, src_kind: str, dst_kind: str
                      ) -> tuple[Peer, Peer, Peer, Path]:
    """A refused source tries first, then a good qmpd source migrates into the same
    destination; returns (bad source, destination, good source, image)."""
    image = create_qcow2(mig.dir / "disk.qcow2")
    src_objs = [] if case == "plain" else objects(src_kind, pki, ("c0", BAD_CLIENTS[case],
                                                                  "client"))
    bad = mig.spawn(src_kind, "bad", extra=src_objs)
    dst = mig.spawn(dst_kind, "dst", incoming="defer",
                    extra=objects(dst_kind, pki, ("s0", "server", "server")) + authz(dst_kind))
    start(bad, dst)
    bad.caps(events=True)
    bad.add_disk(image)
    dst.add_disk(image)
    dst.params(tls_creds="s0", tls_authz="az0")
    dst.ok("migrate-incoming", {"uri": "tcp:127.0.0.1:0"})
    uri = f"tcp:127.0.0.1:{port_of(dst)}"
    if case != "plain":
        bad.params(tls_creds="c0", tls_hostname="localhost")
    bad.ok("migrate", {"uri": uri})
    info = bad.wait_migration()
    if src_kind == "qmpd":
        # Never completed: failed, running again, the image active and written to.
        assert info["status"] == "failed", info
        assert bad.status() == "running"
        assert bad.qemu_io("disk", "write -P 0x5a 0 64k") == ""
        assert bad.qemu_io("disk", "read -P 0x5a 0 64k") == ""
        assert_one_writer(image, [bad, dst], bad)
    # The destination waits on, its image untouched.
    wait_until(lambda: dst.stderr().strip() != "", 10, "the destination logs the refusal")
    time.sleep(0.2)
    assert dst.alive()
    assert dst.status() == "inmigrate"
    assert dst.migrate_info().get("status") in (None, "setup"), dst.migrate_info()
    if src_kind == "qmpd":
        assert_one_writer(image, [bad, dst], bad)
        bad.quit()
    else:
        bad.quit()  # QEMU's source may claim completed: it has stopped either way
    good = mig("qmpd", "good", extra=objects("qmpd", pki, ("c0", "client", "client")))
    good.add_disk(image)
    good.params(tls_creds="c0")
    good.ok("migrate", {"uri": uri})
    assert good.wait_migration()["status"] == "completed"
    assert dst.wait_migration()["status"] == "completed"
    assert_one_writer(image, [good, dst], dst)
    return bad, dst, good, image


@pytest.mark.parametrize("case", ["plain", "rogue", "expired", "wrongdn"])
@pytest.mark.parametrize(("src_kind", "dst_kind"),
                         [("qmpd", "qmpd"), ("qmpd", "qemu"), ("qemu", "qmpd")])
def test_refused_source(mig: Cluster, pki: Pki, case: str, src_kind: str,
                        dst_kind: str) -> None:
    if "qemu" in (src_kind, dst_kind):
        need_qemu()
    bad, dst, _good, image = refused_then_good(mig, pki, case, src_kind, dst_kind)
    if dst_kind == "qmpd":
        log = dst.stderr()
        expected = {
            "plain": "TLS handshake failed: the peer does not speak TLS",
            "rogue": "TLS handshake failed: The certificate hasn't got a known issuer",
            "expired": "TLS handshake failed: The certificate has expired",
            "wrongdn": "TLS x509 authz check for C=GB,O=Example,CN=intruder is denied",
        }[case]
        assert expected in log, log
    if src_kind == "qmpd":
        assert "MIGRATION:failed" in bad.qmp.names(), bad.qmp.names()
        assert "MIGRATION:completed" not in bad.qmp.names()
    assert dst.quit() == 0
    image_check(image)


def test_stalled_peers_hang_nothing(mig: Cluster, pki: Pki, sink: Sink) -> None:
    """A client that connects and says nothing does not keep a good source out of
    a TLS destination, and a destination that never answers fails the source's
    handshake after --tls-handshake-timeout; QMP answers meanwhile on both."""
    image = create_qcow2(mig.dir / "disk.qcow2")
    src = mig.spawn("qmpd", "src", extra=[*objects("qmpd", pki, ("c0", "client", "client")),
                                          "--tls-handshake-timeout", "1"])
    dst = mig.spawn("qmpd", "dst", incoming="defer",
                    extra=[*objects("qmpd", pki, ("s0", "server", "server")),
                           "--tls-handshake-timeout", "600"])
    start(src, dst)
    src.add_disk(image)
    dst.add_disk(image)
    src.params(tls_creds="c0", tls_hostname="localhost")
    # The source's handshake with a peer that never answers.
    src.ok("migrate", {"uri": sink.uri})
    assert src.status() == "running"
    info = src.wait_migration()
    assert info == {"status": "failed",
                    "error-desc": "TLS handshake failed: the TLS handshake took too long"}, info
    assert src.status() == "running"
    # A client stalled mid-handshake on the destination (a partial ClientHello).
    dst.params(tls_creds="s0")
    dst.ok("migrate-incoming", {"uri": "tcp:127.0.0.1:0"})
    port = int(port_of(dst))
    stalled = socket.create_connection(("127.0.0.1", port))
    try:
        stalled.sendall(b"\x16\x03\x01\x02\x00\x01")
        time.sleep(0.2)
        assert dst.status() == "inmigrate"
        src.ok("migrate", {"uri": f"tcp:127.0.0.1:{port}"})
        assert src.wait_migration()["status"] == "completed"
        assert dst.wait_migration()["status"] == "completed"
        assert dst.status() == "running"
    finally:
        stalled.close()
    assert_one_writer(image, [src, dst], dst)


# ---------------------------------------------------------------------------
# Objects in use, and the URIs qmpd puts no TLS on
# ---------------------------------------------------------------------------


def test_object_del_refused_while_migration_holds_the_objects(mig: Cluster, pki: Pki) -> None:
    """While a TLS migration runs, object-del of the source's credentials and of the
    destination's credentials and authz is refused (QEMU 7.2 deletes them); once it
    has ended, they can be deleted."""
    image = create_qcow2(mig.dir / "disk.qcow2", "64M")
    src = mig.spawn("qmpd", "src", extra=objects("qmpd", pki, ("c0", "client", "client")))
    dst = mig.spawn("qmpd", "dst", incoming="defer",
                    extra=objects("qmpd", pki, ("s0", "server", "server")) + authz("qmpd"))
    start(src, dst)
    src.add_disk(image)
    dst.add_disk(image)
    dst.params(tls_creds="s0", tls_authz="az0")
    src.params(tls_creds="c0", tls_hostname="localhost", max_bandwidth=100)
    dst.ok("migrate-incoming", {"uri": "tcp:127.0.0.1:0"})
    src.ok("migrate", {"uri": f"tcp:127.0.0.1:{port_of(dst)}"})
    src.wait_migration(states=("active",))
    dst.wait_migration(states=("active",))
    for peer, ident in ((src, "c0"), (dst, "s0"), (dst, "az0")):
        assert peer.err("object-del", {"id": ident}) == (
            f"object '{ident}' is in use, can not be deleted"), (peer, ident)
    assert src.migrate_info()["status"] == "active"
    src.params(max_bandwidth=1 << 30)
    assert src.wait_migration()["status"] == "completed"
    assert dst.wait_migration()["status"] == "completed"
    for peer, ident in ((src, "c0"), (dst, "s0"), (dst, "az0")):
        assert peer.ok("object-del", {"id": ident}) == {}, (peer, ident)
    assert_one_writer(image, [src, dst], dst)
    src.quit()
    assert dst.quit() == 0
    image_check(image)


@pytest.mark.parametrize("scheme", ["exec", "fd"])
def test_no_plaintext_on_exec_and_fd_with_tls_creds(mig: Cluster, pki: Pki,
                                                    scheme: str) -> None:
    """QEMU 7.2 wraps exec: and fd: channels in TLS; qmpd refuses them with tls-creds
    set (a README difference), and not one plaintext byte leaves either side."""
    message = ("qmpd puts TLS on socket migrations only (tcp: and unix: URIs), "
               "not on exec: or fd:")
    image = create_qcow2(mig.dir / "disk.qcow2", "64M")
    src = mig.spawn("qmpd", "src", extra=objects("qmpd", pki, ("c0", "client", "client")))
    dst = mig.spawn("qmpd", "dst", incoming="defer",
                    extra=objects("qmpd", pki, ("s0", "server", "server")))
    start(src, dst)
    src.add_disk(image)
    dst.add_disk(image)
    src.params(tls_creds="c0", tls_hostname="localhost")
    dst.params(tls_creds="s0")
    out = mig.dir / "stream.out"
    a, b = socket.socketpair()
    with a, b:
        if scheme == "exec":
            uri = f"exec:cat > {out}"
            in_uri = f"exec:cat {out}"
            out.write_bytes(b"")
        else:
            uri = in_uri = "fd:mig"
            assert src.ok("getfd", {"fdname": "mig"}, fds=[a.fileno()]) == {}
            assert dst.ok("getfd", {"fdname": "mig"}, fds=[b.fileno()]) == {}
        src.ok("migrate", {"uri": uri})
        assert src.wait_migration() == {"status": "failed", "error-desc": message}
        assert src.status() == "running"
        assert src.holds_write(image)
        assert dst.err("migrate-incoming", {"uri": in_uri}) == message
        assert dst.alive() and dst.status() == "inmigrate"
        if scheme == "exec":
            assert out.read_bytes() == b""
        else:
            b.setblocking(False)
            with pytest.raises(BlockingIOError):
                b.recv(1)  # nothing sent by the source
    # Without tls-creds the same URIs migrate in the clear, as asked.
    src.params(tls_creds="")
    dst.params(tls_creds="")
    if scheme == "exec":
        src.ok("migrate", {"uri": f"exec:cat > {out}"})
        assert src.wait_migration()["status"] == "completed"
        dst.ok("migrate-incoming", {"uri": f"exec:cat {out}"})
        assert dst.wait_migration()["status"] == "completed"
        assert out.read_bytes() != b""
        assert_one_writer(image, [src, dst], dst)
