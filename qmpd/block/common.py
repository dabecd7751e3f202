"""The block graph's vocabulary, as QEMU's ``include/block/block-common.h``:
permissions (BLK_PERM_*), child roles (BDRV_CHILD_*), node states, and what
nodes are given of their graph."""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

from qmpd.objects import ObjectRegistry

T = TypeVar("T")

#: A request's completion callback: ``(result, None)`` or ``(None, error)``.
IoDone = Callable[[Any, BaseException | None], None]
#: A read started without a coroutine: ``(offset, length, done)``.
SoonRead = tuple[int, int, IoDone]
#: A write started without a coroutine: ``(offset, data, fua, done)``.
SoonWrite = tuple[int, bytes | bytearray, bool, IoDone]


class Perm(enum.IntFlag):
    """QEMU's block permissions (BLK_PERM_*); also the lock byte numbers."""

    NONE = 0
    CONSISTENT_READ = 0x1
    WRITE = 0x2
    WRITE_UNCHANGED = 0x4
    RESIZE = 0x8


PERM_ALL = Perm.CONSISTENT_READ | Perm.WRITE | Perm.WRITE_UNCHANGED | Perm.RESIZE

PERM_NAMES = {
    Perm.CONSISTENT_READ: "consistent read",
    Perm.WRITE: "write",
    Perm.WRITE_UNCHANGED: "write unchanged",
    Perm.RESIZE: "resize",
}


def perm_names(perm: Perm) -> str:
    """``'write, resize'``: the names QEMU prints for a permission set."""
    return ", ".join(name for bit, name in PERM_NAMES.items() if perm & bit)


class ChildRole(enum.Flag):
    """What a child is to its parent (BDRV_CHILD_*)."""

    DATA = enum.auto()
    METADATA = enum.auto()
    FILTERED = enum.auto()
    COW = enum.auto()
    PRIMARY = enum.auto()

    @classmethod
    def image(cls) -> ChildRole:
        return cls.DATA | cls.METADATA | cls.PRIMARY


#: Every permission set by value, and the bits as ints, for the rules below.
_PERMS = tuple(Perm(value) for value in range(16))
_CONSISTENT_READ, _WRITE, _WRITE_UNCHANGED, _RESIZE = 0x1, 0x2, 0x4, 0x8
_WRITE_RESIZE = _WRITE | _RESIZE
_NOT_WRITE_RESIZE = ~_WRITE_RESIZE
_DATA, _METADATA, _FILTERED, _COW = (ChildRole.DATA.value, ChildRole.METADATA.value,
                                     ChildRole.FILTERED.value, ChildRole.COW.value)
#: The answers of default_child_perms by (role, parent's perm and shared,
#: active, read-only).
_CHILD_PERMS: dict[int, tuple[Perm, Perm]] = {}


def default_child_perms(role: ChildRole, parent_perm: Perm, parent_shared: Perm,
                        active: bool, read_only: bool) -> tuple[Perm, Perm]:
    """What a node asks of a child in ``role``, given its own parents' needs:
    QEMU's storage/COW rule set (``bdrv_default_perms``)."""
    # Plain ints, and each answer worked out once: this runs for every
    # node at every (in)activation, and enum arithmetic costs several
    # times what the rules themselves do.
    r: int = role._value_
    key = (r << 10 | parent_perm._value_ << 6 | parent_shared._value_ << 2
           | active << 1 | read_only)
    known = _CHILD_PERMS.get(key)
    if known is not None:
        return known
    if r & _COW:
        perm = _CONSISTENT_READ
        shared = (_WRITE_RESIZE if int(parent_shared) & _WRITE else 0) \
            | _CONSISTENT_READ | _WRITE_UNCHANGED
    else:
        perm, shared = int(parent_perm), int(parent_shared)
        if not r & _FILTERED:
            if r & _METADATA:
                if active and not read_only:
                    perm |= _WRITE_RESIZE | _CONSISTENT_READ
                else:
                    perm |= _CONSISTENT_READ
                shared &= _NOT_WRITE_RESIZE
            if r & _DATA:
                perm |= _CONSISTENT_READ
    if not active:
        shared |= _WRITE_RESIZE
    known = _CHILD_PERMS[key] = _PERMS[perm], _PERMS[shared]
    return known


class NodeState(enum.Enum):
    """Whether a node may write and trust its cached metadata.

    ``INACTIVATING``: its driver is writing back (:meth:`BlockDriver.inactivate`)
    before the node turns inactive, or before its cache is reloaded: no new
    writes, but what it caches is still its own.
    """

    ACTIVE = "active"
    INACTIVATING = "inactivating"
    INACTIVE = "inactive"


#: Allowed node-state changes: inactivation (through writing back) and
#: activation (back to inactive when it fails).
NODE_TRANSITIONS: dict[NodeState, frozenset[NodeState]] = {
    NodeState.ACTIVE: frozenset({NodeState.INACTIVATING, NodeState.INACTIVE}),
    NodeState.INACTIVATING: frozenset({NodeState.INACTIVE, NodeState.ACTIVE}),
    NodeState.INACTIVE: frozenset({NodeState.ACTIVE}),
}


class NodeGraph(Protocol):
    """What a node (and so its driver) may use of the graph it belongs to."""

    #: The objects drivers refer to (throttle groups).
    objects: ObjectRegistry
    #: Where drivers send QMP events (``BLOCK_IMAGE_CORRUPTED``).
    on_event: Callable[[str, dict[str, Any]], None]

    async def run_io(self, fn: Callable[..., T], *args: Any) -> T:
        """Run a blocking call in the I/O thread pool."""
        ...
