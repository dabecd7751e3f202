"""What the block layer counts per node, as QEMU's ``block/accounting.c``."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class NodeStats:
    """I/O counters of one node (exported as metrics)."""

    rd_bytes: int = 0
    wr_bytes: int = 0
    rd_operations: int = 0
    wr_operations: int = 0
    flush_operations: int = 0
    invalidations: int = 0
    #: How long the last activation of the node took (None: never activated).
    activation_seconds: float | None = None
