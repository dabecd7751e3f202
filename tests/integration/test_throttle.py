"""The throttle filter driver behind NBD exports: measured rates obey the group's limits.

Only lower bounds are tight (a throttled transfer can never be faster than its
buckets drain); upper bounds are many times the expected time.  Each case took
the same time (within 0.05 s) on qemu-storage-daemon 7.2.
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import QmpdProcess, RawClient, require_tool, wait_for_socket

MiB = 1 << 20


def _setup(qmpd: QmpdProcess, tmp: Path, group: dict[str, Any], nodes: int = 1) -> RawClient:
    """A group, ``nodes`` throttle nodes in it over one raw image, each exported as tN."""
    image = tmp / "disk.raw"
    # Data, not holes: NBD sends holes without reading them, so neither QSD
    # nor qmpd throttles them.
    image.write_bytes(b"\x5a" * (8 * MiB))
    c = qmpd.client()
    c.negotiate()
    assert c.cmd("object-add", {"qom-type": "throttle-group", "id": "tg", **group}) == {
        "return": {}}
    assert c.cmd("blockdev-add", {"driver": "file", "node-name": "f0",
                                  "filename": str(image)}) == {"return": {}}
    assert c.cmd("nbd-server-start", {"addr": {"type": "unix", "data": {
        "path": str(tmp / "nbd.sock")}}}) == {"return": {}}
    for i in range(nodes):
        assert c.cmd("blockdev-add", {"driver": "throttle", "node-name": f"t{i}",
                                      "throttle-group": "tg", "file": "f0"}) == {"return": {}}
        assert c.cmd("block-export-add", {"type": "nbd", "id": f"e{i}", "node-name": f"t{i}",
                                          "writable": True}) == {"return": {}}
    return c


def _qemu_io(tmp: Path, export: str, commands: list[str]) -> None:
    qemu_io = require_tool("qemu-io")
    args = [qemu_io, "-f", "raw", f"nbd+unix:///{export}?socket={tmp / 'nbd.sock'}"]
    for command in commands:
        args += ["-c", command]
    out = subprocess.run(args, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "error" not in out.stdout.lower(), out


def _timed(tmp: Path, jobs: dict[str, list[str]]) -> float:
    """Seconds for qemu-io runs on several exports at once."""
    errors: list[BaseException] = []

    def run(export: str, commands: list[str]) -> None:
        try:
            _qemu_io(tmp, export, commands)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=item) for item in jobs.items()]
    start = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - start
    if errors:
        raise errors[0]
    return elapsed


def _reads(count: int, size: int) -> list[str]:
    return [f"read {i * size} {size}" for i in range(count)]


@pytest.mark.parametrize("group, commands, at_least, below", [
    # 3 MiB at 1 MiB/s: 6 requests, at most 0.1 MiB of bucket and the last
    # request are not waited for.
    ({"x-bps-total": MiB}, _reads(6, 512 << 10), 2.0, 20),
    # 25 operations at 10/s: the bucket holds one, the last is not waited for.
    ({"x-iops-total": 10}, _reads(25, 4096), 2.0, 20),
    # iops-size counts a 64 KiB write as 16 operations of 4 KiB.
    ({"x-iops-write": 40, "x-iops-size": 4096},
     [f"write {i * 65536} 65536" for i in range(8)], 2.0, 20),
    # A burst of 1 MiB/s for 10 s above an average of 256 KiB/s: the burst
    # rate decides (the average alone would take 11 s).
    ({"x-bps-total": 256 << 10, "x-bps-total-max": MiB, "x-bps-total-max-length": 10},
     _reads(6, 512 << 10), 2.0, 8),
    # The control: a limit far above what is asked.
    ({"x-bps-total": 1 << 30}, _reads(6, 512 << 10), 0.0, 2.0),
])
def test_throttled_rate(qmpd: QmpdProcess, tmp_path: Path, group: dict[str, Any],
                        commands: list[str], at_least: float, below: float) -> None:
    _setup(qmpd, tmp_path, group)
    elapsed = _timed(tmp_path, {"t0": commands})
    assert at_least <= elapsed < below


def test_reads_not_held_by_write_limit(qmpd: QmpdProcess, tmp_path: Path) -> None:
    _setup(qmpd, tmp_path, {"x-bps-write": 64 << 10})
    assert _timed(tmp_path, {"t0": _reads(6, 512 << 10)}) < 2.0


def test_group_members_share_limits(qmpd: QmpdProcess, tmp_path: Path) -> None:
    c = _setup(qmpd, tmp_path, {"x-bps-total": MiB}, nodes=2)
    # 1.5 MiB through each node at once: 3 MiB at the group's 1 MiB/s (each
    # alone would take under a second).
    elapsed = _timed(tmp_path, {"t0": _reads(3, 512 << 10), "t1": _reads(3, 512 << 10)})
    assert 2.0 <= elapsed < 20
    assert c.cmd("object-del", {"id": "tg"})["error"]["desc"] == (
        "object 'tg' is in use, can not be deleted")


def _maps(sock: Path) -> tuple[str, str]:
    nbdinfo = require_tool("nbdinfo")
    url = f"nbd+unix:///t0?socket={sock}"
    return tuple(  # type: ignore[return-value]
        subprocess.run([nbdinfo, f"--map={ctx}", url], capture_output=True, text=True,
                       check=True, timeout=30).stdout
        for ctx in ("base:allocation", "qemu:allocation-depth")
    )


def test_block_status_through_filter_like_qsd(qmpd: QmpdProcess, tmp_path: Path) -> None:
    """A throttle node over a qcow2 chain: the same maps (and depths) as QSD's."""
    qemu_img = require_tool("qemu-img")
    base, top = tmp_path / "base.qcow2", tmp_path / "top.qcow2"
    subprocess.run([qemu_img, "create", "-q", "-f", "qcow2", str(base), "4M"], check=True)
    _qemu_io_file(base, "write 0 1M")
    subprocess.run([qemu_img, "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2",
                    str(top)], check=True)
    _qemu_io_file(top, "write 2M 1M")
    nodes = [
        {"driver": "file", "node-name": "f0", "filename": str(top)},
        {"driver": "qcow2", "node-name": "q0", "file": "f0", "read-only": True},
        {"driver": "throttle", "node-name": "t0", "file": "q0", "throttle-group": "tg"},
    ]
    c = qmpd.client()
    c.negotiate()
    c.cmd("object-add", {"qom-type": "throttle-group", "id": "tg"})
    for node in nodes:
        assert c.cmd("blockdev-add", node) == {"return": {}}
    ours_sock = tmp_path / "ours.sock"
    c.cmd("nbd-server-start", {"addr": {"type": "unix", "data": {"path": str(ours_sock)}}})
    c.cmd("block-export-add", {"type": "nbd", "id": "e0", "node-name": "t0",
                               "allocation-depth": True})
    ours = _maps(ours_sock)
    qsd_sock = tmp_path / "qsd.sock"
    proc = subprocess.Popen(
        [require_tool("qemu-storage-daemon"), "--object", "throttle-group,id=tg",
         *(arg for node in nodes for arg in ("--blockdev", json.dumps(node))),
         "--nbd-server", f"addr.type=unix,addr.path={qsd_sock}",
         "--export", "nbd,id=e0,node-name=t0,allocation-depth=on"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_socket(proc, qsd_sock)
        theirs = _maps(qsd_sock)
    finally:
        proc.terminate()
        proc.wait(10)
    assert "backing depth 3" in theirs[1]
    assert ours == theirs


def _qemu_io_file(path: Path, command: str) -> None:
    subprocess.run([require_tool("qemu-io"), "-f", "qcow2", "-c", command, str(path)],
                   check=True, capture_output=True, timeout=30)
