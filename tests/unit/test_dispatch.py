"""The dispatcher without sockets: lookup, negotiation, OOB, argument checks, and
exceptions becoming QMP errors at this one boundary.

Real sessions, the real schema and command table, and a daemon's real
services (built, never started); a few handlers are swapped for ones that fail.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from qmpd.cli import parse_args
from qmpd.daemon import Daemon
from qmpd.errors import DeviceNotFound
from qmpd.qmp.dispatch import HANDLERS, CommandContext, Dispatcher, Handler, Reply
from qmpd.qmp.session import QMPSession, Request


@pytest.fixture
def daemon(tmp_path: Path) -> Daemon:
    # With --http, so it keeps metrics (built, never started: nothing listens).
    return Daemon(parse_args(["--qmp", f"unix:{tmp_path}/qmp.sock", "--http", "127.0.0.1:0"]))


def session(daemon: Daemon, negotiate: bool = True, oob: bool = False) -> QMPSession:
    s = QMPSession(daemon.version_info)
    if negotiate:
        enable = ', "arguments": {"enable": ["oob"]}' if oob else ""
        assert call(daemon.dispatcher, s, f'{{"execute": "qmp_capabilities"{enable}}}') == {
            "return": {}}
    return s


def request(s: QMPSession, text: str) -> Request:
    (item,) = s.receive_data(text.encode())
    assert isinstance(item, Request), item
    return item


def decode(reply: Reply) -> dict[str, Any]:
    assert isinstance(reply, bytes), reply
    msg: dict[str, Any] = json.loads(reply)
    return msg


def call(dispatcher: Dispatcher, s: QMPSession, text: str) -> dict[str, Any]:
    return decode(dispatcher.dispatch(s, request(s, text)))


async def call_async(dispatcher: Dispatcher, s: QMPSession, text: str) -> dict[str, Any]:
    reply = dispatcher.dispatch(s, request(s, text))
    assert not isinstance(reply, bytes), "a coroutine handler answers later"
    return decode(await reply)


def with_handlers(daemon: Daemon, **swapped: Handler) -> Dispatcher:
    handlers = dict(HANDLERS)
    for name, fn in swapped.items():
        handlers[name.replace("_", "-")] = fn
    return Dispatcher(daemon.schema, daemon.dispatcher.services, daemon.metrics, handlers)


def counted(daemon: Daemon, command: str, result: str) -> float:
    assert daemon.metrics is not None
    value = daemon.metrics.registry.get_sample_value(
        "qmpd_qmp_commands_total", {"command": command, "result": result})
    return value or 0.0


def test_negotiation_mode_knows_only_qmp_capabilities(daemon: Daemon) -> None:
    s = session(daemon, negotiate=False)
    assert daemon.dispatcher.command_names(s) == ["qmp_capabilities"]
    assert call(daemon.dispatcher, s, '{"execute": "query-status", "id": 1}') == {
        "id": 1, "error": {"class": "CommandNotFound",
                           "desc": "Expecting capabilities negotiation with 'qmp_capabilities'"}}
    assert call(daemon.dispatcher, s, '{"execute": "qmp_capabilities"}') == {"return": {}}
    assert call(daemon.dispatcher, s, '{"execute": "qmp_capabilities"}') == {
        "error": {"class": "CommandNotFound",
                  "desc": "Capabilities negotiation is already complete, command ignored"}}
    assert "query-status" in daemon.dispatcher.command_names(s)


def test_unknown_command(daemon: Daemon) -> None:
    s = session(daemon)
    assert call(daemon.dispatcher, s, '{"execute": "no-such", "id": "x"}') == {
        "id": "x", "error": {"class": "CommandNotFound",
                             "desc": "The command no-such has not been found"}}
    # Unknown names share one label: a client cannot grow the metrics at will.
    assert counted(daemon, "<unknown>", "CommandNotFound") == 1
    assert counted(daemon, "no-such", "CommandNotFound") == 0


@pytest.mark.parametrize(
    ("arguments", "desc"),
    [
        ({}, "Parameter 'node-name' is missing"),
        ({"node-name": 3}, "Invalid parameter type for 'node-name', expected: string"),
    ],
)
def test_arguments_are_checked_before_the_handler_runs(
    daemon: Daemon, arguments: dict[str, Any], desc: str
) -> None:
    ran: list[str] = []

    async def blockdev_del(ctx: CommandContext, args: dict[str, Any]) -> None:
        ran.append("blockdev-del")

    dispatcher = with_handlers(daemon, blockdev_del=blockdev_del)
    s = session(daemon)
    text = json.dumps({"execute": "blockdev-del", "arguments": arguments})
    assert call(dispatcher, s, text) == {"error": {"class": "GenericError", "desc": desc}}
    assert ran == []


def test_unexpected_argument(daemon: Daemon) -> None:
    s = session(daemon)
    reply = call(daemon.dispatcher, s, '{"execute": "query-name", "arguments": {"x": 1}}')
    assert reply == {"error": {"class": "GenericError", "desc": "Parameter 'x' is unexpected"}}


def test_out_of_band_rules(daemon: Daemon) -> None:
    dispatcher = daemon.dispatcher
    s = session(daemon, oob=True)
    pause = request(s, '{"exec-oob": "migrate-pause", "id": 1}')
    assert dispatcher.runs_out_of_band(s, pause)
    # The handler's own error, not an OOB refusal.
    assert decode(dispatcher.dispatch(s, pause))["error"]["desc"].startswith(
        "migrate-pause is currently only supported")
    # In-band use of an OOB-capable command is ordinary.
    assert not dispatcher.runs_out_of_band(s, request(s, '{"execute": "migrate-pause"}'))
    # A command without allow-oob is queued like any other, then refused.
    status = request(s, '{"exec-oob": "query-status", "id": 2}')
    assert not dispatcher.runs_out_of_band(s, status)
    assert decode(dispatcher.dispatch(s, status)) == {
        "id": 2, "error": {"class": "GenericError",
                           "desc": "The command query-status does not support OOB"}}


def test_exec_oob_without_the_capability_is_refused_by_the_session(daemon: Daemon) -> None:
    s = session(daemon)
    (item,) = s.receive_data(b'{"exec-oob": "migrate-pause"}')
    assert isinstance(item, bytes)
    assert json.loads(item) == {"error": {
        "class": "GenericError", "desc": "QMP input member 'exec-oob' is unexpected"}}


def test_handler_errors_become_replies_at_one_boundary(daemon: Daemon) -> None:
    def query_name(ctx: CommandContext, args: dict[str, Any]) -> None:
        raise DeviceNotFound("no such device")

    def query_version(ctx: CommandContext, args: dict[str, Any]) -> None:
        raise KeyError("bug")

    dispatcher = with_handlers(daemon, query_name=query_name, query_version=query_version)
    s = session(daemon)
    assert call(dispatcher, s, '{"execute": "query-name", "id": 1}') == {
        "id": 1, "error": {"class": "DeviceNotFound", "desc": "no such device"}}
    # A bug is reported as GenericError and the dispatcher keeps serving.
    assert call(dispatcher, s, '{"execute": "query-version"}') == {
        "error": {"class": "GenericError", "desc": "internal error: 'bug'"}}
    assert call(dispatcher, s, '{"execute": "query-status"}')["return"]["status"] == "prelaunch"
    assert counted(daemon, "query-name", "DeviceNotFound") == 1
    assert counted(daemon, "query-version", "GenericError") == 1


async def test_coroutine_handlers_answer_through_the_same_boundary(daemon: Daemon) -> None:
    async def blockdev_del(ctx: CommandContext, args: dict[str, Any]) -> None:
        raise RuntimeError("lost")

    dispatcher = with_handlers(daemon, blockdev_del=blockdev_del)
    s = session(daemon)
    text = '{"execute": "blockdev-del", "arguments": {"node-name": "n"}, "id": 7}'
    assert await call_async(dispatcher, s, text) == {
        "id": 7, "error": {"class": "GenericError", "desc": "internal error: lost"}}
    # The real handler: the block layer's own error class comes through.
    assert await call_async(daemon.dispatcher, s, text) == {
        "id": 7, "error": {"class": "GenericError",
                           "desc": "Failed to find node with node-name='n'"}}


def test_success_replies(daemon: Daemon) -> None:
    s = session(daemon)
    # None becomes {}; the id comes back as given.
    assert call(daemon.dispatcher, s, '{"execute": "query-name", "id": [1, {"a": null}]}') == {
        "return": {}, "id": [1, {"a": None}]}
    names = call(daemon.dispatcher, s, '{"execute": "query-commands"}')["return"]
    # Newest registration first, as QEMU lists them.
    assert names == [{"name": name} for name in reversed(HANDLERS)]
    assert counted(daemon, "query-commands", "success") == 1


def test_schema_and_handlers_must_agree(daemon: Daemon) -> None:
    handlers = dict(HANDLERS)
    del handlers["query-name"]
    with pytest.raises(RuntimeError, match=r"no handler for \['query-name'\]"):
        Dispatcher(daemon.schema, daemon.dispatcher.services, handlers=handlers)
