"""The ``iothread`` object: accepted and recorded; qmpd runs one asyncio loop.

Exports may name one (``iothread=``); it then counts as in use.
"""

from __future__ import annotations

from typing import Any

from qmpd.errors import GenericError
from qmpd.objects.base import SecretLookup, UserObject, check_members, to_int

_INT64_MAX = (1 << 63) - 1


class IOThread(UserObject):
    """Options: QEMU 7.2's polling and batching tunables (recorded, unused)."""

    qom_type = "iothread"
    properties = ("poll-max-ns", "poll-grow", "poll-shrink", "aio-max-batch")

    def __init__(self, object_id: str, params: dict[str, int]) -> None:
        super().__init__(object_id)
        self.params = params
        self.users: set[str] = set()

    @classmethod
    def create(cls, object_id: str, props: dict[str, Any],
               secret: SecretLookup | None = None) -> IOThread:
        params: dict[str, int] = {}
        for name in cls.properties:
            if name not in props:
                continue
            value = to_int(props[name], name)
            if not 0 <= value <= _INT64_MAX:
                raise GenericError(f"{name} value must be in range [0, {_INT64_MAX}]")
            params[name] = value
        check_members(props, cls.properties)
        return cls(object_id, params)

    def in_use(self) -> bool:
        return bool(self.users)
