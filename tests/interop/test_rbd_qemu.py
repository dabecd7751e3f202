"""qmpd's rbd driver against QEMU 7.2's on the same cluster: each reads what
the other wrote, a qcow2 made by ``qemu-img create -f qcow2 rbd:...`` grows
under qmpd and checks clean, block status through an NBD export matches
``qemu-img map`` on QEMU's driver, and ``query-named-block-nodes`` and the
open errors match qemu-storage-daemon's."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import QmpdProcess
from tests.support.ceph import CephCluster
from tests.support.qmp import QmpClient
from tests.support.qsd import QsdMonitor
from tests.support.tools import QSD, qemu_img, qemu_io, require_tool

pytestmark = pytest.mark.qemu("qemu-img", "qemu-io")

K, M = 1 << 10, 1 << 20


def client(sock: Path | str) -> QmpClient:
    return QmpClient(str(sock), timeout=60, negotiate=True, check_schema=False)


def hmp_io(proc: QmpdProcess, node: str, command: str) -> str:
    qmp = client(proc.sock)
    try:
        before = len(proc.read_stdout())
        reply = qmp.cmd("human-monitor-command",
                        {"command-line": f'qemu-io {node} "{command}"'})
        time.sleep(0.05)
        return str(reply.get("return", reply)) + proc.read_stdout()[before:]
    finally:
        qmp.close()


def ok(sock: Path | str, execute: str, arguments: dict[str, Any] | None = None) -> Any:
    qmp = client(sock)
    try:
        return qmp.ok(execute, arguments)
    finally:
        qmp.close()


@pytest.fixture
def qsd(tmp_path: Path) -> Iterator[QmpClient]:
    """A qemu-storage-daemon 7.2 and a negotiated QMP client of it."""
    monitor = QsdMonitor("c")
    log = tmp_path / "qsd.stderr"
    # A file, not a pipe: what QSD reports never blocks it.
    with open(log, "wb") as stderr:
        proc = monitor.popen([require_tool(QSD), *monitor.args],
                             stdout=subprocess.DEVNULL, stderr=stderr)
    try:
        qmp = monitor.client(proc, 60, log=log, negotiate=True, check_schema=False)
        try:
            yield qmp
        finally:
            qmp.close()
    finally:
        proc.terminate()
        proc.wait(20)


def test_qemu_reads_what_qmpd_wrote_and_back(qmpd: QmpdProcess, ceph: CephCluster) -> None:
    image = ceph.new_image("32M")
    ok(qmpd.sock, "blockdev-add", ceph.blockdev(image, **{"node-name": "r"}))
    for command in ("write -P 0x61 0 1M", "write -P 0x62 20M 64k", "write -z 20M 4k", "flush"):
        assert "failed" not in hmp_io(qmpd, "r", command)
    ok(qmpd.sock, "blockdev-del", {"node-name": "r"})
    res = qemu_io("-f", "raw", "-c", "read -P 0x61 0 1M", "-c", "read -P 0 20M 4k",
                  "-c", "read -P 0x62 20484k 60k", "-c", "write -P 0x71 30M 1M",
                  ceph.spec(image))
    assert res.returncode == 0 and "verification" not in res.stdout, res.stdout + res.stderr
    ok(qmpd.sock, "blockdev-add", ceph.blockdev(image, **{"node-name": "r"}))
    out = hmp_io(qmpd, "r", "read -P 0x71 30M 1M")
    assert "failed" not in out and "verification" not in out, out


def test_qcow2_made_by_qemu_img_on_rbd_grows_under_qmpd(qmpd: QmpdProcess,
                                                       ceph: CephCluster) -> None:
    """``qemu-img create -f qcow2 rbd:...`` makes a small image; qmpd's writes
    past its end grow it; qemu-img check is clean and QEMU reads the data."""
    name = f"grow-{time.monotonic_ns()}"
    spec = f"rbd:rbd/{name}:conf={ceph.client_conf}"
    qemu_img("create", "-q", "-f", "qcow2", spec, "256M")
    small = json.loads(ceph.rbd("info", "--format", "json", f"rbd/{name}"))["size"]
    proto = ceph.blockdev(name, **{"node-name": "proto"})
    ok(qmpd.sock, "blockdev-add", {"driver": "qcow2", "node-name": "q", "file": proto})
    writes = [(0, 64 * K, 0x41), (100 * M, 1 * M, 0x42), (255 * M, 64 * K, 0x43)]
    for offset, length, pattern in writes:
        assert "failed" not in hmp_io(qmpd, "q", f"write -P {pattern:#x} {offset} {length}")
    assert "failed" not in hmp_io(qmpd, "q", "flush")
    ok(qmpd.sock, "blockdev-del", {"node-name": "q"})
    grown = json.loads(ceph.rbd("info", "--format", "json", f"rbd/{name}"))["size"]
    assert grown > small + M, (small, grown)
    res = qemu_img("check", "-f", "qcow2", spec, check=False)
    assert res.returncode == 0 and "No errors were found" in res.stdout, res.stdout
    args = [a for offset, length, pattern in writes
            for a in ("-c", f"read -P {pattern:#x} {offset} {length}")]
    res = qemu_io("-f", "qcow2", *args, "-c", "write -P 0x44 200M 64k", spec)
    assert res.returncode == 0 and "verification" not in res.stdout, res.stdout
    ok(qmpd.sock, "blockdev-add", {"driver": "qcow2", "node-name": "q2", "file": proto})
    out = hmp_io(qmpd, "q2", "read -P 0x44 200M 64k")
    assert "failed" not in out and "verification" not in out, out


def _extents(map_json: str, length: int) -> list[tuple[int, int, bool, bool]]:
    """qemu-img map's extents, neighbours with the same flags merged."""
    out: list[tuple[int, int, bool, bool]] = []
    for ext in json.loads(map_json):
        start, size = ext["start"], ext["length"]
        if start >= length:
            continue
        key = (ext["data"], ext["zero"])
        if out and out[-1][2:] == key and out[-1][0] + out[-1][1] == start:
            out[-1] = (out[-1][0], out[-1][1] + size, *key)
        else:
            out.append((start, size, *key))
    return out


def test_block_status_through_nbd_matches_qemu_map(qmpd: QmpdProcess,
                                                    ceph: CephCluster) -> None:
    """With fast-diff, what qmpd's export of an rbd node says is allocated is
    what QEMU's rbd driver says (whole 4 MiB objects)."""
    image = ceph.new_image("64M", features="layering,exclusive-lock,object-map,fast-diff")
    res = qemu_io("-f", "raw", "-c", "write -P 1 0 64k", "-c", "write -P 2 20M 5M",
                  ceph.spec(image))
    assert res.returncode == 0, res.stderr
    reference = qemu_img("map", "--output=json", "-f", "raw", ceph.spec(image)).stdout
    sock = Path(qmpd.sock).parent / "nbd.sock"
    ok(qmpd.sock, "blockdev-add", ceph.blockdev(image, **{"node-name": "r", "read-only": True}))
    ok(qmpd.sock, "nbd-server-start", {"addr": {"type": "unix", "data": {"path": str(sock)}}})
    ok(qmpd.sock, "block-export-add", {"type": "nbd", "id": "e", "node-name": "r",
                                       "name": "r"})
    got = qemu_img("map", "--output=json", "-f", "raw",
                   f"nbd+unix:///r?socket={sock}").stdout
    want = _extents(reference, 64 * M)
    assert _extents(got, 64 * M) == want
    assert [e[2] for e in want] == [True, False, True, False], want


def _nodes(qmp: QmpClient) -> list[dict[str, Any]]:
    nodes = qmp.ok("query-named-block-nodes")
    for node in nodes:
        node.pop("active", None)  # QEMU 10's member, which qmpd reports
    return list(nodes)


def test_node_info_and_errors_match_qemu_storage_daemon(qmpd: QmpdProcess, qsd: QmpClient,
                                                         ceph: CephCluster) -> None:
    image = ceph.new_image("48M")
    opts = ceph.blockdev(image, **{"node-name": "r"})
    results: dict[str, Any] = {}
    with closing(client(qmpd.sock)) as ours:
        for name, qmp in (("qmpd", ours), ("qsd", qsd)):
            replies = [qmp.cmd("blockdev-add", opts),
                       qmp.cmd("blockdev-add", {**opts, "node-name": "x", "image": "nope"}),
                       qmp.cmd("blockdev-add", {**opts, "node-name": "y", "pool": "nopool"}),
                       qmp.cmd("blockdev-add", {**opts, "node-name": "z",
                                                "snapshot": "nosnap"}),
                       qmp.cmd("blockdev-add", {**opts, "node-name": "w",
                                                "namespace": "nons"}),
                       qmp.cmd("block_resize", {"node-name": "r", "size": 64 * M})]
            results[name] = (replies, _nodes(qmp))
            qmp.ok("blockdev-del", {"node-name": "r"})
    assert results["qmpd"] == results["qsd"]


def test_key_secret_user_and_auth_mode_match_qemu_storage_daemon(
        qmpd: QmpdProcess, qsd: QmpClient, ceph: CephCluster) -> None:
    """Without a keyring in the configuration, the key comes from a secret
    object (``key-secret``); a wrong key is refused as QEMU refuses it."""
    image = ceph.new_image("16M")
    key = next(line.split("=", 1)[1].strip() for line in ceph.keyring.read_text().splitlines()
               if line.strip().startswith("key"))
    conf = ceph.root / "nokeyring.conf"
    conf.write_text("\n".join(line for line in ceph.client_conf.read_text().splitlines()
                              if not line.startswith("keyring")) + "\n")
    wrong = "AQBAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=="
    opts = {**ceph.blockdev(image), "conf": str(conf), "user": "admin",
            "auth-client-required": ["cephx"]}
    results: dict[str, Any] = {}
    with closing(client(qmpd.sock)) as ours:
        for name, qmp in (("qmpd", ours), ("qsd", qsd)):
            results[name] = [
                qmp.cmd("object-add", {"qom-type": "secret", "id": "k", "data": key,
                                       "format": "base64"}),
                qmp.cmd("object-add", {"qom-type": "secret", "id": "bad", "data": wrong,
                                       "format": "base64"}),
                qmp.cmd("blockdev-add", {**opts, "node-name": "r", "key-secret": "k"}),
                qmp.cmd("blockdev-add", {**opts, "node-name": "x", "key-secret": "bad"}),
                qmp.cmd("blockdev-add", {**opts, "node-name": "y", "key-secret": "nosuch"}),
            ]
    assert results["qmpd"] == results["qsd"]
    assert results["qmpd"][2] == {"return": {}}
