"""I/O errors are logged once per cause (node and errno), then rate-limited."""

from __future__ import annotations

import errno
import logging

import pytest

from qmpd.block.errorlog import IoErrorLog


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_once_per_cause_then_summaries(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    errors = IoErrorLog(interval=60.0, clock=clock)
    caplog.set_level(logging.ERROR, logger="qmpd.block.io")
    assert errors.report_errno("disk", errno.ENOSPC, "NBD write on export e")
    for _ in range(500):
        assert not errors.report_errno("disk", errno.ENOSPC, "NBD write on export e")
    # Another node, another errno: causes of their own.
    assert errors.report_errno("other", errno.ENOSPC, "NBD write on export f")
    assert errors.report_errno("disk", errno.EIO, "NBD read on export e")
    clock.now += 59
    assert not errors.report_errno("disk", errno.ENOSPC, "NBD write on export e")
    clock.now += 2
    assert errors.report_errno("disk", errno.ENOSPC, "NBD write on export e")
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "node disk: NBD write on export e: No space left on device (ENOSPC)",
        "node other: NBD write on export f: No space left on device (ENOSPC)",
        "node disk: NBD read on export e: Input/output error (EIO)",
        "node disk: NBD write on export e: No space left on device (ENOSPC)"
        " (501 more since the last report)",
    ]


def test_bug_traceback_only_once(caplog: pytest.LogCaptureFixture) -> None:
    errors = IoErrorLog(clock=Clock())
    caplog.set_level(logging.ERROR, logger="qmpd.block.io")
    for _ in range(3):
        try:
            raise AssertionError("broken invariant")
        except AssertionError as exc:
            errors.report("disk", type(exc).__name__, "NBD read on export e failed", exc)
    assert len(caplog.records) == 1
    assert caplog.records[0].exc_info is not None
