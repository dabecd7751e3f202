"""Migration status, its transition table, capabilities and parameters."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from qmpd.errors import GenericError


class MigrationStatus(enum.StrEnum):
    """MigrationStatus, QEMU 7.2's values in order."""

    NONE = "none"
    SETUP = "setup"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"
    ACTIVE = "active"
    POSTCOPY_ACTIVE = "postcopy-active"
    POSTCOPY_PAUSED = "postcopy-paused"
    POSTCOPY_RECOVER = "postcopy-recover"
    COMPLETED = "completed"
    FAILED = "failed"
    COLO = "colo"
    PRE_SWITCHOVER = "pre-switchover"
    DEVICE = "device"
    WAIT_UNPLUG = "wait-unplug"


_M = MigrationStatus
_FINISHED = frozenset({_M.COMPLETED, _M.FAILED, _M.CANCELLED})

#: The changes qmpd makes (precopy only).  A finished migration may be
#: followed by a new one, which starts again at setup.
TRANSITIONS: dict[MigrationStatus, frozenset[MigrationStatus]] = {
    _M.NONE: frozenset({_M.SETUP, _M.ACTIVE, _M.FAILED, _M.CANCELLED}),
    _M.SETUP: frozenset({_M.ACTIVE, _M.FAILED, _M.CANCELLING, _M.CANCELLED}),
    _M.ACTIVE: frozenset({_M.PRE_SWITCHOVER, _M.DEVICE, _M.COMPLETED, _M.FAILED, _M.CANCELLING}),
    _M.PRE_SWITCHOVER: frozenset({_M.DEVICE, _M.FAILED, _M.CANCELLING}),
    _M.DEVICE: frozenset({_M.COMPLETED, _M.FAILED, _M.CANCELLING}),
    _M.CANCELLING: frozenset({_M.CANCELLED, _M.FAILED}),
    _M.COMPLETED: frozenset({_M.SETUP}),
    _M.FAILED: frozenset({_M.SETUP}),
    _M.CANCELLED: frozenset({_M.SETUP}),
}

#: While in one of these, a migration "is running" (QEMU's migration_is_running).
RUNNING_STATES = frozenset(
    {_M.SETUP, _M.ACTIVE, _M.PRE_SWITCHOVER, _M.DEVICE, _M.CANCELLING, _M.WAIT_UNPLUG}
)


CAPABILITIES = (
    "xbzrle", "rdma-pin-all", "auto-converge", "zero-blocks", "compress", "events",
    "postcopy-ram", "x-colo", "release-ram", "block", "return-path", "pause-before-switchover",
    "multifd", "dirty-bitmaps", "postcopy-blocktime", "late-block-activate", "x-ignore-shared",
    "validate-uuid", "background-snapshot", "zero-copy-send", "postcopy-preempt",
)

#: QEMU 7.2's defaults, in QAPI order (query-migrate-parameters).
DEFAULT_PARAMETERS: dict[str, Any] = {
    "announce-initial": 50,
    "announce-max": 550,
    "announce-rounds": 5,
    "announce-step": 100,
    "compress-level": 1,
    "compress-threads": 8,
    "compress-wait-thread": True,
    "decompress-threads": 2,
    "throttle-trigger-threshold": 50,
    "cpu-throttle-initial": 20,
    "cpu-throttle-increment": 10,
    "cpu-throttle-tailslow": False,
    "tls-creds": "",
    "tls-hostname": "",
    "tls-authz": "",
    "max-bandwidth": 134217728,
    "downtime-limit": 300,
    "x-checkpoint-delay": 20000,
    "block-incremental": False,
    "multifd-channels": 2,
    "xbzrle-cache-size": 67108864,
    "max-postcopy-bandwidth": 0,
    "max-cpu-throttle": 99,
    "multifd-compression": "none",
    "multifd-zlib-level": 1,
    "multifd-zstd-level": 1,
}

#: Parameters QAPI types as uint64 or size: a negative JSON number wraps
#: around (-1 is 18446744073709551615), and the range checks see that.
UINT64_PARAMETERS = frozenset({
    "announce-initial", "announce-max", "announce-rounds", "announce-step", "max-bandwidth",
    "downtime-limit", "xbzrle-cache-size", "max-postcopy-bandwidth",
})

#: Accepted by QEMU 7.2's migrate-set-parameters but never applied (nor range
#: checked): query-migrate-parameters keeps showing the old value.
IGNORED_PARAMETERS = frozenset({"multifd-zlib-level", "multifd-zstd-level"})

#: What background-snapshot cannot be combined with, in the order QEMU 7.2
#: checks (the first one set is named in the error).
_BACKGROUND_SNAPSHOT_EXCLUDES = (
    "postcopy-ram", "dirty-bitmaps", "postcopy-blocktime", "late-block-activate",
    "return-path", "multifd", "pause-before-switchover", "auto-converge", "release-ram",
    "rdma-pin-all", "compress", "xbzrle", "x-colo", "validate-uuid", "zero-copy-send",
)

_ZERO_COPY = "Zero copy only available for non-compressed non-TLS multifd migration"

_TARGET_PAGE_SIZE = 4096
_MAX_DOWNTIME_MS = 2000 * 1000


@dataclass
class MigrationSettings:
    """Capabilities and parameters, shared by both directions."""

    capabilities: dict[str, bool] = field(
        default_factory=lambda: dict.fromkeys(CAPABILITIES, False))
    parameters: dict[str, Any] = field(default_factory=lambda: dict(DEFAULT_PARAMETERS))


def _expects(name: str, what: str) -> GenericError:
    return GenericError(f"Parameter '{name}' expects {what}")


def normalize_parameters(params: dict[str, Any]) -> dict[str, Any]:
    """migrate-set-parameters' arguments as QEMU 7.2 sees them after the QAPI visitor."""
    out: dict[str, Any] = {}
    for key, value in params.items():
        if key in IGNORED_PARAMETERS:
            continue
        if value is None:  # StrOrNull: null means ""
            value = ""
        elif key in UINT64_PARAMETERS and isinstance(value, int) and value < 0:
            value &= (1 << 64) - 1
        out[key] = value
    return out


def check_capabilities(caps: dict[str, bool], params: dict[str, Any]) -> None:
    """The whole new capability set, QEMU 7.2's checks in its order (migrate_caps_check)."""
    if caps["postcopy-ram"] and caps["x-ignore-shared"]:
        raise GenericError("Postcopy is not compatible with ignore-shared")
    if caps["background-snapshot"]:
        for other in _BACKGROUND_SNAPSHOT_EXCLUDES:
            if caps[other]:
                raise GenericError(f"Background-snapshot is not compatible with {other}")
    if caps["zero-copy-send"] and (
        not caps["multifd"] or caps["compress"] or caps["xbzrle"]
        or params["multifd-compression"] != "none" or params["tls-creds"]
    ):
        raise GenericError(_ZERO_COPY)
    if caps["postcopy-preempt"]:
        if not caps["postcopy-ram"]:
            raise GenericError("Postcopy preempt requires postcopy-ram")
        if caps["compress"]:
            raise GenericError("Postcopy preempt not compatible with compress")
    if caps["multifd"] and caps["compress"]:
        raise GenericError("Multifd is not compatible with compress")


def check_parameters(new: dict[str, Any]) -> None:
    """QEMU's migrate_params_check, with its texts (internal underscore names)."""
    def get(key: str) -> Any:
        return new.get(key)

    if get("compress-level") is not None and new["compress-level"] > 9:
        raise _expects("compress_level", "a value between 0 and 9")
    if get("compress-threads") is not None and new["compress-threads"] < 1:
        raise _expects("compress_threads", "a value between 1 and 255")
    if get("decompress-threads") is not None and new["decompress-threads"] < 1:
        raise _expects("decompress_threads", "a value between 1 and 255")
    value = get("throttle-trigger-threshold")
    if value is not None and not 1 <= value <= 100:
        raise _expects("throttle_trigger_threshold", "an integer in the range of 1 to 100")
    value = get("cpu-throttle-initial")
    if value is not None and not 1 <= value <= 99:
        raise _expects("cpu_throttle_initial", "an integer in the range of 1 to 99")
    value = get("cpu-throttle-increment")
    if value is not None and not 1 <= value <= 99:
        raise _expects("cpu_throttle_increment", "an integer in the range of 1 to 99")
    value = get("max-bandwidth")
    if value is not None and (value < 0 or value > (1 << 64) - 1):
        raise _expects(
            "max_bandwidth", "an integer in the range of 0 to 18446744073709551615 bytes/second"
        )
    value = get("downtime-limit")
    if value is not None and (value < 0 or value > _MAX_DOWNTIME_MS):
        raise _expects("downtime_limit", "an integer in the range of 0 to (2000 * 1000) ms")
    value = get("multifd-channels")
    if value is not None and value < 1:
        raise _expects("multifd_channels", "a value between 1 and 255")
    value = get("xbzrle-cache-size")
    if value is not None and (value < _TARGET_PAGE_SIZE or value & (value - 1)):
        raise _expects(
            "xbzrle_cache_size", "a power of two no less than the target page size"
        )
    value = get("max-cpu-throttle")
    initial = get("cpu-throttle-initial")
    if value is not None and (value < (initial or 0) or value > 99):
        raise _expects("max_cpu_throttle", "an integer in the range of cpu_throttle_initial to 99")
    for key in ("announce-initial", "announce-max"):
        value = get(key)
        if value is not None and value > 100000:
            raise _expects(key.replace("-", "_"), "a value between 0 and 100000")
    value = get("announce-rounds")
    if value is not None and value > 1000:
        raise _expects("announce_rounds", "a value between 0 and 1000")
    value = get("announce-step")
    if value is not None and not 1 <= value <= 10000:
        raise _expects("announce_step", "a value between 0 and 10000")
