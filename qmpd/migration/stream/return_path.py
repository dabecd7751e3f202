"""The return path (destination -> source): messages out and in (sans-IO)."""

from __future__ import annotations

import errno
import struct
from dataclasses import dataclass

from qmpd.migration.stream.wire import (
    MigrationStreamError,
    RPMessageType,
)


def encode_rp_message(kind: RPMessageType | int, data: bytes = b"") -> bytes:
    """One return-path message; SHUT and PONG carry a be32."""
    return struct.pack(">HH", kind, len(data)) + data


# --------------------------------------------------------------------------
# Return path (destination -> source)
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class RPMessage:
    """One return-path message; :attr:`value` for SHUT and PONG."""

    type: int
    data: bytes

    @property
    def value(self) -> int:
        return int(struct.unpack(">I", self.data[:4].ljust(4, b"\0"))[0])


_RP_LENGTHS: dict[int, int] = {RPMessageType.SHUT: 4, RPMessageType.PONG: 4}


class ReturnPathReader:
    """The source's side of the return path: ``feed(bytes) -> [RPMessage]``.

    QEMU 7.2's destination sends PONG(n) for each PING(n) and SHUT(0) when it
    finished loading (SHUT(1) on failure).  Malformed messages raise
    :class:`MigrationStreamError` with qmpd's own wording.
    """

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[RPMessage]:
        self._buf += data
        out: list[RPMessage] = []
        while len(self._buf) >= 4:
            kind, length = struct.unpack_from(">HH", self._buf)
            expected = _RP_LENGTHS.get(kind)
            if kind == RPMessageType.INVALID or kind > RPMessageType.RESUME_ACK or (
                expected is not None and length != expected
            ):
                raise MigrationStreamError(
                    errno.EINVAL,
                    [f"qmpd: invalid return path message 0x{kind:04x} length 0x{length:04x}"],
                )
            if len(self._buf) < 4 + length:
                break
            out.append(RPMessage(kind, bytes(self._buf[4 : 4 + length])))
            del self._buf[: 4 + length]
        return out

    def close(self) -> None:
        """Raise if the channel closed in the middle of a message."""
        if self._buf:
            raise MigrationStreamError(errno.EIO, ["qmpd: return path closed mid-message"])
