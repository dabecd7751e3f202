"""The status streams of ``/api/events`` share one status per change.

A stand-in daemon counts how often its status is made; the HTTP side is the
real aiohttp application on a real socket.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import aiohttp
from aiohttp import web

from qmpd import http
from qmpd.metrics import Metrics


class CountingDaemon:
    """Just enough of :class:`qmpd.http.HealthService` to count status calls."""

    def __init__(self) -> None:
        self.made = 0
        self.watchers: list[Callable[[], None]] = []

    @property
    def metrics(self) -> Metrics | None:
        return None

    def health(self) -> dict[str, Any]:
        return {"status": "ok"}

    def readiness_problems(self) -> list[str]:
        return []

    def run_state(self) -> str:
        return "running"

    def migration_failure(self) -> str | None:
        return None

    def status(self) -> dict[str, Any]:
        self.made += 1
        return {"made": self.made}

    def watch(self, changed: Callable[[], None]) -> Callable[[], None]:
        self.watchers.append(changed)
        return lambda: self.watchers.remove(changed)

    def event(self) -> None:
        for changed in list(self.watchers):
            changed()


async def _read_message(resp: aiohttp.ClientResponse) -> dict[str, Any]:
    while True:
        line = await asyncio.wait_for(resp.content.readline(), 10)
        assert line, "stream ended"
        if line.startswith(b"data: "):
            parsed: dict[str, Any] = json.loads(line[6:])
            return parsed


async def test_streams_share_one_status_per_change(monkeypatch: Any) -> None:
    # No tick within the test: every status made is due to a stream or an event.
    monkeypatch.setattr(http, "STATUS_TICK", 60.0)
    daemon = CountingDaemon()
    runner = web.AppRunner(http.build_app(daemon))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    streams = 8
    try:
        async with aiohttp.ClientSession() as session:
            resps = [await session.get(f"http://127.0.0.1:{port}/api/events")
                     for _ in range(streams)]
            firsts = [await _read_message(r) for r in resps]
            # Eight streams opened with no change between them: one status.
            assert daemon.made == 1, firsts
            # The daemon is watched once, whatever the number of streams.
            assert len(daemon.watchers) == 1
            before = daemon.made
            daemon.event()
            after = [await _read_message(r) for r in resps]
            # One change: one new status, sent to every stream.
            assert daemon.made == before + 1
            assert all(m == {"made": before + 1} for m in after), after
            for r in resps:
                r.close()
        # A stream finds its client gone when it next writes: after a change.
        for _ in range(100):
            if not daemon.watchers:
                break
            daemon.event()
            await asyncio.sleep(0.05)
        # The last stream gone, the daemon is no longer watched.
        assert daemon.watchers == []
    finally:
        await runner.cleanup()
