"""What every user-creatable object (QOM's ``-object``) is, and property parsing.

Properties arrive either from QMP (already typed by the schema) or from the
command line's keyval form (strings); :func:`take` accepts both, with QEMU's
keyval texts for the strings.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from typing import Any, ClassVar

from qmpd.errors import GenericError

_ID = re.compile(r"[A-Za-z][A-Za-z0-9_.-]*")


def check_id(object_id: str) -> None:
    """QEMU's id_wellformed()."""
    if not _ID.fullmatch(object_id):
        raise GenericError("Parameter 'id' expects an identifier")


def to_int(value: Any, name: str) -> int:
    """An integer property, from JSON or from keyval text (any C base)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str):
        try:
            return int(value, 0)
        except ValueError:
            pass
        raise GenericError(f"Parameter '{name}' expects integer")
    raise GenericError(f"Invalid parameter type for '{name}', expected: integer")


def to_str(value: Any, name: str) -> str:
    if not isinstance(value, str):
        raise GenericError(f"Invalid parameter type for '{name}', expected: string")
    return value


def check_members(props: dict[str, Any], allowed: tuple[str, ...], prefix: str = "") -> None:
    """QEMU's "Parameter 'x' is unexpected" for a key no property has."""
    for key in props:
        if key not in allowed:
            raise GenericError(f"Parameter '{prefix}{key}' is unexpected")


class UserObject(ABC):
    """One object created by ``object-add`` or ``--object``."""

    #: The ``qom-type`` that creates it.
    qom_type: ClassVar[str]
    #: Its properties, in QAPI order (anything else is unexpected).
    properties: ClassVar[tuple[str, ...]]

    def __init__(self, object_id: str) -> None:
        self.id = object_id

    @classmethod
    @abstractmethod
    def create(cls, object_id: str, props: dict[str, Any]) -> UserObject:
        """Build it from its properties (typed or keyval strings), or raise GenericError."""

    def in_use(self) -> bool:
        """Whether something uses it, so that object-del must refuse."""
        return False
