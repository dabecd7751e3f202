"""Reading an option's payload as QEMU 7.2's server does, with its error texts.

Sans-IO, used by :class:`qmpd.nbd.protocol.handshake.ServerHandshake`.  QEMU reads an
option field by field (``nbd/server.c``: ``nbd_opt_read``,
``nbd_opt_read_name``, ``nbd_reject_length``) and answers the first problem
it meets with ``NBD_REP_ERR_INVALID`` and one of these texts:

* a field longer than what is left of the option:
  ``Inconsistent lengths in option <name>``;
* a name or query with a NUL byte: ``Unexpected embedded NUL in option <name>``;
* a name over 4096 bytes: ``Invalid name length: <n>``;
* bytes left over where the option should end:
  ``option '<name>' has unexpected length``.

``<name>`` is QEMU 7.2's name for the option (``nbd_opt_lookup``), which
knows only the options 7.2 implements.  Export names in error replies are
cut at 80 bytes (``nbd_sanitize_name``).
"""

from __future__ import annotations

import struct
from typing import Final

#: QEMU 7.2's nbd_opt_lookup(); anything else is "<unknown>".
QEMU_OPTION_NAMES: Final = {
    1: "export name",
    2: "abort",
    3: "list",
    5: "starttls",
    6: "info",
    7: "go",
    8: "structured reply",
    9: "list meta context",
    10: "set meta context",
}

#: Longest name QEMU accepts (NBD_MAX_STRING_SIZE).
_MAX_NAME = 4096
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")


def option_name(option: int) -> str:
    """The name QEMU 7.2 prints for an option number."""
    return QEMU_OPTION_NAMES.get(option, "<unknown>")


def sanitize_name(raw: bytes) -> str:
    """An export name as QEMU quotes it in an error reply: at most 80 bytes, then ``...``."""
    if len(raw) < 80:
        return raw.decode("utf-8", "replace")
    return raw[:80].decode("utf-8", "replace") + "..."


def not_present(raw: bytes) -> str:
    """The text of NBD_REP_ERR_UNKNOWN for an export name."""
    return f"export '{sanitize_name(raw)}' not present"


def unexpected_length(option: int) -> str:
    return f"option '{option_name(option)}' has unexpected length"


class OptionInvalid(Exception):
    """Malformed option data: answered NBD_REP_ERR_INVALID with this message."""


class OptionReader:
    """A cursor over one option's payload that fails as QEMU's reads fail."""

    def __init__(self, option: int, data: bytes) -> None:
        self.option = option
        self.data = data
        self.pos = 0

    @property
    def remaining(self) -> int:
        return len(self.data) - self.pos

    def take(self, n: int, check_nul: bool = False) -> bytes:
        if n > self.remaining:
            raise OptionInvalid(f"Inconsistent lengths in option {option_name(self.option)}")
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        if check_nul and b"\0" in chunk:
            raise OptionInvalid(f"Unexpected embedded NUL in option {option_name(self.option)}")
        return chunk

    def u16(self) -> int:
        value: int = _U16.unpack(self.take(2))[0]
        return value

    def u32(self) -> int:
        value: int = _U32.unpack(self.take(4))[0]
        return value

    def name(self) -> bytes:
        """A length-prefixed export name (raw bytes)."""
        length = self.u32()
        if length > _MAX_NAME:
            raise OptionInvalid(f"Invalid name length: {length}")
        return self.take(length, check_nul=True)

    def query(self) -> bytes | None:
        """A length-prefixed meta-context query; None for one too long (skipped)."""
        length = self.u32()
        if length > _MAX_NAME:
            self.take(length)
            return None
        return self.take(length, check_nul=True)

    def end(self) -> None:
        """The option must end here."""
        if self.remaining:
            raise OptionInvalid(unexpected_length(self.option))
