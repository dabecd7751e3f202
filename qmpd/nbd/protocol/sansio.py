"""What every sans-IO state machine here shares: :data:`NEED_DATA` and :class:`ProtocolError`."""

from __future__ import annotations

from typing import Final


class NeedData:
    """Sentinel: the state machine needs more bytes before its next event."""

    _instance: NeedData | None = None

    def __new__(cls) -> NeedData:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA: Final = NeedData()


class ProtocolError(Exception):
    """The peer broke the protocol; the only answer is to drop the connection."""
