"""What ``/api/status`` and the status page show of the daemon (schema/http/status.json).

Built by the daemon (the composition root) from its subsystems; it only reads.
"""

from __future__ import annotations

import collections
import json
from collections.abc import Callable, Iterable
from typing import Any

from qmpd.block.driver import PERM_NAMES, BlockNode
from qmpd.block.filename import FilenameMemo, refresh_filename

_PERM_BITS = [(int(bit), name) for bit, name in PERM_NAMES.items()]
_LOCKS: dict[tuple[int, int], dict[str, list[str]]] = {}


def perm_names(bits: int) -> list[str]:
    """The names of the permission bits in ``bits`` (QEMU's, as in its lock errors)."""
    return [name for bit, name in _PERM_BITS if bits & bit]


def _locks(held: int, unshared: int) -> dict[str, list[str]]:
    """``locks`` of a node (made once per pair and shared: only ever encoded)."""
    locks = _LOCKS.get((held, unshared))
    if locks is None:
        locks = _LOCKS[held, unshared] = {"held": perm_names(held),
                                          "unshared": perm_names(unshared)}
    return locks


class RecentEvents:
    """The last ``keep`` events, as the bus encoded them (a ring, for ``/api/status``)."""

    pretty = False

    def __init__(self, keep: int = 50) -> None:
        self._kept: collections.deque[bytes] = collections.deque(maxlen=keep)

    def send_event(self, plain: bytes, pretty: bytes | None) -> None:
        self._kept.append(plain)

    def list(self) -> list[dict[str, Any]]:
        """Oldest first (decoded only when asked for)."""
        return [json.loads(raw) for raw in self._kept]


class Watcher:
    """An event-bus sink that only says something happened."""

    pretty = False

    def __init__(self, changed: Callable[[], None]) -> None:
        self.changed = changed

    def send_event(self, plain: bytes, pretty: bytes | None) -> None:
        self.changed()


def node_status(node: BlockNode, memo: FilenameMemo | None = None) -> dict[str, Any]:
    """One node: what it is, what it holds, how its caches do, what lies below it.

    ``memo``: one per status of many nodes, so each file name is made once.
    """
    driver = node.driver
    locks = driver.locks_held()
    spent = node.stats.activation_seconds
    caches = {}
    for name, (hits, misses) in driver.cache_stats().items():
        lookups = hits + misses
        caches[name] = {"hits": hits, "misses": misses,
                        "hit-rate": round(hits / lookups, 4) if lookups else None}
    return {
        "node-name": node.node_name,
        "driver": driver.format_name,
        "filename": refresh_filename(node, memo),
        "size": node.size(),
        "active": node.active,
        "read-only": node.read_only,
        "locks": None if locks is None else _locks(*locks),
        "cache": caches,
        "activation-ms": None if spent is None else round(spent * 1000, 3),
        "children": [{"role": name, "node-name": edge.child.node_name}
                     for name, edge in node.children.items()],
    }


def nodes_status(nodes: Iterable[BlockNode]) -> list[dict[str, Any]]:
    """:func:`node_status` of each node, sharing the file names' work."""
    memo: FilenameMemo = {}
    return [node_status(node, memo) for node in nodes]
