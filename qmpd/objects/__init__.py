"""User-creatable objects: ``secret``, ``iothread``, ``throttle-group``, TLS and authz."""

from qmpd.objects.registry import OBJECT_TYPES, ObjectRegistry

__all__ = ["OBJECT_TYPES", "ObjectRegistry"]
