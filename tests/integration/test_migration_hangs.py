"""Migration must never hang holding the disks.

* ``migrate_cancel`` while the source waits for the return path's SHUT
  cancels: the source runs again with its nodes active (write lock held).
* An incoming stream whose global state the destination may not enter from
  ``inmigrate`` (``debug``, ``save-vm``, ``restore-vm``) fails the incoming
  migration, and the destination holds no lock on the image afterwards
  (``/proc/locks``), whether it exits or stays (``exit-on-error``).
"""

from __future__ import annotations

import socket
import subprocess
import threading
import time

import pytest

from qmpd.migration import stream
from tests.conftest import require_tool
from tests.integration.migration_helpers import (
    WRITE_LOCK,
    Cluster,
    create_qcow2,
    locks_in_proc_locks,
    start,
    wait_until,
)
from tests.migration_data.streams import build_stream

pytestmark = pytest.mark.qemu


class SilentDestination:
    """Reads a whole migration stream and never answers on the return path."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(path)
        self.server.listen(1)
        self.reader = stream.StreamReader({"return-path": True})
        self.complete = threading.Event()
        self.closed = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        conn, _ = self.server.accept()
        with conn:
            while True:
                data = conn.recv(65536)
                if not data:
                    break
                self.reader.feed(data)
                if self.reader.done:
                    self.complete.set()
        self.closed.set()

    def close(self) -> None:
        self.server.close()


def test_cancel_while_waiting_for_shut(mig: Cluster) -> None:
    image = create_qcow2(mig.dir / "disk.qcow2", "64M")
    src = mig("qmpd", "src")
    src.caps(events=True, **{"return-path": True})
    src.add_disk(image)
    assert src.qemu_io("disk", "write -P 0x5a 0 64k") == ""
    dst = SilentDestination(str(mig.dir / "mig.sock"))
    try:
        src.ok("migrate", {"uri": f"unix:{dst.path}"})
        assert dst.complete.wait(10), "the whole stream did not arrive"
        # The source has sent everything and waits for SHUT, its nodes inactive.
        wait_until(lambda: WRITE_LOCK not in src.lock_bytes(image), what="source inactive")
        time.sleep(0.1)  # let the source reach the wait (a cancel before it was fine already)
        assert src.migrate_info()["status"] == "active"
        assert src.status() == "finish-migrate"
        src.ok("migrate_cancel")
        assert src.wait_migration(timeout=10)["status"] == "cancelled"
        assert dst.closed.wait(10)
    finally:
        dst.close()
    assert src.status() == "running"
    assert WRITE_LOCK in src.lock_bytes(image)
    nodes = src.ok("query-named-block-nodes")
    assert all(n["active"] for n in nodes), nodes
    assert src.qemu_io("disk", "read -P 0x5a 0 64k") == ""
    assert src.qemu_io("disk", "write -P 0x5b 1M 64k") == ""
    assert src.qmp.names()[-2:] == ["RESUME", "MIGRATION:cancelled"]


def feed_stream(path: str, data: bytes) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(path)
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        sock.settimeout(10)
        while sock.recv(4096):
            pass


@pytest.mark.parametrize("runstate", ["debug", "save-vm", "restore-vm"])
def test_illegal_globalstate_fails_and_releases_the_image(mig: Cluster, runstate: str) -> None:
    image = create_qcow2(mig.dir / "disk.qcow2", "64M")
    dst = mig.spawn("qmpd", "dst", incoming="defer")
    stays = mig.spawn("qmpd", "stays", incoming="defer")
    start(dst, stays)
    reason = f"invalid runstate transition: 'inmigrate' -> '{runstate}'"
    for peer, exit_on_error in ((dst, True), (stays, False)):
        peer.add_disk(image)
        sock = str(mig.dir / f"{peer.name}.sock")
        peer.ok("migrate-incoming", {"uri": f"unix:{sock}", "exit-on-error": exit_on_error})
        feed_stream(sock, build_stream(runstate))
        if exit_on_error:
            assert peer.wait(10) == 1
            assert locks_in_proc_locks(image) == set()
        else:
            assert peer.wait_migration(timeout=10) == {"status": "failed", "error-desc": reason}
            assert peer.status() == "inmigrate"
            assert all(not n["active"] for n in peer.ok("query-named-block-nodes"))
            assert WRITE_LOCK not in peer.lock_bytes(image)
            assert WRITE_LOCK not in locks_in_proc_locks(image)
        assert f"qmpd: error: {reason}" in peer.stderr()


def test_cancel_after_the_destination_took_the_image(mig: Cluster) -> None:
    """If the destination already holds the image when the cancel comes, the source
    cannot re-activate: it stays stopped (never running without its disk), and
    cont activates and runs once the image is free again."""
    require_tool("qemu-io")
    image = create_qcow2(mig.dir / "disk.qcow2", "64M")
    src = mig("qmpd", "src")
    src.caps(events=True, **{"return-path": True})
    src.add_disk(image)
    dst = SilentDestination(str(mig.dir / "mig.sock"))
    holder: subprocess.Popen[bytes] | None = None
    try:
        src.ok("migrate", {"uri": f"unix:{dst.path}"})
        assert dst.complete.wait(10), "the whole stream did not arrive"
        wait_until(lambda: WRITE_LOCK not in src.lock_bytes(image), what="source inactive")
        # The "destination" activates: another process takes the write lock.
        holder = subprocess.Popen(["qemu-io", "-f", "qcow2", str(image)], stdin=subprocess.PIPE,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(lambda: WRITE_LOCK in locks_in_proc_locks(image), what="holder locked")
        src.ok("migrate_cancel")
        assert src.wait_migration(timeout=10)["status"] == "cancelled"
        assert src.status() == "postmigrate"
        assert WRITE_LOCK not in src.lock_bytes(image)
        assert 'Failed to get "write" lock' in src.err("cont")
    finally:
        dst.close()
        if holder is not None:
            assert holder.stdin is not None
            holder.stdin.close()
            holder.wait(10)
    src.ok("cont")
    assert src.status() == "running"
    assert WRITE_LOCK in src.lock_bytes(image)


def test_failed_stream_releases_nodes_activated_early(mig: Cluster) -> None:
    """A destination whose nodes cont activated early (nobody else held the image)
    gives the write lock back when its incoming migration fails."""
    image = create_qcow2(mig.dir / "disk.qcow2", "64M")
    dst = mig("qmpd", "dst", incoming="defer")
    dst.add_disk(image)
    dst.ok("cont")
    assert WRITE_LOCK in dst.lock_bytes(image)
    sock = str(mig.dir / "in.sock")
    dst.ok("migrate-incoming", {"uri": f"unix:{sock}", "exit-on-error": False})
    feed_stream(sock, b"not a migration stream at all")
    assert dst.wait_migration(timeout=10)["status"] == "failed"
    assert dst.status() == "inmigrate"
    assert all(not n["active"] for n in dst.ok("query-named-block-nodes"))
    assert WRITE_LOCK not in dst.lock_bytes(image)
    assert WRITE_LOCK not in locks_in_proc_locks(image)
