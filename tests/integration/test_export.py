"""NBD exports through QMP on a real daemon: QEMU 7.2's texts and event order.

Every error text and event order asserted here was first observed on
qemu-storage-daemon 7.2 with the same commands.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from qmpd.nbd import protocol as p
from qmpd.nbd.client import Address, NbdClient, NbdError
from tests.conftest import QmpdProcess, require_tool


def error(reply: dict[str, Any]) -> str:
    assert "error" in reply, reply
    return str(reply["error"]["desc"])


def raw_image(path: Path, size: int = 1 << 20, fill: bytes | None = None) -> Path:
    with open(path, "wb") as f:
        if fill is not None:
            f.write(fill)
        f.truncate(size)
    return path


def uri(sock: str | Path, name: str) -> str:
    return f"nbd+unix:///{name}?socket={sock}"


class Session:
    """A daemon, one negotiated QMP client, and the NBD socket path."""

    def __init__(self, proc: QmpdProcess, tmp: Path) -> None:
        self.proc = proc
        self.tmp = tmp
        self.qmp = proc.client()
        self.qmp.negotiate()
        self.nbd_sock = str(tmp / "nbd.sock")
        self.events: list[dict[str, Any]] = []

    def cmd(self, execute: str, arguments: dict[str, Any] | None = None) -> dict[str, Any]:
        """A command's reply; events that came before it are kept in ``events``."""
        seen = len(self.qmp.events)
        reply = self.qmp.cmd(execute, arguments)
        self.events += self.qmp.events[seen:]
        return reply

    def transcript(self, execute: str, arguments: dict[str, Any] | None = None,
                   settle: float = 0.3) -> list[str]:
        """Event names and 'return'/'error' in arrival order, for one command."""
        self.events.clear()
        req: dict[str, Any] = {"execute": execute}
        if arguments is not None:
            req["arguments"] = arguments
        self.qmp.send_msg(req)
        order: list[str] = []
        deadline = time.monotonic() + settle
        answered = False
        while not answered or time.monotonic() < deadline:
            wait = max(deadline - time.monotonic(), 0.01) if answered else 5.0
            try:
                msg = self.qmp.recv(wait)
            except (TimeoutError, EOFError):
                break
            if "event" in msg:
                order.append(f"{msg['event']}:{msg.get('data', {}).get('id', '')}")
            else:
                order.append("return" if "return" in msg else f"error:{msg['error']['desc']}")
                answered = True
        return order

    def start_server(self, **extra: Any) -> None:
        args = {"addr": {"type": "unix", "data": {"path": self.nbd_sock}}, **extra}
        assert self.cmd("nbd-server-start", args) == {"return": {}}

    def add_raw(self, name: str, image: Path, **opts: Any) -> None:
        reply = self.cmd("blockdev-add", {
            "driver": "raw", "node-name": name,
            "file": {"driver": "file", "filename": str(image)}, **opts,
        })
        assert reply == {"return": {}}, reply

    def export(self, **args: Any) -> dict[str, Any]:
        return self.cmd("block-export-add", {"type": "nbd", **args})


@pytest.fixture
def session(qmpd_factory: Any, tmp_path: Path) -> Session:
    return Session(qmpd_factory(), tmp_path)


def run(coro: Any) -> Any:
    return asyncio.run(coro)


# --- nbd-server-start / -stop -------------------------------------------------------------


def test_server_start_stop_errors(session: Session, tmp_path: Path) -> None:
    s = session
    assert error(s.cmd("nbd-server-stop")) == "NBD server not running"
    start = lambda **a: s.cmd("nbd-server-start", a)  # noqa: E731
    assert error(start()) == "Parameter 'addr' is missing"
    assert error(start(addr={})) == "Parameter 'addr.type' is missing"
    assert error(start(addr={"type": "bogus"})) == "Parameter 'type' does not accept value 'bogus'"
    assert error(start(addr={"type": "unix"})) == "Parameter 'addr.data' is missing"
    assert error(start(addr={"type": "unix", "data": {}})) == "Parameter 'addr.data.path' is missing"
    assert error(start(addr={"type": "unix", "data": {"path": "x", "foo": 1}})) == (
        "Parameter 'addr.data.foo' is unexpected")
    assert error(start(addr={"type": "inet", "data": {"host": "127.0.0.1"}})) == (
        "Parameter 'addr.data.port' is missing")
    assert error(start(addr={"type": "inet", "data": {"host": "h", "port": 1}})) == (
        "Invalid parameter type for 'addr.data.port', expected: string")
    good = {"type": "unix", "data": {"path": s.nbd_sock}}
    assert error(start(addr=good, **{"max-connections": -1})) == (
        "Parameter 'max-connections' expects uint32_t")
    assert error(start(addr=good, **{"max-connections": "x"})) == (
        "Parameter 'max-connections' expects uint64")
    bad = f"{tmp_path}/nosuchdir/nbd.sock"
    assert error(start(addr={"type": "unix", "data": {"path": bad}})) == (
        f"Failed to bind socket to {bad}: No such file or directory")
    long_path = "/tmp/" + "a" * 120
    assert error(start(addr={"type": "unix", "data": {"path": long_path}})) == (
        f"UNIX socket path '{long_path}' is too long")
    assert error(start(addr={"type": "fd", "data": {"str": "x"}})) == (
        "only QEMU supports file descriptor passing")
    assert error(start(addr={"type": "inet", "data": {"host": "127.0.0.1", "port": "abc"}})) == (
        "address resolution failed for 127.0.0.1:abc: Servname not supported for ai_socktype")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = str(busy.getsockname()[1])
        assert error(start(addr={"type": "inet", "data": {"host": "127.0.0.1", "port": port}})) == (
            "Failed to find an available port: Address already in use")
    assert error(start(addr=good, **{"tls-creds": "x"})) == "No TLS credentials with id 'x'"
    assert not os.path.exists(s.nbd_sock)
    assert start(addr=good) == {"return": {}}
    assert error(start(addr=good)) == "NBD server already running"
    assert s.cmd("nbd-server-stop") == {"return": {}}
    assert not os.path.exists(s.nbd_sock)
    # qmpd extension: the flat address form of QEMU 8 and of --nbd-server.
    assert error(start(addr={"type": "unix", "data": {"path": s.nbd_sock}, "path": "x"})) == (
        "Parameter 'addr.path' is unexpected")
    assert error(start(addr={"type": "unix", "path": 5})) == (
        "Invalid parameter type for 'addr.path', expected: string")
    assert start(addr={"type": "unix", "path": s.nbd_sock}) == {"return": {}}
    assert os.path.exists(s.nbd_sock)


def test_tcp_server(session: Session) -> None:
    s = session
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    addr = {"type": "inet", "data": {"host": "127.0.0.1", "port": str(port)}}
    assert s.cmd("nbd-server-start", {"addr": addr}) == {"return": {}}
    s.add_raw("disk", raw_image(s.tmp / "d.raw", fill=b"tcp!"))
    assert s.export(id="e0", **{"node-name": "disk"}) == {"return": {}}

    async def check() -> None:
        async with await NbdClient.connect(f"nbd://127.0.0.1:{port}/disk") as c:
            assert await c.read(0, 4) == b"tcp!"

    run(check())


# --- block-export-add ----------------------------------------------------------------------


def test_export_add_errors_and_order(session: Session) -> None:
    s = session
    image = raw_image(s.tmp / "d.raw")
    s.add_raw("disk", image)
    s.add_raw("ro", raw_image(s.tmp / "ro.raw"), **{"read-only": True})
    # Before the server runs: QEMU's check order (id, node, writable, server).
    assert error(s.export(id="#bad", **{"node-name": "nosuch"})) == "Invalid block export id"
    assert error(s.export(id="e0", **{"node-name": "nosuch"})) == (
        "Cannot find device='' nor node-name='nosuch'")
    assert error(s.export(id="e0", **{"node-name": "ro"}, writable=True)) == (
        "Cannot export read-only node as writable")
    assert error(s.export(id="e0", **{"node-name": "disk"})) == "NBD server not running"
    assert error(s.cmd("nbd-server-add", {"device": "nosuch"})) == (
        "Cannot find device='nosuch' nor node-name='nosuch'")
    assert error(s.cmd("nbd-server-add", {"device": "disk"})) == "NBD server not running"
    s.start_server()
    assert error(s.cmd("block-export-add", {"id": "e2"})) == "Parameter 'type' is missing"
    assert error(s.export(**{"node-name": "disk"})) == "Parameter 'id' is missing"
    assert error(s.export(id="e2")) == "Parameter 'node-name' is missing"
    assert error(s.cmd("block-export-add", {"type": "bogus", "id": "e", "node-name": "disk"})) == (
        "Parameter 'type' does not accept value 'bogus'")
    assert error(s.export(id="e", **{"node-name": "disk"}, writable="yes")) == (
        "Invalid parameter type for 'writable', expected: boolean")
    assert error(s.export(id="e", **{"node-name": "disk"}, bitmap="b")) == (
        "Parameter 'bitmap' is unexpected")
    assert error(s.export(id="e", **{"node-name": "disk"}, bitmaps=[5])) == (
        "Invalid parameter type for 'null', expected: BlockDirtyBitmapOrStr")
    assert error(s.export(id="", **{"node-name": "disk"})) == "Invalid block export id"
    assert error(s.export(id="e0", **{"node-name": "disk"}, iothread="x")) == (
        'iothread "x" not found')
    assert error(s.export(id="e0", **{"node-name": "disk"}, name="x" * 4097)) == (
        f"export name '{'x' * 4097}' too long")
    assert error(s.export(id="e0", **{"node-name": "disk"}, description="d" * 4097)) == (
        f"description '{'d' * 4097}' too long")
    assert error(s.export(id="e0", **{"node-name": "disk"}, bitmaps=["bm"])) == (
        "Bitmap 'bm' is not found")
    assert error(s.export(id="e0", **{"node-name": "disk"}, bitmaps=[{"node": "nosuch", "name": "b"}])) == (
        "Node 'nosuch' not found")
    assert error(s.export(id="e0", **{"node-name": "disk"}, bitmaps=[{"node": "disk", "name": "b"}])) == (
        "Dirty bitmap 'b' not found")
    assert s.export(id="e0", **{"node-name": "disk"}) == {"return": {}}
    assert error(s.export(id="e0", **{"node-name": "ro"})) == "Block export id 'e0' is already in use"
    assert error(s.export(id="e1", **{"node-name": "ro"}, name="disk")) == (
        "NBD server already has export named 'disk'")
    # Several exports of one node are fine; a long id is fine (no length limit).
    assert s.export(id="a" * 200, **{"node-name": "disk"}, name="", writethrough=True,
                    **{"allocation-depth": True}) == {"return": {}}
    assert error(s.export(id="e3", **{"node-name": "disk"}, name="")) == (
        "NBD server already has export named ''")
    assert s.export(id="r0", **{"node-name": "ro"}, name="roexp", description="read-only view",
                    writable=False) == {"return": {}}
    assert s.cmd("query-block-exports") == {"return": [
        {"id": "r0", "type": "nbd", "node-name": "ro", "shutting-down": False},
        {"id": "a" * 200, "type": "nbd", "node-name": "disk", "shutting-down": False},
        {"id": "e0", "type": "nbd", "node-name": "disk", "shutting-down": False},
    ]}
    assert error(s.cmd("blockdev-del", {"node-name": "disk"})) == "Node disk is in use"
    # What clients see.
    listing = run(NbdClient.list_exports(Address(path=s.nbd_sock)))
    assert listing == [("disk", ""), ("", ""), ("roexp", "read-only view")]
    info = run(NbdClient.export_info(Address(path=s.nbd_sock), "roexp"))
    assert info.read_only and info.description == "read-only view"
    assert info.block_size == (1, 4096, 32 << 20)
    assert info.flags == (p.TFlag.HAS_FLAGS | p.TFlag.READ_ONLY | p.TFlag.SEND_FLUSH | p.TFlag.SEND_FUA
                          | p.TFlag.SEND_DF | p.TFlag.CAN_MULTI_CONN | p.TFlag.SEND_CACHE)
    # Deletion: events before the return for idle exports; nbd-server-stop
    # deletes the rest, oldest first.
    assert s.transcript("block-export-del", {"id": "e0"}) == ["BLOCK_EXPORT_DELETED:e0", "return"]
    assert error(s.cmd("block-export-del", {"id": "e0"})) == "Export 'e0' is not found"
    assert error(s.cmd("block-export-del", {"id": "x", "mode": "bogus"})) == (
        "Parameter 'mode' does not accept value 'bogus'")
    assert s.transcript("nbd-server-stop") == [
        f"BLOCK_EXPORT_DELETED:{'a' * 200}", "BLOCK_EXPORT_DELETED:r0", "return"]
    assert s.cmd("query-block-exports") == {"return": []}
    assert s.cmd("blockdev-del", {"node-name": "disk"}) == {"return": {}}


def test_legacy_nbd_server_add_remove(session: Session) -> None:
    s = session
    s.add_raw("ro", raw_image(s.tmp / "ro.raw"), **{"read-only": True})
    s.start_server()
    assert error(s.cmd("nbd-server-add", {})) == "Parameter 'device' is missing"
    # nbd-server-add quietly exports a read-only node read-only.
    assert s.cmd("nbd-server-add", {"device": "ro", "writable": True}) == {"return": {}}
    assert error(s.cmd("nbd-server-add", {"device": "ro"})) == "Block export id 'ro' is already in use"
    assert error(s.export(id="x", **{"node-name": "ro"}, name="ro")) == (
        "NBD server already has export named 'ro'")
    assert error(s.cmd("nbd-server-add", {"device": "ro", "name": "#x"})) == "Invalid block export id"
    assert error(s.cmd("nbd-server-add", {"device": "ro", "name": "r2", "bitmap": "bm"})) == (
        "Bitmap 'bm' is not found")
    assert s.cmd("nbd-server-add", {"device": "ro", "name": "r3", "description": "d"}) == {"return": {}}
    assert [e["id"] for e in s.cmd("query-block-exports")["return"]] == ["r3", "ro"]
    info = run(NbdClient.export_info(Address(path=s.nbd_sock), "ro"))
    assert info.read_only
    assert error(s.cmd("nbd-server-remove", {"name": "nosuch"})) == "Export 'nosuch' is not found"
    assert error(s.cmd("nbd-server-remove", {"name": "ro", "mode": "bogus"})) == (
        "Parameter 'mode' does not accept value 'bogus'")
    assert s.transcript("nbd-server-remove", {"name": "ro"}) == ["BLOCK_EXPORT_DELETED:ro", "return"]
    assert s.transcript("nbd-server-remove", {"name": "r3", "mode": "hard"}) == [
        "BLOCK_EXPORT_DELETED:r3", "return"]


def test_delete_with_connected_client(session: Session) -> None:
    s = session
    image = raw_image(s.tmp / "d.raw")
    s.add_raw("disk", image)
    s.start_server()
    assert s.export(id="w0", **{"node-name": "disk"}, writable=True, name="wexp") == {"return": {}}

    async def scenario() -> None:
        client = await NbdClient.connect(uri(s.nbd_sock, "wexp"))
        await client.write(0, b"\x5a" * 4096)
        assert error(s.cmd("block-export-del", {"id": "w0"})) == "export 'w0' still in use"
        assert error(s.cmd("nbd-server-remove", {"name": "w0"})) == "export 'w0' still in use"
        assert s.cmd("query-block-exports")["return"][0]["shutting-down"] is False
        # In flight when the hard delete comes: answered before the drop.
        pending = [asyncio.ensure_future(client.write(4096 * i, b"\x11" * 4096)) for i in range(1, 9)]
        await asyncio.sleep(0.05)
        order = s.transcript("block-export-del", {"id": "w0", "mode": "hard"}, settle=1.0)
        assert order == ["return", "BLOCK_EXPORT_DELETED:w0"]
        done = await asyncio.gather(*pending, return_exceptions=True)
        assert all(r is None for r in done), done
        with pytest.raises((ConnectionError, NbdError)):
            await client.read(0, 512)
        client.close()

    run(scenario())
    assert image.read_bytes()[: 4096 * 9] == b"\x5a" * 4096 + b"\x11" * 4096 * 8
    assert error(s.cmd("block-export-del", {"id": "w0"})) == "Export 'w0' is not found"
    assert s.cmd("blockdev-del", {"node-name": "disk"}) == {"return": {}}


def test_nbd_server_stop_with_client_waits_for_it(session: Session) -> None:
    s = session
    s.add_raw("disk", raw_image(s.tmp / "d.raw"))
    s.start_server()
    s.export(id="e0", **{"node-name": "disk"})

    async def scenario() -> None:
        client = await NbdClient.connect(uri(s.nbd_sock, "disk"))
        # QEMU: the events of exports with clients still come before the return.
        assert s.transcript("nbd-server-stop") == ["BLOCK_EXPORT_DELETED:e0", "return"]
        with pytest.raises((ConnectionError, NbdError)):
            await client.read(0, 512)
        client.close()

    run(scenario())


def test_quit_deletes_idle_exports_before_replying(session: Session) -> None:
    s = session
    s.add_raw("disk", raw_image(s.tmp / "d.raw"))
    s.start_server()
    s.export(id="e1", **{"node-name": "disk"}, name="one")
    s.export(id="e0", **{"node-name": "disk"})
    assert s.transcript("quit") == [
        "SHUTDOWN:", "BLOCK_EXPORT_DELETED:e1", "BLOCK_EXPORT_DELETED:e0", "return"]
    assert s.proc.wait() == 0


# --- the node: permissions and locks ---------------------------------------------------------


def holds_lock_byte(path: Path, byte: int) -> bool:
    """Whether some process holds a shared lock on ``byte`` of the image (QEMU's scheme)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        request = struct.pack("hhqqi4x", fcntl.F_WRLCK, os.SEEK_SET, byte, 1, 0)
        result = fcntl.fcntl(fd, 36, request)  # F_OFD_GETLK
        return struct.unpack("hhqqi4x", result)[0] != fcntl.F_UNLCK
    finally:
        os.close(fd)


def test_writable_export_takes_write_lock(session: Session) -> None:
    s = session
    image = raw_image(s.tmp / "d.raw")
    s.add_raw("disk", image)
    s.start_server()
    assert not holds_lock_byte(image, 101)  # a raw node alone takes nothing
    s.export(id="r", **{"node-name": "disk"})
    assert holds_lock_byte(image, 100) and not holds_lock_byte(image, 101)
    assert holds_lock_byte(image, 203)  # resize is not shared
    s.export(id="w", **{"node-name": "disk"}, writable=True, name="w")
    assert holds_lock_byte(image, 101)
    resize = subprocess.run([require_tool("qemu-img"), "resize", "-f", "raw", str(image), "2M"],
                            capture_output=True, text=True)
    assert resize.returncode == 1 and 'Failed to get "resize" lock' in resize.stderr
    s.cmd("block-export-del", {"id": "w"})
    assert not holds_lock_byte(image, 101)
    s.cmd("block-export-del", {"id": "r"})
    assert not holds_lock_byte(image, 100)


def test_permission_conflict_with_qcow2_parent(session: Session) -> None:
    s = session
    image = s.tmp / "d.qcow2"
    subprocess.run([require_tool("qemu-img"), "create", "-q", "-f", "qcow2", str(image), "1M"], check=True)
    s.cmd("blockdev-add", {"driver": "file", "node-name": "f", "filename": str(image)})
    reply = s.cmd("blockdev-add", {"driver": "qcow2", "node-name": "q", "file": "f"})
    if "error" in reply:
        pytest.skip(f"qcow2 driver not usable: {reply['error']['desc']}")
    s.start_server()
    assert error(s.export(id="ef", **{"node-name": "f"}, writable=True)) == (
        "Permission conflict on node 'f': permissions 'write' are both required by an unnamed "
        "block device (uses node 'f' as 'root' child) and unshared by node 'q' (uses node 'f' "
        "as 'file' child).")
    assert error(s.export(id="ef", **{"node-name": "f"})) == (
        "Permission conflict on node 'f': permissions 'resize' are both required by node 'q' "
        "(uses node 'f' as 'file' child) and unshared by an unnamed block device (uses node "
        "'f' as 'root' child).")
    assert s.cmd("query-block-exports") == {"return": []}


# --- command line -------------------------------------------------------------------------------


def test_command_line(qmpd_factory: Any, tmp_path: Path) -> None:
    image = raw_image(tmp_path / "d.raw", fill=b"cli")
    sock = tmp_path / "n.sock"
    proc = qmpd_factory(
        "--blockdev", f"driver=file,node-name=f,filename={image}",
        "--nbd-server", f"addr.type=unix,addr.path={sock},max-connections=4",
        "--export", "nbd,id=e0,node-name=f,writable=on,description=from the command line",
        "--export", json.dumps({"type": "nbd", "id": "e1", "node-name": "f", "name": "json"}),
        "--log-level", "info",
    )
    assert f"NBD on unix:{sock}" in proc.banner
    c = proc.client()
    c.negotiate()
    assert [e["id"] for e in c.cmd("query-block-exports")["return"]] == ["e1", "e0"]
    listing = run(NbdClient.list_exports(Address(path=str(sock))))
    assert listing == [("f", "from the command line"), ("json", "")]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--export", "type=nbd,id=e,node-name=f"], "--export type=nbd,id=e,node-name=f: NBD server not running"),
        (["--nbd-server", "addr.type=unix,addr.path=S,max-connections=x"],
         "--nbd-server addr.type=unix,addr.path=S,max-connections=x: Parameter 'max-connections' expects integer"),
        (["--nbd-server", "addr.type=unix,addr.path=S", "--export", "nbd,id=e,node-name=nosuch"],
         "--export nbd,id=e,node-name=nosuch: Cannot find device='' nor node-name='nosuch'"),
        (["--nbd-server", "addr.type=unix,addr.path=S", "--export", "nbd,id=e,node-name=f,foo=1"],
         "--export nbd,id=e,node-name=f,foo=1: Parameter 'foo' is unexpected"),
        (["--nbd-server", "addr.type=unix,addr.path=S", "--nbd-server", "addr.type=unix,addr.path=T"],
         "--nbd-server addr.type=unix,addr.path=T: NBD server already running"),
    ],
)
def test_command_line_errors(tmp_path: Path, args: list[str], message: str) -> None:
    image = raw_image(tmp_path / "d.raw")
    result = subprocess.run(
        [sys.executable, "-m", "qmpd", "--qmp", f"unix:{tmp_path}/q.sock",
         "--blockdev", f"driver=file,node-name=f,filename={image}", *args],
        capture_output=True, text=True, timeout=30, cwd=tmp_path,
    )
    assert result.returncode == 1
    assert f"qmpd: {message}" in result.stderr


# --- inactive nodes (migration destination) ---------------------------------------------------


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_inactive_node_needs_allow_inactive(qmpd_factory: Any, tmp_path: Path, fmt: str) -> None:
    qemu_img = require_tool("qemu-img")
    qemu_io = require_tool("qemu-io")
    image = tmp_path / f"d.{fmt}"
    subprocess.run([qemu_img, "create", "-q", "-f", fmt, str(image), "1M"], check=True)
    subprocess.run([qemu_io, "-f", fmt, "-c", "write -P 0x11 0 64k", str(image)],
                   check=True, capture_output=True)
    proc = qmpd_factory("--incoming", "defer")
    s = Session(proc, tmp_path)
    reply = s.cmd("blockdev-add", {"driver": fmt, "node-name": "disk",
                                   "file": {"driver": "file", "filename": str(image)}})
    if "error" in reply:
        pytest.skip(f"{fmt} driver not usable: {reply['error']['desc']}")
    assert s.cmd("query-named-block-nodes")["return"][0]["active"] is False
    s.start_server()
    # Without allow-inactive the export activates the node (QEMU 7.2/10.0), which
    # image locking refuses while another process holds a qcow2 image (a raw
    # node shares writes, as in QEMU).
    if fmt == "qcow2":
        holder = subprocess.Popen([qemu_io, "-f", fmt, str(image)], stdin=subprocess.PIPE,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 10
            while not holds_lock_byte(image, 101):  # qemu-io has opened the image
                assert holder.poll() is None and time.monotonic() < deadline
                time.sleep(0.01)
            assert error(s.export(id="e0", **{"node-name": "disk"})) == (
                'Failed to get "write" lock')
        finally:
            assert holder.stdin is not None
            holder.stdin.close()
            holder.wait(10)
    else:
        assert s.export(id="e9", **{"node-name": "disk"}) == {"return": {}}
        assert s.cmd("query-named-block-nodes")["return"][0]["active"] is True
        assert s.cmd("block-export-del", {"id": "e9"}) == {"return": {}}
        assert s.cmd("blockdev-set-active", {"active": False}) == {"return": {}}
    assert s.cmd("query-named-block-nodes")["return"][0]["active"] is False
    assert s.export(id="e0", **{"node-name": "disk"}, writable=True, **{"allow-inactive": True}) == {
        "return": {}}
    # Inactive: nobody holds the write lock; another process still owns the image.
    subprocess.run([qemu_io, "-f", fmt, "-c", "write -P 0x22 64k 64k", str(image)],
                   check=True, capture_output=True)

    async def while_inactive() -> None:
        async with await NbdClient.connect(uri(s.nbd_sock, "disk")) as c:
            assert await c.read(0, 65536) == b"\x11" * 65536
            for op in (c.write(0, b"x" * 512), c.flush(), c.block_status(0, 4096),
                       c.trim(0, 4096), c.write_zeroes(0, 4096)):
                with pytest.raises(NbdError) as exc:
                    await op
                assert (exc.value.errno, exc.value.message) == (p.Errno.EPERM, "export is inactive")

    run(while_inactive())
    assert s.cmd("blockdev-set-active", {"active": True}) == {"return": {}}

    async def after_activation() -> None:
        async with await NbdClient.connect(uri(s.nbd_sock, "disk")) as c:
            # Current data: what the other process wrote while we were inactive.
            assert await c.read(65536, 65536) == b"\x22" * 65536
            await c.write(0, b"\x33" * 512, fua=True)
            assert await c.read(0, 512) == b"\x33" * 512

    run(after_activation())
    assert holds_lock_byte(image, 101)


# --- metrics ------------------------------------------------------------------------------------


def test_metrics(qmpd_factory: Any, tmp_path: Path) -> None:
    import urllib.request

    image = raw_image(tmp_path / "d.raw")
    sock = tmp_path / "n.sock"
    proc = qmpd_factory(
        "--http", "127.0.0.1:0",
        "--blockdev", f"driver=file,node-name=f,filename={image}",
        "--nbd-server", f"addr.type=unix,addr.path={sock}",
        "--export", "nbd,id=e0,node-name=f,writable=on",
        "--log-level", "info",
    )

    async def io() -> None:
        async with await NbdClient.connect(uri(sock, "f")) as c:
            await c.write(0, b"m" * 8192)
            await c.read(0, 4096)
            await c.flush()
            with pytest.raises(NbdError):
                await c.read(1 << 20, 512)

    run(io())
    text = urllib.request.urlopen(proc.http_url() + "/metrics", timeout=10).read().decode()
    for line in [
        'qmpd_nbd_export_requests_total{command="write",export="e0"} 1.0',
        'qmpd_nbd_export_bytes_total{command="write",export="e0"} 8192.0',
        'qmpd_nbd_export_bytes_total{command="read",export="e0"} 4096.0',
        'qmpd_nbd_export_requests_total{command="flush",export="e0"} 1.0',
        'qmpd_nbd_export_errors_total{command="read",export="e0"} 1.0',
        'qmpd_nbd_export_connections_total{export="e0"} 1.0',
        'qmpd_nbd_export_clients{export="e0"} 0.0',
        "qmpd_nbd_server_running 1.0",
    ]:
        assert line in text, line


# --- shutdown -----------------------------------------------------------------------------------


def test_shutdown_drains_exports(qmpd_factory: Any, tmp_path: Path) -> None:
    import signal

    image = raw_image(tmp_path / "d.raw", size=8 << 20)
    sock = tmp_path / "n.sock"
    proc = qmpd_factory(
        "--blockdev", f"driver=file,node-name=f,filename={image}",
        "--nbd-server", f"addr.type=unix,addr.path={sock}",
        "--export", "nbd,id=e0,node-name=f,writable=on",
    )
    qmp = proc.client()
    qmp.negotiate()

    async def scenario() -> list[Any]:
        c = await NbdClient.connect(uri(sock, "f"))
        await c.write(0, bytes([1]) * 65536)
        writes = [asyncio.ensure_future(c.write(i * 65536, bytes([i + 1]) * 65536)) for i in range(64)]
        await asyncio.sleep(0.02)
        proc.signal(signal.SIGTERM)
        results = await asyncio.gather(*writes, return_exceptions=True)
        c.close()
        return results

    results = run(scenario())
    assert proc.wait() == 0
    events = []
    while True:
        try:
            msg = qmp.recv()
        except EOFError:
            break
        events.append(msg.get("event"))
    assert "BLOCK_EXPORT_DELETED" in events
    data = image.read_bytes()
    acknowledged = [i for i, r in enumerate(results) if r is None]
    assert acknowledged, results
    for i in acknowledged:  # every acknowledged write is in the file
        assert data[i * 65536 : (i + 1) * 65536] == bytes([i + 1]) * 65536


# --- clients, good and bad ------------------------------------------------------------------------


def test_disjoint_writers_and_max_connections(qmpd_factory: Any, tmp_path: Path) -> None:
    image = raw_image(tmp_path / "d.raw", size=4 << 20)
    sock = tmp_path / "n.sock"
    qmpd_factory(
        "--blockdev", f"driver=file,node-name=f,filename={image}",
        "--nbd-server", f"addr.type=unix,addr.path={sock}",
        "--export", "nbd,id=e0,node-name=f,writable=on",
    )
    reference = bytearray(4 << 20)

    async def writer(index: int) -> None:
        async with await NbdClient.connect(uri(sock, "f")) as c:
            assert c.flags & p.TFlag.CAN_MULTI_CONN
            base = index << 20
            chunks = []
            for k in range(64):
                data = bytes([(index * 64 + k) % 251 + 1]) * 4096
                reference[base + k * 16384 : base + k * 16384 + 4096] = data
                chunks.append(c.write(base + k * 16384, data))
            await asyncio.gather(*chunks)
            await c.flush()

    async def all_writers() -> None:
        await asyncio.gather(*(writer(i) for i in range(4)))

    run(all_writers())
    assert image.read_bytes() == bytes(reference)


def test_max_connections_one(qmpd_factory: Any, tmp_path: Path) -> None:
    image = raw_image(tmp_path / "d.raw")
    sock = tmp_path / "n.sock"
    qmpd_factory(
        "--blockdev", f"driver=file,node-name=f,filename={image}",
        "--nbd-server", f"addr.type=unix,addr.path={sock},max-connections=1",
        "--export", "nbd,id=e0,node-name=f",
    )

    async def scenario() -> None:
        first = await NbdClient.connect(uri(sock, "f"))
        assert not first.flags & p.TFlag.CAN_MULTI_CONN
        second = asyncio.ensure_future(NbdClient.connect(uri(sock, "f")))
        await asyncio.sleep(0.3)
        assert not second.done()  # left in the listen backlog
        await first.disconnect()
        c2 = await asyncio.wait_for(second, 5)
        await c2.disconnect()

    run(scenario())


def recv_exact(s: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = s.recv(n - len(out))
        if not chunk:
            raise EOFError(f"got {len(out)} of {n} bytes")
        out += chunk
    return out


def raw_connect(sock: Path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(5)
    s.connect(str(sock))
    assert recv_exact(s, 18)[:8] == b"NBDMAGIC"
    return s


def recv_until_eof(s: socket.socket) -> bytes:
    out = b""
    while True:
        chunk = s.recv(65536)
        if not chunk:
            return out
        out += chunk


def test_hostile_clients_do_not_disturb_others(qmpd_factory: Any, tmp_path: Path) -> None:
    image = raw_image(tmp_path / "d.raw", size=4 << 20, fill=b"good")
    sock = tmp_path / "n.sock"
    proc = qmpd_factory(
        "--blockdev", f"driver=file,node-name=f,filename={image}",
        "--nbd-server", f"addr.type=unix,addr.path={sock}",
        "--export", "nbd,id=e0,node-name=f,writable=on",
    )
    qmp = proc.client()
    qmp.negotiate()
    # Unknown client flags: dropped at once.
    s = raw_connect(sock)
    s.sendall(struct.pack(">I", 0xFF))
    assert recv_until_eof(s) == b""
    # Wrong option magic.
    s = raw_connect(sock)
    s.sendall(struct.pack(">IQII", 3, 0xDEADBEEF, 1, 0))
    assert recv_until_eof(s) == b""
    # An option longer than the protocol allows.
    s = raw_connect(sock)
    s.sendall(struct.pack(">IQII", 3, p.IHAVEOPT, p.Opt.GO, 0xFFFFFFFF))
    assert recv_until_eof(s) == b""
    # Transmission: out-of-range offsets get QEMU's error; a request after DISC is ignored.
    s = raw_connect(sock)
    s.sendall(struct.pack(">I", 3) + p.option_request(p.Opt.EXPORT_NAME, b"f"))
    assert len(recv_exact(s, 10)) == 10
    s.sendall(p.request_header(p.Cmd.READ, 1, 4 << 20, 512) + p.request_header(p.Cmd.DISC, 2)
              + p.request_header(p.Cmd.READ, 3, 0, 512))
    reply = recv_until_eof(s)
    assert reply == struct.pack(">IIQ", p.SIMPLE_REPLY_MAGIC, p.Errno.EINVAL, 1)
    # Bad request magic after a good handshake: QEMU's EINVAL reply, then disconnect.
    s = raw_connect(sock)
    s.sendall(struct.pack(">I", 3) + p.option_request(p.Opt.EXPORT_NAME, b"f"))
    recv_exact(s, 10)
    s.sendall(b"\xff" * 28)
    assert recv_until_eof(s) == struct.pack(
        ">IIQ", p.SIMPLE_REPLY_MAGIC, p.Errno.EINVAL, (1 << 64) - 1)
    # A client that never reads its replies: it stalls alone.
    stuck = raw_connect(sock)
    stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stuck.sendall(struct.pack(">I", 3) + p.option_request(p.Opt.EXPORT_NAME, b"f"))
    recv_exact(stuck, 10)
    stuck.setblocking(False)
    flood = b"".join(p.request_header(p.Cmd.READ, i, 0, 1 << 20) for i in range(64))
    sent = 0
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            sent += stuck.send(flood[sent % len(flood):])
        except BlockingIOError:
            break

    async def others() -> None:
        async with await NbdClient.connect(uri(sock, "f")) as c:
            for _ in range(20):
                assert await c.read(0, 4) == b"good"

    start = time.monotonic()
    run(others())
    assert time.monotonic() - start < 5
    t0 = time.monotonic()
    assert qmp.cmd("query-block-exports")["return"][0]["id"] == "e0"
    assert time.monotonic() - t0 < 1
    stuck.close()
    # Still serving after all that.
    run(others())


# --- commands, as a client sees them -----------------------------------------------------------


def test_commands_through_client(qmpd_factory: Any, tmp_path: Path) -> None:
    image = raw_image(tmp_path / "d.raw", size=4 << 20)
    sock = tmp_path / "n.sock"
    qmpd_factory(
        "--blockdev", f"driver=file,node-name=f,filename={image}",
        "--nbd-server", f"addr.type=unix,addr.path={sock}",
        "--export", "nbd,id=e0,node-name=f,writable=on,allocation-depth=on",
    )

    async def scenario() -> None:
        c = await NbdClient.connect(uri(sock, "f"), contexts=[p.BASE_ALLOCATION, p.ALLOCATION_DEPTH])
        assert c.info.contexts == {0: p.BASE_ALLOCATION, 1: p.ALLOCATION_DEPTH}
        await c.write(0, b"\x42" * 65536, fua=True)
        status = await c.block_status(0, 1 << 20)
        assert status[p.BASE_ALLOCATION] == [(65536, 0), ((1 << 20) - 65536, 3)]
        assert status[p.ALLOCATION_DEPTH] == [(1 << 20, 1)]
        assert await c.block_status(0, 512, req_one=True) == {
            p.BASE_ALLOCATION: [(512, 0)], p.ALLOCATION_DEPTH: [(512, 1)]}
        # FAST_ZERO is honoured only where nothing needs doing.
        await c.write_zeroes(1 << 20, 65536, flags=p.CmdFlag.FAST_ZERO)
        with pytest.raises(NbdError) as exc:
            await c.write_zeroes(0, 4096, flags=p.CmdFlag.FAST_ZERO)
        assert (exc.value.errno, exc.value.message) == (p.Errno.ENOTSUP, "writing to file failed")
        await c.write_zeroes(0, 4096, flags=p.CmdFlag.NO_HOLE | p.CmdFlag.FUA)
        await c.trim(8192, 4096, fua=True)
        await c.cache(0, 65536)
        await c.flush()
        data = await c.read(0, 65536, flags=p.CmdFlag.DF)
        assert data[:4096] == bytes(4096) and data[4096:8192] == b"\x42" * 4096
        # Replies overtake each other: a big read and small ones in flight at once.
        big = asyncio.ensure_future(c.read(0, 4 << 20))
        small = [asyncio.ensure_future(c.read(65536 - 512, 512)) for _ in range(8)]
        assert all(r == b"\x42" * 512 for r in await asyncio.gather(*small))
        assert (await big)[4096:65536] == b"\x42" * (65536 - 4096)
        with pytest.raises(NbdError) as exc:
            await c.command(p.Cmd.READ, 0, 512, flags=0x40)
        assert exc.value.message == "unsupported flags for command read (got 0x40)"
        with pytest.raises(NbdError) as exc:
            await c.command(42)
        assert exc.value.message == "invalid request type (42) received"
        await c.disconnect()

    run(scenario())


def test_sparse_read_uses_hole_chunks(qmpd_factory: Any, tmp_path: Path) -> None:
    image = raw_image(tmp_path / "d.raw", size=1 << 20, fill=b"\x01" * 65536)
    sock = tmp_path / "n.sock"
    qmpd_factory(
        "--blockdev", f"driver=file,node-name=f,filename={image}",
        "--nbd-server", f"addr.type=unix,addr.path={sock}",
        "--export", "nbd,id=e0,node-name=f",
    )
    s = raw_connect(sock)
    s.sendall(struct.pack(">I", 3) + p.option_request(p.Opt.STRUCTURED_REPLY)
              + p.option_request(p.Opt.GO, p.info_request_data("f", [])))
    buf = b""
    while not buf.endswith(struct.pack(">QIII", p.OPTION_REPLY_MAGIC, p.Opt.GO, p.Rep.ACK, 0)):
        buf += s.recv(4096)
    s.sendall(p.request_header(p.Cmd.READ, 7, 0, 1 << 20))
    chunks = []
    while True:
        head = recv_exact(s, 20)
        _magic, flags, kind, _cookie, length = struct.unpack(">IHHQI", head)
        body = recv_exact(s, length)
        chunks.append((kind, struct.unpack_from(">Q", body)[0], flags, len(body)))
        if flags & p.ReplyFlag.DONE:
            break
    assert chunks == [(p.ReplyType.OFFSET_DATA, 0, 0, 8 + 65536), (p.ReplyType.OFFSET_HOLE, 65536, 1, 12)]
    s.close()
