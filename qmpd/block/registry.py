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


#: What QEMU reads of a file to probe its format.
PROBE_BYTES = 2048


def driver_class(name: str) -> type[BlockDriver] | None:
    """The driver class for a ``driver`` value, None when qmpd has none."""
    return DRIVERS.get(name)


def probe_format(path: str) -> str:
    """The format of a backing file its overlay names without one, as QEMU probes.

    Only formats qmpd opens are told apart (:meth:`BlockDriver.probe`);
    anything else is raw (QEMU 7.2 also falls back to raw).  An unreadable
    file is left to the open that follows, which reports it.
    """
    try:
        with open(path, "rb") as f:
            head = f.read(PROBE_BYTES)
    except OSError:
        return "raw"
    for name, cls in DRIVERS.items():
        if cls.probe(head):
            return name
    return "raw"
