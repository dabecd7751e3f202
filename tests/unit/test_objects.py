"""The object registry as ``--object`` uses it (keyval strings), and the bucket arithmetic.

Every text was observed on qemu-storage-daemon 7.2 with the same ``--object``.
"""

from __future__ import annotations

from typing import Any

import pytest

from qmpd.errors import GenericError
from qmpd.objects import ObjectRegistry
from qmpd.objects.throttle import LeakyBucket, ThrottleGroup


@pytest.mark.parametrize("options, text", [
    ({"qom-type": "throttle-group", "id": "tg", "x-bps-total": "abc"},
     "Parameter 'x-bps-total' expects integer"),
    ({"qom-type": "throttle-group", "id": "tg", "limits": {"bps-total": "abc"}},
     "Parameter 'limits.bps-total' expects integer"),
    ({"qom-type": "throttle-group", "id": "tg", "limits": {"bps-total": "5", "foo": "1"}},
     "Parameter 'limits.foo' is unexpected"),
    ({"qom-type": "nosuch", "id": "x"}, "Parameter 'qom-type' does not accept value 'nosuch'"),
    ({"qom-type": "iothread"}, "Parameter 'id' is missing"),
    ({"qom-type": "secret", "id": "s", "data": "x", "format": "hex"},
     "Parameter 'format' does not accept value 'hex'"),
    ({"qom-type": "secret", "id": "s", "data": "x", "bogus": "1"},
     "Parameter 'bogus' is unexpected"),
    ({"qom-type": "iothread", "id": "i", "poll-max-ns": "-5"},
     "poll-max-ns value must be in range [0, 9223372036854775807]"),
    ({"qom-type": "throttle-group", "id": "tg", "x-bps-total": "-5"},
     "Property values cannot be negative"),
])
def test_command_line_errors(options: dict[str, Any], text: str) -> None:
    with pytest.raises(GenericError) as info:
        ObjectRegistry().add_object(options)
    assert info.value.desc == text


def test_command_line_values() -> None:
    objects = ObjectRegistry()
    objects.add_object({"qom-type": "throttle-group", "id": "tg", "x-bps-total": "0x10",
                        "limits": {"bps-total": "7", "iops-read": "5"}})
    objects.add_object({"qom-type": "secret", "id": "s", "data": "aGVsbG8", "format": "base64"})
    objects.add_object({"qom-type": "iothread", "id": "io", "poll-max-ns": "32768"})
    group = objects.throttle_group("tg")
    assert isinstance(group, ThrottleGroup)
    # The x- properties win over limits, as in QEMU.
    assert group.config.limits()["bps-total"] == 16
    assert group.config.limits()["iops-read"] == 5
    assert objects.secret("s") == b"hello"
    assert "hello" not in repr(objects.objects["s"])
    with pytest.raises(GenericError, match="Object 'io' is not a secret"):
        objects.secret("io")


def test_bucket_waits_as_qemu() -> None:
    # Without a burst rate a tenth of a second's worth passes at once.
    bucket = LeakyBucket(avg=10, level=5.0)
    assert bucket.wait() == pytest.approx(0.4)
    bucket.leak(0.4)
    assert bucket.wait() == 0
    # With one, the burst bucket (a tenth of a second at max) limits first.
    burst = LeakyBucket(avg=10, max=100, burst_length=10, level=50.0, burst_level=30.0)
    assert burst.wait() == pytest.approx(0.2)
    burst.leak(0.2)
    assert burst.wait() == 0 and burst.level == pytest.approx(48.0)
