"""Hostile and careless clients never stall the daemon or other clients."""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import QmpdProcess, RawClient


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


#: Longer than any answer takes on a loaded machine, far shorter than a stalled
#: client waits (for ever: the other client's backlog never clears).
STALL = 5.0


def timed_query(client: RawClient) -> float:
    start = time.monotonic()
    assert client.cmd("query-status")["return"]["status"] == "running"
    return time.monotonic() - start


def test_client_that_never_reads_is_paused_not_buffered(qmpd: QmpdProcess) -> None:
    lazy = qmpd.client()
    lazy.negotiate()
    other = qmpd.client()
    other.negotiate()
    before = rss_kib(qmpd.proc.pid)
    request = b'{"execute": "query-qmp-schema"}\n' * 2000
    lazy.sock.setblocking(False)
    sent = 0
    deadline = time.monotonic() + 5
    # Keep pushing requests; the daemon stops reading once this client's
    # replies back up, so the socket fills and the sends stop succeeding.
    while time.monotonic() < deadline:
        try:
            sent += lazy.sock.send(request)
        except BlockingIOError:
            time.sleep(0.01)
        assert timed_query(other) < STALL
    growth = rss_kib(qmpd.proc.pid) - before
    assert sent > 0
    assert growth < 32 * 1024, f"daemon grew by {growth} KiB for a client that does not read"
    lazy.close()
    assert timed_query(other) < STALL


def test_hundred_megabytes_without_closing(qmpd: QmpdProcess) -> None:
    flood = qmpd.client()
    flood.negotiate()
    other = qmpd.client()
    other.negotiate()
    errors: list[BaseException] = []

    def pump() -> None:
        try:
            flood.send(b'{"execute": "query-status", "id": "')
            chunk = b" " * (1 << 20)
            for _ in range(100):
                flood.send(chunk)
            flood.send(b'\n{"execute": "query-status", "id": "after"}\n')
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    thread = threading.Thread(target=pump)
    thread.start()
    while thread.is_alive():
        assert timed_query(other) < STALL
        time.sleep(0.05)
    thread.join()
    assert not errors
    assert flood.recv() == {
        "error": {"class": "GenericError", "desc": "JSON token size limit exceeded"}
    }
    reply = flood.recv()
    assert reply["id"] == "after" and reply["return"]["status"] == "running"
    assert rss_kib(qmpd.proc.pid) < 400 * 1024


def test_event_backlog_disconnects_only_the_lazy_client(qmpd_factory: Any) -> None:
    proc: QmpdProcess = qmpd_factory("--max-client-output", "65536", "--http", "127.0.0.1:0",
                                     "--log-level", "info")
    lazy = proc.client()
    lazy.negotiate()
    lazy.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    busy = proc.client()
    busy.negotiate()
    batch = b'{"execute": "stop"}{"execute": "cont"}' * 200
    for _ in range(20):
        busy.send(batch)
        for _ in range(400):
            msg = busy.recv()
            while "event" in msg:
                msg = busy.recv()
            assert msg == {"return": {}}
    # The lazy client was cut off; the daemon and the busy client carry on.
    lazy.sock.settimeout(5)
    received = b""
    try:
        while True:
            chunk = lazy.sock.recv(1 << 20)
            if not chunk:
                break
            received += chunk
    except ConnectionResetError:
        pass
    assert len(received) < 4 * 1024 * 1024
    assert timed_query(busy) < 1.0
    with urllib.request.urlopen(proc.http_url() + "/metrics", timeout=5) as resp:
        assert b"qmpd_qmp_output_limit_disconnects_total 1.0" in resp.read()


def test_many_concurrent_clients(qmpd: QmpdProcess) -> None:
    clients = [qmpd.client() for _ in range(200)]
    for c in clients:
        c.send('{"execute": "qmp_capabilities"}{"execute": "query-status", "id": 1}')
    for c in clients:
        assert c.recv() == {"return": {}}
        assert c.recv()["id"] == 1
        c.close()


def test_garbage_connection_does_not_disturb_others(qmpd: QmpdProcess) -> None:
    other = qmpd.client()
    other.negotiate()
    junk = qmpd.client()
    junk.send(os.urandom(200_000))
    junk.send(b'\x04{"execute": "qmp_capabilities", "id": "ok"}')
    while True:
        msg = junk.recv()
        if msg.get("id") == "ok":
            break
        assert msg["error"]["class"] in ("GenericError", "CommandNotFound")
    assert msg == {"return": {}, "id": "ok"}
    assert timed_query(other) < STALL
    json.dumps(msg)


def test_fifo_never_blocks_an_open(qmpd: QmpdProcess, tmp_path: Any) -> None:
    """A FIFO (on tmpfs, where opens run on the event loop) is refused at once
    with QEMU's text; QEMU 7.2 blocks its main loop on the read-only open."""
    shm = Path("/dev/shm")
    if not shm.is_dir():
        pytest.skip("no /dev/shm")
    fifo = shm / f"qmpd-fifo-{os.getpid()}-{time.monotonic_ns()}"
    os.mkfifo(fifo)
    try:
        client = qmpd.client()
        client.negotiate()
        for read_only in (True, False):
            start = time.monotonic()
            reply = client.cmd("blockdev-add", {"driver": "file", "node-name": "f",
                                                "filename": str(fifo), "read-only": read_only})
            assert time.monotonic() - start < STALL
            assert reply["error"]["desc"] == (
                f"'file' driver requires '{fifo}' to be a regular file"), reply
        other = qmpd.client()
        other.negotiate()
        assert timed_query(other) < STALL
    finally:
        fifo.unlink()
