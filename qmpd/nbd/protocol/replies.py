"""Replies: the server's encoders (simple or structured), the client's parsers.

:class:`Replies` encodes one connection's replies as negotiated; READ data
may be a :class:`FileSpan`, which the server sends straight from the file.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Final

from qmpd.nbd.protocol.constants import (
    MAX_STRING,
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY_MAGIC,
    ReplyFlag,
    ReplyType,
)
from qmpd.nbd.protocol.sansio import ProtocolError

_SIMPLE_REPLY = struct.Struct(">IIQ")
_CHUNK = struct.Struct(">IHHQI")
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")
_HOLE = struct.Struct(">QI")
_ERROR_HEAD = struct.Struct(">IH")
_EXTENT = struct.Struct(">II")
_DATA_CHUNK = struct.Struct(">IHHQIQ")  # an OFFSET_DATA chunk's header and offset

_DONE: Final = int(ReplyFlag.DONE)
_OFFSET_DATA: Final = int(ReplyType.OFFSET_DATA)

SIMPLE_REPLY_SIZE: Final = _SIMPLE_REPLY.size  # 16
CHUNK_HEADER_SIZE: Final = _CHUNK.size  # 20


@dataclass(frozen=True, slots=True)
class FileSpan:
    """Reply data that is to be sent straight from a host file (sendfile).

    The protocol only needs its length; the server moves the bytes.
    """

    fd: int
    offset: int
    length: int

    def __len__(self) -> int:
        return self.length


#: What a READ reply's data may be: bytes, a span of a host file, or None
#: for a range that reads as zeros.
ReadData = bytes | FileSpan | None
#: One buffer of a reply, as the server sends it.
ReplyPart = bytes | FileSpan


# --- reply encoding (server side) ---------------------------------------------------------


def simple_reply(cookie: int, error: int = 0) -> bytes:
    return _SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, error, cookie)


def chunk_header(cookie: int, kind: int, length: int, done: bool) -> bytes:
    return _CHUNK.pack(STRUCTURED_REPLY_MAGIC, ReplyFlag.DONE if done else 0, kind, cookie, length)


def data_chunk_header(cookie: int, offset: int, data_length: int, done: bool) -> bytes:
    """Header and offset of an OFFSET_DATA chunk; the data follows."""
    return chunk_header(cookie, ReplyType.OFFSET_DATA, 8 + data_length, done) + _U64.pack(offset)


def hole_chunk(cookie: int, offset: int, size: int, done: bool) -> bytes:
    return chunk_header(cookie, ReplyType.OFFSET_HOLE, 12, done) + _HOLE.pack(offset, size)


def error_chunk(cookie: int, error: int, message: str) -> bytes:
    raw = message.encode("utf-8", "replace")[:MAX_STRING]
    return chunk_header(cookie, ReplyType.ERROR, 6 + len(raw), True) + _ERROR_HEAD.pack(
        error, len(raw)
    ) + raw


def block_status_chunk(
    cookie: int, context_id: int, extents: Sequence[tuple[int, int]], done: bool
) -> bytes:
    body = _U32.pack(context_id) + b"".join(_EXTENT.pack(n, f) for n, f in extents)
    return chunk_header(cookie, ReplyType.BLOCK_STATUS, len(body), done) + body


def none_chunk(cookie: int) -> bytes:
    return chunk_header(cookie, ReplyType.NONE, 0, True)


class Replies:
    """Reply encoders for one connection: simple or structured as negotiated.

    As QEMU's server: successful commands other than READ and BLOCK_STATUS
    get a simple reply; errors are an ERROR chunk (with the message) once
    structured replies are negotiated, a simple reply otherwise.
    """

    def __init__(self, structured: bool) -> None:
        self.structured = structured

    def ok(self, cookie: int) -> bytes:
        return _SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, 0, cookie)

    def error(self, cookie: int, error: int, message: str) -> bytes:
        if self.structured:
            return error_chunk(cookie, error, message)
        return simple_reply(cookie, error)

    def read_data(self, cookie: int, offset: int, data: bytes) -> tuple[bytes, bytes]:
        """:meth:`read_parts` of one piece of data covering the request."""
        if not self.structured:
            return _SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, 0, cookie), data
        return _DATA_CHUNK.pack(STRUCTURED_REPLY_MAGIC, _DONE, _OFFSET_DATA, cookie,
                                8 + len(data), offset), data

    def read_parts(
        self, cookie: int, offset: int, pieces: Sequence[tuple[int, int, ReadData]]
    ) -> list[ReplyPart]:
        """The buffers of a successful READ reply.

        ``pieces`` covers the request in order: ``(offset, length, data)``,
        with ``data`` None for a range that reads as zeros.
        """
        out: list[ReplyPart]
        if not self.structured:
            out = [simple_reply(cookie)]
            for _off, length, data in pieces:
                out.append(data if data is not None else bytes(length))
            return out
        if not pieces:
            return [none_chunk(cookie)]
        out = []
        last = len(pieces) - 1
        for index, (off, length, data) in enumerate(pieces):
            done = index == last
            if data is None:
                out.append(hole_chunk(cookie, off, length, done))
            else:
                out.append(data_chunk_header(cookie, off, length, done))
                out.append(data)
        return out

    def block_status(
        self, cookie: int, per_context: Sequence[tuple[int, Sequence[tuple[int, int]]]]
    ) -> bytes:
        last = len(per_context) - 1
        return b"".join(
            block_status_chunk(cookie, cid, extents, index == last)
            for index, (cid, extents) in enumerate(per_context)
        )


def merge_extents(extents: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """Join neighbouring extents with equal flags (lengths stay below 2^32)."""
    out: list[tuple[int, int]] = []
    for length, flags in extents:
        if out and out[-1][1] == flags and out[-1][0] + length < (1 << 32):
            out[-1] = (out[-1][0] + length, flags)
        else:
            out.append((length, flags))
    return out


# --- client side --------------------------------------------------------------------------


@dataclass
class ReplyHeader:
    """A parsed simple reply or structured chunk header (client side)."""

    structured: bool
    cookie: int
    error: int = 0
    flags: int = 0
    type: int = 0
    length: int = 0


def parse_reply_magic(data: bytes) -> int:
    value: int = _U32.unpack_from(data)[0]
    return value


def parse_simple_reply(data: bytes) -> ReplyHeader:
    magic, error, cookie = _SIMPLE_REPLY.unpack(data)
    if magic != SIMPLE_REPLY_MAGIC:
        raise ProtocolError("bad simple reply magic")
    return ReplyHeader(False, cookie, error=error)


def parse_chunk_header(data: bytes) -> ReplyHeader:
    magic, flags, kind, cookie, length = _CHUNK.unpack(data)
    if magic != STRUCTURED_REPLY_MAGIC:
        raise ProtocolError("bad structured reply magic")
    return ReplyHeader(True, cookie, flags=flags, type=kind, length=length)


def parse_error_payload(payload: bytes) -> tuple[int, str]:
    error, length = _ERROR_HEAD.unpack_from(payload)
    return error, payload[6 : 6 + length].decode("utf-8", "replace")


def parse_extents(payload: bytes) -> tuple[int, list[tuple[int, int]]]:
    context = _U32.unpack_from(payload)[0]
    extents = [_EXTENT.unpack_from(payload, 4 + 8 * i) for i in range((len(payload) - 4) // 8)]
    return context, extents
