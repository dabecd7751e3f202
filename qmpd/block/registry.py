"""Block drivers by name: the one place blockdev-add looks a ``driver`` up."""

from __future__ import annotations

from qmpd.block.driver import BlockDriver
from qmpd.block.file import FileDriver, HostDeviceDriver
from qmpd.block.null import NullDriver
from qmpd.block.qcow2.driver import Qcow2Driver
from qmpd.block.raw import RawDriver
from qmpd.block.throttle import ThrottleDriver

#: Every driver qmpd opens, by its ``format_name`` (the QAPI ``driver`` value).
DRIVERS: dict[str, type[BlockDriver]] = {
    cls.format_name: cls
    for cls in (FileDriver, HostDeviceDriver, RawDriver, NullDriver, ThrottleDriver,
                Qcow2Driver)
}


def driver_class(name: str) -> type[BlockDriver] | None:
    """The driver class for a ``driver`` value, None when qmpd has none."""
    return DRIVERS.get(name)
