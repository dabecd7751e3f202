"""NBD over TLS (issue 13), client side: the ``nbd`` block driver with ``tls-creds``
and ``tls-hostname``, next to qemu-storage-daemon 7.2 doing the same blockdev-add.

The servers are those of tests/interop/test_nbd_tls.py (a TLS qemu-storage-daemon
and a TLS qmpd, with an authz for the good client's DN).  For every case
both clients (qmpd and a QSD) run the same blockdev-add; against QSD's server
the outcomes (success or QEMU's error text) must be equal, and against qmpd's
server too where both TLS libraries agree on the moment of failure.  Data
goes through the TLS node both ways (an export of it on a plain socket,
qemu-io writes, ``qemu-img compare``).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import QmpdProcess
from tests.interop.test_nbd_driver import Qsd
from tests.interop.test_nbd_tls import SIZE, Server, Servers
from tests.support.certs import Pki
from tests.support.qmp import QmpClient
from tests.support.tools import QSD, qemu_img, qemu_io, require_tool

pytestmark = pytest.mark.qemu

TLS_DROPPED = "Failed to read option reply: Cannot read from TLS channel: Input/output error"
TLS_ABORTED = ("Failed to read option reply: Cannot read from TLS channel: Software caused "
               "connection abort")


def _objects(pki: Pki) -> list[str]:
    out = []
    for oid, directory, endpoint in (("good", "client", "client"), ("rogue", "rogue-ca", "client"),
                                     ("expired", "client-expired", "client"),
                                     ("wrongdn", "client-wrongdn", "client"),
                                     ("srv", "server", "server")):
        out += ["--object", f"tls-creds-x509,id={oid},dir={pki.dir(directory)},"
                f"endpoint={endpoint},sanity-check=off"]
    return [*out, "--object", "secret,id=sec,data=x"]


class Clients:
    def __init__(self, root: Path, pki: Pki) -> None:
        root.mkdir(exist_ok=True)
        self.plain = root / "plain.sock"
        self.qmpd = QmpdProcess(root, *_objects(pki), "--blockdev",
                                "driver=null-co,node-name=null0,size=1048576",
                                "--nbd-server", f"addr.type=unix,addr.path={self.plain}",
                                "--export", "type=nbd,id=n,node-name=null0,name=e")
        try:
            self.qmpd_qmp = QmpClient(self.qmpd.sock, 60)
            self.qmpd_qmp.negotiate()
            self.qsd = Qsd(root / "qsd", *_objects(pki))
        except BaseException:
            self.qmpd.stop()
            raise

    def qmp(self, impl: str) -> QmpClient:
        return self.qmpd_qmp if impl == "qmpd" else self.qsd.qmp

    def stop(self) -> None:
        self.qmpd_qmp.close()
        self.qmpd.stop()
        self.qsd.stop()


@pytest.fixture(scope="module")
def tls_servers(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[Servers]:
    require_tool(QSD)
    both = Servers(tmp_path_factory.mktemp("nbdtls-servers"), pki)
    try:
        yield both
    finally:
        both.stop()


@pytest.fixture(scope="module")
def clients(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[Clients]:
    require_tool(QSD)
    both = Clients(tmp_path_factory.mktemp("nbdtls-clients"), pki)
    try:
        yield both
    finally:
        both.stop()


def _tcp(server: Server) -> dict[str, Any]:
    return {"type": "inet", "host": "127.0.0.1", "port": str(server.port)}


def _unix(server: Server) -> dict[str, Any]:
    return {"type": "unix", "path": str(server.sock)}


#: case -> (blockdev-add arguments but node-name, given the server).
CASES: dict[str, Any] = {
    "good-tcp": lambda s: {"server": _tcp(s), "tls-creds": "good"},
    "good-unix": lambda s: {"server": _unix(s), "tls-creds": "good", "tls-hostname": "localhost"},
    "unix-without-hostname": lambda s: {"server": _unix(s), "tls-creds": "good"},
    "wrong-hostname": lambda s: {"server": _unix(s), "tls-creds": "good",
                                 "tls-hostname": "wronghost"},
    "no-tls": lambda s: {"server": _tcp(s)},
    "wrong-ca": lambda s: {"server": _tcp(s), "tls-creds": "rogue"},
    "dn-refused": lambda s: {"server": _tcp(s), "tls-creds": "wrongdn"},
    "expired": lambda s: {"server": _tcp(s), "tls-creds": "expired"},
    "server-endpoint": lambda s: {"server": _tcp(s), "tls-creds": "srv"},
    "no-such-creds": lambda s: {"server": _tcp(s), "tls-creds": "nosuch"},
    "not-creds": lambda s: {"server": _tcp(s), "tls-creds": "sec"},
}
#: Where OpenSSL (qmpd's server) and GnuTLS (QSD's) part: QSD's client sees
#: qmpd's server refuse its certificate in the handshake, not after it.
DIFFERENT_ON_QMPD_SERVER = {"expired", "dn-refused", "wrong-ca"}


def _blockdev_add(qmp: QmpClient, name: str, args: dict[str, Any]) -> str:
    reply = qmp.cmd("blockdev-add", {"driver": "nbd", "node-name": name, "export": "e", **args})
    if "error" in reply:
        return str(reply["error"]["desc"])
    qmp.ok("blockdev-del", {"node-name": name})
    return "ok"


@pytest.mark.parametrize("server_impl", ["qsd", "qmpd"])
@pytest.mark.parametrize("case", list(CASES))
def test_blockdev_add_as_qsd(tls_servers: Servers, clients: Clients, server_impl: str,
                             case: str) -> None:
    server = tls_servers.by_impl[server_impl]["tcp"]
    if "unix" in case or "hostname" in case:
        server = tls_servers.by_impl[server_impl]["unix"]
    args = CASES[case](server)
    got = {impl: _blockdev_add(clients.qmp(impl), f"n-{case}", args)
           for impl in ("qsd", "qmpd")}
    if case in ("dn-refused", "expired"):
        # The server drops the client after the handshake: QEMU's client reads
        # EIO or ECONNABORTED, depending on how soon the hang-up comes.
        assert got["qmpd"] == TLS_DROPPED
        assert got["qsd"] in (TLS_DROPPED, TLS_ABORTED)
    elif server_impl == "qsd" or case not in DIFFERENT_ON_QMPD_SERVER:
        assert got["qmpd"] == got["qsd"]
    if case.startswith("good"):
        assert got["qmpd"] == "ok"
    elif case == "wrong-ca":
        assert got["qmpd"] == "The certificate hasn't got a known issuer"
    else:
        assert got["qmpd"] != "ok"


def test_tls_to_plain_server_as_qsd(clients: Clients) -> None:
    args = {"server": {"type": "unix", "path": str(clients.plain)}, "tls-creds": "good",
            "tls-hostname": "localhost"}
    got = {impl: _blockdev_add(clients.qmp(impl), "n-plain", args) for impl in ("qsd", "qmpd")}
    assert got["qmpd"] == got["qsd"] == "Denied by server for option 5 (starttls)"


@pytest.mark.parametrize("server_impl", ["qsd", "qmpd"])
def test_data_through_a_tls_node(tls_servers: Servers, clients: Clients, tmp_path: Path,
                                 server_impl: str) -> None:
    """qemu-io writes through an export of the TLS node; the server's image gets them."""
    server = tls_servers.by_impl[server_impl]["tcp"]
    qmp = clients.qmpd_qmp
    qmp.ok("blockdev-add", {"driver": "nbd", "node-name": "tlsnode", "export": "e",
                            "server": _tcp(server), "tls-creds": "good"})
    try:
        qmp.ok("block-export-add", {"type": "nbd", "id": "through", "node-name": "tlsnode",
                                    "name": "through", "writable": True})
        uri = f"nbd+unix:///through?socket={clients.plain}"
        out = qemu_io("-f", "raw", uri, "-c", "read -P 0x5a 0 1M", "-c",
                      "write -P 0x6b 3M 512k", "-c", "write -z 3584k 64k", "-c", "flush",
                      check=True)
        assert "Pattern verification failed" not in out.stdout
        copy = tmp_path / "copy.raw"
        qemu_img("convert", "-f", "raw", "-O", "raw", uri, copy)
        qemu_img("compare", "-f", "raw", "-F", "raw", server.image, copy)
        assert copy.stat().st_size == SIZE
        reply = qmp.cmd("object-del", {"id": "good"})
        assert "error" in reply  # held by the node
        qmp.ok("block-export-del", {"id": "through", "mode": "hard"})
        qmp.wait_event("BLOCK_EXPORT_DELETED")
    finally:
        qmp.cmd("blockdev-del", {"node-name": "tlsnode"})
