"""The sans-IO JSON stream parser, fed bytes directly (no sockets)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qmpd.qmp.encode import encode
from qmpd.qmp.json_stream import (
    MAX_NESTING,
    JSONStreamParser,
    ParseFailure,
)
from tests.strategies import qemu_text

E = "JSON parse error, "


def feed(data: bytes) -> list[Any]:
    out = JSONStreamParser().feed(data)
    return [f"ERR {x.desc}" if isinstance(x, ParseFailure) else x for x in out]


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b'{"execute": foo}', [f"ERR {E}invalid keyword 'foo'"]),
        (b"hello\n", [f"ERR {E}invalid keyword 'hello'"]),
        (b'{"execute": }', [f"ERR {E}expecting value"]),
        (b"}", [f"ERR {E}expecting value"]),
        (b"]", [f"ERR {E}expecting value"]),
        (b"{]", [f"ERR {E}expecting value"]),
        (b'{"a" 1}', [f"ERR {E}missing : in object pair"]),
        (b'{"a":1 "b":2}', [f"ERR {E}expected separator in dict"]),
        (b"[1 2]", [f"ERR {E}expected separator in list"]),
        (b"[1,]", [f"ERR {E}expecting value"]),
        (b"{1:2}", [f"ERR {E}key is not a string in object"]),
        (b'{"a":tru}', [f"ERR {E}invalid keyword 'tru'"]),
        (b'{"a":"\\x"}', [f"ERR {E}invalid escape sequence in string"]),
        (b'"\\ud800"', [f"ERR {E}\\ud800 is not a valid Unicode character"]),
        (b'"\\uffff"', [f"ERR {E}\\uffff is not a valid Unicode character"]),
        (b'{"a":"\xff"}', [f"ERR {E}stray '\"\ufffd'", f"ERR {E}expecting value"]),
        (b'"\xc0\xaf"', [f"ERR {E}invalid UTF-8 sequence in string"]),
        (b'"\xed\xa0\x80"', [f"ERR {E}invalid UTF-8 sequence in string"]),
        (b'"\xf4\x90\x80\x80"', [f"ERR {E}invalid UTF-8 sequence in string"]),
        (b'"\xef\xbf\xbf"', [f"ERR {E}invalid UTF-8 sequence in string"]),
        (b'"\x80"', [f"ERR {E}invalid UTF-8 sequence in string"]),
        (b'{"a":1,"a":2}', [f"ERR {E}duplicate key"]),
        (b"@", [f"ERR {E}stray '@'"]),
        (b'{"a":"b\x01c"}', [f"ERR {E}stray '\"b\x01'", f"ERR {E}expecting value"]),
        (b'\xff{"execute":"x"}', [f"ERR {E}stray '\ufffd'", {"execute": "x"}]),
        (b'\xef\xbb\xbf{"execute":"x"}', [f"ERR {E}stray '\ufffd'", {"execute": "x"}]),
        (b"\x00", [f"ERR {E}stray ''"]),
        (b"01 ", [f"ERR {E}stray '01'"]),
        (b"NaN ", [f"ERR {E}stray 'N'"]),
        (b"/* x */ ", [f"ERR {E}stray '/'"]),
        (b"%d ", [f"ERR {E}stray '%'"]),
        (b'{"execute": %s}', [f"ERR {E}stray '%'", f"ERR {E}expecting value"]),
        (b'"a\nb" {}', [f"ERR {E}stray '\"a\n'", {}]),
        (b'"\\u12" ', [f"ERR {E}\\u12\" is not a valid Unicode character"]),
        (b"{'execute': 'x'}", [{"execute": "x"}]),
        (b"'it\\'s' ", ["it's"]),
        (b'"\\u0000" ', ["\x00"]),
        (b'"\xc0\x80" ', ["\x00"]),
        (b'"\x7f" ', ["\x7f"]),
        (b'"\\ud83d\\ude00" ', ["\U0001f600"]),
        (b"1.5e3 ", [1500.0]),
        (b"-0 ", [0]),
        (b"-0.0 ", [-0.0]),
        (b"1e400 ", [float("inf")]),
        (b"9223372036854775807 ", [9223372036854775807]),
        (b"18446744073709551615 ", [18446744073709551615]),
        (b"18446744073709551616 ", [1.8446744073709552e19]),
        (b"-9223372036854775809 ", [-9.2233720368547758e18]),
        (b"0e5 ", [0, f"ERR {E}invalid keyword 'e'", 5]),
        (b"1.x ", [f"ERR {E}stray '1.x'"]),
        (b"   \r\n\t ", []),
        (b'{"a":1}{"b":2}\n{"c":3}', [{"a": 1}, {"b": 2}, {"c": 3}]),
        (b"42 true null \"s\" [] ", [42, True, None, "s", []]),
    ],
)
def test_qemu_error_table(data: bytes, expected: list[Any]) -> None:
    assert feed(data) == expected


def test_bare_scalar_waits_for_its_terminator() -> None:
    p = JSONStreamParser()
    assert p.feed(b"42") == []
    assert p.feed(b" ") == [42]
    assert p.feed(b"tru") == []
    assert p.feed(b"e,") == [True, ParseFailure(E + "expecting value")]


def test_unclosed_brace_swallows_until_bracket_closes_it() -> None:
    p = JSONStreamParser()
    assert p.feed(b'{"execute": "query-status"\n') == []
    assert p.feed(b'{"execute": "query-status"}\n') == []
    assert p.feed(b"]") == [ParseFailure(E + "expected separator in dict")]


def test_control_byte_resynchronises() -> None:
    p = JSONStreamParser()
    assert p.feed(b'{"execute": "quer') == []
    out = p.feed(b'\x04{"execute": "x"}')
    assert out[-1] == {"execute": "x"}
    assert all(isinstance(x, ParseFailure) for x in out[:-1])


def test_nesting_limit() -> None:
    ok = b"[" * MAX_NESTING + b"]" * MAX_NESTING
    (value,) = feed(ok)
    depth = 1
    while value:
        (value,) = value
        depth += 1
    assert depth == MAX_NESTING
    bad = b"[" * (MAX_NESTING + 1) + b"]" * (MAX_NESTING + 1)
    out = feed(bad)
    assert out[0] == "ERR JSON nesting depth limit exceeded"
    assert out[1:] == [f"ERR {E}expecting value"] * (MAX_NESTING + 1)


def test_token_count_limit_with_small_limit() -> None:
    p = JSONStreamParser(max_token_count=10)
    # [1,2,3,4] is 9 tokens: fine.  [1,2,3,4,5] needs 11.
    assert p.feed(b"[1,2,3,4]") == [[1, 2, 3, 4]]
    out = p.feed(b"[1,2,3,4,5]")
    # The 11th token (the closing bracket) is the one refused.
    assert out == [ParseFailure("JSON token count limit exceeded")]
    assert p.feed(b"[1,2,3,4,5,6]") == [
        ParseFailure("JSON token count limit exceeded"),
        6,
        ParseFailure(E + "expecting value"),
    ]


def test_token_size_limit_real_64mib() -> None:
    p = JSONStreamParser()
    head = b'{"execute": "query-status", "id": "'
    chunk = b"x" * (1 << 20)
    out: list[Any] = list(p.feed(head))
    for _ in range(65):
        out += p.feed(chunk)
    out += p.feed(b'"}\n{"execute": "x"}')
    assert out[0] == ParseFailure("JSON token size limit exceeded")
    # The rest of the oversized string is lexed from scratch, then the
    # parser recovers and the next command arrives intact.
    assert out[-1] == {"execute": "x"}
    assert p.pending_bytes == 0


def test_one_mebibyte_id_round_trips() -> None:
    big = "y" * (1 << 20)
    msg = json.dumps({"execute": "query-version", "id": big}).encode()
    assert feed(msg) == [{"execute": "query-version", "id": big}]


def test_pending_bytes_bounded_for_whitespace_flood() -> None:
    p = JSONStreamParser()
    p.feed(b"{")
    for _ in range(10):
        p.feed(b" " * (1 << 20))
    assert p.pending_bytes < 16


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(1 << 63), max_value=(1 << 64) - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | qemu_text(),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(qemu_text(max_size=8), children, max_size=4),
    max_leaves=20,
)


def _equal(a: Any, b: Any) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return float(a) == float(b)
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(map(_equal, a, b))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    return bool(a == b) and type(a) is type(b)


@settings(max_examples=200, deadline=None)
@given(
    messages=st.lists(st.dictionaries(qemu_text(max_size=6), json_values, max_size=4), min_size=1,
                      max_size=5),
    cuts=st.lists(st.integers(min_value=0, max_value=10_000), max_size=20),
    pretty=st.booleans(),
)
def test_any_split_gives_the_same_messages(
    messages: list[dict[str, Any]], cuts: list[int], pretty: bool
) -> None:
    stream = b"".join(encode(m, pretty).encode("ascii") + b"\r\n" for m in messages)
    points = sorted({c % (len(stream) + 1) for c in cuts})
    parser = JSONStreamParser()
    out: list[Any] = []
    last = 0
    for point in [*points, len(stream)]:
        out += parser.feed(stream[last:point])
        last = point
    assert len(out) == len(messages)
    for got, want in zip(out, messages, strict=False):
        assert _equal(got, want), (got, want)


@settings(max_examples=300, deadline=None)
@given(garbage=st.binary(max_size=200))
def test_garbage_never_breaks_the_parser(garbage: bytes) -> None:
    parser = JSONStreamParser()
    out = parser.feed(garbage)
    for item in out:
        if isinstance(item, ParseFailure):
            assert item.desc.startswith(("JSON parse error, ", "JSON "))
    # A client can always resynchronise with a control byte, then be heard.
    tail = parser.feed(b'\x04"\x04]}]}\x04{"execute": "query-status"}')
    assert tail[-1] == {"execute": "query-status"}


def _run(data: bytes, fast: bool, splits: list[int]) -> list[Any]:
    parser = JSONStreamParser(fast_messages=fast)
    out: list[Any] = []
    last = 0
    for point in [*sorted(p % (len(data) + 1) for p in splits), len(data)]:
        out += parser.feed(data[last:point])
        last = point
    out += parser.feed(b'\x04{"execute": "end"}')
    return out


@settings(max_examples=500, deadline=None)
@given(
    text=st.text(alphabet='{}[]:,"0123456789-.e truefalsnl\'\\x\n', max_size=80),
    splits=st.lists(st.integers(min_value=0, max_value=100), max_size=3),
)
def test_fast_path_agrees_with_token_path(text: str, splits: list[int]) -> None:
    data = text.encode()
    # Compare on one buffer and on random splits: the whole-message fast
    # path must never change what a stream means.
    assert _run(data, True, []) == _run(data, False, [])
    assert _run(data, True, splits) == _run(data, False, [])


@settings(max_examples=200, deadline=None)
@given(messages=st.lists(st.dictionaries(qemu_text(max_size=6), json_values, max_size=4), max_size=4))
def test_fast_path_agrees_on_valid_messages(messages: list[dict[str, Any]]) -> None:
    data = b"".join(json.dumps(m).encode() + b"\n" for m in messages)
    fast = _run(data, True, [])
    slow = _run(data, False, [])
    assert len(fast) == len(slow)
    assert all(_equal(a, b) for a, b in zip(fast, slow, strict=True))
