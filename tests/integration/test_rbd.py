"""The rbd driver in a qmpd process on a real Ceph cluster: its requests, its
errors when the cluster fails, /ready and /metrics, and the refusal without
Ceph's Python bindings."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from typing import Any

import pytest

from tests.conftest import QmpdProcess
from tests.support.ceph import CephCluster, require_ceph
from tests.support.qmp import QmpClient, wait_greeting
from tests.support.tools import QEMU_IO, qemu_io, require_tool

K, M = 1 << 10, 1 << 20


def http_get(proc: QmpdProcess, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(proc.http_url() + path, timeout=30) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def hmp_io(proc: QmpdProcess, node: str, command: str) -> str:
    """HMP qemu-io: what it printed on stdout and what the monitor replied."""
    client = QmpClient(proc.sock, timeout=60, negotiate=True)
    try:
        before = len(proc.read_stdout())
        reply = client.cmd("human-monitor-command",
                           {"command-line": f'qemu-io {node} "{command}"'}, timeout=60)
        time.sleep(0.05)
        return str(reply.get("return", reply)) + proc.read_stdout()[before:]
    finally:
        client.close()


def qmp(proc: QmpdProcess, execute: str, arguments: dict[str, Any] | None = None,
        timeout: float = 60) -> dict[str, Any]:
    client = QmpClient(proc.sock, timeout=60, negotiate=True)
    try:
        return dict(client.cmd(execute, arguments, timeout=timeout))
    finally:
        client.close()


def test_requests_reach_the_image(qmpd_factory: Any, ceph: CephCluster) -> None:
    """Reads, writes, write-zeroes, discard, flush, resize and a write past
    the end through qmpd, checked by a fresh client (rbd export)."""
    image = ceph.new_image("16M")
    proc = qmpd_factory()
    assert qmp(proc, "blockdev-add", ceph.blockdev(image, **{"node-name": "r",
                                                            "discard": "unmap"})) == {"return": {}}
    for command in ("write -P 0x11 0 1M", "write -P 0x22 4M 64k", "write -z 4M 4k",
                    "write -P 0x33 8M 1M", "discard 8M 512k", "flush"):
        out = hmp_io(proc, "r", command)
        assert "failed" not in out, (command, out)
    for command in ("read -P 0x11 0 1M", "read -P 0 4M 4k", "read -P 0x22 4100k 60k",
                    "read -P 0 8M 512k", "read -P 0x33 8704k 512k"):
        out = hmp_io(proc, "r", command)
        assert "failed" not in out and "verification" not in out, (command, out)
    assert qmp(proc, "block_resize", {"node-name": "r", "size": 32 * M}) == {"return": {}}
    nodes = qmp(proc, "query-named-block-nodes")["return"]
    assert nodes[0]["image"]["virtual-size"] == 32 * M
    assert "32 MiB" in ceph.rbd("info", f"rbd/{image}")
    assert qmp(proc, "blockdev-del", {"node-name": "r"}) == {"return": {}}
    exported = ceph.root / f"{image}.raw"
    ceph.rbd("export", "--no-progress", f"rbd/{image}", str(exported))
    data = exported.read_bytes()
    assert len(data) == 32 * M
    assert data[:M] == b"\x11" * M
    assert data[4 * M:4 * M + 4 * K] == bytes(4 * K)
    assert data[4 * M + 4 * K:4 * M + 64 * K] == b"\x22" * (60 * K)
    assert data[8 * M:8 * M + 512 * K] == bytes(512 * K)
    assert data[8 * M + 512 * K:9 * M] == b"\x33" * (512 * K)


def export_nbd(proc: QmpdProcess, node: str) -> str:
    """Export ``node`` writable over NBD on a UNIX socket: its URI."""
    sock = proc.tmp / "nbd.sock"
    assert qmp(proc, "nbd-server-start", {"addr": {"type": "unix", "data": {
        "path": str(sock)}}}) == {"return": {}}
    assert qmp(proc, "block-export-add", {"type": "nbd", "id": "e", "node-name": node,
                                          "name": "e", "writable": True}) == {"return": {}}
    return f"nbd+unix:///e?socket={sock}"


def io_over_nbd(uri: str, commands: list[str]) -> None:
    """qemu-io's ``commands`` over NBD, in writeback mode (no FUA: the
    server's path without a coroutine); every one must pass."""
    out = qemu_io("-f", "raw", "-t", "writeback",
                  *(a for c in commands for a in ("-c", c)), uri, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "fail" not in out.stdout and "verification" not in out.stdout, out.stdout


def image_after_close(proc: QmpdProcess, ceph: CephCluster, image: str) -> bytes:
    """Drop the export and the node (flushing librbd's cache), then what a
    fresh client (rbd export) reads of the image."""
    assert qmp(proc, "block-export-del", {"id": "e"}) == {"return": {}}
    deadline = time.monotonic() + 30
    while qmp(proc, "blockdev-del", {"node-name": "r"}) != {"return": {}}:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    exported = ceph.root / f"{image}.raw"
    ceph.rbd("export", "--no-progress", f"rbd/{image}", str(exported))
    return exported.read_bytes()


def test_nbd_requests_in_flight_together(qmpd_factory: Any, ceph: CephCluster) -> None:
    """Many 4 KiB writes and reads in flight at once through an NBD export
    (the server starts them without a coroutine: qemu-io in writeback mode
    sends no FUA), each landing where it should: read back over NBD and by
    a fresh client (rbd export)."""
    image = ceph.new_image("16M")
    proc = qmpd_factory()
    assert qmp(proc, "blockdev-add", ceph.blockdev(image, **{"node-name": "r"})) == \
        {"return": {}}
    uri = export_nbd(proc, "r")
    blocks = range(0, 16 * M, 64 * K)
    writes = [f"aio_write -P {i % 250 + 1} {off} 4k" for i, off in enumerate(blocks)]
    reads = [f"aio_read -P {i % 250 + 1} {off} 4k" for i, off in enumerate(blocks)]
    io_over_nbd(uri, [*writes, "aio_flush"])
    io_over_nbd(uri, [*reads, "aio_flush"])
    data = image_after_close(proc, ceph, image)
    for i, off in enumerate(blocks):
        assert data[off:off + 4 * K] == bytes([i % 250 + 1]) * (4 * K), off
        assert data[off + 4 * K:off + 64 * K] == bytes(60 * K), off


def test_nbd_large_requests_in_flight_together(
        qmpd_factory: Any, ceph: CephCluster, tmp_path: Any) -> None:
    """1 MiB writes and reads in flight at once through an NBD export, each
    carrying its own bytes: a WRITE is received into the payload of one that
    librbd completed, never of one it may still hold (the client allows
    zero-copy writes, without a cache, and the OSD is stopped meanwhile;
    librbd 16 copies anyway, a zero-copy librbd would send from those
    buffers), and READs of data the export has seen start without a
    coroutine."""
    conf = tmp_path / "zero-copy.conf"
    conf.write_text(ceph.client_conf.read_text().replace("rbd_cache = true", "rbd_cache = false")
                    + "rbd_disable_zero_copy_writes = false\n")
    image = ceph.new_image("48M")
    proc = qmpd_factory()
    node = {**ceph.blockdev(image, **{"node-name": "r"}), "conf": str(conf)}
    assert qmp(proc, "blockdev-add", node) == {"return": {}}
    uri = export_nbd(proc, "r")
    count = 48
    writes = [f"aio_write -P {i + 1} {i * M} 1M" for i in range(count)]
    reads = [f"aio_read -P {i + 1} {i * M} 1M" for i in range(count)]
    osd = ceph.osd
    assert osd is not None
    os.kill(osd.pid, signal.SIGSTOP)
    try:
        writer = subprocess.Popen(
            [QEMU_IO, "-f", "raw", "-t", "writeback",  # no FUA: the soon path
             *(a for c in [*writes, "aio_flush"] for a in ("-c", c)), uri],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(2)  # the writes reach librbd, which waits for the OSD
    finally:
        os.kill(osd.pid, signal.SIGCONT)
    stdout, stderr = writer.communicate(timeout=120)
    assert writer.returncode == 0, stderr
    assert "fail" not in stdout, stdout
    io_over_nbd(uri, [*reads, "aio_flush"])
    io_over_nbd(uri, [*reads[::-1], "aio_flush"])
    data = image_after_close(proc, ceph, image)
    for i in range(count):
        assert data[i * M:(i + 1) * M] == bytes([i + 1]) * M, i


def test_unknown_pool_and_image_errors(qmpd_factory: Any, ceph: CephCluster) -> None:
    """QEMU 7.2's texts (checked against qemu-storage-daemon in tests/interop)."""
    proc = qmpd_factory()
    reply = qmp(proc, "blockdev-add", {**ceph.blockdev("nope"), "node-name": "a"})
    assert reply["error"]["desc"] == "error reading header from nope: No such file or directory"
    reply = qmp(proc, "blockdev-add", {**ceph.blockdev("nope"), "pool": "nopool",
                                       "node-name": "b"})
    assert reply["error"]["desc"] == "error opening pool nopool: No such file or directory"


def _unused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_monitor_unreachable_at_blockdev_add(qmpd_factory: Any, ceph: CephCluster) -> None:
    """No monitor answers: blockdev-add fails within the client's mount
    timeout (5 s in the test configuration) and the daemon goes on."""
    image = ceph.new_image("16M")
    proc = qmpd_factory()
    started = time.monotonic()
    reply = qmp(proc, "blockdev-add", ceph.blockdev(
        image, **{"node-name": "r", "server": [{"host": "127.0.0.1",
                                                 "port": str(_unused_port())}]}))
    took = time.monotonic() - started
    assert reply["error"]["desc"] == "error connecting: Connection timed out", reply
    assert took < 30, took
    assert qmp(proc, "query-status")["return"]["status"] == "running"
    assert qmp(proc, "blockdev-add", ceph.blockdev(image, **{"node-name": "r"})) == \
        {"return": {}}


def test_osd_stopped_mid_write(qmpd_factory: Any, ceph: CephCluster) -> None:
    """The OSD stops under the daemon: requests fail with an error after the
    client's OSD timeout, the daemon stays up, /ready names the node and the
    cluster, and everything works again once the OSD is back."""
    image = ceph.new_image("16M")
    proc = qmpd_factory("--http", "127.0.0.1:0", "--log-level", "info")
    assert qmp(proc, "blockdev-add", ceph.blockdev(
        image, **{"node-name": "r", "cache": {"direct": True}})) == {"return": {}}
    assert "failed" not in hmp_io(proc, "r", "write -P 0x44 0 1M")
    assert http_get(proc, "/ready")[0] == 200
    uri = export_nbd(proc, "r")
    ceph.stop_osd()
    try:
        # An NBD client's 4 KiB write and read meanwhile (their timeouts run
        # alongside the monitor's requests'): error replies, nothing else.
        nbd = subprocess.Popen(
            [require_tool(QEMU_IO), "-f", "raw", "-c", "write -P 0x77 6M 4k",
             "-c", "read 7M 4k", uri], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True)
        # librbd reports a timed-out object write as EIO, a read as ETIMEDOUT.
        out = hmp_io(proc, "r", "write -P 0x55 2M 1M")
        assert out.endswith(("write failed: Input/output error\n",
                             "write failed: Connection timed out\n")), out
        out = hmp_io(proc, "r", "read 4M 64k")
        assert out.endswith(("read failed: Input/output error\n",
                             "read failed: Connection timed out\n")), out
        said = nbd.communicate(timeout=60)[0]
        # NBD has no ETIMEDOUT: it goes as EINVAL, as from QEMU's server.
        assert re.search(r"write failed: (Input/output error|Invalid argument)\n", said), said
        assert re.search(r"read failed: (Input/output error|Invalid argument)\n", said), said
        assert qmp(proc, "query-status")["return"]["status"] == "running"
        deadline = time.monotonic() + 30
        while True:
            status, body = http_get(proc, "/ready")
            if status == 503 or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert status == 503, body
        reasons = json.loads(body)["reasons"]
        assert any(r.startswith("node r: Ceph") for r in reasons), reasons
        metrics = http_get(proc, "/metrics")[1]
        assert 'qmpd_block_driver_cluster_reachable{driver="rbd",node="r"} 0.0' in metrics
        assert 'qmpd_block_driver_request_errors{driver="rbd",node="r"} 4.0' in metrics
    finally:
        ceph.ensure_running()
    assert "failed" not in hmp_io(proc, "r", "read -P 0x44 0 1M")
    assert "failed" not in hmp_io(proc, "r", "write -P 0x66 2M 1M")
    deadline = time.monotonic() + 30
    while http_get(proc, "/ready")[0] != 200:
        assert time.monotonic() < deadline, http_get(proc, "/ready")
        time.sleep(0.5)


#: qmpd in a Python that cannot import Ceph's bindings (a test-run process).
NO_BINDINGS = (
    "import sys\n"
    "sys.modules['rados'] = None\n"
    "sys.modules['rbd'] = None\n"
    "import qmpd.block.ceph as c\n"
    "c._DIST_DIRS = ()\n"
    "from qmpd.__main__ import main\n"
    "raise SystemExit(main(sys.argv[1:]))\n"
)


def test_without_bindings_rbd_is_refused_naming_the_packages(tmp_path: Any) -> None:
    import subprocess
    import sys

    from tests.support.tools import REPO

    sock = tmp_path / "q.sock"
    env = {"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}
    proc = subprocess.Popen([sys.executable, "-c", NO_BINDINGS, "--qmp", f"unix:{sock}"],
                            env=env, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while not wait_greeting(str(sock)):
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.02)
        client = QmpClient(str(sock), negotiate=True)
        reply = client.cmd("blockdev-add", {"driver": "rbd", "node-name": "r", "pool": "p",
                                            "image": "i"})
        client.close()
    finally:
        proc.terminate()
        proc.wait(10)
    desc = reply["error"]["desc"]
    assert reply["error"]["class"] == "GenericError"
    assert "python3-rados" in desc and "python3-rbd" in desc, desc


@pytest.fixture(autouse=True)
def _ceph_for_bindings_test(request: pytest.FixtureRequest) -> None:
    if request.node.name.startswith("test_without_bindings"):
        return
    require_ceph()
