"""Shutdown with commands in flight: every client gets an answer or a clean close,
and no task of the daemon outlives it.

The daemon runs in the test's own event loop (on a real socket, with qemu.qmp
as the client), so the test can see every task that is left.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from pathlib import Path

import pytest
from qemu.qmp import QMPClient

from qmpd.cli import parse_args
from qmpd.daemon import Daemon
from qmpd.errors import ConfigError

MiB = 1 << 20


def leftover_tasks() -> list[asyncio.Task[object]]:
    current = asyncio.current_task()
    return [t for t in asyncio.all_tasks() if t is not current and not t.done()]


async def test_quit_while_another_client_runs_a_slow_command(tmp_path: Path) -> None:
    sock = tmp_path / "qmp.sock"
    daemon = Daemon(parse_args(["--qmp", f"unix:{sock}"]))
    await daemon.start()
    slow, quitter = QMPClient("slow"), QMPClient("quitter")
    try:
        await slow.connect(str(sock))
        await quitter.connect(str(sock))
        # 64 KiB/s: the first 1 MiB write empties the bucket, the second waits ~16 s.
        await slow.execute("object-add", {"qom-type": "throttle-group", "id": "tg",
                                          "x-bps-write": 64 << 10})
        await slow.execute("blockdev-add", {"driver": "null-co", "node-name": "n0",
                                            "size": 64 * MiB})
        await slow.execute("blockdev-add", {"driver": "throttle", "node-name": "t0",
                                            "throttle-group": "tg", "file": "n0"})
        write = 'qemu-io t0 "write {} 1M"'
        await slow.execute("human-monitor-command", {"command-line": write.format(0)})
        in_flight = asyncio.ensure_future(
            slow.execute("human-monitor-command", {"command-line": write.format(MiB)}))
        await asyncio.sleep(0.2)
        assert not in_flight.done()

        assert await quitter.execute("quit") == {}
        async with asyncio.timeout(5):
            await daemon.wait_stopped()
            await daemon.shutdown()
        # The slow command was cancelled: no reply, the connection closed.
        with pytest.raises(Exception) as caught:
            async with asyncio.timeout(5):
                await in_flight
        assert "ExecuteError" not in type(caught.value).__name__
    finally:
        for client in (slow, quitter):
            with contextlib.suppress(Exception):
                await client.disconnect()
        await daemon.shutdown()
    assert leftover_tasks() == []


async def test_failed_start_tears_down_only_what_started(tmp_path: Path) -> None:
    sock, pidfile, image = tmp_path / "qmp.sock", tmp_path / "qmpd.pid", tmp_path / "disk.raw"
    image.write_bytes(bytes(MiB))
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        daemon = Daemon(parse_args([
            "--pidfile", str(pidfile), "--qmp", f"unix:{sock}",
            "--blockdev", f"file,node-name=f0,filename={image}",
            "--http", f"127.0.0.1:{port}",
            "--blockdev", "null-co,node-name=never",
        ]))
        with pytest.raises(ConfigError, match="cannot serve HTTP"):
            await daemon.start()
    assert sock.exists() and pidfile.exists()
    assert list(daemon.block.graph.nodes) == ["f0"]
    await daemon.shutdown()
    assert not sock.exists() and not pidfile.exists()
    assert daemon.block.graph.nodes == {}
    assert leftover_tasks() == []
