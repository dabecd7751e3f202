"""The daemon-wide budget of unfinished QMP input, driven with bytes only."""

from __future__ import annotations

import json
from typing import Any

import pytest

from qmpd.qmp.budget import DEFAULT_QMP_INPUT_TOTAL, QMPInputBudget
from qmpd.qmp.session import INPUT_CHUNK, QMPSession, Request

VERSION = {"qemu": {"major": 7, "minor": 2, "micro": 0}, "package": "test"}
OVER = {"class": "GenericError", "desc": "JSON token size limit exceeded"}


def replies(session: QMPSession, data: bytes) -> list[Any]:
    return [
        json.loads(item) if isinstance(item, bytes) else item
        for item in session.receive_data(data)
    ]


def unfinished(size: int) -> bytes:
    """The start of a request with a string argument ``size`` bytes long so far."""
    return b'{"execute": "x", "arguments": {"s": "' + b"a" * size


def test_account_grows_shrinks_and_releases() -> None:
    budget = QMPInputBudget(100)
    a, b = budget.account(), budget.account()
    assert a.resize(60) and budget.used == 60
    assert not b.resize(50)  # would make 110
    assert b.held == 0 and budget.used == 60 and budget.refusals == 1
    assert b.resize(40) and budget.available == 0
    assert a.resize(10) and budget.used == 50  # shrinking always succeeds
    a.release()
    b.release()
    assert budget.used == 0 and a.held == 0 and b.held == 0


def test_default_total_is_256_mib() -> None:
    assert QMPInputBudget().total == DEFAULT_QMP_INPUT_TOTAL == 256 << 20


def test_sessions_share_one_budget() -> None:
    budget = QMPInputBudget(300_000)
    first = QMPSession(VERSION, budget=budget)
    second = QMPSession(VERSION, budget=budget)
    assert replies(first, unfinished(200_000)) == []
    held = first.input_held
    assert held >= 200_000 and budget.used == held
    # The second client's growth does not fit next to the first's message.
    assert replies(second, unfinished(200_000)) == [{"error": OVER}]
    assert second.input_held == 0 and budget.used == held
    # The first client is untouched: its message completes; once answered,
    # the budget is back.
    out = replies(first, b'"}}')
    assert len(out) == 1 and isinstance(out[0], Request)
    assert out[0].arguments == {"s": "a" * 200_000}
    assert out[0].size > held and budget.used == out[0].size  # plus the closing tokens
    first.request_done(out[0])
    assert first.input_held == 0 and budget.used == 0
    # Now the second client's message fits.
    out = replies(second, unfinished(200_000) + b'"}}')
    assert len(out) == 1 and isinstance(out[0], Request)
    second.request_done(out[0])
    assert budget.used == 0


def test_requests_awaiting_their_reply_hold_their_input() -> None:
    budget = QMPInputBudget(300_000)
    first = QMPSession(VERSION, budget=budget)
    second = QMPSession(VERSION, budget=budget)
    queued = [replies(first, unfinished(100_000) + b'"}}')[0] for _ in range(2)]
    assert all(isinstance(r, Request) for r in queued)
    assert budget.used > 200_000
    assert replies(second, unfinished(150_000)) == [{"error": OVER}]
    for request in queued:
        assert isinstance(request, Request)
        first.request_done(request)
        first.request_done(request)  # a second call changes nothing
    assert budget.used == 0
    assert replies(second, unfinished(150_000)) == []
    # A connection that goes away returns its queued requests' share too.
    second.reset_input()
    replies(first, unfinished(100_000) + b'"}}')
    first.reset_input()
    assert budget.used == 0


def test_refused_message_is_discarded_and_later_input_parsed() -> None:
    budget = QMPInputBudget(1000)
    s = QMPSession(VERSION, budget=budget)
    out = replies(s, b'{"execute": "a"}' + unfinished(5000))
    assert isinstance(out[0], Request) and out[0].command == "a"
    assert out[1:] == [{"error": OVER}]
    # The request parsed before the refusal is already in memory: still counted.
    assert budget.used == out[0].size > 0
    s.request_done(out[0])
    assert budget.used == 0
    # As after QEMU's forced-out token, what follows is lexed afresh.
    out = replies(s, b'{"execute": "b"}')
    assert out == [Request(command="b", arguments={})]
    s.request_done(out[0])
    assert budget.used == 0


def test_complete_requests_over_the_total_are_kept_without_error() -> None:
    budget = QMPInputBudget(1000)
    s = QMPSession(VERSION, budget=budget)
    small = b'{"execute": "x", "arguments": {"s": "' + b"a" * 600 + b'"}}'
    out = replies(s, small * 2)
    assert [type(item) for item in out] == [Request, Request]
    assert budget.used > budget.total
    for r in out:
        s.request_done(r)
    assert budget.used == 0


def test_answered_requests_hold_nothing() -> None:
    budget = QMPInputBudget(1 << 20)
    s = QMPSession(VERSION, budget=budget)
    big = b'{"execute": "x", "arguments": {"s": "' + b"a" * 10_000 + b'"}}'
    out = replies(s, big * 3)
    assert [type(item) for item in out] == [Request] * 3
    assert budget.used == sum(r.size for r in out) > 30_000
    for r in out:
        s.request_done(r)
    assert budget.used == 0


def test_many_small_tokens_are_charged_their_overhead() -> None:
    data = b"[" + b"12," * 20_000
    big = QMPSession(VERSION, budget=QMPInputBudget(4 << 20))
    assert replies(big, data) == []
    assert big.input_held > 10 * len(data)  # each token object costs more than its bytes
    # The bytes alone would fit; with their objects they do not.
    small = QMPSession(VERSION, budget=QMPInputBudget(3 * len(data)))
    assert replies(small, data) == [{"error": OVER}]


def test_reset_returns_the_share() -> None:
    budget = QMPInputBudget(1 << 20)
    s = QMPSession(VERSION, budget=budget)
    replies(s, unfinished(1000))
    assert budget.used > 1000
    s.reset_input()
    assert budget.used == 0 and s.input_held == 0
    assert replies(s, b'{"execute": "x"}') == [Request(command="x", arguments={})]


def test_large_buffer_is_charged_in_chunks() -> None:
    # One huge buffer cannot slip past the budget before it is checked.
    budget = QMPInputBudget(INPUT_CHUNK)
    s = QMPSession(VERSION, budget=budget)
    out = replies(s, unfinished(4 * INPUT_CHUNK))
    assert out and all(item == {"error": OVER} for item in out)
    assert budget.used <= INPUT_CHUNK


def test_sessions_without_a_budget_get_their_own() -> None:
    s = QMPSession(VERSION)
    replies(s, unfinished(1000))
    assert s.input_held > 1000


def test_negative_total_refused() -> None:
    with pytest.raises(ValueError):
        QMPInputBudget(-1)
