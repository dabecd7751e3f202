"""QEMU's parser limits, through a real socket (QEMU itself takes minutes here)."""

from __future__ import annotations

import pytest

from tests.conftest import QmpdProcess

PARSE = "JSON parse error, expecting value"


def id_list_request(items: int) -> bytes:
    # Tokens: { "execute" : "query-version" , "id" : [ items... ] } = 2 * items + 9
    return (
        b'{"execute": "query-version", "id": ['
        + b",".join([b"1"] * items)
        + b"]}"
    )


def test_nesting_depth_1024_accepted_1025_refused(qmpd: QmpdProcess) -> None:
    c = qmpd.client()
    c.negotiate()
    deep_ok = b'{"execute": "query-version", "id": ' + b"[" * 1023 + b"]" * 1023 + b"}"
    c.send(deep_ok)
    # Too deep for Python's json module to decode: compare the raw line.
    line = c.recv_line()
    assert line.startswith(b'{"return": {"qemu": ')
    assert line.endswith(b', "id": ' + b"[" * 1022 + b"[]" + b"]" * 1022 + b"}")
    c.send(b'{"execute": "query-version", "id": ' + b"[" * 1024 + b"]" * 1024 + b"}")
    assert c.recv()["error"]["desc"] == "JSON nesting depth limit exceeded"
    # Every closing bracket left over is an error of its own, then it recovers.
    for _ in range(1025):
        assert c.recv()["error"]["desc"] == PARSE
    assert c.cmd("query-status")["return"]["running"] is True


def test_64_mib_message_limit(qmpd: QmpdProcess) -> None:
    c = qmpd.client()
    c.negotiate()
    head = b'{"execute": "query-version", "id": "'
    tail = b'"}'
    # Just under the limit (token bytes + 1 per token must stay <= 64 MiB).
    fits = (64 << 20) - len(head) - len(tail) - 64
    c.send(head + b"a" * fits + tail)
    assert len(c.recv()["id"]) == fits
    c.send(head + b" " * (64 << 20) + tail + b"\n")
    assert c.recv()["error"]["desc"] == "JSON token size limit exceeded"
    # What followed the cut is lexed afresh: the closing quote opens a new
    # string that the newline breaks.
    assert c.recv()["error"]["desc"] == "JSON parse error, stray '\"}\n'"
    assert c.cmd("query-status")["return"]["status"] == "running"


@pytest.mark.slow
def test_token_count_limit_exact(qmpd: QmpdProcess) -> None:
    c = qmpd.client()
    c.sock.settimeout(120)
    c.negotiate()
    c.send(id_list_request(1_048_571))  # 2,097,151 tokens
    reply = c.recv()
    assert len(reply["id"]) == 1_048_571
    c.send(id_list_request(1_048_572))  # 2,097,153 tokens
    # The refused token is the final "}", so nothing is left over.
    assert c.recv()["error"]["desc"] == "JSON token count limit exceeded"
    assert c.cmd("query-status")["return"]["running"] is True
