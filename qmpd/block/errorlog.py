"""I/O errors in the log: once per cause, not once per request.

A full disk or a failing device makes every request fail the same way; a
client retrying in a loop must not fill the log with one line (let alone
a traceback) per request.  :class:`IoErrorLog` logs the first error of a
cause (a node and an errno, or a node and an exception type for errors
that are bugs) at once, then at most one summary per :data:`INTERVAL` with
the number of errors suppressed meanwhile.
"""

from __future__ import annotations

import errno as _errno
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger("qmpd.block.io")

#: Seconds between two log lines for the same cause.
INTERVAL = 60.0
#: Causes remembered at most (the oldest is forgotten first).
MAX_CAUSES = 1024


@dataclass
class _Cause:
    last_logged: float
    suppressed: int = 0


def describe_errno(err: int) -> str:
    name = _errno.errorcode.get(err, str(err))
    return f"{os.strerror(err)} ({name})"


class IoErrorLog:
    """Rate-limited logging of I/O errors, keyed by (node, cause)."""

    def __init__(
        self, interval: float = INTERVAL, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.interval = interval
        self.clock = clock
        self._causes: dict[tuple[str, str], _Cause] = {}

    def report(
        self, node: str, cause: str, message: str, exc: BaseException | None = None
    ) -> bool:
        """Log ``message`` unless this cause was logged less than ``interval`` ago.

        ``exc`` adds its traceback (for errors that are not I/O errors but
        bugs), on the first report of the cause only.  Returns whether a
        line was logged.
        """
        now = self.clock()
        key = (node, cause)
        known = self._causes.get(key)
        if known is None:
            if len(self._causes) >= MAX_CAUSES:
                del self._causes[next(iter(self._causes))]
            self._causes[key] = _Cause(now)
            log.error("node %s: %s", node, message, exc_info=exc)
            return True
        if now - known.last_logged < self.interval:
            known.suppressed += 1
            return False
        log.error("node %s: %s (%d more since the last report)", node, message,
                  known.suppressed)
        known.last_logged = now
        known.suppressed = 0
        return True

    def report_errno(self, node: str, err: int, what: str) -> bool:
        """An I/O error with an errno: ``what`` says which request failed."""
        return self.report(node, f"errno {err}", f"{what}: {describe_errno(err)}")


#: The daemon's one error log.
IO_ERRORS = IoErrorLog()
