"""One exception hierarchy; each class carries the QMP error class it maps to.

Handlers raise these; the dispatcher turns them into ``{"error": ...}`` at a
single boundary.  Any other exception escaping a handler is a bug: it is
logged and reported as a GenericError so the daemon keeps serving.
"""

from __future__ import annotations

from enum import StrEnum


class ErrorClass(StrEnum):
    """QapiErrorClass: the five error classes QMP knows."""

    GENERIC_ERROR = "GenericError"
    COMMAND_NOT_FOUND = "CommandNotFound"
    DEVICE_NOT_ACTIVE = "DeviceNotActive"
    DEVICE_NOT_FOUND = "DeviceNotFound"
    KVM_MISSING_CAP = "KVMMissingCap"


class QMPError(Exception):
    """Root of every error that becomes a QMP error reply."""

    error_class = ErrorClass.GENERIC_ERROR

    def __init__(self, desc: str) -> None:
        super().__init__(desc)
        self.desc = desc

    def to_qmp(self) -> dict[str, str]:
        return {"class": self.error_class.value, "desc": self.desc}


class GenericError(QMPError):
    """The class of almost every QMP error."""


class CommandNotFound(QMPError):
    """Unknown or disabled command, and the negotiation-mode errors."""

    error_class = ErrorClass.COMMAND_NOT_FOUND


class DeviceNotFound(QMPError):
    """A device or block backend looked up by id does not exist."""

    error_class = ErrorClass.DEVICE_NOT_FOUND


class DeviceNotActive(QMPError):
    """A block job looked up by its device name does not exist."""

    error_class = ErrorClass.DEVICE_NOT_ACTIVE


class BlockDriverError(GenericError):
    """An error of the block layer or a driver; ``errno`` is what I/O paths
    (NBD replies, the guest) report instead of the text."""

    def __init__(self, desc: str, errno: int = 5) -> None:
        super().__init__(desc)
        self.errno = errno


class ArgumentError(GenericError):
    """A command's arguments failed schema validation (QAPI's wording)."""


class ConfigError(Exception):
    """Bad command-line or configuration input; the daemon refuses to start."""
