"""The ``nfs`` driver against a real NFS server (nfs-ganesha, started by the
session fixture ``nfs_server``): interop with QEMU 7.2's own ``nfs`` driver,
the handover of a qcow2 that the source grew during migration, and faults.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.migration_helpers import (
    Cluster,
    Peer,
    need_qemu,
    short_dir,
    start,
)
from tests.support.nfs import NfsServer
from tests.support.qsd import QsdMonitor
from tests.support.tools import REPO, qemu_img, run_tool

NO_SIZE_REFRESH = (
    "import qmpd.block.nfs as n\n"
    "n.NfsDriver.refresh_size = False\n"
    "from qmpd.__main__ import main\n"
    "main()\n"
)


@pytest.fixture
def work() -> Iterator[Path]:
    with short_dir() as path:
        yield path


@pytest.fixture
def cluster(work: Path) -> Iterator[Cluster]:
    c = Cluster(work)
    try:
        yield c
    finally:
        c.close()


def _name(tag: str) -> str:
    return f"{tag}-{time.monotonic_ns()}"


def _add(peer: Peer, nfs: NfsServer, name: str, fmt: str = "raw", node: str = "disk") -> None:
    peer.ok("blockdev-add", {"driver": fmt, "node-name": node, "file": nfs.blockdev(name)})


def _io_ok(peer: Peer, node: str, command: str) -> None:
    assert peer.qemu_io(node, command) == ""
    time.sleep(0.02)
    out = peer.stdout()
    assert "Pattern verification failed" not in out and "error" not in out.lower(), out


# --- interop -----------------------------------------------------------------------


def test_qemu_reads_what_qmpd_wrote_and_back(nfs_server: NfsServer, cluster: Cluster) -> None:
    name = _name("interop") + ".qcow2"
    qemu_img("create", "-q", "-f", "qcow2", nfs_server.url(name), "64M")
    q = cluster("qmpd", "q")
    _add(q, nfs_server, name, "qcow2")
    _io_ok(q, "disk", "write -P 0x5a 0 3M")
    _io_ok(q, "disk", "write -P 0x33 40M 64k")
    q.ok("blockdev-del", {"node-name": "disk"})
    # QEMU's nfs driver reads it, and finds the image clean.
    out = run_tool("qemu-io", "-f", "qcow2", "-c", "read -P 0x5a 0 3M", "-c",
                   "read -P 0x33 40M 64k", nfs_server.url(name)).stdout
    assert "verification failed" not in out, out
    assert "No errors were found" in qemu_img("check", nfs_server.url(name)).stdout
    # QEMU writes, qmpd reads.
    run_tool("qemu-io", "-f", "qcow2", "-c", "write -P 0x77 10M 1M", nfs_server.url(name))
    _add(q, nfs_server, name, "qcow2")
    _io_ok(q, "disk", "read -P 0x77 10M 1M")
    _io_ok(q, "disk", "read -P 0x5a 0 3M")
    q.ok("blockdev-del", {"node-name": "disk"})
    assert "No errors were found" in qemu_img("check", nfs_server.url(name)).stdout
    # The same bytes as the server's file, read locally.
    local = nfs_server.export / name
    assert local.read_bytes()[:4] == b"QFI\xfb"


def test_raw_on_nfs_resize_and_flush(nfs_server: NfsServer, cluster: Cluster) -> None:
    name = _name("raw") + ".img"
    (nfs_server.export / name).write_bytes(b"\x11" * 1024 * 1024)
    q = cluster("qmpd", "q")
    _add(q, nfs_server, name)
    _io_ok(q, "disk", "read -P 0x11 0 1M")
    _io_ok(q, "disk", "write -P 0x22 4096 8192")
    q.hmp('qemu-io disk "flush"')
    q.ok("block_resize", {"node-name": "disk", "size": 2 * 1024 * 1024})
    assert (nfs_server.export / name).stat().st_size == 2 * 1024 * 1024
    data = (nfs_server.export / name).read_bytes()
    assert data[4096:12288] == b"\x22" * 8192 and data[1 << 20:] == bytes(1 << 20)


def test_query_named_block_nodes_like_qsd(nfs_server: NfsServer, cluster: Cluster) -> None:
    name = _name("info") + ".img"
    (nfs_server.export / name).write_bytes(bytes(1 << 20))
    node = {"node-name": "n0", **nfs_server.blockdev(name)}
    q = cluster("qmpd", "q")
    q.ok("blockdev-add", node)
    ours = q.ok("query-named-block-nodes")[0]
    monitor = QsdMonitor("m")
    qsd = monitor.popen(["qemu-storage-daemon", "--blockdev", json.dumps(node), *monitor.args],
                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        c = monitor.client(qsd, 20, check_schema=False, negotiate=True)
        try:
            theirs = c.ok("query-named-block-nodes")[0]
        finally:
            c.close()
    finally:
        qsd.terminate()
        qsd.wait(10)
    for key in ("drv", "file", "ro", "encrypted", "backing_file_depth"):
        assert ours[key] == theirs[key], (key, ours[key], theirs[key])
    assert ours["image"] == theirs["image"]


def test_without_libnfs_driver_nfs_is_refused(nfs_server: NfsServer, cluster: Cluster) -> None:
    code = ("import ctypes\n"
            "_real = ctypes.CDLL\n"
            "class _NoNfs(_real):\n"
            "    def __init__(self, name, *a, **k):\n"
            "        if name and 'nfs' in str(name):\n"
            "            raise OSError(name + ': cannot open shared object file')\n"
            "        super().__init__(name, *a, **k)\n"
            "ctypes.CDLL = _NoNfs\n"
            "from qmpd.__main__ import main\n"
            "main()\n")
    q = cluster.spawn("qmpd", "q", code=code).ready()
    msg = q.err("blockdev-add", {"node-name": "d", **nfs_server.blockdev("x.img")})
    assert "libnfs13" in msg, msg
    assert q.status() == "running"


# --- handover of a qcow2 the source grew ------------------------------------------------


def _grown_handover(nfs: NfsServer, cluster: Cluster, src_kind: str, dst_kind: str,
                    dst_code: str | None = None) -> tuple[str, str]:
    """Migrate with a qcow2 on nfs that the source grows after the destination
    opened it; returns (what the destination's reads printed, qemu-img check)."""
    need_qemu()
    name = _name(f"{src_kind}-{dst_kind}") + ".qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(nfs.export / name), "64M")
    src = cluster.spawn(src_kind, f"src-{src_kind}")
    dst = cluster.spawn(dst_kind, f"dst-{dst_kind}", incoming="defer", code=dst_code)
    start(src, dst)
    _add(src, nfs, name, "qcow2")
    _add(dst, nfs, name, "qcow2")  # inactive, sized now
    assert src.qemu_io("disk", "write -P 0x5a 0 2M") == ""
    assert src.qemu_io("disk", "write -P 0x6c 20M 64k") == ""
    uri = f"unix:{cluster.dir / ('mig-' + name + '.sock')}"
    dst.ok("migrate-incoming", {"uri": uri})
    src.ok("migrate", {"uri": uri})
    assert src.wait_migration()["status"] == "completed"
    assert dst.wait_migration()["status"] == "completed"
    before = len(dst.stdout())
    errors = dst.qemu_io("disk", "read -P 0x5a 0 2M") + dst.qemu_io("disk", "read -P 0x6c 20M 64k")
    errors += dst.qemu_io("disk", "write -P 0x7d 30M 1M")
    time.sleep(0.05)
    out = errors + dst.stdout()[before:]
    assert dst.quit() == 0
    src.quit()
    check = qemu_img("check", str(nfs.export / name), check=False)
    return out, check.stdout + check.stderr


def _ok(out: str, check: str) -> None:
    assert "Pattern verification failed" not in out and "error" not in out.lower(), out
    assert "No errors were found" in check, check


def _stale(out: str, check: str) -> bool:
    return "Pattern verification failed" in out or "error" in out.lower() \
        or "No errors were found" not in check


@pytest.mark.parametrize("src_kind", ["qmpd", "qemu"])
def test_grown_qcow2_handover_to_qmpd(nfs_server: NfsServer, cluster: Cluster,
                                      src_kind: str) -> None:
    _ok(*_grown_handover(nfs_server, cluster, src_kind, "qmpd"))


@pytest.mark.parametrize("src_kind", ["qmpd", "qemu"])
def test_grown_qcow2_handover_to_qemu_fails(nfs_server: NfsServer, cluster: Cluster,
                                            src_kind: str) -> None:
    """QEMU 7.2's nfs driver keeps the size it read at open: the destination
    reads zeros where the source wrote (the bug qmpd does not have)."""
    out, check = _grown_handover(nfs_server, cluster, src_kind, "qemu")
    assert _stale(out, check), (out, check)


def test_grown_qcow2_without_size_refresh_fails(nfs_server: NfsServer, cluster: Cluster) -> None:
    """The negative control: qmpd with the size refresh disabled fails as QEMU does."""
    out, check = _grown_handover(nfs_server, cluster, "qmpd", "qmpd", dst_code=NO_SIZE_REFRESH)
    assert _stale(out, check), (out, check)


NO_PAGECACHE_DROP = (
    "import qmpd.block.libnfs as l\n"
    "l.NfsFile.invalidate_pagecache = lambda self: None\n"
    "from qmpd.__main__ import main\n"
    "main()\n"
)


def _pagecache_handover(nfs: NfsServer, cluster: Cluster, dst_code: str | None) -> str:
    """raw on nfs with libnfs's page cache on both sides: the destination
    reads before the migration (filling its cache), the source overwrites;
    returns what the destination's read after activation printed."""
    name = _name("pagecache") + ".img"
    (nfs.export / name).write_bytes(b"\x11" * (1 << 20))
    src = cluster.spawn("qmpd", "src")
    dst = cluster.spawn("qmpd", "dst", incoming="defer", code=dst_code)
    start(src, dst)
    for peer in (src, dst):
        peer.ok("blockdev-add", {"driver": "raw", "node-name": "disk",
                                 "file": {**nfs.blockdev(name), "page-cache-size": 256}})
    _io_ok(dst, "disk", "read -P 0x11 0 64k")  # cached now
    _io_ok(src, "disk", "write -P 0x22 0 64k")
    uri = f"unix:{cluster.dir / 'mig-pc.sock'}"
    dst.ok("migrate-incoming", {"uri": uri})
    src.ok("migrate", {"uri": uri})
    assert src.wait_migration()["status"] == "completed"
    assert dst.wait_migration()["status"] == "completed"
    before = len(dst.stdout())
    errors = dst.qemu_io("disk", "read -P 0x22 0 64k")
    time.sleep(0.05)
    return errors + dst.stdout()[before:]


def test_activation_drops_libnfs_page_cache(nfs_server: NfsServer, cluster: Cluster) -> None:
    out = _pagecache_handover(nfs_server, cluster, None)
    assert "Pattern verification failed" not in out and "read 65536/65536" in out, out


def test_without_page_cache_drop_destination_is_stale(nfs_server: NfsServer,
                                                      cluster: Cluster) -> None:
    """The negative control: the cache really keeps the old bytes."""
    out = _pagecache_handover(nfs_server, cluster, NO_PAGECACHE_DROP)
    assert "Pattern verification failed" in out, out


# --- the driver in a process of its own ---------------------------------------------------

#: What a child process runs before a test's body: the driver on a stand-in
#: node (the graph's I/O pool, nothing else), counting libnfs contexts.
_DRIVER = """
import asyncio, gc, os, sys, threading, types, weakref
from qmpd.block import libnfs, nfs as nfsmod
from qmpd.block.iopool import IOPool

HOST, EXPORT = sys.argv[1], sys.argv[2]
counts = {"created": 0, "closed": 0}
_init, _close = libnfs.NfsFile.__init__, libnfs.NfsFile.close

def _counted_init(self):
    _init(self)
    counts["created"] += 1

def _counted_close(self):
    if self.ctx:
        counts["closed"] += 1
    _close(self)

libnfs.NfsFile.__init__ = _counted_init
libnfs.NfsFile.close = _counted_close

class Graph:
    def __init__(self):
        self.io = IOPool(4)

    async def run_io(self, fn, *args):
        return await self.io.run(fn, *args)

def options(name):
    return {"driver": "nfs", "server": {"type": "inet", "host": HOST},
            "path": f"{EXPORT}/{name}"}

async def driver(name):
    d = nfsmod.NfsDriver(types.SimpleNamespace(graph=Graph(), read_only=False, node_name="n"))
    await d.open(options(name))
    return d

def fds():
    return len(os.listdir("/proc/self/fd"))
"""


def _run_driver(nfs: NfsServer, name: str, body: str, timeout: float = 60) -> str:
    """Run ``body`` (an ``async def main()`` using ``_DRIVER``) on a fresh
    file ``name`` in a child process; returns its output, which must end
    with ``DONE`` (a crash or a hang fails the test, not the session)."""
    (nfs.export / name).write_bytes(bytes(1 << 20))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    code = _DRIVER + body + "\nasyncio.run(main())\nprint('DONE', flush=True)\n"
    try:
        proc = subprocess.run([sys.executable, "-c", code, "127.0.0.1", "/export"], env=env,
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"the driver hung: {exc.stdout!r} {exc.stderr!r}") from None
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and proc.stdout.rstrip().endswith("DONE"), \
        f"exit status {proc.returncode}: {out}"
    return out


def test_concurrent_requests_share_one_reconnect(nfs_server: NfsServer) -> None:
    """Requests arriving while the node reconnects wait for that one new
    context and all use it; the old one is closed, no descriptor leaks."""
    name = _name("race") + ".img"
    _run_driver(nfs_server, name, """
async def main():
    d = await driver(NAME)
    await d.read(0, 4096)
    base = fds()
    d._broken = True  # as after a request the server failed
    results = await asyncio.gather(*(d.read(i * 4096, 4096) for i in range(8)),
                                   return_exceptions=True)
    errors = [r for r in results if isinstance(r, BaseException)]
    assert not errors, errors
    assert counts == {"created": 2, "closed": 1}, counts
    assert fds() == base, (fds(), base)
    await d.close()
    assert counts == {"created": 2, "closed": 2}, counts
""".replace("NAME", repr(name)))


def test_cancelled_reconnect_closes_context_after_the_mount(nfs_server: NfsServer) -> None:
    """A request cancelled while its reconnection mounts leaves the context
    to the mounting thread: it is closed once the mount ended (closing it
    meanwhile, from another thread, crashed the daemon)."""
    name = _name("cancel") + ".img"
    _run_driver(nfs_server, name, """
gate, entered = threading.Event(), threading.Event()
mounting, early = set(), []
_mount, _close2 = libnfs.NfsFile.mount, libnfs.NfsFile.close

def gated_mount(self, host, export):
    mounting.add(id(self))
    try:
        entered.set()
        assert gate.wait(30)
        _mount(self, host, export)
    finally:
        mounting.discard(id(self))

def watched_close(self):
    if id(self) in mounting:
        early.append("closed while nfs_mount runs on another thread")
        print(early[-1], flush=True)
        os._exit(3)  # what followed was a crash
    _close2(self)

async def main():
    d = await driver(NAME)
    libnfs.NfsFile.mount, libnfs.NfsFile.close = gated_mount, watched_close
    d._broken = True
    task = asyncio.ensure_future(d.read(0, 4096))
    while not entered.is_set():
        await asyncio.sleep(0.01)
    task.cancel()
    try:
        await task
        raise AssertionError("not cancelled")
    except asyncio.CancelledError:
        pass
    await asyncio.sleep(0.2)
    assert counts == {"created": 2, "closed": 0}, counts  # the thread still mounts
    gate.set()
    for _ in range(1000):
        if counts["closed"] == 1:
            break
        await asyncio.sleep(0.01)
    assert counts == {"created": 2, "closed": 1}, counts
    libnfs.NfsFile.mount = _mount
    assert await d.read(0, 4096) == bytes(4096)  # reconnects anew
    await d.close()
    assert counts == {"created": 3, "closed": 3}, counts
""".replace("NAME", repr(name)))


def test_write_payload_outlives_a_close_in_flight(nfs_server: NfsServer) -> None:
    """A WRITE still in libnfs when the node closes keeps its payload until
    libnfs is done with it: its callback ran or the context was destroyed."""
    name = _name("payload") + ".img"
    _run_driver(nfs_server, name, """
refs, answered, report = [], [0], []
collected = threading.Event()
_copy, _done, _close2 = libnfs._copy, libnfs.AsyncContext._done, libnfs.NfsFile.close

def tracked_copy(data, start, length):
    buf = _copy(data, start, length)
    refs.append(weakref.ref(buf))
    return buf

def counted_done(self, err, ctx, data, private):
    entry = self._pending.get(int(private or 0))
    if entry is not None and entry[1] == "write":
        answered[0] += 1
    return _done(self, err, ctx, data, private)

def checked_close(self):
    assert collected.wait(30)
    # Before nfs_destroy_context: libnfs may still read every payload sent.
    report.append((answered[0], [r() is not None for r in refs]))
    _close2(self)

libnfs._copy = tracked_copy
libnfs.AsyncContext._done = counted_done
libnfs.NfsFile.close = checked_close

async def writer(d, data):
    try:
        await d.write(0, data)
    except Exception:  # the error and its frames go
        return "failed"
    return "written"

async def main():
    d = await driver(NAME)
    for rnd in range(3):
        refs.clear()
        answered[0] = 0
        collected.clear()
        write = asyncio.ensure_future(writer(d, bytes([rnd + 1]) * (1 << 20)))
        await asyncio.sleep(0)  # the WRITE is in libnfs
        assert refs, "no write started"
        closing = asyncio.ensure_future(d.close())
        assert await write == "failed"
        del write
        gc.collect()
        collected.set()
        await closing
        await d.open(options(NAME))
    collected.set()
    await d.close()
    for n, alive in report[:3]:
        assert n == 0, "the write was answered before the close"
        assert all(alive), f"a payload was freed before libnfs was done: {alive}"
""".replace("NAME", repr(name)))


@pytest.mark.parametrize("key, value, warning", [
    ("readahead-size", 2**31 + 1, "Truncating NFS readahead size to 1048576"),
    ("page-cache-size", 2**30, "Truncating NFS pagecache size to 2048 pages"),
    ("page-cache-size", 2**31 + 1, "Truncating NFS pagecache size to 2048 pages"),
    ("debug", 3, "Limiting NFS debug level to 2"),
])
def test_large_libnfs_settings_are_lowered_as_qemu_does(
        nfs_server: NfsServer, cluster: Cluster, key: str, value: int, warning: str) -> None:
    """Past QEMU 7.2's limits, libnfs looped forever (blockdev-add never
    returned) or crashed on the first write: lowered, with QEMU's warning."""
    name = _name("limits") + ".img"
    (nfs_server.export / name).write_bytes(bytes(1 << 20))
    q = cluster("qmpd", "q")
    q.ok("blockdev-add", {"driver": "raw", "node-name": "disk",
                          "file": {**nfs_server.blockdev(name), key: value}}, timeout=30)
    _io_ok(q, "disk", "write -P 0x3c 0 64k")
    _io_ok(q, "disk", "read -P 0x3c 0 64k")
    assert warning in q.stderr(), q.stderr()
    assert (nfs_server.export / name).read_bytes()[:65536] == b"\x3c" * 65536


@pytest.mark.parametrize("key", ["readahead-size", "page-cache-size"])
def test_negative_libnfs_sizes_are_refused(nfs_server: NfsServer, cluster: Cluster,
                                           key: str) -> None:
    """The QAPI members are ``int``: QEMU passes -1 on, and libnfs never
    returns; qmpd refuses it."""
    q = cluster("qmpd", "q")
    msg = q.err("blockdev-add", {"node-name": "d", **nfs_server.blockdev("x.img"), key: -1},
                timeout=30)
    assert msg == f"Parameter '{key}' must not be negative", msg
    assert q.ok("query-named-block-nodes") == []


# --- faults (last: they stop and restart the session's server) --------------------------


def test_unreachable_server_at_blockdev_add(cluster: Cluster, nfs_server: NfsServer) -> None:
    q = cluster("qmpd", "q")
    t0 = time.monotonic()
    msg = q.err("blockdev-add", {"driver": "nfs", "node-name": "d",
                                 "server": {"type": "inet", "host": "192.0.2.1"},
                                 "path": "/export/x.img"}, timeout=60)
    assert time.monotonic() - t0 < 45
    assert "mount" in msg.lower(), msg
    assert q.status() == "running"
    assert q.ok("query-named-block-nodes") == []


def test_server_stopped_mid_io(nfs_server: NfsServer, cluster: Cluster) -> None:
    name = _name("fault") + ".img"
    (nfs_server.export / name).write_bytes(bytes(4 << 20))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        http_port = s.getsockname()[1]
    q = cluster.spawn("qmpd", "q", extra=["--http", f"127.0.0.1:{http_port}"]).ready()
    _add(q, nfs_server, name)
    _io_ok(q, "disk", "write -P 0x42 0 1M")
    nfs_server.stop_ganesha()
    try:
        t0 = time.monotonic()
        reply = q.qmp.cmd("human-monitor-command",
                          {"command-line": 'qemu-io disk "write -P 0x43 0 1M"'}, timeout=90)
        assert time.monotonic() - t0 < 60
        time.sleep(0.05)
        text = json.dumps(reply) + q.stdout()
        assert "error" in text.lower() or "failed" in text.lower(), text
        assert q.status() in ("running", "paused", "io-error")
        body = _ready(http_port)
        assert body["status"] == "not-ready" and any("NFS server" in r for r in body["reasons"]), body
    finally:
        nfs_server.start_ganesha()
    # The daemon is alive, and the node works again once the server is back.
    deadline = time.monotonic() + 60
    while True:
        before = len(q.stdout())
        q.qemu_io("disk", "read -P 0x42 0 1M")
        time.sleep(0.05)
        if "read 1048576/1048576" in q.stdout()[before:]:
            break
        assert time.monotonic() < deadline, q.stdout()
        time.sleep(0.5)
    assert _ready(http_port)["status"] == "ready"


def _ready(port: int) -> dict[str, Any]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=10) as r:
            return dict(json.load(r))
    except urllib.error.HTTPError as exc:
        return dict(json.load(exc))


def _read_ok(q: Peer, what: str) -> None:
    before = len(q.stdout())
    reply = q.qemu_io("disk", "read -P 0x42 0 64k")
    time.sleep(0.05)
    out = reply + q.stdout()[before:]
    assert "read 65536/65536" in out and "error" not in out.lower(), (what, out)


def _read_fails(q: Peer, what: str) -> None:
    before = len(q.stdout())
    reply = q.qemu_io("disk", "read -P 0x42 0 64k")
    time.sleep(0.05)
    out = reply + q.stdout()[before:]
    assert "read 65536/65536" not in out, (what, out)


def _reading_node(nfs_server: NfsServer, cluster: Cluster, stem: str) -> Peer:
    """A qmpd with node ``disk`` on a new 1 MiB file of 0x42, read once."""
    name = _name(stem) + ".img"
    (nfs_server.export / name).write_bytes(b"\x42" * (1 << 20))
    q = cluster("qmpd", "q")
    _add(q, nfs_server, name)
    _read_ok(q, "before")
    return q


def test_node_reconnects_after_a_failed_reconnect(nfs_server: NfsServer,
                                                  cluster: Cluster) -> None:
    """A reconnection that fails (the server still down) leaves the node to
    reconnect on the next request: it works at once when the server is back."""
    q = _reading_node(nfs_server, cluster, "dead")
    nfs_server.stop_ganesha()
    try:
        _read_fails(q, "server down")
        _read_fails(q, "server down, reconnecting")
        _read_fails(q, "server down, reconnecting again")
    finally:
        nfs_server.start_ganesha()
    _read_ok(q, "server back")
    _read_ok(q, "server back, again")


def test_server_restart_while_idle(nfs_server: NfsServer, cluster: Cluster) -> None:
    """The server restarts while the node is idle: the next request works, at
    once (libnfs's own reconnection put a new socket under the watched fd
    number, which the event loop never saw: the request timed out)."""
    q = _reading_node(nfs_server, cluster, "restart")
    nfs_server.stop_ganesha()
    nfs_server.start_ganesha()
    t0 = time.monotonic()
    _read_ok(q, "after the restart")
    assert time.monotonic() - t0 < 5
    _read_ok(q, "again")
