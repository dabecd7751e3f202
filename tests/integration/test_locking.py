"""Image locking in both directions between qmpd and QEMU's tools, with QEMU's texts."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import QmpdProcess, RawClient, require_tool
from tests.support.tools import held_bytes

SHARED = 'Failed to get shared "write" lock'
WRITE = 'Failed to get "write" lock'


def run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=60)


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "disk.qcow2"
    run(require_tool("qemu-img"), "create", "-q", "-f", "qcow2", str(path), "16M")
    return path


def add_qcow2(c: RawClient, image: Path, **extra: Any) -> dict[str, Any]:
    return c.cmd("blockdev-add", {
        "driver": "qcow2", "node-name": "disk",
        "file": {"driver": "file", "filename": str(image)}, **extra,
    })


def test_qmpd_read_write_holder_refuses_tools(qmpd: QmpdProcess, image: Path) -> None:
    c = qmpd.client()
    c.negotiate()
    assert add_qcow2(c, image) == {"return": {}}
    # What QEMU's read-write qcow2 holds: read, write, resize; unshares write, resize.
    assert held_bytes(image) == {100, 101, 103, 201, 203}
    info = run(require_tool("qemu-img"), "info", str(image))
    assert info.returncode == 1
    assert info.stderr.splitlines() == [
        f"qemu-img: Could not open '{image}': {SHARED}",
        f"Is another process using the image [{image}]?",
    ]
    write = run(require_tool("qemu-io"), "-c", "write 0 4k", str(image))
    assert write.returncode == 1
    assert f"qemu-io: can't open device {image}: {WRITE}" in write.stderr
    read_only = run(require_tool("qemu-io"), "-r", "-c", "read 0 4k", str(image))
    assert SHARED in read_only.stderr
    # Force-share readers are let in, as with QEMU.
    assert run(require_tool("qemu-img"), "info", "-U", str(image)).returncode == 0
    # Deleting the node gives the locks back.
    assert c.cmd("blockdev-del", {"node-name": "disk"}) == {"return": {}}
    assert held_bytes(image) == set()
    assert run(require_tool("qemu-io"), "-c", "write 0 4k", str(image)).returncode == 0


def test_qmpd_read_only_holder_lets_readers_in(qmpd: QmpdProcess, image: Path) -> None:
    c = qmpd.client()
    c.negotiate()
    assert add_qcow2(c, image, **{"read-only": True}) == {"return": {}}
    assert run(require_tool("qemu-img"), "info", str(image)).returncode == 0
    write = run(require_tool("qemu-io"), "-c", "write 0 4k", str(image))
    assert f"qemu-io: can't open device {image}: {WRITE}" in write.stderr


def test_read_only_force_share_blocks_nobody(qmpd: QmpdProcess, image: Path) -> None:
    c = qmpd.client()
    c.negotiate()
    assert add_qcow2(c, image, **{"read-only": True, "force-share": True}) == {"return": {}}
    write = run(require_tool("qemu-io"), "-c", "write -P 7 0 4k", str(image))
    assert write.returncode == 0, write.stderr


def test_raw_without_users_takes_no_lock(qmpd: QmpdProcess, tmp_path: Path) -> None:
    path = tmp_path / "disk.raw"
    path.write_bytes(bytes(1 << 20))
    c = qmpd.client()
    c.negotiate()
    c.cmd("blockdev-add", {"driver": "raw", "node-name": "r",
                           "file": {"driver": "file", "filename": str(path)}})
    assert held_bytes(path) == set()
    assert run(require_tool("qemu-io"), "-f", "raw", "-c", "write 0 4k", str(path)).returncode == 0


@pytest.fixture
def qsd_holder(tmp_path: Path, image: Path) -> Any:
    """qemu-storage-daemon holding the image read-write."""
    qsd = require_tool("qemu-storage-daemon")
    proc = subprocess.Popen(
        [qsd, "--blockdev", f"driver=file,node-name=f,filename={image}",
         "--blockdev", "driver=qcow2,node-name=q,file=f"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    deadline = time.monotonic() + 10
    while 101 not in held_bytes(image):
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        assert time.monotonic() < deadline, "qemu-storage-daemon did not take its locks"
        time.sleep(0.02)
    yield proc
    proc.terminate()
    proc.wait(10)


def test_qemu_holder_refuses_qmpd(qmpd: QmpdProcess, image: Path, qsd_holder: Any) -> None:
    c = qmpd.client()
    c.negotiate()
    assert add_qcow2(c, image)["error"] == {"class": "GenericError", "desc": WRITE}
    assert add_qcow2(c, image, **{"read-only": True})["error"]["desc"] == SHARED
    # A failed add leaves nothing behind, and force-share still reads.
    assert c.cmd("query-named-block-nodes") == {"return": []}
    assert add_qcow2(c, image, **{"read-only": True, "force-share": True}) == {"return": {}}


def test_qmpd_holder_refuses_a_second_qemu(qmpd: QmpdProcess, image: Path) -> None:
    c = qmpd.client()
    c.negotiate()
    assert add_qcow2(c, image) == {"return": {}}
    qsd = run(require_tool("qemu-storage-daemon"),
              "--blockdev", f"driver=file,node-name=f,filename={image}",
              "--blockdev", "driver=qcow2,node-name=q,file=f")
    assert qsd.returncode == 1
    assert f"--blockdev driver=qcow2,node-name=q,file=f: {WRITE}" in qsd.stderr


def test_two_nodes_on_one_file_conflict_inside_qmpd(qmpd: QmpdProcess, image: Path) -> None:
    c = qmpd.client()
    c.negotiate()
    assert add_qcow2(c, image) == {"return": {}}
    second = c.cmd("blockdev-add", {
        "driver": "qcow2", "node-name": "again",
        "file": {"driver": "file", "filename": str(image)},
    })
    assert second["error"]["desc"] == WRITE


def lock_lines(path: Path) -> list[tuple[str, str, int, int]]:
    """/proc/locks lines on ``path`` as (class, type, first byte, last byte), sorted."""
    st = os.stat(path)
    wanted = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    lines = []
    with open("/proc/locks") as f:
        for line in f:
            fields = line.split()
            if wanted in line and "->" not in fields:
                lines.append((fields[1], fields[3], int(fields[-2]), int(fields[-1])))
    return sorted(lines)


@pytest.mark.parametrize("read_only", [False, True])
def test_proc_locks_show_what_qemu_shows(qmpd: QmpdProcess, image: Path,
                                         read_only: bool) -> None:
    """qmpd takes its lock bytes in runs, QEMU one by one: the kernel's view is the same."""
    qsd = require_tool("qemu-storage-daemon")
    ro = ",read-only=on" if read_only else ""
    proc = subprocess.Popen(
        [qsd, "--blockdev", f"driver=file,node-name=f,filename={image}{ro}",
         "--blockdev", f"driver=qcow2,node-name=q,file=f{ro}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    try:
        deadline = time.monotonic() + 10
        while 100 not in held_bytes(image):
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            assert time.monotonic() < deadline, "qemu-storage-daemon did not take its locks"
            time.sleep(0.02)
        time.sleep(0.1)  # every byte taken
        qemu = lock_lines(image)
    finally:
        proc.terminate()
        proc.wait(10)
    assert lock_lines(image) == []
    c = qmpd.client()
    c.negotiate()
    assert add_qcow2(c, image, **({"read-only": True} if read_only else {})) == {"return": {}}
    assert lock_lines(image) == qemu
    assert qemu[0][:2] == ("OFDLCK", "READ")


def _graph(name: str, images: list[Path]) -> list[dict[str, Any]]:
    """blockdev-add arguments for the graphs the source inactivates."""
    if name == "pair":  # qcow2 over its file: the file settles with its parent
        return [{"driver": "qcow2", "node-name": "q",
                 "file": {"driver": "file", "filename": str(images[0])}}]
    if name == "chain":  # a backing node has both a parent and a child
        return [{"driver": "qcow2", "node-name": "base",
                 "file": {"driver": "file", "filename": str(images[1])}},
                {"driver": "qcow2", "node-name": "top", "backing": "base",
                 "file": {"driver": "file", "filename": str(images[0])}}]
    # one file node under two (read-only) qcow2 parents: it goes last
    return [{"driver": "file", "node-name": "f", "filename": str(images[0]),
             "read-only": True},
            {"driver": "qcow2", "node-name": "q0", "file": "f", "read-only": True},
            {"driver": "qcow2", "node-name": "q1", "file": "f", "read-only": True}]


def _inactivated_source(client: Any, graph: list[dict[str, Any]], stream: Path,
                        images: list[Path]) -> list[list[tuple[str, str, int, int]]]:
    """Add ``graph``, migrate it away (to a file), return the images' lock lines."""
    from tests.migration_data.capture import wait_migration

    for args in graph:
        assert client.cmd("blockdev-add", args) == {"return": {}}
    before = [lock_lines(image) for image in images]
    assert client.cmd("migrate", {"uri": f"exec:cat > {stream}"}) == {"return": {}}
    assert wait_migration(client)["status"] == "completed"
    after = [lock_lines(image) for image in images]
    assert after != before or graph[0].get("read-only")  # the write bytes went
    return after


@pytest.mark.parametrize("graph", ["pair", "chain", "shared"])
def test_proc_locks_after_the_handover_show_what_qemu_shows(
    qmpd: QmpdProcess, tmp_path: Path, graph: str
) -> None:
    """A source that has inactivated its nodes leaves the lock bytes a QEMU 7.2
    source leaves, whatever way each node took through the inactivation."""
    from tests.migration_data.capture import Qemu

    qemu_img = require_tool("qemu-img")
    require_tool("qemu-system-x86_64")
    images = [tmp_path / "a.qcow2", tmp_path / "b.qcow2"]
    for image in images:
        run(qemu_img, "create", "-q", "-f", "qcow2", str(image), "16M")
    (tmp_path / "qemu").mkdir()
    src = Qemu(tmp_path / "qemu")
    try:
        qemu = _inactivated_source(src.qmp, _graph(graph, images), tmp_path / "qemu.mig",
                                   images)
    finally:
        src.quit()
    assert all(lock_lines(image) == [] for image in images)
    c = qmpd.client()
    c.negotiate()
    ours = _inactivated_source(c, _graph(graph, images), tmp_path / "qmpd.mig", images)
    assert ours == qemu
    assert qemu[0] and qemu[0][0][:2] == ("OFDLCK", "READ")  # consistent read is kept
