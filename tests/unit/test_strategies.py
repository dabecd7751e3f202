"""The shared Hypothesis strategies draw only what QEMU accepts (the parser agrees, code point by code point)."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given, settings

from qmpd.qmp.encode import encode
from qmpd.qmp.json_stream import JSONStreamParser, ParseFailure
from tests.strategies import is_qemu_char, qemu_text

#: The whole BMP (surrogates, U+FDD0..U+FDEF, U+FFFE/U+FFFF) and both ends of
#: every other plane (its two noncharacters are the last code points).
CODE_POINTS = [*range(0x10000),
               *(cp for plane in range(1, 17) for cp in (*range(plane << 16, (plane << 16) + 256),
                                                        *range((plane << 16) + 0xFF00, (plane + 1) << 16)))]


def parse(data: bytes) -> list[Any]:
    return JSONStreamParser().feed(data)


def test_every_accepted_code_point_round_trips_as_key_and_value() -> None:
    text = "".join(chr(cp) for cp in CODE_POINTS if is_qemu_char(chr(cp)))
    assert len(text) == len(CODE_POINTS) - 2048 - 66
    msg = {text: text}
    for data in (encode(msg, False).encode("ascii"), json.dumps(msg, ensure_ascii=False).encode()):
        assert parse(data + b"\n") == [msg]


def test_every_refused_code_point_is_refused_by_the_parser() -> None:
    refused = [cp for cp in CODE_POINTS if not is_qemu_char(chr(cp))]
    assert len(refused) == 2048 + 66
    for cp in refused:
        escaped = json.dumps({"k": chr(cp)}).encode()  # \uXXXX
        raw = json.dumps({"k": chr(cp)}, ensure_ascii=False).encode("utf-8", "surrogatepass")
        for data in (escaped, raw):
            out = parse(data + b"\n")
            assert out and all(isinstance(x, ParseFailure) for x in out), (hex(cp), data, out)


@settings(max_examples=200)
@given(qemu_text())
def test_qemu_text_draws_only_accepted_text(text: str) -> None:
    assert all(is_qemu_char(ch) for ch in text)
    assert parse(encode({text: text}, False).encode("ascii") + b"\n") == [{text: text}]
