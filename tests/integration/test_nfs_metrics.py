"""The ``nfs`` driver's own figures in /metrics (BlockDriver.driver_metrics),
on a real NFS server (nfs-ganesha): requests and bytes through an NBD export,
activation, and a server that went away."""

from __future__ import annotations

import re
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.migration_helpers import Cluster, Peer, short_dir
from tests.support.nfs import NfsServer

M = 1 << 20


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    with short_dir() as path:
        c = Cluster(path)
        try:
            yield c
        finally:
            c.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def driver_metrics(port: int, node: str) -> dict[str, float]:
    """``qmpd_block_driver_*`` of ``node`` (an nfs node), by name."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    pattern = re.compile(
        r'^qmpd_block_driver_(\w+)\{driver="nfs",node="' + re.escape(node) + r'"\} (\S+)$',
        re.M)
    return {name: float(value) for name, value in pattern.findall(text)}


def nbd_io(sock: Path, *commands: str) -> str:
    """qemu-io over NBD (its WRITEs reach the driver as the NBD server's payloads)."""
    argv = ["qemu-io", "-f", "raw"]
    for command in commands:
        argv += ["-c", command]
    res = subprocess.run([*argv, f"nbd+unix:///d0?socket={sock}"], capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    return res.stdout + res.stderr


@pytest.mark.qemu("qemu-io")
def test_nfs_node_metrics(nfs_server: NfsServer, cluster: Cluster) -> None:
    name = f"metrics-{time.monotonic_ns()}.img"
    (nfs_server.export / name).write_bytes(bytes(4 * M))
    port = free_port()
    q: Peer = cluster.spawn("qmpd", "q", extra=["--http", f"127.0.0.1:{port}"]).ready()
    q.ok("blockdev-add", {**nfs_server.blockdev(name), "node-name": "n"})
    first = driver_metrics(port, "n")
    assert first["server_reachable"] == 1
    assert first["request_errors"] == 0
    assert first["requests_in_flight"] == 0
    assert first["read_bytes"] == first["written_bytes"] == 0
    sock = cluster.dir / "nbd.sock"
    q.ok("nbd-server-start", {"addr": {"type": "unix", "data": {"path": str(sock)}}})
    q.ok("block-export-add", {"type": "nbd", "id": "e0", "node-name": "n", "name": "d0",
                              "writable": True})
    out = nbd_io(sock, "write -P 0x5a 0 1M", "write -P 0x5b 1M 4k", "flush",
                 "read -P 0x5a 0 1M", "read -P 0x5b 1M 4k")
    assert "failed" not in out.lower() and "error" not in out.lower(), out
    assert (nfs_server.export / name).read_bytes()[:M + 4096] == b"\x5a" * M + b"\x5b" * 4096
    after = driver_metrics(port, "n")
    assert after["written_bytes"] == M + 4096
    assert after["read_bytes"] == M + 4096
    # 2 writes, 1 fsync, 2 reads at least (qemu-io may read more on its own).
    assert after["requests"] >= first["requests"] + 5
    assert after["request_seconds"] > first["request_seconds"]
    assert after["request_errors"] == 0 and after["requests_in_flight"] == 0

    # A destination's activation drops the page cache and re-reads the size:
    # another client grew the file after the destination opened it.
    dport = free_port()
    dst = cluster.spawn("qmpd", "dst", incoming="defer",
                        extra=["--http", f"127.0.0.1:{dport}"]).ready()
    dst.ok("blockdev-add", {**nfs_server.blockdev(name), "node-name": "n"})
    opened = driver_metrics(dport, "n")
    assert opened["cache_invalidations"] == opened["size_changes"] == 0
    with open(nfs_server.export / name, "ab") as f:
        f.write(bytes(M))
    q.ok("block-export-del", {"id": "e0"})
    uri = f"unix:{cluster.dir / 'mig.sock'}"
    dst.ok("migrate-incoming", {"uri": uri})
    q.ok("migrate", {"uri": uri})
    assert q.wait_migration()["status"] == "completed"
    assert dst.wait_migration()["status"] == "completed"
    active = driver_metrics(dport, "n")
    assert active["cache_invalidations"] == 1 and active["size_changes"] == 1, active
    assert dst.ok("query-named-block-nodes")[0]["image"]["virtual-size"] == 5 * M

    # The server goes away: the failed request is counted, and the node is
    # unreachable until a request (on a new connection) succeeds again.
    nfs_server.stop_ganesha()
    try:
        dst.qmp.cmd("human-monitor-command", {"command-line": 'qemu-io n "read 0 4k"'},
                    timeout=90)
        down = driver_metrics(dport, "n")
        assert down["server_reachable"] == 0, down
        assert down["request_errors"] >= 1, down
    finally:
        nfs_server.start_ganesha()
    deadline = time.monotonic() + 60
    while driver_metrics(dport, "n")["server_reachable"] != 1:
        assert time.monotonic() < deadline
        dst.qmp.cmd("human-monitor-command", {"command-line": 'qemu-io n "read 0 4k"'},
                    timeout=90)
        time.sleep(0.5)
    assert driver_metrics(dport, "n")["reconnects"] >= 1
