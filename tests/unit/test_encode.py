"""QEMU-style JSON output."""

from __future__ import annotations

import json
from collections import OrderedDict

import pytest
from hypothesis import given
from hypothesis import strategies as st

from qmpd.qmp.encode import _write, encode, encode_message, qdict_order


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (1500.0, "1500"),
        (0.1, "0.10000000000000001"),
        (-0.0, "-0"),
        (1e300, "1.0000000000000001e+300"),
        (1.8446744073709552e19, "1.8446744073709552e+19"),
        (-9.2233720368547758e18, "-9.2233720368547758e+18"),
        (float("inf"), "inf"),
        (18446744073709551615, "18446744073709551615"),
        (True, "true"),
        (None, "null"),
        ("é😀", '"\\u00E9\\uD83D\\uDE00"'),
        ("\x7f\x00\x1f", '"\\u007F\\u0000\\u001F"'),
        ('"\\/\b\f\n\r\t', '"\\"\\\\/\\b\\f\\n\\r\\t"'),
        ({}, "{}"),
        ([], "[]"),
        ([1, [2, {}]], "[1, [2, {}]]"),
    ],
)
def test_scalars_and_containers(value: object, text: str) -> None:
    assert encode(value) == text


@pytest.mark.parametrize(
    "keys",
    [
        ["return", "id"],
        ["id", "error"],
        ["class", "desc"],
        ["timestamp", "event", "data"],
        ["status", "singlestep", "running"],
        ["micro", "minor", "major"],
        ["qemu", "package"],
        ["version", "capabilities"],
    ],
)
def test_member_order_matches_qemu_observations(keys: list[str]) -> None:
    # Insert in any order: the observed QEMU order must come out.
    assert qdict_order(sorted(keys)) == keys or qdict_order(list(reversed(keys))) == keys


def test_qapi_insertion_order_for_statusinfo() -> None:
    # "status" and "singlestep" share a bucket: the one inserted last comes first.
    assert qdict_order(["running", "singlestep", "status"]) == ["status", "singlestep", "running"]


def test_message_is_ascii_with_crlf() -> None:
    raw = encode_message({"return": {"x": "ü"}, "id": 1})
    assert raw == b'{"return": {"x": "\\u00FC"}, "id": 1}\r\n'
    assert json.loads(raw) == {"return": {"x": "ü"}, "id": 1}


def test_pretty_output_uses_crlf_and_qemu_layout() -> None:
    raw = encode_message({"return": {}}, pretty=True)
    assert raw == b'{\r\n    "return": {\r\n    }\r\n}\r\n'
    raw = encode_message({"return": [1, 2]}, pretty=True)
    assert raw == b'{\r\n    "return": [\r\n        1,\r\n        2\r\n    ]\r\n}\r\n'


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner,
                                                                max_size=5),
    max_leaves=30,
)


def _iterative(value: object) -> str:
    parts: list[str] = []
    _write(value, parts, False)
    return "".join(parts)


@given(_JSON)
def test_compact_writer_matches_the_iterative_one(value: object) -> None:
    """The recursive compact writer (issue 10) writes exactly what the
    iterative writer, which the transcripts were checked against, writes."""
    assert encode(value) == _iterative(value)
    assert encode([value, {"k": value}]) == _iterative([value, {"k": value}])


def test_compact_writer_deep_nesting_and_subclasses() -> None:
    deep: object = {"a": 1}
    for i in range(3000):
        deep = [deep] if i % 2 else {"x": deep, "y": "z"}
    assert encode(deep) == _iterative(deep)
    assert encode(OrderedDict(b=1, a=[True, None])) == '{"a": [true, null], "b": 1}'
    assert encode((1, "x")) == '[1, "x"]'


def test_encoded_objects_are_spliced_compact_and_rewritten_pretty() -> None:
    from qmpd.qmp.encode import Encoded

    inner = {"ro": False, "node-name": "n\u00e9", "image": {"virtual-size": 1 << 40}}
    enc = Encoded(inner)
    assert enc.text == encode(inner)
    value = {"return": [enc, {"x": enc}]}
    plain = {"return": [inner, {"x": inner}]}
    assert encode(value) == encode(plain)
    assert encode(value, pretty=True) == encode(plain, pretty=True)
    # The compact writer uses the text as given (it is the builder's promise).
    enc.text = '{"spliced": true}'
    assert encode([enc]) == '[{"spliced": true}]'
