"""The ``nfs`` driver against a real NFS server (nfs-ganesha, started by the
session fixture ``nfs_server``): interop with QEMU 7.2's own ``nfs`` driver,
the handover of a qcow2 that the source grew during migration, and faults.
"""

from __future__ import annotations

import json
import socket
import subprocess
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
from tests.support.tools import qemu_img, run_tool

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
