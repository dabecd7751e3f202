"""UNIX socket files: they appear only when listening, and never trample another's.

The rules hold for QMP monitors, the NBD server and incoming migration
(qmpd/net.py).  QEMU 7.2 unlinks any file at the path; qmpd refuses with
QEMU's bind-failure text and keeps a file that is not a dead socket.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import QmpdProcess, RawClient, require_tool
from tests.integration.migration_helpers import Cluster, need_qemu, short_dir, start

IN_USE = "Address already in use"


def listen_at(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    sock.listen(64)  # liveness probes queue up here, never accepted
    return sock


def dead_socket_file(path: Path) -> None:
    """A socket file nobody listens on, as a killed process leaves it."""
    listen_at(path).close()
    assert path.exists()


def test_fifty_daemons_accept_the_moment_their_socket_appears(tmp_path: Path) -> None:
    count = 50
    paths = [tmp_path / f"d{i}.sock" for i in range(count)]
    results: dict[int, str] = {}

    def connect_asap(i: int) -> None:
        deadline = time.monotonic() + 120
        while not paths[i].exists():
            if time.monotonic() > deadline:
                results[i] = "never appeared"
                return
            time.sleep(0.0005)
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(60)
                s.connect(str(paths[i]))
                results[i] = "ok" if s.recv(8) == b'{"QMP": ' else "no greeting"
        except OSError as exc:
            results[i] = f"refused: {exc}"

    watchers = [threading.Thread(target=connect_asap, args=(i,)) for i in range(count)]
    for t in watchers:
        t.start()
    procs = [subprocess.Popen([sys.executable, "-m", "qmpd", "--qmp", f"unix:{p}"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
             for p in paths]
    try:
        for t in watchers:
            t.join(180)
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(30)
    assert results == {i: "ok" for i in range(count)}
    assert not any(p.exists() for p in paths)


def test_live_qmp_socket_is_never_taken(qmpd: QmpdProcess) -> None:
    second = subprocess.run([sys.executable, "-m", "qmpd", "--qmp", f"unix:{qmpd.sock}"],
                            capture_output=True, text=True, timeout=30)
    assert second.returncode == 1
    assert f"Failed to bind socket to {qmpd.sock}: {IN_USE}" in second.stderr
    # The first daemon still owns its socket file and answers on it.
    c = qmpd.client()
    c.negotiate()
    assert c.cmd("query-status")["return"]["status"] == "running"


def test_dead_socket_file_is_replaced_and_other_files_kept(qmpd_factory: Any,
                                                           tmp_path: Path) -> None:
    stale = tmp_path / "stale.sock"
    dead_socket_file(stale)
    proc = qmpd_factory("--qmp", f"unix:{stale}", default_qmp=False)
    RawClient(str(stale)).negotiate()
    regular = tmp_path / "regular"
    regular.write_text("keep me")
    refused = subprocess.run([sys.executable, "-m", "qmpd", "--qmp", f"unix:{regular}"],
                             capture_output=True, text=True, timeout=30)
    assert refused.returncode == 1 and IN_USE in refused.stderr
    assert regular.read_text() == "keep me"
    proc.stop()
    assert not stale.exists()


def test_exit_leaves_a_path_rebound_by_someone_else(qmpd: QmpdProcess, tmp_path: Path) -> None:
    os.unlink(qmpd.sock)
    other = listen_at(Path(qmpd.sock))
    try:
        qmpd.stop()
        assert Path(qmpd.sock).exists()
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(qmpd.sock)  # still the other listener's
    finally:
        other.close()


def test_nbd_and_incoming_migration_refuse_a_live_path(qmpd_factory: Any,
                                                       tmp_path: Path) -> None:
    live = tmp_path / "live.sock"
    holder = listen_at(live)
    try:
        proc = qmpd_factory()
        c = proc.client()
        c.negotiate()
        reply = c.cmd("nbd-server-start", {"addr": {"type": "unix", "data": {"path": str(live)}}})
        assert reply["error"]["desc"] == f"Failed to bind socket to {live}: {IN_USE}"
        (tmp_path / "p2").mkdir()
        proc2 = QmpdProcess(tmp_path / "p2", "--incoming", "defer")
        try:
            c2 = proc2.client()
            c2.negotiate()
            reply = c2.cmd("migrate-incoming", {"uri": f"unix:{live}"})
            assert reply["error"]["desc"] == f"Failed to bind socket to {live}: {IN_USE}"
        finally:
            proc2.stop()
        assert live.exists()
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(5)
            s.connect(str(live))
        # A dead file at the NBD path is replaced, and removed at nbd-server-stop.
        dead = tmp_path / "dead.sock"
        dead_socket_file(dead)
        assert c.cmd("nbd-server-start",
                     {"addr": {"type": "unix", "data": {"path": str(dead)}}}) == {"return": {}}
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(str(dead))
        assert c.cmd("nbd-server-stop") == {"return": {}}
        assert not dead.exists()
    finally:
        holder.close()


def refused_text(path: Path) -> str:
    """QEMU's bind-failure text; QEMU 7.2 itself unlinks whatever is at the path."""
    return f"Failed to bind socket to {path}: {IN_USE}"


def run_qmpd(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "qmpd", *args],
                          capture_output=True, text=True, timeout=30)


def test_regular_file_is_never_removed_by_a_monitor(tmp_path: Path) -> None:
    regular = tmp_path / "regular"
    regular.write_text("keep me")
    for args in (["--qmp", f"unix:{regular}"],
                 ["--chardev", f"socket,id=c,path={regular},server=on,wait=off",
                  "--monitor", "c"]):
        refused = run_qmpd(*args)
        assert refused.returncode == 1
        assert refused_text(regular) in refused.stderr, refused.stderr
        assert regular.read_text() == "keep me"


def test_regular_file_is_never_removed_by_the_nbd_server(qmpd: QmpdProcess,
                                                         tmp_path: Path) -> None:
    regular = tmp_path / "regular"
    regular.write_text("keep me")
    c = qmpd.client()
    c.negotiate()
    for addr in ({"type": "unix", "data": {"path": str(regular)}},
                 {"type": "unix", "path": str(regular)}):
        reply = c.cmd("nbd-server-start", {"addr": addr})
        assert reply["error"]["desc"] == refused_text(regular)
        assert regular.read_text() == "keep me"
    refused = run_qmpd("--nbd-server", f"addr.type=unix,addr.path={regular}")
    assert refused.returncode == 1
    assert refused_text(regular) in refused.stderr, refused.stderr
    assert regular.read_text() == "keep me"


def test_incoming_migration_keeps_a_regular_file_and_replaces_a_dead_socket(
        qmpd_factory: Any, tmp_path: Path) -> None:
    regular = tmp_path / "regular"
    regular.write_text("keep me")
    proc = qmpd_factory("--incoming", "defer")
    c = proc.client()
    c.negotiate()
    reply = c.cmd("migrate-incoming", {"uri": f"unix:{regular}"})
    assert reply["error"]["desc"] == refused_text(regular)
    assert regular.read_text() == "keep me"
    dead = tmp_path / "dead.sock"
    dead_socket_file(dead)
    assert c.cmd("migrate-incoming", {"uri": f"unix:{dead}"}) == {"return": {}}
    assert c.cmd("query-migrate")["return"]["socket-address"] == [
        {"path": str(dead), "type": "unix"}]
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(5)
        s.connect(str(dead))  # ours now: it accepts


@pytest.mark.qemu
def test_incoming_migration_errors_like_qemu() -> None:
    """QEMU 7.2's texts for a busy port, an unknown host and a path too long."""
    need_qemu()
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    port = busy.getsockname()[1]
    long_path = f"/tmp/qn{os.getpid()}-" + "z" * 105
    uris = [f"tcp:127.0.0.1:{port}", "tcp:nosuchhost.invalid:4444", f"unix:{long_path}"]
    seen: dict[str, list[str]] = {}
    with short_dir() as path:
        cluster = Cluster(path)
        try:
            peers = [cluster.spawn(kind, kind, incoming="defer") for kind in ("qemu", "qmpd")]
            start(*peers)
            for peer in peers:
                seen[peer.kind] = [peer.err("migrate-incoming", {"uri": uri}) for uri in uris]
        finally:
            cluster.close()
            busy.close()
    assert seen["qmpd"] == seen["qemu"]
    assert seen["qmpd"][0] == f"Failed to find an available port: {IN_USE}"
    assert seen["qmpd"][1].startswith("address resolution failed for nosuchhost.invalid:4444: ")
    assert seen["qmpd"][2] == f"UNIX socket path '{long_path}' is too long"
    assert not os.path.exists(long_path)


@pytest.mark.parametrize("impl", ["qsd", "qmpd"])
def test_monitor_refusals_in_qemu_words(impl: str, tmp_path: Path) -> None:
    """A path too long for sun_path and a busy port: QSD's reasons (qmpd listened on the
    long path by a hard link nobody could connect to)."""
    argv = ([require_tool("qemu-storage-daemon")] if impl == "qsd"
            else [sys.executable, "-m", "qmpd"])
    long_path = f"/tmp/qn{os.getpid()}-" + "y" * 105
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    port = busy.getsockname()[1]
    cases = [
        (f"socket,id=c,path={long_path},server=on,wait=off",
         f"UNIX socket path '{long_path}' is too long"),
        (f"socket,id=c,host=127.0.0.1,port={port},server=on,wait=off",
         f"Failed to find an available port: {IN_USE}"),
    ]
    try:
        for chardev, reason in cases:
            refused = subprocess.run([*argv, "--chardev", chardev, "--monitor", "c"],
                                     capture_output=True, text=True, timeout=30, cwd=tmp_path)
            assert refused.returncode == 1
            assert reason in refused.stderr, refused.stderr
            assert not os.path.exists(long_path)
    finally:
        busy.close()
