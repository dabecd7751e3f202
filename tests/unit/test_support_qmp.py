"""The shared test QMP client against a scripted peer on a real socket pair."""

from __future__ import annotations

import json
import socket

import pytest

from tests.support.qmp import QmpClient

GREETING = b'{"QMP": {"version": {}, "capabilities": []}}\r\n'


def pair() -> tuple[QmpClient, socket.socket]:
    ours, peer = socket.socketpair()
    peer.sendall(GREETING)
    return QmpClient(ours, 5, check_schema=False), peer


def test_a_timed_out_recv_keeps_the_partial_line() -> None:
    client, peer = pair()
    with peer:
        assert client.greeting == json.loads(GREETING)
        peer.sendall(b'{"event": "STOP", "data": {}, "timestamp": {"se')
        with pytest.raises(TimeoutError):
            client.recv(0.05)
        peer.sendall(b'conds": 1, "microseconds": 2}}\r\n')
        assert client.recv()["event"] == "STOP"
        assert client.events == [{"event": "STOP", "data": {},
                                   "timestamp": {"seconds": 1, "microseconds": 2}}]
        assert client.sock.gettimeout() == 5


def test_numbered_commands_set_other_replies_aside() -> None:
    client, peer = pair()
    client.ids = True
    with peer:
        peer.sendall(b'{"return": {}, "id": "theirs"}\r\n'
                     b'{"event": "RESUME", "timestamp": {"seconds": 0, "microseconds": 0}}\r\n'
                     b'{"return": {"status": "running"}, "id": 1}\r\n')
        assert client.cmd("query-status") == {"return": {"status": "running"}}
        sent = json.loads(peer.recv(4096))
        assert sent == {"execute": "query-status", "id": 1}
        assert client.stray == [{"return": {}}]
        assert [entry[0] for entry in client.log] == ["event", "reply"]


def test_eof_is_an_error() -> None:
    client, peer = pair()
    peer.sendall(b'{"return": {}')
    peer.close()
    with pytest.raises(EOFError):
        client.recv_line()
    assert client.buf == b'{"return": {}'
