"""QOM's view of the objects: qom-list, qom-get and qom-list-types, as QEMU 7.2 answers.

The tree is QEMU's: ``/`` holds ``objects`` (once the first object was
added, as QEMU creates the container lazily) and ``chardevs``; objects have
no children.  Absolute paths name one node; a partial path (no leading
``/``) names the one node whose path ends with it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from qmpd.errors import DeviceNotFound, GenericError
from qmpd.objects.base import UserObject

#: QOM types qmpd knows, for qom-list-types: name -> (parent, abstract).
#: tls-creds-psk is left out on purpose: qmpd refuses to create it.
TYPES: dict[str, tuple[str | None, bool]] = {
    "object": (None, True),
    "container": ("object", False),
    "tls-creds": ("object", True),
    "tls-creds-x509": ("tls-creds", False),
    "authz": ("object", True),
    "authz-simple": ("authz", False),
    "authz-list": ("authz", False),
    "authz-list-file": ("authz", False),
    "secret_common": ("object", True),
    "secret": ("secret_common", False),
    "event-loop-base": ("object", True),
    "iothread": ("event-loop-base", False),
    "throttle-group": ("object", False),
    "chardev": ("object", True),
    "chardev-socket": ("chardev", False),
    "chardev-stdio": ("chardev", False),
}


def _implements(name: str, ancestor: str) -> bool:
    current: str | None = name
    while current is not None:
        if current == ancestor:
            return True
        current = TYPES[current][0]
    return False


def list_types(implements: str | None, abstract: bool) -> list[dict[str, Any]]:
    """qom-list-types."""
    out: list[dict[str, Any]] = []
    for name, (parent, is_abstract) in TYPES.items():
        if is_abstract and not abstract:
            continue
        if implements is not None and (implements not in TYPES
                                       or not _implements(name, implements)):
            continue
        entry: dict[str, Any] = {"name": name}
        if is_abstract:
            entry["abstract"] = True
        if parent is not None:
            entry["parent"] = parent
        out.append(entry)
    return out


@dataclass
class _Node:
    path: str
    qom_type: str
    children: dict[str, _Node]
    obj: UserObject | None = None


class QomTree:
    """The tree for one query, built from the live objects and chardevs."""

    def __init__(self, objects: dict[str, UserObject] | None,
                 chardevs: Iterable[tuple[str, str]]) -> None:
        root = _Node("/", "container", {})
        if objects is not None:
            root.children["objects"] = _Node("/objects", "container", {
                oid: _Node(f"/objects/{oid}", obj.qom_type, {}, obj)
                for oid, obj in objects.items()
            })
        root.children["chardevs"] = _Node("/chardevs", "container", {
            cid: _Node(f"/chardevs/{cid}", kind, {}) for cid, kind in chardevs
        })
        self.root = root

    def _walk(self) -> Iterable[_Node]:
        stack = [self.root]
        while stack:
            node = stack.pop()
            yield node
            stack.extend(node.children.values())

    def resolve(self, path: str) -> _Node:
        parts = [p for p in path.split("/") if p]
        if path.startswith("/"):
            node = self.root
            for part in parts:
                child = node.children.get(part)
                if child is None:
                    raise DeviceNotFound(f"Device '{path}' not found")
                node = child
            return node
        found = [n for n in self._walk()
                 if [p for p in n.path.split("/") if p][-len(parts):] == parts or not parts]
        if len(found) > 1:
            raise GenericError(f"Path '{path}' is ambiguous")
        if not found:
            raise DeviceNotFound(f"Device '{path}' not found")
        return found[0]

    def list(self, path: str) -> list[dict[str, str]]:
        """qom-list."""
        node = self.resolve(path)
        out = [{"name": "type", "type": "string"}]
        if node.obj is not None:
            out += [{"name": n, "type": t} for n, t in node.obj.qom_properties]
        out += [{"name": name, "type": f"child<{child.qom_type}>"}
                for name, child in node.children.items()]
        return out

    def get(self, path: str, prop: str) -> Any:
        """qom-get; a missing path is DeviceNotFound even when partial, as QEMU's."""
        try:
            node = self.resolve(path)
        except GenericError:
            raise DeviceNotFound(f"Device '{path}' not found") from None
        if node.obj is not None:
            return node.obj.qom_get(prop)
        if prop == "type":
            return node.qom_type
        if prop in node.children:
            return f"{node.children[prop].path}"
        raise GenericError(f"Property '{node.qom_type}.{prop}' not found")


ChardevLister = Callable[[], Iterable[tuple[str, str]]]
