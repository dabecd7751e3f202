"""qmpd driven by qemu.qmp's QMPClient, the official client library."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import pytest
from qemu.qmp import ExecuteError, QMPClient

from tests.conftest import QmpdProcess, check_message


async def connect(proc: QmpdProcess, name: str = "test") -> QMPClient:
    client = QMPClient(name)
    await client.connect(proc.sock)
    return client


async def execute(client: QMPClient, cmd: str, args: dict[str, Any] | None = None) -> Any:
    value = await client.execute(cmd, args)
    check_message({"return": value}, cmd)
    return value


async def test_version_gate_and_basic_queries(qmpd: QmpdProcess) -> None:
    client = await connect(qmpd)
    try:
        greeting = client.greeting
        assert greeting is not None
        version = greeting.QMP.version
        assert (version["qemu"]["major"], version["qemu"]["minor"]) == (7, 2)
        assert version["package"].startswith("qmpd ")
        assert await execute(client, "query-version") == version
        assert await execute(client, "query-status") == {
            "running": True, "singlestep": False, "status": "running"}
        names = {c["name"] for c in await execute(client, "query-commands")}
        assert {"qmp_capabilities", "query-status", "stop", "cont", "quit"} <= names
        assert await execute(client, "query-name") == {}
        schema = await execute(client, "query-qmp-schema")
        assert {e["name"] for e in schema if e["meta-type"] == "command"} == names
    finally:
        await client.disconnect()


async def test_errors_reach_the_client_with_class(qmpd: QmpdProcess) -> None:
    client = await connect(qmpd)
    try:
        with pytest.raises(ExecuteError) as info:
            await client.execute("no-such-command")
        assert info.value.error_class == "CommandNotFound"
        assert info.value.error.error.desc == "The command no-such-command has not been found"
        with pytest.raises(ExecuteError) as info:
            await client.execute("query-status", {"x": 1})
        assert info.value.error.error.desc == "Parameter 'x' is unexpected"
    finally:
        await client.disconnect()


async def test_stop_cont_events_reach_every_negotiated_client(qmpd: QmpdProcess) -> None:
    a = await connect(qmpd, "a")
    b = await connect(qmpd, "b")
    try:
        with a.listener(("STOP", "RESUME")) as la, b.listener(("STOP", "RESUME")) as lb:
            await execute(a, "stop")
            assert await execute(b, "query-status") == {
                "running": False, "singlestep": False, "status": "paused"}
            await execute(b, "cont")
            for listener in (la, lb):
                first = await asyncio.wait_for(listener.get(), 5)
                second = await asyncio.wait_for(listener.get(), 5)
                check_message(dict(first))
                assert (first["event"], second["event"]) == ("STOP", "RESUME")
    finally:
        await a.disconnect()
        await b.disconnect()


async def test_name_option(qmpd_factory: Any) -> None:
    proc = qmpd_factory("--name", "vm-7", "--paused")
    client = await connect(proc)
    try:
        assert await execute(client, "query-name") == {"name": "vm-7"}
        assert (await execute(client, "query-status"))["status"] == "prelaunch"
    finally:
        await client.disconnect()


async def test_quit_from_the_library(qmpd: QmpdProcess) -> None:
    client = await connect(qmpd)
    with client.listener("SHUTDOWN") as listener:
        await execute(client, "quit")
        event = await asyncio.wait_for(listener.get(), 5)
    assert event["data"] == {"guest": False, "reason": "host-qmp-quit"}
    # The server hangs up after quit; the library reports that as EOFError,
    # exactly as it does with QEMU.
    with contextlib.suppress(EOFError):
        await client.disconnect()
    assert qmpd.wait() == 0
