"""GET /api/status: validated against schema/http/status.json while two real
daemons go through start, blockdev-add, an export with a client, a job, a
migration and shutdown; and it only ever reads."""

from __future__ import annotations

import asyncio
import json
import threading
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from qmpd.nbd.client import NbdClient
from tests.integration.migration_helpers import (
    Cluster,
    create_qcow2,
    http_peer,
    image_check,
    start,
)

SCHEMA = json.loads(
    (Path(__file__).resolve().parents[2] / "schema" / "http" / "status.json").read_text())
VALIDATOR = jsonschema.Draft202012Validator(SCHEMA)



def status(port: int) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/status", timeout=10) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("application/json")
        body: dict[str, Any] = json.loads(resp.read())
    VALIDATOR.validate(body)
    return body


def nodes(body: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {n["node-name"]: n for n in body["nodes"]}


#: QEMU's lock bytes: 100 + bit while holding a permission, 200 + bit while not sharing it.
PERM_BIT = {"consistent read": 0, "write": 1, "write unchanged": 2, "resize": 3}


def assert_locks_match(locks: dict[str, list[str]], kernel: set[int]) -> None:
    """The locks /api/status names are the bytes the kernel says the process holds."""
    named = {100 + PERM_BIT[p] for p in locks["held"]} | {200 + PERM_BIT[p] for p in locks["unshared"]}
    assert named == kernel, (locks, sorted(kernel))



def test_status_follows_the_daemon_and_fits_its_schema(mig: Cluster) -> None:
    image = create_qcow2(mig.dir / "disk.qcow2", "64M")
    src, sport = http_peer(mig, "src")
    dst, dport = http_peer(mig, "dst", incoming="defer")
    start(src, dst)

    first = status(sport)
    assert first["run-state"] == "running" and first["ready"] is True
    assert first["nodes"] == [] and first["exports"] == [] and first["jobs"] == []
    assert first["migration"] == {}
    incoming = status(dport)
    assert incoming["run-state"] == "inmigrate" and incoming["ready"] is False
    assert incoming["readiness-problems"]

    src.add_disk(image)
    body = nodes(status(sport))
    assert body["disk"]["driver"] == "qcow2" and body["disk"]["active"] is True
    assert body["disk"]["size"] == 64 << 20 and body["disk"]["read-only"] is False
    assert body["disk"]["filename"] == str(image)
    (child,) = body["disk"]["children"]
    assert child["role"] == "file" and body[child["node-name"]]["driver"] == "file"
    # The locks are the ones the kernel shows for the image, by permission.
    file_node = body[child["node-name"]]
    assert body["disk"]["locks"] is None  # qcow2 itself takes none: its file does
    assert_locks_match(file_node["locks"], src.lock_bytes(image))
    assert "write" in file_node["locks"]["held"]
    # qcow2's metadata caches: looked up while opening, so some hits and misses.
    assert set(body["disk"]["cache"]) == {"l2", "refcount"}
    assert file_node["cache"] == {}
    assert body["disk"]["activation-ms"] is None  # opened active, never activated
    assert first["handover"] is None

    # An export with a client connected to it.
    nbd_sock = mig.dir / "nbd.sock"
    src.ok("nbd-server-start", {"addr": {"type": "unix", "data": {"path": str(nbd_sock)}}})
    src.ok("block-export-add", {"type": "nbd", "id": "e0", "node-name": "disk", "name": "d0"})
    assert status(sport)["exports"] == [{"id": "e0", "type": "nbd", "node-name": "disk",
                                         "shutting-down": False, "name": "d0", "clients": []}]
    connected, leave = threading.Event(), threading.Event()

    async def hold() -> None:
        async with await NbdClient.connect(f"nbd+unix:///d0?socket={nbd_sock}") as c:
            await c.read(0, 512)
            connected.set()
            while not leave.is_set():
                await asyncio.sleep(0.01)

    holder = threading.Thread(target=asyncio.run, args=(hold(),))
    holder.start()
    try:
        assert connected.wait(20)
        (export,) = status(sport)["exports"]
        assert len(export["clients"]) == 1
    finally:
        leave.set()
        holder.join(20)
    src.ok("block-export-del", {"id": "e0"})
    src.ok("nbd-server-stop")

    # A job, kept after it concluded.
    src.ok("blockdev-create", {"job-id": "c0", "options": {
        "driver": "file", "filename": str(mig.dir / "new.raw"), "size": 1 << 20}})
    src.qmp.wait_event("JOB_STATUS_CHANGE", "concluded")
    (job,) = status(sport)["jobs"]
    assert job["id"] == "c0" and job["type"] == "create" and job["status"] == "concluded"
    assert job["current-progress"] == job["total-progress"]
    src.ok("job-dismiss", {"id": "c0"})

    # A migration: the source ends inactive, the destination active.
    dst.add_disk(image)
    waiting = status(dport)
    assert nodes(waiting)["disk"]["active"] is False
    dst_file = nodes(waiting)["disk"]["children"][0]["node-name"]
    assert nodes(waiting)[dst_file]["locks"] == {"held": [], "unshared": []}
    uri = f"unix:{mig.dir / 'mig.sock'}"
    dst.ok("migrate-incoming", {"uri": uri})
    listening = status(dport)["handover"]
    assert listening["role"] == "destination" and listening["steps-done"] == 0
    # Paused before the switchover: part of the way, and the page can say where.
    src.caps(pause_before_switchover=True)
    src.ok("migrate", {"uri": uri})
    assert src.wait_migration(states=("pre-switchover",))["status"] == "pre-switchover"
    paused = status(sport)["handover"]
    assert paused["role"] == "source" and paused["status"] == "pre-switchover"
    assert 0 < paused["steps-done"] < paused["steps-total"]
    assert "downtime" not in paused
    src.ok("migrate-continue", {"state": "pre-switchover"})
    assert src.wait_migration()["status"] == "completed"
    assert dst.wait_migration()["status"] == "completed"
    after = status(sport)
    assert after["migration"]["status"] == "completed" and after["run-state"] == "postmigrate"
    assert nodes(after)["disk"]["active"] is False
    # The inactive source gave the write lock up (what it kept, the kernel agrees with).
    src_locks = nodes(after)[child["node-name"]]["locks"]
    assert "write" not in src_locks["held"]
    assert_locks_match(src_locks, src.lock_bytes(image))
    done = after["handover"]
    assert done["steps-done"] == done["steps-total"] and done["step"] == "completed"
    assert done["downtime"] == after["migration"]["downtime"]
    assert done["total-time"] == after["migration"]["total-time"] >= done["downtime"]
    landed = status(dport)
    assert landed["run-state"] == "running" and nodes(landed)["disk"]["active"] is True
    arrived = landed["handover"]
    assert arrived["role"] == "destination" and arrived["step"] == "completed"
    assert arrived["steps-done"] == arrived["steps-total"] and arrived["bytes"] > 0
    assert arrived["activation-time"] >= 0
    # Each node's own activation time, and the locks it took with it.
    for name in ("disk", dst_file):
        assert nodes(landed)[name]["activation-ms"] >= 0
    assert_locks_match(nodes(landed)[dst_file]["locks"], dst.lock_bytes(image))

    # Read-only: no endpoint takes another method, and nothing moved.
    for path in ("/api/status", "/api/events", "/", "/metrics", "/ready", "/health"):
        for method in ("POST", "PUT", "PATCH", "DELETE"):
            req = urllib.request.Request(f"http://127.0.0.1:{sport}{path}", data=b"{}",
                                         method=method)
            with pytest.raises(urllib.error.HTTPError) as exc:
                urllib.request.urlopen(req, timeout=10)
            assert exc.value.code == 405, (method, path)
    assert status(sport)["nodes"] == after["nodes"]

    for peer in (src, dst):
        peer.quit()
    image_check(image)


def test_an_open_event_stream_does_not_hold_up_shutdown(mig: Cluster) -> None:
    peer, port = http_peer(mig, "streamed")
    start(peer)
    stream = urllib.request.urlopen(f"http://127.0.0.1:{port}/api/events", timeout=10)
    try:
        first = stream.readline()
        assert first.startswith(b"data: {")
        VALIDATOR.validate(json.loads(first[len(b"data: "):]))
        peer.add_disk(create_qcow2(mig.dir / "s.qcow2", "1M"))
        # The node arrives on the stream, within the next statuses.
        for _ in range(20):
            line = stream.readline()
            if line.startswith(b"data: "):
                VALIDATOR.validate(json.loads(line[len(b"data: "):]))
            if line.startswith(b"data: ") and b'"node-name":"disk"' in line:
                break
        else:
            raise AssertionError("the new node never came down the stream")
        peer.qmp.cmd("quit")
        # aiohttp would wait up to a minute for a handler still streaming.
        assert peer.wait(10) == 0
        # Every status down to the shutdown fits the schema, and the stream ends.
        rest = stream.read()
        for line in rest.splitlines():
            if line.startswith(b"data: "):
                VALIDATOR.validate(json.loads(line[len(b"data: "):]))
    finally:
        stream.close()
