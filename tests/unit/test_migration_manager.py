"""The two halves of migration, in one process, with real daemon parts.

A source and a destination (each its own event bus, VM, block layer with
``null-co`` nodes, and :class:`MigrationManager`) talk over a socket pair
handed over as ``fd:`` URIs; where the test plays the destination itself it
reads the stream with :class:`StreamReader` and answers on the return path.
"""

from __future__ import annotations

import asyncio
import json
import socket
import struct
from dataclasses import dataclass, field
from typing import Any

import pytest

from qmpd.block.core import BlockLayer
from qmpd.errors import GenericError
from qmpd.metrics import Metrics
from qmpd.migration.manager import MigrationManager
from qmpd.migration.state import MigrationStatus
from qmpd.migration.stream import (
    Complete,
    MigrationStreamError,
    ReturnPathReader,
    RPMessage,
    RPMessageType,
    StreamReader,
    encode_rp_message,
)
from qmpd.qmp.events import EventBus
from qmpd.runstate import RunState
from qmpd.vm import VirtualMachine
from tests.migration_data.streams import build_stream

_S = MigrationStatus


@dataclass(eq=False)
class Side:
    """One daemon's worth of migration: what it emitted, and how it asked to exit."""

    vm: VirtualMachine
    block: BlockLayer
    migration: MigrationManager
    seen: list[tuple[str, Any]] = field(default_factory=list)
    exits: list[int] = field(default_factory=list)
    pretty: bool = False

    def send_event(self, plain: bytes, pretty: bytes | None) -> None:
        msg = json.loads(plain)
        self.seen.append((msg["event"], msg.get("data")))

    def names(self) -> list[str]:
        return [name if data is None or "status" not in data else f"{name}:{data['status']}"
                for name, data in self.seen]

    def active(self) -> list[bool]:
        return [node.active for node in self.block.graph.all_nodes()]


async def make_side(state: RunState, *, autostart: bool = True,
                    capabilities: tuple[str, ...] = ("events",)) -> Side:
    metrics = Metrics()
    bus = EventBus(metrics)
    block = BlockLayer(metrics)
    vm = VirtualMachine(bus, state, autostart=autostart, block=block, metrics=metrics)
    exits: list[int] = []
    side = Side(vm, block, MigrationManager(
        events=bus, vm=vm, block=block, metrics=metrics, request_exit=exits.append))
    side.exits = exits
    bus.subscribe(side)
    for name in ("n0", "n1"):
        await block.add({"driver": "null-co", "node-name": name},
                        inactive=state == RunState.INMIGRATE)
    side.migration.set_capabilities([{"capability": c, "state": True} for c in capabilities])
    side.seen.clear()
    return side


def hand_over(side: Side, sock: socket.socket, name: str = "mig") -> None:
    side.migration.fds.add(name, sock.detach())


async def finish(task: asyncio.Task[None] | None) -> None:
    assert task is not None
    await asyncio.wait_for(task, 10)


# --- the return path reader ------------------------------------------------------------


def test_return_path_reader_byte_by_byte() -> None:
    data = (encode_rp_message(RPMessageType.PONG, struct.pack(">I", 7))
            + encode_rp_message(RPMessageType.SHUT, struct.pack(">I", 0)))
    reader = ReturnPathReader()
    got: list[RPMessage] = []
    for i in range(len(data)):
        got += reader.feed(data[i:i + 1])
        if i < 7:
            assert got == []
    reader.close()
    assert [(m.type, m.value) for m in got] == [(RPMessageType.PONG, 7), (RPMessageType.SHUT, 0)]


@pytest.mark.parametrize("head", [
    b"\x00\x00\x00\x00",  # INVALID
    b"\x00\x07\x00\x00",  # past RESUME_ACK
    b"\x00\x01\x00\x02",  # SHUT with 2 bytes
    b"\x00\x02\x00\x08",  # PONG with 8 bytes
])
def test_return_path_reader_refuses_malformed_headers(head: bytes) -> None:
    with pytest.raises(MigrationStreamError, match="invalid return path message"):
        ReturnPathReader().feed(head)


def test_return_path_reader_close_mid_message() -> None:
    reader = ReturnPathReader()
    assert reader.feed(b"\x00\x01\x00\x04\x00") == []
    with pytest.raises(MigrationStreamError, match="closed mid-message"):
        reader.close()


# --- both halves --------------------------------------------------------------------------


async def test_migration_completes_in_qemu_order() -> None:
    caps = ("events", "return-path")
    source = await make_side(RunState.RUNNING, capabilities=caps)
    dest = await make_side(RunState.INMIGRATE, capabilities=caps)
    a, b = socket.socketpair()
    hand_over(source, a)
    hand_over(dest, b)
    assert dest.active() == [False, False]
    await dest.migration.migrate_incoming("fd:mig")
    source.migration.migrate({"uri": "fd:mig"})
    assert source.migration.query() == {"status": "setup"}
    await finish(source.migration.outgoing.task)
    await finish(dest.migration.incoming.task)

    assert source.names() == [
        "MIGRATION:setup", "MIGRATION_PASS", "MIGRATION:active", "STOP", "MIGRATION_PASS",
        "MIGRATION:completed",
    ]
    assert source.vm.state == RunState.POSTMIGRATE
    assert source.active() == [False, False]
    info = source.migration.query()
    assert info["status"] == "completed" and info["ram"]["dirty-sync-count"] == 2
    assert source.migration.last_failure is None

    assert dest.names() == ["MIGRATION:setup", "MIGRATION:active", "RESUME",
                            "MIGRATION:completed"]
    assert dest.vm.state == RunState.RUNNING
    assert dest.active() == [True, True]
    assert dest.migration.query() == {"status": "completed"}
    assert dest.exits == []


async def test_destination_keeps_paused_without_autostart() -> None:
    source = await make_side(RunState.RUNNING)
    dest = await make_side(RunState.INMIGRATE, autostart=False,
                           capabilities=("events", "late-block-activate"))
    a, b = socket.socketpair()
    hand_over(source, a)
    hand_over(dest, b)
    await dest.migration.migrate_incoming("fd:mig")
    source.migration.migrate({"uri": "fd:mig"})
    await finish(source.migration.outgoing.task)
    await finish(dest.migration.incoming.task)
    # late-block-activate without autostart: the nodes wait for cont.
    assert dest.vm.state == RunState.PAUSED
    assert dest.active() == [False, False]


# --- source failures ---------------------------------------------------------------------


async def play_destination(sock: socket.socket, answer: bytes | None) -> None:
    """Read the whole stream, then send ``answer`` on the return path (None: hang up)."""
    reader, writer = await asyncio.open_connection(sock=sock)
    stream = StreamReader({"return-path": True})
    while not any(isinstance(e, Complete) for e in stream.feed(await reader.read(65536))):
        pass
    if answer is not None:
        writer.write(answer)
        await writer.drain()
        await reader.read()  # the source closes its side
    writer.close()


@pytest.mark.parametrize(("answer", "reason"), [
    (encode_rp_message(RPMessageType.SHUT, struct.pack(">I", 1)),
     "return path: the destination reported a failure"),
    (encode_rp_message(RPMessageType.REQ_PAGES, b""),
     "return path: the destination reported a failure"),
    (None, "return path: the destination closed the channel before SHUT"),
    (b"\x00\x00\x00\x00", "return path: qmpd: invalid return path message 0x0000 length 0x0000"),
])
async def test_return_path_failure_gives_the_images_back(answer: bytes | None,
                                                         reason: str) -> None:
    source = await make_side(RunState.RUNNING, capabilities=("events", "return-path"))
    a, b = socket.socketpair()
    hand_over(source, a)
    source.migration.migrate({"uri": "fd:mig"})
    await play_destination(b, answer)
    await finish(source.migration.outgoing.task)
    # QEMU records no error-desc here; qmpd keeps the reason.
    assert source.migration.query() == {"status": "failed"}
    assert source.migration.last_failure == reason
    assert source.names()[-3:] == ["MIGRATION_PASS", "MIGRATION:failed", "RESUME"]
    assert source.vm.state == RunState.RUNNING
    assert source.active() == [True, True]


async def test_no_new_migration_while_a_failed_one_gives_the_images_back() -> None:
    """A migration that failed late reports failed before its re-activation
    (QEMU's order) and that waits for the graph lock: a new migrate accepted
    meanwhile ran beside the old task, whose clean-up then took the new one's
    bitmaps and run state."""
    source = await make_side(RunState.RUNNING, capabilities=("events", "return-path"))
    a, b = socket.socketpair()
    hand_over(source, a)
    source.migration.migrate({"uri": "fd:mig"})
    reader, writer = await asyncio.open_connection(sock=b)
    stream = StreamReader({"return-path": True})
    while not any(isinstance(e, Complete) for e in stream.feed(await reader.read(65536))):
        pass
    outgoing = source.migration.outgoing
    async with source.block.lock.held():  # a command holds the graph lock meanwhile
        writer.write(encode_rp_message(RPMessageType.SHUT, struct.pack(">I", 1)))
        await writer.drain()
        async with asyncio.timeout(10):
            while outgoing.status != _S.FAILED:
                await asyncio.sleep(0.01)
        assert outgoing.task is not None and not outgoing.task.done()
        c, _ = socket.socketpair()
        hand_over(source, c, "again")
        with pytest.raises(GenericError, match="There's a migration process in progress"):
            source.migration.migrate({"uri": "fd:again"})
    await finish(outgoing.task)
    writer.close()
    assert source.vm.state == RunState.RUNNING
    assert source.active() == [True, True]


async def test_failed_connect_leaves_the_vm_alone(tmp_path: Any) -> None:
    source = await make_side(RunState.PAUSED)
    source.migration.migrate({"uri": f"unix:{tmp_path}/nobody"})
    await finish(source.migration.outgoing.task)
    info = source.migration.query()
    assert info["status"] == "failed"
    assert info["error-desc"].startswith(f"Failed to connect to '{tmp_path}/nobody'")
    assert source.names() == ["MIGRATION:setup", "MIGRATION:failed"]
    assert source.vm.state == RunState.PAUSED
    assert source.active() == [True, True]


async def test_migrate_refusals_change_nothing() -> None:
    dest = await make_side(RunState.INMIGRATE)
    with pytest.raises(GenericError, match="waiting for an incoming migration"):
        dest.migration.migrate({"uri": "fd:x"})
    source = await make_side(RunState.RUNNING)
    for args, text in [({"uri": "fd:x", "resume": True}, "Cannot resume"),
                       ({"uri": "fd:x", "blk": True}, "block migration")]:
        with pytest.raises(GenericError, match=text):
            source.migration.migrate(args)
    with pytest.raises(GenericError, match="Migration not in expected state: none"):
        source.migration.continue_("pre-switchover")
    assert source.migration.query() == {}
    assert source.seen == [] and dest.seen == []


async def test_unknown_fd_fails_before_the_reply() -> None:
    source = await make_side(RunState.RUNNING)
    with pytest.raises(GenericError, match="File descriptor named 'nope' has not been found"):
        source.migration.migrate({"uri": "fd:nope"})
    assert source.migration.query() == {
        "status": "failed", "error-desc": "File descriptor named 'nope' has not been found"}
    assert source.names() == ["MIGRATION:setup", "MIGRATION:failed"]
    assert source.migration.outgoing.task is None


async def test_cancel_in_pre_switchover_resumes_then_reports() -> None:
    source = await make_side(RunState.RUNNING,
                             capabilities=("events", "pause-before-switchover"))
    a, b = socket.socketpair()
    hand_over(source, a)
    reader, writer = await asyncio.open_connection(sock=b)
    drain = asyncio.get_running_loop().create_task(reader.read())
    source.migration.migrate({"uri": "fd:mig"})
    while source.migration.outgoing.status != _S.PRE_SWITCHOVER:
        await asyncio.sleep(0.01)
    stopped_in = source.vm.state
    with pytest.raises(GenericError, match="migration process in progress"):
        source.migration.set_capabilities([{"capability": "events", "state": False}])
    source.migration.cancel()
    await finish(source.migration.outgoing.task)
    assert source.names()[-4:] == ["MIGRATION:pre-switchover", "MIGRATION:cancelling",
                                   "RESUME", "MIGRATION:cancelled"]
    assert (stopped_in, source.vm.state) == (RunState.FINISH_MIGRATE, RunState.RUNNING)
    assert source.active() == [True, True]
    assert source.migration.last_failure is None
    await drain
    writer.close()


# --- destination failures ----------------------------------------------------------------


@pytest.mark.parametrize("exit_on_error", [True, False])
async def test_bad_stream_fails_the_destination(exit_on_error: bool) -> None:
    dest = await make_side(RunState.INMIGRATE)
    a, b = socket.socketpair()
    hand_over(dest, b)
    await dest.migration.migrate_incoming("fd:mig", exit_on_error)
    with pytest.raises(GenericError, match="already been started"):
        await dest.migration.migrate_incoming("fd:mig")
    a.sendall(b"QEVN" + bytes(12))
    a.close()
    await finish(dest.migration.incoming.task)
    assert dest.migration.query() == {"status": "failed",
                                      "error-desc": "Not a migration stream"}
    assert dest.names() == ["MIGRATION:setup", "MIGRATION:active", "MIGRATION:failed"]
    assert dest.exits == ([1] if exit_on_error else [])
    assert dest.vm.state == RunState.INMIGRATE
    assert dest.active() == [False, False]


async def test_run_state_the_destination_cannot_enter() -> None:
    dest = await make_side(RunState.INMIGRATE)
    a, b = socket.socketpair()
    hand_over(dest, b)
    await dest.migration.migrate_incoming("fd:mig", False)
    a.sendall(build_stream("save-vm"))
    a.close()
    await finish(dest.migration.incoming.task)
    assert dest.migration.query()["error-desc"] == (
        "invalid runstate transition: 'inmigrate' -> 'save-vm'")
    assert dest.active() == [False, False]


async def test_incoming_needs_inmigrate() -> None:
    side = await make_side(RunState.PAUSED)
    with pytest.raises(GenericError, match="'-incoming' was not specified"):
        await side.migration.migrate_incoming("fd:mig")
    assert side.seen == []
