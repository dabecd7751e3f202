"""Where qmpd's messages go, and their one format: ``qmpd: LEVEL: message``.

Quiet by default, as qemu-storage-daemon is: warnings and errors only.  The
"listening" line is shown at ``--log-level info`` or when stderr is a
terminal.  ``--log-file`` (QEMU's ``-D``) sends every line to a file instead,
so a daemonized qmpd keeps its errors.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import TextIO

PROG = "qmpd"
#: Prefixes for lines written as QEMU prints them (migration's error reports).
ERROR = f"{PROG}: error"

LEVELS = ("debug", "info", "warning", "error")

_root = logging.getLogger(PROG)


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        text = f"{PROG}: {record.levelname.lower()}: {record.getMessage()}"
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


class _Handler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to the current stderr (or the log file), whatever fd 2 became."""

    def __init__(self, stream: TextIO | None) -> None:
        super().__init__(stream)
        self.to_file = stream is not None

    def emit(self, record: logging.LogRecord) -> None:
        if not self.to_file:
            self.stream = sys.stderr
        super().emit(record)


_handler: _Handler | None = None


def setup(level: str = "warning", log_file: str | None = None) -> None:
    """Configure the ``qmpd`` logger; ``log_file`` is opened for appending."""
    global _handler
    stream: TextIO | None = None
    if log_file is not None:
        stream = open(log_file, "a", buffering=1, encoding="utf-8", errors="replace")
    handler = _Handler(stream)
    handler.setFormatter(_Formatter())
    for old in list(_root.handlers):
        _root.removeHandler(old)
    _root.addHandler(handler)
    _root.setLevel(getattr(logging, level.upper()))
    _root.propagate = False
    _handler = handler


def log_fd() -> int | None:
    """The log file's descriptor, if logging to a file."""
    if _handler is None or not _handler.to_file:
        return None
    fd: int = _handler.stream.fileno()
    return fd


def write_raw(text: str) -> None:
    """Write lines already in ``qmpd: LEVEL: ...`` form (QEMU-style reports)."""
    stream = _handler.stream if _handler is not None and _handler.to_file else sys.stderr
    if not text.endswith("\n"):
        text += "\n"
    try:
        stream.write(text)
        stream.flush()
    except (OSError, ValueError):
        pass


def announce(message: str) -> None:
    """The "listening" line: shown at info level, or on a terminal at any level."""
    if _root.isEnabledFor(logging.INFO):
        _root.info("%s", message)
        return
    try:
        tty = os.isatty(2)
    except OSError:
        tty = False
    if tty and log_fd() is None:
        write_raw(f"{PROG}: info: {message}")
