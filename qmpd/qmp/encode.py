"""QEMU-style JSON output: ASCII only, QEMU's escapes, separators and member order.

QEMU writes object members in the iteration order of its QDict, a 512-bucket
hash table: buckets ascending, and within a bucket the member added last
first.  Clients must not depend on member order, but reproducing it makes
transcripts byte-comparable with QEMU's at the cost of one sort per object.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Any

_QDICT_BUCKETS = 512
_MASK32 = 0xFFFFFFFF


@lru_cache(maxsize=8192)
def qdict_bucket(key: str) -> int:
    """Bucket of ``key`` in a QEMU QDict (tdb_hash over modified UTF-8)."""
    raw = key.encode("utf-8", "surrogatepass").replace(b"\0", b"\xc0\x80")
    value = (0x238F13AF * len(raw)) & _MASK32
    for i, c in enumerate(raw):
        value = (value + (c << (i * 5 % 24))) & _MASK32
    return ((1103515243 * value + 12345) & _MASK32) % _QDICT_BUCKETS


_ORDER_CACHE: dict[tuple[str, ...], list[str]] = {}
_ORDER_CACHE_MAX = 4096


def qdict_order(keys: list[str]) -> list[str]:
    """Keys (given in insertion order) in the order QEMU iterates them."""
    if len(keys) < 2:
        return keys
    cache_key = tuple(keys)
    order = _ORDER_CACHE.get(cache_key)
    if order is None:
        indexed = sorted(range(len(keys)), key=lambda i: (qdict_bucket(keys[i]), -i))
        order = [keys[i] for i in indexed]
        if len(_ORDER_CACHE) < _ORDER_CACHE_MAX:
            _ORDER_CACHE[cache_key] = order
    return order


_SHORT_ESCAPES = {
    '"': '\\"',
    "\\": "\\\\",
    "\b": "\\b",
    "\f": "\\f",
    "\n": "\\n",
    "\r": "\\r",
    "\t": "\\t",
}
_NEEDS_ESCAPE = re.compile(r'["\\\x00-\x1f\x7f-\U0010ffff]')


def _escape_char(m: re.Match[str]) -> str:
    ch = m.group()
    short = _SHORT_ESCAPES.get(ch)
    if short is not None:
        return short
    cp = ord(ch)
    if 0xD800 <= cp <= 0xDFFF:
        cp = 0xFFFD  # a lone surrogate cannot be valid UTF-8 in QEMU either
    if cp > 0xFFFF:
        cp -= 0x10000
        return f"\\u{0xD800 + (cp >> 10):04X}\\u{0xDC00 + (cp & 0x3FF):04X}"
    return f"\\u{cp:04X}"


def quote_string(text: str) -> str:
    """A JSON string literal exactly as QEMU writes it."""
    if text.isascii() and text.isprintable() and '"' not in text and "\\" not in text:
        return '"' + text + '"'
    return '"' + _NEEDS_ESCAPE.sub(_escape_char, text) + '"'


def _number(value: float) -> str:
    return f"{value:.17g}"


def encode(value: Any, pretty: bool = False) -> str:
    """Serialise ``value`` as QEMU's JSON writer would (no trailing newline)."""
    parts: list[str] = []
    if pretty:
        _write_pretty(value, parts, 0)
    else:
        _write(value, parts)
    return "".join(parts)


def _write(value: Any, out: list[str]) -> None:
    if isinstance(value, str):
        out.append(quote_string(value))
    elif value is True:
        out.append("true")
    elif value is False:
        out.append("false")
    elif value is None:
        out.append("null")
    elif isinstance(value, int):
        out.append(str(value))
    elif isinstance(value, float):
        out.append(_number(value))
    elif isinstance(value, dict):
        if not value:
            out.append("{}")
            return
        out.append("{")
        first = True
        for key in qdict_order(list(value)):
            if not first:
                out.append(", ")
            first = False
            out.append(quote_string(key))
            out.append(": ")
            _write(value[key], out)
        out.append("}")
    elif isinstance(value, (list, tuple)):
        if not value:
            out.append("[]")
            return
        out.append("[")
        first = True
        for item in value:
            if not first:
                out.append(", ")
            first = False
            _write(item, out)
        out.append("]")
    else:
        raise TypeError(f"cannot encode {type(value).__name__} as QMP JSON")


def _write_pretty(value: Any, out: list[str], depth: int) -> None:
    # QEMU's pretty writer: each member on its own line, four spaces per
    # level, and a closing bracket always on a new line (so an empty
    # container prints as "{" newline "}").
    if isinstance(value, dict):
        out.append("{")
        inner = "\n" + "    " * (depth + 1)
        first = True
        for key in qdict_order(list(value)):
            out.append(inner if first else "," + inner)
            first = False
            out.append(quote_string(key))
            out.append(": ")
            _write_pretty(value[key], out, depth + 1)
        out.append("\n" + "    " * depth + "}")
    elif isinstance(value, (list, tuple)):
        out.append("[")
        inner = "\n" + "    " * (depth + 1)
        first = True
        for item in value:
            out.append(inner if first else "," + inner)
            first = False
            _write_pretty(item, out, depth + 1)
        out.append("\n" + "    " * depth + "]")
    else:
        _write(value, out)


def encode_message(value: Any, pretty: bool = False) -> bytes:
    """One server message on the wire: JSON, then CR LF (CR before every LF)."""
    text = encode(value, pretty)
    if pretty:
        text = text.replace("\n", "\r\n")
    return text.encode("ascii") + b"\r\n"
