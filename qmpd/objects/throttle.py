"""The ``throttle-group`` object and QEMU's leaky-bucket throttling (util/throttle.c).

Each limit is a bucket: every request adds its bytes (or its operations,
counted in ``iops-size`` units) to the buckets of its direction and to the
total ones; buckets leak at their average rate.  A request waits while a
bucket holds more than its size: a tenth of a second at the average rate,
or ``max * max-length`` when a burst rate is set, whose own bucket (a tenth
of a second at the burst rate) then limits the burst.  All nodes of a group
share its buckets; one request per direction passes the gate at a time.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

from qmpd.errors import GenericError
from qmpd.objects.base import SecretLookup, UserObject, check_members, to_int

#: The buckets, in QEMU's ThrottleLimits order.
BUCKETS = ("bps-total", "bps-read", "bps-write", "iops-total", "iops-read", "iops-write")
THROTTLE_VALUE_MAX = 1_000_000_000_000_000
_UINT_MAX = 0xFFFFFFFF

#: ThrottleLimits members, in QAPI order.
LIMIT_MEMBERS = (
    *BUCKETS,
    *(f"{b}-max" for b in BUCKETS),
    *(f"{b}-max-length" for b in BUCKETS),
    "iops-size",
)

#: Bucket checked for a read and for a write (throttle_compute_wait_for).
_DIRECTION = {
    False: ("bps-total", "iops-total", "bps-read", "iops-read"),
    True: ("bps-total", "iops-total", "bps-write", "iops-write"),
}


@dataclass
class LeakyBucket:
    """One limit: ``avg`` per second, bursts of ``max`` for ``burst_length`` s."""

    avg: int = 0
    max: int = 0
    burst_length: int = 1
    level: float = 0.0
    burst_level: float = 0.0

    def leak(self, delta: float) -> None:
        self.level = max(self.level - self.avg * delta, 0.0)
        if self.burst_length > 1:
            self.burst_level = max(self.burst_level - self.max * delta, 0.0)

    def wait(self) -> float:
        """Seconds until the next request may go (QEMU's throttle_compute_wait)."""
        if not self.avg:
            return 0.0
        if not self.max:
            # Short bursts are allowed even without a burst limit.
            bucket_size = self.avg / 10
            burst_bucket_size = 0.0
        else:
            bucket_size = float(self.max * self.burst_length)
            burst_bucket_size = self.max / 10
        extra = self.level - bucket_size
        if extra > 0:
            return extra / self.avg
        if self.burst_length > 1:
            extra = self.burst_level - burst_bucket_size
            if extra > 0:
                return extra / self.max
        return 0.0


class ThrottleConfig:
    """The limits of a group, checked as QEMU's throttle_is_valid does."""

    def __init__(self) -> None:
        self.buckets = {name: LeakyBucket() for name in BUCKETS}
        self.op_size = 0

    @property
    def enabled(self) -> bool:
        return any(b.avg or b.max for b in self.buckets.values())

    def set_member(self, member: str, value: int) -> None:
        """Set one ThrottleLimits member (``bps-total-max``, ``iops-size`` …)."""
        if member == "iops-size":
            self.op_size = value
            return
        if member.endswith("-max-length"):
            self.buckets[member[: -len("-max-length")]].burst_length = value
        elif member.endswith("-max"):
            self.buckets[member[: -len("-max")]].max = value
        else:
            self.buckets[member].avg = value

    def limits(self) -> dict[str, int]:
        """The group's ``limits`` property as QEMU reads it back."""
        out: dict[str, int] = {}
        for name, bucket in self.buckets.items():
            out[name] = bucket.avg
            out[f"{name}-max"] = bucket.max
            out[f"{name}-max-length"] = bucket.burst_length
        out["iops-size"] = self.op_size
        return out

    def validate(self) -> None:
        b = self.buckets

        def mixed(kind: str, attr: str) -> bool:
            total = getattr(b[f"{kind}-total"], attr)
            return bool(total and (getattr(b[f"{kind}-read"], attr)
                                   or getattr(b[f"{kind}-write"], attr)))

        if any(mixed(k, a) for k in ("bps", "iops") for a in ("avg", "max")):
            raise GenericError(
                "bps/iops/max total values and read/write values cannot be used at the same time"
            )
        if self.op_size and not any(b[n].avg for n in ("iops-total", "iops-read", "iops-write")):
            raise GenericError("iops size requires an iops value to be set")
        for bucket in b.values():
            if bucket.avg > THROTTLE_VALUE_MAX or bucket.max > THROTTLE_VALUE_MAX:
                raise GenericError(
                    f"bps/iops/max values must be within [0, {THROTTLE_VALUE_MAX}]"
                )
            if not bucket.burst_length:
                raise GenericError("the burst length cannot be 0")
            if bucket.burst_length > 1 and not bucket.max:
                raise GenericError("burst length set without burst rate")
            if bucket.max and not bucket.avg:
                raise GenericError("bps_max/iops_max require corresponding bps/iops values")
            if bucket.max and bucket.max < bucket.avg:
                raise GenericError("bps_max/iops_max cannot be lower than bps/iops")


def parse_limits(config: ThrottleConfig, limits: Any) -> None:
    """The ``limits`` struct form (throttle_limits_to_config)."""
    if not isinstance(limits, dict):
        raise GenericError("Invalid parameter type for 'limits', expected: object")
    values = {m: to_int(limits[m], f"limits.{m}") for m in LIMIT_MEMBERS if m in limits}
    check_members(limits, LIMIT_MEMBERS, "limits.")
    for member, value in values.items():
        if member.endswith("-max-length"):
            if not 0 <= value <= _UINT_MAX:
                raise GenericError(f"{member} value must be in the range [0, {_UINT_MAX}]")
        elif member != "iops-size" and not 0 <= value <= THROTTLE_VALUE_MAX:
            raise GenericError(f"bps/iops/max values must be within [0, {THROTTLE_VALUE_MAX}]")
    for member, value in values.items():
        config.set_member(member, value)


class ThrottleState:
    """The buckets' levels over time (ThrottleState)."""

    def __init__(self, config: ThrottleConfig) -> None:
        self.config = config
        self.previous_leak = time.monotonic()

    def _leak(self, now: float) -> None:
        delta = now - self.previous_leak
        self.previous_leak = now
        if delta <= 0:
            return
        for bucket in self.config.buckets.values():
            bucket.leak(delta)

    def wait(self, is_write: bool) -> float:
        self._leak(time.monotonic())
        return max(self.config.buckets[name].wait() for name in _DIRECTION[is_write])

    def account(self, is_write: bool, size: int) -> None:
        units = 1.0
        op_size = self.config.op_size
        if op_size and size > op_size:
            units = size / op_size
        buckets = self.config.buckets
        direction = "write" if is_write else "read"
        for name, amount in (
            ("bps-total", float(size)), (f"bps-{direction}", float(size)),
            ("iops-total", units), (f"iops-{direction}", units),
        ):
            bucket = buckets[name]
            bucket.level += amount
            if bucket.burst_length > 1:
                bucket.burst_level += amount


class ThrottleGroup(UserObject):
    """Limits shared by every ``throttle`` node that names the group."""

    qom_type = "throttle-group"
    properties = ("limits", *(f"x-{m}" for m in LIMIT_MEMBERS))

    def __init__(self, object_id: str, config: ThrottleConfig) -> None:
        super().__init__(object_id)
        self.config = config
        self.state = ThrottleState(config)
        self.members: set[str] = set()
        self._gates = {False: asyncio.Lock(), True: asyncio.Lock()}

    @classmethod
    def create(cls, object_id: str, props: dict[str, Any],
               secret: SecretLookup | None = None) -> ThrottleGroup:
        config = ThrottleConfig()
        # QAPI visits ``limits`` first, so the x- properties win over it.
        if "limits" in props:
            parse_limits(config, props["limits"])
        for prop in cls.properties[1:]:
            if prop not in props:
                continue
            value = to_int(props[prop], prop)
            if value < 0:
                raise GenericError("Property values cannot be negative")
            if prop.endswith("-max-length") and value > _UINT_MAX:
                # "therange": QEMU 7.2's own text.
                raise GenericError(f"{prop} value must be in therange [0, {_UINT_MAX}]")
            config.set_member(prop[2:], value)
        check_members(props, cls.properties)
        config.validate()
        return cls(object_id, config)

    def in_use(self) -> bool:
        return bool(self.members)

    async def intercept(self, is_write: bool, size: int) -> None:
        """Wait until a request of ``size`` bytes may go, then account for it."""
        if not self.config.enabled:
            return
        async with self._gates[is_write]:
            while True:
                wait = self.state.wait(is_write)
                if wait <= 0:
                    break
                await asyncio.sleep(wait)
            self.state.account(is_write, size)
