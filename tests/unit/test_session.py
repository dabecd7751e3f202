"""The per-connection session state, driven with bytes only."""

from __future__ import annotations

import json
from typing import Any

import pytest

from qmpd.errors import CommandNotFound, GenericError
from qmpd.qmp.session import NEGOTIATION_HINT, QMPSession, Request

VERSION = {"qemu": {"major": 7, "minor": 2, "micro": 0}, "package": "test"}


def replies(session: QMPSession, data: bytes) -> list[Any]:
    out: list[Any] = []
    for item in session.receive_data(data):
        out.append(json.loads(item) if isinstance(item, bytes) else item)
    return out


def test_greeting() -> None:
    s = QMPSession(VERSION)
    assert s.greeting() == (
        b'{"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}, '
        b'"package": "test"}, "capabilities": ["oob"]}}\r\n'
    )


@pytest.mark.parametrize(
    ("line", "desc"),
    [
        (b"[]", "QMP input must be a JSON object"),
        (b'"x"', "QMP input must be a JSON object"),
        (b'{"id": 1}', "QMP input lacks member 'execute'"),
        (b'{"execute": 1}', "QMP input member 'execute' must be a string"),
        (b'{"execute": "x", "arguments": null}', "QMP input member 'arguments' must be an object"),
        (b'{"execute": "x", "foo": 1}', "QMP input member 'foo' is unexpected"),
        (b'{"exec-oob": "x"}', "QMP input member 'exec-oob' is unexpected"),
    ],
)
def test_envelope_errors(line: bytes, desc: str) -> None:
    (reply,) = replies(QMPSession(VERSION), line)
    assert reply["error"] == {"class": "GenericError", "desc": desc}


def test_id_echoed_on_envelope_errors_but_not_on_parse_errors() -> None:
    s = QMPSession(VERSION)
    (r1,) = replies(s, b'{"id": {"a": [1e3]}, "bogus": 0}')
    assert r1["id"] == {"a": [1000]}
    (r2,) = replies(s, b'{"id": 1, "execute": }')
    assert "id" not in r2


def test_request_and_oob_flag() -> None:
    s = QMPSession(VERSION)
    (req,) = replies(s, b'{"execute": "query-status", "id": null}')
    assert isinstance(req, Request)
    assert req.command == "query-status" and req.has_id and req.id is None and not req.oob
    s.accept_capabilities(["oob"])
    (req,) = replies(s, b'{"exec-oob": "query-status"}')
    assert isinstance(req, Request) and req.oob and not req.has_id
    (err,) = replies(s, b'{"exec-oob": "a", "execute": "b"}')
    assert err["error"]["desc"] in (
        "QMP input member 'execute' clashes with 'exec-oob'",
        "QMP input member 'exec-oob' clashes with 'execute'",
    )


def test_negotiation_rewrites_only_command_not_found() -> None:
    s = QMPSession(VERSION)
    req = Request("query-status", {}, 7)
    rewritten = json.loads(s.error_reply(req, CommandNotFound("The command x has not been found")))
    assert rewritten == {"id": 7, "error": {"class": "CommandNotFound", "desc": NEGOTIATION_HINT}}
    kept = json.loads(s.error_reply(req, GenericError("Parameter 'x' is unexpected")))
    assert kept["error"]["desc"] == "Parameter 'x' is unexpected"


def test_capabilities() -> None:
    s = QMPSession(VERSION, offered=())
    with pytest.raises(GenericError, match="Capability oob not available"):
        s.accept_capabilities(["oob"])
    assert s.negotiating
    s.accept_capabilities([])
    assert not s.negotiating and not s.oob_enabled
    with pytest.raises(CommandNotFound, match="already complete"):
        s.accept_capabilities([])


def test_pretty_session_encodes_pretty() -> None:
    s = QMPSession(VERSION, pretty=True)
    assert s.return_reply(Request("x", {}), {}) == b'{\r\n    "return": {\r\n    }\r\n}\r\n'
