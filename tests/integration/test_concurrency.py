"""Conflicting graph commands from several clients end as if run one after the other.

QEMU's monitor runs one command at a time; qmpd serves many clients at once.
Each round fires two conflicting commands from two clients without waiting,
then checks what QEMU's serial order allows, and that no image fd, lock or
metadata was left behind (/proc/PID/fd, /proc/locks, qemu-img check).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import QmpdProcess, RawClient, require_tool
from tests.integration.migration_helpers import (
    Cluster,
    create_qcow2,
)
from tests.integration.test_locking import held_bytes
from tests.support.tools import qemu_img

ROUNDS = 200 if os.environ.get("QMPD_SLOW") == "1" else 12


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "disk.qcow2"
    assert qemu_img("create", "-q", "-f", "qcow2", str(path), "64M").returncode == 0
    return path


def qcow2(node: str, image: Path) -> dict[str, Any]:
    return {"driver": "qcow2", "node-name": node,
            "file": {"driver": "file", "filename": str(image)}}


def both(a: RawClient, b: RawClient, first: tuple[str, dict[str, Any]],
         second: tuple[str, dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Send both requests before reading either reply."""
    a.send(json.dumps({"execute": first[0], "arguments": first[1]}) + "\n")
    b.send(json.dumps({"execute": second[0], "arguments": second[1]}) + "\n")
    return reply(a), reply(b)


def reply(c: RawClient) -> dict[str, Any]:
    while True:
        msg = c.recv()
        if "return" in msg or "error" in msg:
            return msg


def open_paths(pid: int) -> list[str]:
    fds = Path(f"/proc/{pid}/fd")
    out = []
    for fd in fds.iterdir():
        try:
            out.append(os.readlink(fd))
        except FileNotFoundError:
            pass
    return out


def assert_released(qmpd: QmpdProcess, image: Path) -> None:
    if qmpd.proc.poll() is None:
        assert str(image) not in open_paths(qmpd.proc.pid)
    assert held_bytes(image) == set()
    check = qemu_img("check", str(image), check=False)
    assert check.returncode == 0, check.stdout + check.stderr


def clients(qmpd: QmpdProcess) -> tuple[RawClient, RawClient]:
    a, b = qmpd.client(), qmpd.client()
    a.negotiate()
    b.negotiate()
    return a, b


def dirty(c: RawClient, node: str, offset: int) -> None:
    """Allocate a cluster: the node now has L2/refcount updates to write back."""
    line = f'qemu-io {node} "write -P 0x5a {offset} 64k"'
    assert "error" not in c.cmd("human-monitor-command", {"command-line": line})


def test_add_add_same_name(qmpd: QmpdProcess, image: Path) -> None:
    a, b = clients(qmpd)
    for i in range(ROUNDS):
        ra, rb = both(a, b, ("blockdev-add", qcow2("n", image)),
                      ("blockdev-add", qcow2("n", image)))
        ok = [r for r in (ra, rb) if "return" in r]
        err = [r for r in (ra, rb) if "error" in r]
        assert len(ok) == 1 and len(err) == 1, (i, ra, rb)
        assert err[0]["error"]["desc"] == "Duplicate nodes with node-name='n'"
        assert a.cmd("blockdev-del", {"node-name": "n"}) == {"return": {}}
        assert_released(qmpd, image)


def test_del_del_same_node(qmpd: QmpdProcess, image: Path) -> None:
    a, b = clients(qmpd)
    for i in range(ROUNDS):
        assert a.cmd("blockdev-add", qcow2("n", image)) == {"return": {}}
        dirty(a, "n", i * 65536)
        ra, rb = both(a, b, ("blockdev-del", {"node-name": "n"}),
                      ("blockdev-del", {"node-name": "n"}))
        ok = [r for r in (ra, rb) if "return" in r]
        err = [r for r in (ra, rb) if "error" in r]
        assert len(ok) == 1 and len(err) == 1, (i, ra, rb)
        assert err[0]["error"]["desc"] == "Failed to find node with node-name='n'"
        assert_released(qmpd, image)
    assert "Bad file descriptor" not in qmpd.read_stderr()


def test_del_races_export_add(qmpd: QmpdProcess, image: Path, tmp_path: Path) -> None:
    a, b = clients(qmpd)
    nbd = str(tmp_path / "nbd.sock")
    assert a.cmd("nbd-server-start", {"addr": {"type": "unix", "data": {"path": nbd}}}) \
        == {"return": {}}
    for i in range(ROUNDS):
        assert a.cmd("blockdev-add", qcow2("n", image)) == {"return": {}}
        dirty(a, "n", i * 65536)
        export = {"type": "nbd", "id": "e", "node-name": "n", "writable": True}
        if i % 2:
            ra, rb = both(a, b, ("block-export-add", export), ("blockdev-del", {"node-name": "n"}))
        else:
            rb, ra = both(b, a, ("blockdev-del", {"node-name": "n"}), ("block-export-add", export))
        assert ("return" in ra) != ("return" in rb), (i, ra, rb)
        if "return" in ra:  # the export won: the node is in use
            assert rb["error"]["desc"].startswith("Node n is in use") or \
                "busy" in rb["error"]["desc"], rb
            assert a.cmd("block-export-del", {"id": "e"}) == {"return": {}}
            for _ in range(50):
                gone = a.cmd("blockdev-del", {"node-name": "n"})
                if "return" in gone:
                    break
                assert "in use" in gone["error"]["desc"], gone
                a.cmd("query-block-exports")
            assert gone == {"return": {}}
        else:
            assert ra["error"]["desc"] == "Cannot find device='n' nor node-name='n'" or \
                "n" in ra["error"]["desc"], ra
        assert a.cmd("query-block-exports") == {"return": []}
        assert a.cmd("query-named-block-nodes") == {"return": []}
        assert_released(qmpd, image)


@pytest.mark.parametrize("how", ["quit", "SIGTERM"])
def test_exit_during_del_keeps_acknowledged_writes(
    qmpd_factory: Any, image: Path, how: str
) -> None:
    qemu_io = require_tool("qemu-io")
    for i in range(max(3, ROUNDS // 4)):
        qmpd = qmpd_factory()
        a, b = clients(qmpd)
        assert a.cmd("blockdev-add", qcow2("n", image)) == {"return": {}}
        # Many newly allocated clusters: plenty of metadata for the del to write.
        for k in range(16):
            dirty(a, "n", (i * 16 + k) * 65536)
        a.send(json.dumps({"execute": "blockdev-del", "arguments": {"node-name": "n"}}) + "\n")
        if how == "quit":
            b.send(json.dumps({"execute": "quit"}) + "\n")
        else:
            qmpd.signal(signal.SIGTERM)
        assert qmpd.wait(20) == 0
        assert_released(qmpd, image)
        for k in range(16):
            off = (i * 16 + k) * 65536
            read = subprocess.run([qemu_io, "-f", "qcow2", "-r", "-c",
                                   f"read -P 0x5a {off} 64k", str(image)],
                                  capture_output=True, text=True, timeout=60)
            assert "Pattern verification failed" not in read.stdout, (i, k, read.stdout)
            assert read.returncode == 0, read.stdout + read.stderr


@pytest.mark.qemu
def test_cont_races_migrate(mig: Cluster) -> None:
    """Never a source that reports running while its disk is inactive."""
    image = create_qcow2(mig.dir / "disk.qcow2", "64M")
    for i in range(max(3, ROUNDS // 2)):
        src = mig("qmpd", f"s{i}", paused=True)
        sock = str(mig.dir / f"m{i}.sock")
        dst = mig("qmpd", f"d{i}", incoming=f"unix:{sock}")
        src.add_disk(image)
        dst.add_disk(image)
        a, b = RawClient(src.qmp_path), RawClient(src.qmp_path)
        a.negotiate()
        b.negotiate()
        ra, _ = both(a, b, ("migrate", {"uri": f"unix:{sock}"}), ("cont", {}))
        assert ra == {"return": {}}
        src.wait_migration()
        status = src.status()
        if status == "running":
            assert src.holds_write(image), f"round {i}: running with an inactive disk"
        src.quit()
        dst.quit()
        a.close()
        b.close()
