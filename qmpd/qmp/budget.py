"""A shared cap on the memory QMP clients can pin with unfinished messages.

QEMU bounds one message (64 MiB, 2M tokens) but not the sum over clients;
qmpd serves many clients per monitor, so one :class:`QMPInputBudget` is
shared by every connection of the daemon.  Each connection holds an
:class:`InputAccount` that grows and shrinks with its parser's unfinished
message and its parsed requests not yet answered; growth past the shared
total is refused, and the session then discards the unfinished message as
QEMU discards an over-limit one.
"""

from __future__ import annotations

#: Default total across all QMP connections (``--max-qmp-input-total``).
DEFAULT_QMP_INPUT_TOTAL = 256 << 20


class QMPInputBudget:
    """Bytes of unfinished QMP input the whole daemon may hold at once."""

    __slots__ = ("refusals", "total", "used")

    def __init__(self, total: int = DEFAULT_QMP_INPUT_TOTAL) -> None:
        if total < 0:
            raise ValueError("budget total must not be negative")
        self.total = total
        self.used = 0
        self.refusals = 0

    @property
    def available(self) -> int:
        return self.total - self.used

    def account(self) -> InputAccount:
        """A new, empty share for one connection."""
        return InputAccount(self)


class InputAccount:
    """One connection's share of a :class:`QMPInputBudget`."""

    __slots__ = ("_budget", "held")

    def __init__(self, budget: QMPInputBudget) -> None:
        self._budget = budget
        self.held = 0

    def resize(self, size: int, force: bool = False) -> bool:
        """Hold ``size`` bytes; False (holding as before) if growth does not fit.

        ``force`` records memory already allocated, such as requests parsed
        before the unfinished message that did not fit.
        """
        budget = self._budget
        delta = size - self.held
        if delta > 0 and not force and budget.used + delta > budget.total:
            budget.refusals += 1
            return False
        budget.used += delta
        self.held = size
        return True

    def release(self) -> None:
        """Return everything held (message done or discarded, connection closed)."""
        self._budget.used -= self.held
        self.held = 0
