"""QEMU-style JSON output: ASCII only, QEMU's escapes, separators and member order.

QEMU writes object members in the iteration order of its QDict, a 512-bucket
hash table: buckets ascending, and within a bucket the member added last
first.  Clients must not depend on member order, but reproducing it makes
transcripts byte-comparable with QEMU's at the cost of one sort per object.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Any, cast

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
# Everything but printable ASCII other than '"' and '\\' (the same set as
# ["\\\x00-\x1f\x7f-\U0010ffff], which takes ~6 ms to compile at start-up).
_NEEDS_ESCAPE = re.compile(r'[^\x20\x21\x23-\x5b\x5d-\x7e]')


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


class Encoded(dict[str, Any]):
    """A JSON object together with its compact encoding, spliced verbatim.

    The compact writer emits ``text``; the pretty writer encodes the members.
    Whoever builds one guarantees that ``text`` is ``encode(dict(self))`` and
    that nobody mutates it afterwards.
    """

    __slots__ = ("text",)

    def __init__(self, value: dict[str, Any]) -> None:
        super().__init__(value)
        self.text = encode(value)


def encode(value: Any, pretty: bool = False) -> str:
    """Serialise ``value`` as QEMU's JSON writer would (no trailing newline)."""
    parts: list[str] = []
    if pretty:
        _write(value, parts, pretty)
    else:
        _fast(value, parts, 0)
    return "".join(parts)


#: Per key tuple (insertion order): the members in QEMU's order, each with the
#: text that precedes its value ('{"key": ' for the first, ', "key": ' after).
_PLANS: dict[tuple[str, ...], list[tuple[str, str]]] = {}
_PLANS_MAX = 4096
#: Deeper than this, the iterative writer takes over (Python's recursion limit).
_FAST_DEPTH = 64


def _plan(keys: tuple[str, ...]) -> list[tuple[str, str]]:
    plan = _PLANS.get(keys)
    if plan is None:
        plan = []
        for key in qdict_order(list(keys)):
            plan.append((key, ("{" if not plan else ", ") + quote_string(key) + ": "))
        if len(_PLANS) < _PLANS_MAX:
            _PLANS[keys] = plan
    return plan


def _fast(value: Any, out: list[str], depth: int) -> None:
    # The compact writer, recursive (a call per value, not per step); what
    # it does not know exactly (subclasses, deep nesting) goes to _write.
    emit = out.append
    cls = value.__class__
    if cls is str:
        if value.isascii() and value.isprintable() and '"' not in value and "\\" not in value:
            emit('"' + value + '"')
        else:
            emit(quote_string(value))
    elif cls is dict:
        if not value:
            emit("{}")
        elif depth > _FAST_DEPTH:
            _write(value, out, False)
        else:
            depth += 1
            for key, prefix in _plan(tuple(value)):
                item = value[key]
                kind = item.__class__
                # Scalar members inline: most members are, and a call costs.
                if kind is str and item.isascii() and item.isprintable() and (
                    '"' not in item and "\\" not in item
                ):
                    emit(prefix + '"' + item + '"')
                elif kind is int:
                    emit(prefix + str(item))
                elif kind is bool:
                    emit(prefix + ("true" if item else "false"))
                else:
                    emit(prefix)
                    _fast(item, out, depth)
            emit("}")
    elif cls is list or cls is tuple:
        if not value:
            emit("[]")
        elif depth > _FAST_DEPTH:
            _write(value, out, False)
        else:
            depth += 1
            sep = "["
            for item in value:
                emit(sep)
                sep = ", "
                _fast(item, out, depth)
            emit("]")
    elif cls is Encoded:
        emit(value.text)
    elif cls is bool:
        emit("true" if value else "false")
    elif cls is int:
        emit(str(value))
    elif value is None:
        emit("null")
    else:
        _write(value, out, False)


def _scalar(value: Any) -> str:
    if isinstance(value, str):
        return quote_string(value)
    if value is True:
        return "true"
    if value is False:
        return "false"
    if value is None:
        return "null"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return _number(value)
    if isinstance(value, dict):
        return "{}"
    if isinstance(value, (list, tuple)):
        return "[]"
    raise TypeError(f"cannot encode {type(value).__name__} as QMP JSON")


_END = object()


def _write(value: Any, out: list[str], pretty: bool) -> None:
    # Iterative, because a request may nest 1024 levels deep and its id is
    # echoed back; Python's recursion limit is lower than that.
    #
    # QEMU's pretty writer puts each member on its own line, four spaces per
    # level, and a closing bracket always on a new line (so an empty
    # container nested in a pretty message prints as "{" newline "}").
    stack: list[list[Any]] = []  # [container, iterator, is_dict, first]
    current = value
    while True:
        if isinstance(current, dict) and (current or pretty):
            out.append("{")
            stack.append([current, iter(qdict_order(list(current))), True, True])
        elif isinstance(current, (list, tuple)) and (current or pretty):
            out.append("[")
            stack.append([current, iter(current), False, True])
        else:
            out.append(_scalar(current))
        while stack:
            frame = stack[-1]
            item = next(frame[1], _END)
            if item is _END:
                stack.pop()
                if pretty:
                    out.append("\n" + "    " * len(stack))
                out.append("}" if frame[2] else "]")
                continue
            if pretty:
                out.append(("\n" if frame[3] else ",\n") + "    " * len(stack))
            elif not frame[3]:
                out.append(", ")
            frame[3] = False
            if frame[2]:
                out.append(quote_string(cast(str, item)))
                out.append(": ")
                current = frame[0][item]
            else:
                current = item
            break
        else:
            return


def encode_message(value: Any, pretty: bool = False) -> bytes:
    """One server message on the wire: JSON, then CR LF (CR before every LF)."""
    text = encode(value, pretty)
    if pretty:
        text = text.replace("\n", "\r\n")
    return text.encode("ascii") + b"\r\n"
