"""QMP command handlers, grouped like QAPI's modules.

Importing this package registers every handler with the dispatcher.
"""

from qmpd.commands import control, run_state

__all__ = ["control", "run_state"]
