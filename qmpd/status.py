"""What ``/api/status`` and the status page show of the daemon (schema/http/status.json).

Built by the daemon (the composition root) from its subsystems; it only reads.
"""

from __future__ import annotations

import collections
import json
from collections.abc import Callable
from typing import Any

from qmpd.block.driver import PERM_NAMES, BlockNode
from qmpd.block.filename import refresh_filename

_PERM_BITS = [(int(bit), name) for bit, name in PERM_NAMES.items()]
_NAMES: dict[int, list[str]] = {}


def perm_names(bits: int) -> list[str]:
    """The names of the permission bits in ``bits`` (QEMU's, as in its lock errors)."""
    names = _NAMES.get(bits)
    if names is None:
        names = _NAMES[bits] = [name for bit, name in _PERM_BITS if bits & bit]
    return list(names)


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


def node_status(node: BlockNode) -> dict[str, Any]:
    """One node: what it is, what it holds, how its caches do, what lies below it."""
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
        "filename": refresh_filename(node),
        "size": node.size(),
        "active": node.active,
        "read-only": node.read_only,
        "locks": None if locks is None else {"held": perm_names(locks[0]),
                                             "unshared": perm_names(locks[1])},
        "cache": caches,
        "activation-ms": None if spent is None else round(spent * 1000, 3),
        "children": [{"role": name, "node-name": edge.child.node_name}
                     for name, edge in node.children.items()],
    }
