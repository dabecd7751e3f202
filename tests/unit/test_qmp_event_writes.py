"""Events emitted outside a command go out together at the end of the
callback that emitted them, before any later reply (issue 10: the
migration source's downtime has no write to the client in it)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from qmpd.cli import parse_args
from qmpd.daemon import Daemon
from qmpd.net import UnixAddress
from qmpd.qmp.config import MonitorConfig


async def _lines(reader: asyncio.StreamReader, count: int) -> list[dict[str, Any]]:
    return [json.loads(await asyncio.wait_for(reader.readline(), 10)) for _ in range(count)]


async def test_events_of_one_callback_go_out_in_one_write_before_later_replies(
    tmp_path: Path,
) -> None:
    daemon = Daemon(parse_args(["--qmp", f"unix:{tmp_path}/unused.sock"]))
    server = daemon.qmp
    path = str(tmp_path / "qmp.sock")
    monitor = await server.add_monitor(MonitorConfig("m0", UnixAddress(path)))
    await monitor.serve()
    reader, writer = await asyncio.open_unix_connection(path)
    try:
        await _lines(reader, 1)  # greeting
        writer.write(b'{"execute": "qmp_capabilities"}\n')
        assert await _lines(reader, 1) == [{"return": {}}]
        (conn,) = monitor.connections
        assert conn.transport is not None
        writes: list[bytes] = []
        real_write = conn.transport.write

        def counting(data: bytes) -> None:
            writes.append(bytes(data))
            real_write(data)

        conn.transport.write = counting  # type: ignore[method-assign]
        # A migration's switchover: events from a task, no command running.
        server.events.emit("STOP")
        server.events.emit("MIGRATION_PASS", {"pass": 2})
        server.events.emit("MIGRATION", {"status": "completed"})
        assert writes == []  # nothing written inside the callback ...
        await asyncio.sleep(0)
        assert len(writes) == 1  # ... then all three at once, in order
        got = await _lines(reader, 3)
        assert [m["event"] for m in got] == ["STOP", "MIGRATION_PASS", "MIGRATION"]
        # An event still unwritten goes out before a reply that follows it.
        writes.clear()
        server.events.emit("RESUME")
        conn.data_received(b'{"execute": "query-status"}\n')
        got = await _lines(reader, 2)
        assert got[0]["event"] == "RESUME" and "return" in got[1]
        assert len(writes) == 2 and b"RESUME" in writes[0]
    finally:
        writer.close()
        await server.close()
