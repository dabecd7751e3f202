"""The daemon's user-creatable objects (QOM's /objects container)."""

from __future__ import annotations

import logging
from typing import Any

from qmpd.errors import GenericError
from qmpd.objects.authz import Authz, AuthzList, AuthzListFile, AuthzSimple
from qmpd.objects.base import UserObject, check_id, to_str
from qmpd.objects.iothread import IOThread
from qmpd.objects.qom import ChardevLister, QomTree, list_types
from qmpd.objects.secret import Secret
from qmpd.objects.throttle import ThrottleGroup
from qmpd.objects.tls import TlsCredsPsk, TlsCredsX509

log = logging.getLogger(__name__)

#: The object types qmpd creates, by ``qom-type``.
OBJECT_TYPES: dict[str, type[UserObject]] = {
    cls.qom_type: cls for cls in (
        AuthzList, AuthzListFile, AuthzSimple, IOThread, Secret, ThrottleGroup,
        TlsCredsPsk, TlsCredsX509,
    )
}
#: QAPI's name for authz-list-file (QEMU 7.2 accepts it, then fails to create it).
OBJECT_TYPES["authz-listfile"] = AuthzListFile


class ObjectRegistry:
    """Objects by id, in creation order."""

    def __init__(self) -> None:
        self.objects: dict[str, UserObject] = {}
        #: QEMU creates /objects with the first object, then keeps it.
        self._root_created = False
        #: The daemon's chardevs (monitors) for QOM's /chardevs: (id, QOM type).
        self.chardevs: ChardevLister = lambda: ()

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
        obj = cls.create(object_id, props, self.secret)
        if object_id in self.objects:
            raise GenericError(
                f"attempt to add duplicate property '{object_id}' to object (type 'container')"
            )
        self.objects[object_id] = obj
        self._root_created = True
        log.debug("object %s (%s) added", object_id, qom_type)

    def delete(self, object_id: str) -> None:
        """object-del."""
        obj = self.objects.get(object_id)
        if obj is None:
            raise GenericError(f"object '{object_id}' not found")
        if obj.in_use():
            # QEMU 7.2 deletes TLS credentials and authz objects in use; qmpd refuses.
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

    def tls_creds(self, name: str, endpoint: str | None = None) -> TlsCredsX509:
        """TLS credentials by id, with QEMU's texts; ``endpoint`` checks which end they serve."""
        obj = self.objects.get(name)
        if obj is None:
            raise GenericError(f"No TLS credentials with id '{name}'")
        if not isinstance(obj, TlsCredsX509):
            raise GenericError(f"Object with id '{name}' is not TLS credentials")
        if endpoint is not None and obj.endpoint != endpoint:
            raise GenericError(f"Expected TLS credentials for a {endpoint} endpoint")
        return obj

    def authz(self, name: str) -> Authz:
        """An authorization object by id."""
        obj = self.objects.get(name)
        if obj is None:
            raise GenericError(f"No authorization object with id '{name}'")
        if not isinstance(obj, Authz):
            raise GenericError(f"Object with id '{name}' is not an authorization object")
        return obj

    def hold(self, obj: TlsCredsX509 | Authz, user: str) -> None:
        """``user`` uses ``obj``: object-del refuses it until :meth:`release`."""
        obj.users.add(user)

    def release(self, obj: TlsCredsX509 | Authz, user: str) -> None:
        obj.users.discard(user)

    # --- QOM ---------------------------------------------------------------------

    def _tree(self) -> QomTree:
        return QomTree(self.objects if self._root_created else None, self.chardevs())

    def qom_list(self, path: str) -> list[dict[str, str]]:
        return self._tree().list(path)

    def qom_get(self, path: str, prop: str) -> Any:
        return self._tree().get(path, prop)

    def qom_list_types(self, implements: str | None, abstract: bool) -> list[dict[str, Any]]:
        return list_types(implements, abstract)
