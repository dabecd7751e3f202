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
