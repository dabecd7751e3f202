"""QMP command handlers, grouped like QAPI's modules.

Importing this package registers every handler with the dispatcher.
"""

from qmpd.commands import (
    bitmaps,
    block_chain,
    block_core,
    block_export,
    block_jobs,
    control,
    create,
    hmp,
    jobs,
    migration,
    objects,
    run_state,
)

__all__ = [
    "bitmaps", "block_chain", "block_core", "block_export", "block_jobs", "control", "create",
    "hmp", "jobs",
    "migration", "objects", "run_state",
]
