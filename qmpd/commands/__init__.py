"""QMP command handlers, grouped like QAPI's modules.

Importing this package registers every handler with the dispatcher.
"""

from qmpd.commands import block_core, control, hmp, run_state

__all__ = ["block_core", "control", "hmp", "run_state"]
