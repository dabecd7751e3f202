"""The daemon's user-creatable objects (QOM's /objects container)."""

from __future__ import annotations

import logging
from typing import Any

from qmpd.errors import GenericError
from qmpd.objects.base import UserObject, check_id, to_str
from qmpd.objects.iothread import IOThread
from qmpd.objects.secret import Secret
from qmpd.objects.throttle import ThrottleGroup

log = logging.getLogger(__name__)

#: The object types qmpd creates, by ``qom-type``.
OBJECT_TYPES: dict[str, type[UserObject]] = {
    cls.qom_type: cls for cls in (IOThread, Secret, ThrottleGroup)
}


class ObjectRegistry:
    """Objects by id, in creation order."""

    def __init__(self) -> None:
        self.objects: dict[str, UserObject] = {}

    def add_object(self, options: dict[str, Any]) -> None:
        """object-add or ``--object``: ``qom-type``, ``id`` and the type's properties flat.

        Values may be typed (QMP, JSON) or keyval strings (the command line).
        Raises GenericError with QEMU's text.
        """
        props = dict(options)
        if "qom-type" not in props:
            raise GenericError("Parameter 'qom-type' is missing")
        qom_type = to_str(props.pop("qom-type"), "qom-type")
        cls = OBJECT_TYPES.get(qom_type)
        if cls is None:
            raise GenericError(f"Parameter 'qom-type' does not accept value '{qom_type}'")
        if "id" not in props:
            raise GenericError("Parameter 'id' is missing")
        object_id = to_str(props.pop("id"), "id")
        check_id(object_id)
        obj = cls.create(object_id, props)
        if object_id in self.objects:
            raise GenericError(
                f"attempt to add duplicate property '{object_id}' to object (type 'container')"
            )
        self.objects[object_id] = obj
        log.debug("object %s (%s) added", object_id, qom_type)

    def delete(self, object_id: str) -> None:
        """object-del."""
        obj = self.objects.get(object_id)
        if obj is None:
            raise GenericError(f"object '{object_id}' not found")
        if obj.in_use():
            raise GenericError(f"object '{object_id}' is in use, can not be deleted")
        del self.objects[object_id]
        log.debug("object %s deleted", object_id)

    def throttle_group(self, name: str) -> ThrottleGroup:
        obj = self.objects.get(name)
        if not isinstance(obj, ThrottleGroup):
            raise GenericError(f"Throttle group '{name}' does not exist")
        return obj

    def iothread(self, name: str) -> IOThread:
        obj = self.objects.get(name)
        if not isinstance(obj, IOThread):
            raise GenericError(f'iothread "{name}" not found')
        return obj

    def secret(self, name: str) -> bytes:
        """A secret's value, for the features that take one (TLS, encryption)."""
        obj = self.objects.get(name)
        if obj is None:
            raise GenericError(f"No secret with id '{name}'")
        if not isinstance(obj, Secret):
            raise GenericError(f"Object '{name}' is not a secret")
        return obj.value
