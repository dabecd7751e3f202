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
    assert nodes(status(dport))["disk"]["active"] is False
    uri = f"unix:{mig.dir / 'mig.sock'}"
    dst.ok("migrate-incoming", {"uri": uri})
    src.ok("migrate", {"uri": uri})
    assert src.wait_migration()["status"] == "completed"
    assert dst.wait_migration()["status"] == "completed"
    after = status(sport)
    assert after["migration"]["status"] == "completed" and after["run-state"] == "postmigrate"
    assert nodes(after)["disk"]["active"] is False
    landed = status(dport)
    assert landed["run-state"] == "running" and nodes(landed)["disk"]["active"] is True

    # Read-only: the endpoint takes no other method, and nothing moved.
    for method in ("POST", "PUT", "DELETE"):
        req = urllib.request.Request(f"http://127.0.0.1:{sport}/api/status", data=b"{}",
                                     method=method)
        with pytest.raises(urllib.error.HTTPError) as exc:
            urllib.request.urlopen(req, timeout=10)
        assert exc.value.code == 405
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
            if line.startswith(b"data: ") and b'"node-name":"disk"' in line:
                break
        else:
            raise AssertionError("the new node never came down the stream")
        peer.qmp.cmd("quit")
        # aiohttp would wait up to a minute for a handler still streaming.
        assert peer.wait(10) == 0
    finally:
        stream.close()
