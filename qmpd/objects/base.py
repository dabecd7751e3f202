"""What every user-creatable object (QOM's ``-object``) is, and property parsing.

Properties arrive either from QMP (already typed by the schema) or from the
command line's keyval form (strings); :func:`take` accepts both, with QEMU's
keyval texts for the strings.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, ClassVar

from qmpd.errors import GenericError

#: Looks a ``secret`` object's value up by id (QEMU's qcrypto_secret_lookup texts).
SecretLookup = Callable[[str], bytes]

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


def to_bool(value: Any, name: str) -> bool:
    """A boolean property, from JSON or from keyval text (on/off, yes/no, true/false)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        if value in ("on", "yes", "true", "y"):
            return True
        if value in ("off", "no", "false", "n"):
            return False
        raise GenericError(f"Parameter '{name}' expects 'on' or 'off'")
    raise GenericError(f"Invalid parameter type for '{name}', expected: boolean")


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
    #: Its QOM parent type (qom-list-types).
    qom_parent: ClassVar[str] = "object"
    #: What qom-list shows besides ``type``: (name, QOM type), as QEMU lists them.
    qom_properties: ClassVar[tuple[tuple[str, str], ...]] = ()

    def __init__(self, object_id: str) -> None:
        self.id = object_id

    @classmethod
    @abstractmethod
    def create(cls, object_id: str, props: dict[str, Any],
               secret: SecretLookup | None = None) -> UserObject:
        """Build it from its properties (typed or keyval strings), or raise GenericError.

        ``secret`` finds the ``secret`` objects it names (a key's password...).
        """

    def in_use(self) -> bool:
        """Whether something uses it, so that object-del must refuse."""
        return False

    def qom_get(self, name: str) -> Any:
        """A property's value as qom-get returns it (never a secret), or QEMU's error."""
        if name == "type":
            return self.qom_type
        raise GenericError(f"Property '{self.qom_type}.{name}' not found")
