"""HTTP health, readiness and metrics (pytest-aiohttp and a real process)."""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from qmpd.cli import parse_args
from qmpd.daemon import Daemon
from qmpd.http import build_app


@pytest.fixture
async def daemon(tmp_path: Path) -> AsyncIterator[Daemon]:
    # Metrics exist only in a daemon serving HTTP (issue 10).
    d = Daemon(parse_args(["--qmp", f"unix:{tmp_path}/qmp.sock", "--http", "127.0.0.1:0"]))
    await d.start()
    yield d
    await d.shutdown()


async def qmp(path: str, *commands: str) -> list[dict[str, Any]]:
    reader, writer = await asyncio.open_unix_connection(path)
    await reader.readline()
    out = []
    for cmd in ("qmp_capabilities", *commands):
        writer.write(json.dumps({"execute": cmd}).encode())
        while True:
            msg = json.loads(await reader.readline())
            if "event" not in msg:
                break
        out.append(msg)
    writer.close()
    return out


async def test_health_and_ready(daemon: Daemon, aiohttp_client: Any) -> None:
    client: TestClient = await aiohttp_client(build_app(daemon))
    for path in ("/health", "/healthz", "/livez"):
        resp = await client.get(path)
        assert resp.status == 200
        body = await resp.json()
        assert body["status"] == "ok" and body["run-state"] == "running"
        assert body["version"] and body["uptime"] >= 0
    for path in ("/ready", "/readyz"):
        resp = await client.get(path)
        assert resp.status == 200, await resp.text()


async def test_metrics_count_commands_and_events(daemon: Daemon, aiohttp_client: Any) -> None:
    client: TestClient = await aiohttp_client(build_app(daemon))
    sock = str(daemon.config.monitors[0].address.path)  # type: ignore[union-attr]
    await qmp(sock, "query-status", "stop", "no-such", "cont")
    text = await (await client.get("/metrics")).text()
    assert 'qmpd_qmp_commands_total{command="query-status",result="success"} 1.0' in text
    assert 'qmpd_qmp_commands_total{command="<unknown>",result="CommandNotFound"} 1.0' in text
    assert 'qmpd_qmp_events_total{event="STOP"} 1.0' in text
    assert 'qmpd_qmp_command_duration_seconds_count{command="stop"} 1.0' in text
    assert 'qmpd_run_state{qmpd_run_state="running"} 1.0' in text
    assert "qmpd_qmp_clients" in text


async def test_not_ready_while_inmigrate(tmp_path: Path, aiohttp_client: Any) -> None:
    d = Daemon(parse_args(["--qmp", f"unix:{tmp_path}/q.sock", "--incoming", "defer"]))
    await d.start()
    try:
        client: TestClient = await aiohttp_client(build_app(d))
        resp = await client.get("/ready")
        assert resp.status == 503
        assert "run state is inmigrate" in (await resp.json())["reasons"]
        assert (await client.get("/health")).status == 200
    finally:
        await d.shutdown()


async def test_not_ready_once_shutting_down(daemon: Daemon, aiohttp_client: Any) -> None:
    client: TestClient = await aiohttp_client(build_app(daemon))
    daemon.request_shutdown("host-signal")
    resp = await client.get("/ready")
    assert resp.status == 503
    assert "shutting down" in (await resp.json())["reasons"]


async def test_not_ready_when_a_monitor_stops_listening(daemon: Daemon, aiohttp_client: Any) -> None:
    client: TestClient = await aiohttp_client(build_app(daemon))
    await daemon.qmp.monitors[0].stop()
    resp = await client.get("/ready")
    assert resp.status == 503


def test_real_process_serves_http(qmpd_factory: Any) -> None:
    proc = qmpd_factory("--http", "127.0.0.1:0", "--log-level", "info")
    url = proc.http_url()
    assert url.startswith("http://127.0.0.1:")
    with urllib.request.urlopen(url + "/health", timeout=5) as resp:
        assert json.loads(resp.read())["status"] == "ok"
    with urllib.request.urlopen(url + "/metrics", timeout=5) as resp:
        assert resp.headers["Content-Type"].startswith("text/plain")
        assert b"qmpd_run_state" in resp.read()
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(url + "/nope", timeout=5)
    assert info.value.code == 404


def _connect(url: str) -> Any:
    import socket
    host, port = url.removeprefix("http://").rsplit(":", 1)
    return socket.create_connection((host, int(port)), timeout=30)


def _closed_by_peer(sock: Any, within: float) -> bool:
    sock.settimeout(within)
    try:
        return sock.recv(1) == b""
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True


def test_idle_and_half_sent_requests_are_closed(qmpd_factory: Any) -> None:
    """Neither an idle client nor one that never finishes its request keeps a connection."""
    from qmpd.http import REQUEST_TIMEOUT

    proc = qmpd_factory("--http", "127.0.0.1:0", "--log-level", "info")
    url = proc.http_url()
    idle = _connect(url)
    half = _connect(url)
    half.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # no blank line: never complete
    assert not _closed_by_peer(idle, 0.5)
    assert _closed_by_peer(idle, REQUEST_TIMEOUT + 5)
    assert _closed_by_peer(half, 5)
    # A normal request is still served.
    with urllib.request.urlopen(url + "/health", timeout=10) as resp:
        assert resp.status == 200


def test_connection_cap_keeps_qmp_working(qmpd_factory: Any) -> None:
    from qmpd.http import MAX_CONNECTIONS

    proc = qmpd_factory("--http", "127.0.0.1:0", "--log-level", "info")
    url = proc.http_url()
    held = [_connect(url) for _ in range(MAX_CONNECTIONS)]
    for sock in held[-3:]:
        assert not _closed_by_peer(sock, 0.2)
    extra = _connect(url)
    assert _closed_by_peer(extra, 5)
    c = proc.client()
    c.negotiate()
    assert c.cmd("query-status")["return"]["status"] == "running"
    for sock in held:
        sock.close()
    deadline = 50
    while deadline:
        try:
            with urllib.request.urlopen(url + "/health", timeout=10) as resp:
                assert resp.status == 200
                break
        except (urllib.error.URLError, ConnectionError):
            deadline -= 1
            asyncio.run(asyncio.sleep(0.1))
    assert deadline


def test_qcow2_cache_lookups_are_exported(qmpd_factory: Any, tmp_path: Path) -> None:
    """qmpd_block_cache_lookups_total, as the README documents it, counts real lookups."""
    import re
    import subprocess

    from tests.conftest import require_tool

    image = tmp_path / "d.qcow2"
    subprocess.run([require_tool("qemu-img"), "create", "-q", "-f", "qcow2", str(image), "1M"],
                   check=True)
    proc = qmpd_factory("--http", "127.0.0.1:0", "--log-level", "info")
    c = proc.client()
    c.negotiate()
    assert c.cmd("blockdev-add", {"driver": "qcow2", "node-name": "disk",
                                  "file": {"driver": "file", "filename": str(image)}}) \
        == {"return": {}}
    for line in ("write -P 0x11 0 4k", "read -P 0x11 0 4k", "read -P 0x11 0 4k"):
        assert "return" in c.cmd("human-monitor-command",
                                 {"command-line": f'qemu-io disk "{line}"'})

    def counts() -> dict[tuple[str, str], float]:
        with urllib.request.urlopen(proc.http_url() + "/metrics", timeout=5) as resp:
            text = resp.read().decode()
        found = re.findall(r'qmpd_block_cache_lookups_total\{cache="(\w+)",node="disk",'
                           r'result="(\w+)"\} (\S+)', text)
        return {(cache, result): float(value) for cache, result, value in found}

    first = counts()
    assert set(first) == {("l2", "hit"), ("l2", "miss"), ("refcount", "hit"),
                          ("refcount", "miss")}
    assert first[("l2", "hit")] >= 1
    assert "return" in c.cmd("human-monitor-command",
                             {"command-line": 'qemu-io disk "read 0 4k"'})
    assert counts()[("l2", "hit")] > first[("l2", "hit")]


def _metric(url: str, name: str) -> float:
    with urllib.request.urlopen(url + "/metrics", timeout=5) as resp:
        for line in resp.read().decode().splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")


def test_a_migration_shows_in_both_daemons_metrics(tmp_path: Path) -> None:
    """The stream's bytes, the status and the destination's activation time."""
    from tests.conftest import QmpdProcess
    from tests.support.qmp import QmpClient

    (tmp_path / "src").mkdir()
    (tmp_path / "dst").mkdir()
    src = QmpdProcess(tmp_path / "src", "--http", "127.0.0.1:0", "--log-level", "info")
    dst = QmpdProcess(tmp_path / "dst", "--http", "127.0.0.1:0", "--log-level", "info",
                      "--incoming", "defer")
    try:
        s, d = QmpClient(src.sock), QmpClient(dst.sock)
        for c in (s, d):
            c.ok("qmp_capabilities")
            c.ok("migrate-set-capabilities",
                 {"capabilities": [{"capability": "events", "state": True}]})
        uri = f"unix:{tmp_path / 'mig.sock'}"
        d.ok("migrate-incoming", {"uri": uri})
        s.ok("migrate", {"uri": uri})
        s.wait_event("MIGRATION", "completed")
        d.wait_event("MIGRATION", "completed")
        sent = _metric(src.http_url(), 'qmpd_migration_bytes_total{direction="out"}')
        got = _metric(dst.http_url(), 'qmpd_migration_bytes_total{direction="in"}')
        assert sent > 0 and got == sent
        assert _metric(src.http_url(), 'qmpd_migration_status{qmpd_migration_status="completed"}') == 1
        assert _metric(dst.http_url(), "qmpd_migration_activation_seconds_count") == 1
        s.close()
        d.close()
    finally:
        src.stop()
        dst.stop()


def test_dirty_bitmap_metrics(qmpd_factory: Any) -> None:
    """qmpd_block_dirty_bitmaps and qmpd_block_dirty_bitmap_bytes follow the bitmaps."""
    import re

    proc = qmpd_factory("--http", "127.0.0.1:0", "--log-level", "info",
                        "--blockdev", "null-co,node-name=n0,size=1048576")
    c = proc.client()
    c.negotiate()

    def scrape() -> tuple[list[str], dict[str, float]]:
        with urllib.request.urlopen(proc.http_url() + "/metrics", timeout=5) as resp:
            text = resp.read().decode()
        count = re.findall(r'qmpd_block_dirty_bitmaps\{node="n0"\} (\S+)', text)
        found = re.findall(r'qmpd_block_dirty_bitmap_bytes\{bitmap="(\w+)",node="n0"\} (\S+)',
                           text)
        return count, {name: float(value) for name, value in found}

    assert scrape() == (["0.0"], {})
    c.ok("block-dirty-bitmap-add", {"node": "n0", "name": "a", "granularity": 4096})
    c.ok("block-dirty-bitmap-add", {"node": "n0", "name": "b", "disabled": True})
    c.ok("human-monitor-command", {"command-line": 'qemu-io n0 "write 4095 2"'})
    assert scrape() == (["2.0"], {"a": 8192.0, "b": 0.0})
