"""Many clients with huge unfinished messages cannot pin unbounded memory."""

from __future__ import annotations

import fcntl
import select
import socket
import struct
import termios
import time
import urllib.request
from pathlib import Path
from typing import Any

from tests.conftest import QmpdProcess, RawClient

CLIENTS = 200
MESSAGE = 1 << 20  # what each client leaves unfinished
TOTAL = 16 << 20  # --max-qmp-input-total
#: RSS growth allowed: the cap plus allocator slack, far below CLIENTS * MESSAGE.
RSS_GROWTH_BOUND = 96 << 20
OVER = "JSON token size limit exceeded"


def vm_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def unread_by_peer(sock: socket.socket) -> int:
    """Bytes sent on a UNIX stream socket that the daemon has not read yet."""
    raw = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, struct.pack("i", 0))
    return int(struct.unpack("i", raw)[0])


def wait_all_read(clients: list[RawClient]) -> None:
    deadline = time.monotonic() + 60
    pending = list(clients)
    while pending:
        pending = [c for c in pending if unread_by_peer(c.sock)]
        assert time.monotonic() < deadline, f"{len(pending)} clients' input never read"
        time.sleep(0.02)


def has_reply(c: RawClient) -> bool:
    return bool(c.buf) or bool(select.select([c.sock], [], [], 0)[0])


def close_and_wait(c: RawClient) -> list[bytes]:
    """Half-close; the daemon's EOF comes only after it dropped the connection."""
    c.sock.shutdown(socket.SHUT_WR)
    data = bytearray(c.buf)
    while chunk := c.sock.recv(1 << 16):
        data += chunk
    c.close()
    return bytes(data).split(b"\r\n")[:-1]


def metric(qmpd: QmpdProcess, name: str) -> float:
    with urllib.request.urlopen(qmpd.http_url() + "/metrics", timeout=10) as resp:
        for line in resp.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    raise AssertionError(f"no {name} in /metrics")


def big_request(size: int) -> bytes:
    return (
        b'{"execute": "query-version", "id": "big", "arguments": {"pad": "'
        + b"a" * size + b'"}}\n'
    )


def test_unfinished_messages_share_a_bounded_budget(qmpd_factory: Any) -> None:
    qmpd: QmpdProcess = qmpd_factory(
        "--max-qmp-input-total", str(TOTAL), "--http", "127.0.0.1:0", "--log-level", "info"
    )
    pid = qmpd.proc.pid
    probe = qmpd.client()
    probe.negotiate()
    assert "return" in probe.cmd("query-version")
    before = vm_rss(pid)

    head = b'{"execute": "query-version", "arguments": {"pad": "'
    clients = []
    for _ in range(CLIENTS):
        c = qmpd.client()
        c.send(head + b"a" * (MESSAGE - len(head)))
        clients.append(c)
    wait_all_read(clients)
    growth = vm_rss(pid) - before
    assert growth < RSS_GROWTH_BOUND, f"RSS grew by {growth >> 20} MiB"

    # Only as many messages as fit in the total are held; the rest were refused.
    holders = [c for c in clients if not has_reply(c)]
    assert len(holders) <= TOTAL // (MESSAGE - len(head))
    for c in clients:
        if c not in holders:
            assert c.recv()["error"] == {"class": "GenericError", "desc": OVER}

    assert 0 < metric(qmpd, "qmpd_qmp_input_bytes") <= TOTAL
    assert metric(qmpd, "qmpd_qmp_input_refusals_total") >= CLIENTS - len(holders)

    # Other clients are still served, and the full budget refuses big input.
    fresh = qmpd.client()
    fresh.negotiate()
    assert fresh.cmd("query-version")["return"]["qemu"]["major"] == 7
    fresh.send(big_request(TOTAL * 3 // 4))
    assert fresh.recv()["error"]["desc"] == OVER
    close_and_wait(fresh)

    # Closed connections give their share back: a big legal message fits now.
    for c in clients:
        close_and_wait(c)
    assert metric(qmpd, "qmpd_qmp_input_bytes") == 0
    after = qmpd.client()
    after.send(big_request(TOTAL * 3 // 4))
    reply = after.recv()
    assert reply["id"] == "big" and "error" in reply  # parsed: pad is no argument
    assert reply["error"]["desc"] != OVER
    after.close()
    # Answered requests, synchronous or not, hold nothing on open connections.
    assert "return" in probe.cmd("query-version")
    assert probe.cmd("blockdev-add", {"driver": "null-co", "node-name": "n0"}) == {"return": {}}
    assert metric(qmpd, "qmpd_qmp_input_bytes") == 0
