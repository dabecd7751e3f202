"""The ``nbd`` block driver (issue 12): an NBD client node, against QEMU 7.2.

Servers under the node: qemu-storage-daemon 7.2, ``qemu-nbd`` and another
qmpd.  Data goes through the node by an NBD export of a ``raw`` node on top
of it, served by the same qmpd (qemu-io writes there); the image under the
server must then equal a copy that got the same writes directly
(``qemu-img compare``).  Open errors and query output are compared with a
qemu-storage-daemon doing the same blockdev-add against the same servers.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import QmpdProcess
from tests.support.qmp import QmpClient
from tests.support.qsd import QsdMonitor
from tests.support.tools import QSD, qemu_img, qemu_io, require_tool, wait_for_socket

pytestmark = pytest.mark.qemu

MiB = 1024 * 1024
SIZE = 4 * MiB

#: Writes through the node (qemu-io commands); the same go to a copy directly.
#: ``-f`` is FUA, ``-z`` write-zeroes (``-u``: may unmap), aio_* run together.
OPS = [
    "write -P 0x5a 0 1M",
    "write -f -P 0x21 1536k 4k",
    "write -z 2M 256k",
    "write -z -u 2304k 64k",
    "aio_write -P 0x42 2560k 64k",
    "aio_write -P 0x43 2624k 64k",
    "aio_write -P 0x44 3M 512",
    "aio_flush",
    "discard 3584k 64k",  # zeros before and after, whatever the server does with it
    "flush",
]


def _seed(image: Path) -> None:
    qemu_img("create", "-q", "-f", "raw", image, str(SIZE))
    qemu_io("-f", "raw", "-c", "write -P 0x11 0 2M", "-c", "write -P 0x12 3M 256k", image,
            check=True)


class Qsd:
    """A qemu-storage-daemon with a QMP monitor."""

    def __init__(self, directory: Path, *args: str) -> None:
        directory.mkdir(exist_ok=True)
        self.dir = directory
        self.log = directory / "qsd.log"
        monitor = QsdMonitor("m")
        self.proc = monitor.popen([require_tool(QSD), *monitor.args, *args],
                                  stdout=open(self.log, "wb"), stderr=subprocess.STDOUT)
        try:
            self.qmp = monitor.client(self.proc, 30, log=self.log, check_schema=False,
                                      negotiate=True)
        except BaseException:
            self.proc.kill()
            self.proc.wait()
            raise

    def stop(self) -> None:
        self.qmp.close()
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


def _qsd_server(directory: Path, image: Path, trace: bool = False) -> Qsd:
    """QSD serving ``image`` as writable ``exp`` and a read-only ``roexp``."""
    ro = directory / "ro.raw"
    directory.mkdir(exist_ok=True)
    qemu_img("create", "-q", "-f", "raw", ro, str(MiB))
    extra = ["--trace", "nbd_co_receive_request_decode_type"] if trace else []
    return Qsd(directory, *extra,
               "--blockdev", f"file,node-name=f,filename={image}",
               "--blockdev", f"file,node-name=r,filename={ro},read-only=on",
               "--nbd-server", f"addr.type=unix,addr.path={directory}/nbd.sock",
               "--export", "nbd,id=e1,node-name=f,name=exp,writable=on",
               "--export", "nbd,id=e2,node-name=r,name=roexp")


def _qemu_nbd(sock: Path, image: Path, *args: str) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [require_tool("qemu-nbd"), "-k", str(sock), "-x", "exp", "-f", "raw", "-t",
         "--shared=0", *args, str(image)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    wait_for_socket(proc, sock)
    return proc


def _stop(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> None:
    if proc.poll() is None:
        proc.send_signal(sig)
        proc.wait(10)


def _free_port() -> int:
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port: int = probe.getsockname()[1]
    probe.close()
    return port


def _nbd_node(name: str, sock: Path, export: str | None = "exp", **extra: Any
              ) -> dict[str, Any]:
    args: dict[str, Any] = {"driver": "nbd", "node-name": name,
                            "server": {"type": "unix", "path": str(sock)}}
    if export is not None:
        args["export"] = export
    args.update(extra)
    return args


def _serve(qmp: QmpClient, sock: Path) -> None:
    qmp.ok("nbd-server-start", {"addr": {"type": "unix", "data": {"path": str(sock)}}})


def _node_info(qmp: QmpClient, name: str) -> dict[str, Any]:
    for info in qmp.ok("query-named-block-nodes", {"flat": True}):
        if info["node-name"] == name:
            info.pop("active", None)  # QEMU 10's member, which qmpd always reports
            return dict(info)
    raise AssertionError(f"no node {name}")


def _qemu_io_ok(uri: str, *ops: str) -> str:
    args: list[str] = ["-f", "raw"]
    for op in ops:
        args += ["-c", op]
    result = qemu_io(*args, uri, check=True)
    out = result.stdout + result.stderr
    assert "error" not in out.lower() and "failed" not in out.lower(), out
    return out


@pytest.fixture
def client(tmp_path: Path) -> Iterator[QmpdProcess]:
    """The qmpd whose nbd nodes are tested (an NBD server of its own at c/nbd.sock)."""
    directory = tmp_path / "c"
    directory.mkdir()
    daemon = QmpdProcess(directory)
    yield daemon
    daemon.stop()


# --- data through the node, over each kind of server -------------------------------


def _start_server(kind: str, tmp_path: Path, image: Path
                  ) -> tuple[Path, Any]:
    """A server exporting ``image`` writable as ``exp``: its socket and a stopper."""
    directory = tmp_path / "s"
    directory.mkdir()
    sock = directory / "nbd.sock"
    if kind == "qsd":
        qsd = _qsd_server(directory, image)
        return sock, qsd.stop
    if kind == "qemu-nbd":
        proc = _qemu_nbd(sock, image)
        return sock, lambda: _stop(proc)
    daemon = QmpdProcess(directory, "--blockdev", f"file,node-name=f,filename={image}",
                         "--nbd-server", f"addr.type=unix,addr.path={sock}",
                         "--export", "nbd,id=e,node-name=f,name=exp,writable=on")
    wait_for_socket(daemon.proc, sock)
    return sock, daemon.stop


@pytest.mark.parametrize("kind", ["qsd", "qemu-nbd", "qmpd"])
def test_writes_through_the_node_reach_the_server(
        kind: str, tmp_path: Path, client: QmpdProcess) -> None:
    require_tool(QSD)
    image, expected = tmp_path / "disk.raw", tmp_path / "expected.raw"
    _seed(image)
    shutil.copy(image, expected)
    sock, stop = _start_server(kind, tmp_path, image)
    try:
        qmp = QmpClient(client.sock, 30, negotiate=True)
        qmp.ok("blockdev-add", _nbd_node("nb", sock))
        qmp.ok("blockdev-add", {"driver": "raw", "node-name": "fmt", "file": "nb"})
        info = _node_info(qmp, "fmt")
        assert info["file"] == f"nbd+unix:///exp?socket={sock}"
        assert info["image"]["virtual-size"] == SIZE and info["ro"] is False
        own = tmp_path / "c" / "nbd.sock"
        _serve(qmp, own)
        qmp.ok("block-export-add", {"type": "nbd", "id": "e", "node-name": "fmt",
                                    "name": "fmt", "writable": True})
        uri = f"nbd+unix:///fmt?socket={own}"
        _qemu_io_ok(uri, *OPS)
        # Read back through the node: the writes, and the seed around them.
        _qemu_io_ok(uri, "read -P 0x5a 0 1M", "read -P 0x11 1M 512k",
                    "read -P 0x21 1536k 4k", "read -P 0 2M 512k", "read -P 0x42 2560k 64k",
                    "read -P 0x43 2624k 64k", "read -P 0x44 3M 512",
                    "read -P 0x12 3146240 512", "read -P 0 3584k 512k")
        # Block status comes through from the server's base:allocation.
        assert qemu_img("map", "-f", "raw", "--output=json", uri).stdout
        qmp.ok("block-export-del", {"id": "e"})
        qmp.wait_event("BLOCK_EXPORT_DELETED")
        qmp.ok("blockdev-del", {"node-name": "fmt"})
        qmp.ok("blockdev-del", {"node-name": "nb"})
        qmp.close()
    finally:
        client.stop()  # before its server: no flush against a server gone
        stop()
    _qemu_io_ok(str(expected), *OPS)
    qemu_img("compare", "-f", "raw", "-F", "raw", image, expected)


# --- open errors and queries, side by side with qemu-storage-daemon ----------------


def test_open_errors_and_queries_as_qemu(tmp_path: Path, client: QmpdProcess) -> None:
    image = tmp_path / "disk.raw"
    _seed(image)
    server = _qsd_server(tmp_path / "s", image)
    sock = tmp_path / "s" / "nbd.sock"
    port = _free_port()
    tcp = subprocess.Popen(
        [require_tool("qemu-nbd"), "-p", str(port), "-b", "127.0.0.1", "-f", "raw", "-t",
         "--shared=0", str(image)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    refused = socket.socket()
    refused.bind(("127.0.0.1", 0))  # bound, not listening: connections are refused
    closed_port = str(refused.getsockname()[1])
    qsd = Qsd(tmp_path / "q")
    ours = QmpClient(client.sock, 30, negotiate=True)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), 1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "qemu-nbd did not listen"
                time.sleep(0.05)
        inet = {"type": "inet", "host": "127.0.0.1", "port": str(port)}
        cases: list[dict[str, Any]] = [
            _nbd_node("e1", tmp_path / "missing.sock"),
            {"driver": "nbd", "node-name": "e2",
             "server": {"type": "inet", "host": "127.0.0.1", "port": closed_port}},
            {"driver": "nbd", "node-name": "e3",
             "server": {"type": "inet", "host": "localhost", "port": closed_port},
             "export": "x"},
            _nbd_node("e4", sock, "nope"),
            _nbd_node("e5", sock, None),
            _nbd_node("e6", sock, "exp", **{"tls-creds": "nocreds"}),
            _nbd_node("e7", sock, "roexp"),
            _nbd_node("e8", sock, "exp", **{"x-dirty-bitmap": "qemu:dirty-bitmap:nope"}),
            {"driver": "nbd", "node-name": "e9", "server": {"type": "unix"}},
            {"driver": "nbd", "node-name": "e10", "export": "exp"},
            {"driver": "nbd", "node-name": "e11",
             "server": {"type": "unix", "path": str(sock), "data": {}}},
            _nbd_node("e12", sock, "exp", **{"reconnect-delay": -1}),
            _nbd_node("e13", sock, "nope", **{"open-timeout": 1}),
            {"driver": "nbd", "node-name": "e14", "open-timeout": 1,
             "server": {"type": "inet", "host": "127.0.0.1", "port": closed_port}},
            # Successes: the queries must match too.
            _nbd_node("ok1", sock, "exp", **{"reconnect-delay": 3, "open-timeout": 2,
                                             "tls-hostname": "ignored"}),
            _nbd_node("ok2", sock, "roexp", **{"read-only": True}),
            _nbd_node("ok3", sock, "roexp", **{"auto-read-only": True}),
            {"driver": "nbd", "node-name": "ok4", "server": inet},
            {"driver": "nbd", "node-name": "ok5", "server": inet, "export": ""},
            {"driver": "nbd", "node-name": "ok6", "server": {**inet, "ipv4": True},
             "export": ""},
            {"driver": "nbd", "node-name": "ok7", "server": {**inet, "to": port + 5}},
            {"driver": "raw", "node-name": "ok8", "file": "ok1"},
            {"driver": "raw", "node-name": "ok9", "file": "ok7"},
        ]
        for args in cases:
            expected = qsd.qmp.cmd("blockdev-add", args)
            got = ours.cmd("blockdev-add", args)
            assert got == expected, args
            if "return" in got:
                assert _node_info(ours, args["node-name"]) == \
                    _node_info(qsd.qmp, args["node-name"]), args
        # A read-only nbd node cannot be exported writable, in QEMU's words.
        export = {"type": "nbd", "id": "x", "node-name": "ok2", "writable": True}
        _serve(ours, tmp_path / "c" / "nbd.sock")
        qsd.qmp.ok("nbd-server-start",
                   {"addr": {"type": "unix", "data": {"path": str(tmp_path / "q" / "n.sock")}}})
        assert ours.cmd("block-export-add", export) == qsd.qmp.cmd("block-export-add", export)
        for name in ("ok9", "ok8", "ok7", "ok6", "ok5", "ok4", "ok3", "ok2", "ok1"):
            assert ours.cmd("blockdev-del", {"node-name": name}) == \
                qsd.qmp.cmd("blockdev-del", {"node-name": name}) == {"return": {}}
    finally:
        ours.close()
        client.stop()
        qsd.stop()
        refused.close()
        _stop(tcp)
        server.stop()


def test_x_dirty_bitmap_as_qemu(tmp_path: Path, client: QmpdProcess) -> None:
    """Block status through ``x-dirty-bitmap``: what qemu-img map shows of the
    node (exported again) equals what it shows of QSD's node."""
    image = tmp_path / "disk.raw"
    _seed(image)
    server = _qsd_server(tmp_path / "s", image)
    sock = tmp_path / "s" / "nbd.sock"
    server.qmp.ok("block-dirty-bitmap-add", {"node": "f", "name": "b0"})
    _qemu_io_ok(f"nbd+unix:///exp?socket={sock}", "write -P 1 64k 64k", "write -P 2 1M 4k")
    server.qmp.ok("block-dirty-bitmap-disable", {"node": "f", "name": "b0"})
    server.qmp.ok("block-export-add", {"type": "nbd", "id": "eb", "node-name": "f",
                                       "name": "bexp", "bitmaps": ["b0"]})
    qsd = Qsd(tmp_path / "q")
    ours = QmpClient(client.sock, 30, negotiate=True)
    maps = []
    try:
        for qmp, own in ((ours, tmp_path / "c" / "n.sock"), (qsd.qmp, tmp_path / "q" / "n.sock")):
            qmp.ok("blockdev-add", _nbd_node("xb", sock, "bexp", **{
                "read-only": True, "x-dirty-bitmap": "qemu:dirty-bitmap:b0"}))
            _serve(qmp, own)
            qmp.ok("block-export-add", {"type": "nbd", "id": "x", "node-name": "xb"})
            maps.append(qemu_img("map", "-f", "raw", "--output=json",
                                 f"nbd+unix:///xb?socket={own}").stdout)
        assert maps[0] == maps[1]
        assert '"start": 65536, "length": 65536, "depth": 0, "present": false' in maps[0]
    finally:
        ours.close()
        client.stop()
        qsd.stop()
        server.stop()


# --- disconnecting ------------------------------------------------------------------


def _disconnects(log: Path) -> int:
    return log.read_text(errors="replace").count("(disconnect)")


def _wait_for(condition: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_blockdev_del_and_shutdown_send_disconnect(tmp_path: Path) -> None:
    """NBD_CMD_DISC at blockdev-del and at shutdown (seen in QSD's trace)."""
    image = tmp_path / "disk.raw"
    _seed(image)
    server = _qsd_server(tmp_path / "s", image, trace=True)
    sock = tmp_path / "s" / "nbd.sock"
    directory = tmp_path / "c"
    directory.mkdir()
    daemon = QmpdProcess(directory)
    try:
        qmp = QmpClient(daemon.sock, 30, negotiate=True)
        qmp.ok("blockdev-add", _nbd_node("a", sock))
        qmp.ok("blockdev-add", _nbd_node("b", sock))
        qmp.ok("blockdev-add", _nbd_node("c", sock))
        # A format node over an nbd node added by name, as libvirt does.
        qmp.ok("blockdev-add", {"driver": "raw", "node-name": "rc", "file": "c"})
        assert _disconnects(server.log) == 0
        qmp.ok("blockdev-del", {"node-name": "a"})
        _wait_for(lambda: _disconnects(server.log) == 1)
        qmp.close()
        daemon.signal(signal.SIGTERM)
        assert daemon.wait() == 0
        _wait_for(lambda: _disconnects(server.log) == 3)
    finally:
        daemon.stop()
        server.stop()


# --- reconnect-delay ----------------------------------------------------------------


def test_reconnect_delay(tmp_path: Path, client: QmpdProcess) -> None:
    """The server is killed and restarted under two nodes: requests to the one
    with reconnect-delay wait and succeed; with 0 they fail with EIO at once,
    the daemon serves on, and once the server is back the node works again."""
    image = tmp_path / "disk.raw"
    _seed(image)
    sock = tmp_path / "nbd.sock"
    server = _qemu_nbd(sock, image)
    qmp = QmpClient(client.sock, 30, negotiate=True)
    try:
        qmp.ok("blockdev-add", _nbd_node("slow", sock, **{"reconnect-delay": 30}))
        qmp.ok("blockdev-add", _nbd_node("fast", sock))
        own = tmp_path / "c" / "nbd.sock"
        _serve(qmp, own)
        for name in ("slow", "fast"):
            qmp.ok("block-export-add", {"type": "nbd", "id": name, "node-name": name,
                                        "writable": True})
        _stop(server, signal.SIGKILL)
        # delay 0: EIO at once, for reads and writes.
        started = time.monotonic()
        result = qemu_io("-f", "raw", "-c", "read 0 4k", "-c", "write -P 9 0 4k",
                         f"nbd+unix:///fast?socket={own}")
        assert result.stdout.count("Input/output error") == 2, result
        assert time.monotonic() - started < 5
        # reconnect-delay: a write and a read wait for the server.
        waiting = subprocess.Popen(
            [require_tool("qemu-io"), "-f", "raw", "-c", "write -P 0x77 8k 4k",
             "-c", "read -P 0x77 8k 4k", "-c", "read -P 0x11 0 4k",
             f"nbd+unix:///slow?socket={own}"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        time.sleep(1.0)
        assert waiting.poll() is None, waiting.communicate()
        # The loop is free meanwhile: QMP answers at once.
        started = time.monotonic()
        assert qmp.ok("query-status")["status"] == "running"
        assert time.monotonic() - started < 3.0  # not the 30 s of the delay
        server = _qemu_nbd(sock, image)
        out, _ = waiting.communicate(timeout=30)
        assert waiting.returncode == 0 and "error" not in out.lower(), out
        assert out.count("read 4096/4096") == 2, out
        # The node with delay 0 reconnects in the background too.
        deadline = time.monotonic() + 10
        while True:
            result = qemu_io("-f", "raw", "-c", "read -P 0x77 8k 4k",
                             f"nbd+unix:///fast?socket={own}")
            if "error" not in result.stdout.lower():
                break
            assert time.monotonic() < deadline, result
            time.sleep(0.2)
        direct = qemu_io("-f", "raw", "-r", "-U", "-c", "read -P 0x77 8k 4k", image).stdout
        assert "read 4096/4096" in direct and "verification failed" not in direct, direct
    finally:
        qmp.close()
        client.stop()
        _stop(server)


def test_reconnect_delay_expires_with_eio(tmp_path: Path, client: QmpdProcess) -> None:
    image = tmp_path / "disk.raw"
    _seed(image)
    sock = tmp_path / "nbd.sock"
    server = _qemu_nbd(sock, image)
    qmp = QmpClient(client.sock, 30, negotiate=True)
    try:
        qmp.ok("blockdev-add", _nbd_node("n", sock, **{"reconnect-delay": 2}))
        own = tmp_path / "c" / "nbd.sock"
        _serve(qmp, own)
        qmp.ok("block-export-add", {"type": "nbd", "id": "n", "node-name": "n"})
        _stop(server, signal.SIGKILL)
        started = time.monotonic()
        result = qemu_io("-f", "raw", "-r", "-c", "read 0 4k", f"nbd+unix:///n?socket={own}")
        took = time.monotonic() - started
        assert "Input/output error" in result.stdout, result
        assert 1.0 < took < 10, took
        assert qmp.ok("query-status")["status"] == "running"
    finally:
        qmp.close()
        client.stop()
        _stop(server)


# --- in process: requests larger than the server's maximum ------------------------


async def test_large_requests_are_split_at_the_servers_maximum(tmp_path: Path) -> None:
    """qemu-nbd takes at most 32 MiB a request: larger reads, writes and
    zeroing (as jobs issue) are split, sent side by side and reassembled."""
    import os

    from qmpd.block.core import BlockLayer

    size = 80 * MiB
    image = tmp_path / "big.raw"
    content = bytearray(os.urandom(size))
    image.write_bytes(content)
    sock = tmp_path / "nbd.sock"
    server = _qemu_nbd(sock, image)
    layer = BlockLayer()
    try:
        node = await layer.add(_nbd_node("n", sock))
        assert node.size() == size
        assert await node.read(0, size) == content
        data = os.urandom(70 * MiB)
        await node.write(3 * MiB + 512, data, fua=True)
        content[3 * MiB + 512:73 * MiB + 512] = data
        await node.write_zeroes(1 * MiB, 40 * MiB, may_unmap=True)
        content[1 * MiB:41 * MiB] = bytes(40 * MiB)
        await node.flush()
        assert await node.read(512, size - 1024) == content[512:size - 512]
        status = await node.block_status(0, size)
        assert status.length > 0 and status.allocated
        await layer.close_all()
    finally:
        layer.graph.close()
        _stop(server)
    assert image.read_bytes() == content


def test_shutdown_does_not_wait_for_the_reconnect_delay(tmp_path: Path) -> None:
    """SIGTERM while requests wait for a server gone (reconnect-delay 300): the
    daemon fails them and exits cleanly at once."""
    image = tmp_path / "disk.raw"
    _seed(image)
    sock = tmp_path / "nbd.sock"
    server = _qemu_nbd(sock, image)
    directory = tmp_path / "c"
    directory.mkdir()
    daemon = QmpdProcess(directory)
    try:
        qmp = QmpClient(daemon.sock, 30, negotiate=True)
        qmp.ok("blockdev-add", _nbd_node("n", sock, **{"reconnect-delay": 300}))
        qmp.ok("blockdev-add", {"driver": "raw", "node-name": "r", "file": "n"})
        own = directory / "nbd.sock"
        _serve(qmp, own)
        qmp.ok("block-export-add", {"type": "nbd", "id": "r", "node-name": "r",
                                    "writable": True})
        _stop(server, signal.SIGKILL)
        waiting = subprocess.Popen(
            [require_tool("qemu-io"), "-f", "raw", "-c", "read 0 4k",
             f"nbd+unix:///r?socket={own}"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        time.sleep(0.5)
        assert waiting.poll() is None
        qmp.close()
        started = time.monotonic()
        daemon.signal(signal.SIGTERM)
        assert daemon.wait(20) == 0
        assert time.monotonic() - started < 10
        out, _ = waiting.communicate(timeout=10)
        assert "read 4096/4096" not in out, out
    finally:
        daemon.stop()
        _stop(server)
