"""Block drivers by name: the one place blockdev-add looks a ``driver`` up.

A driver's module is imported the first time its name is asked for, so a
daemon that opens no image pays nothing for drivers at start-up (issue 10).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

from qmpd.block.driver import BlockDriver


def _file() -> type[BlockDriver]:
    from qmpd.block.file import FileDriver

    return FileDriver


def _host_device() -> type[BlockDriver]:
    from qmpd.block.file import HostDeviceDriver

    return HostDeviceDriver


def _raw() -> type[BlockDriver]:
    from qmpd.block.raw import RawDriver

    return RawDriver


def _null() -> type[BlockDriver]:
    from qmpd.block.null import NullDriver

    return NullDriver


def _throttle() -> type[BlockDriver]:
    from qmpd.block.throttle import ThrottleDriver

    return ThrottleDriver


def _nbd() -> type[BlockDriver]:
    from qmpd.block.nbd import NbdDriver

    return NbdDriver


def _nfs() -> type[BlockDriver]:
    from qmpd.block.nfs import NfsDriver

    return NfsDriver


def _qcow2() -> type[BlockDriver]:
    from qmpd.block.qcow2.driver import Qcow2Driver

    return Qcow2Driver


def _rbd() -> type[BlockDriver]:
    from qmpd.block.rbd import RbdDriver

    return RbdDriver


class DriverTable(Mapping[str, type[BlockDriver]]):
    """Driver classes by ``format_name``, each imported when first looked up."""

    def __init__(self, loaders: dict[str, Callable[[], type[BlockDriver]]]) -> None:
        self._loaders = loaders
        self._loaded: dict[str, type[BlockDriver]] = {}

    def __getitem__(self, name: str) -> type[BlockDriver]:
        cls = self._loaded.get(name)
        if cls is None:
            cls = self._loaded[name] = self._loaders[name]()
        return cls

    def __iter__(self) -> Iterator[str]:
        return iter(self._loaders)

    def __len__(self) -> int:
        return len(self._loaders)


#: Every driver qmpd opens, by its ``format_name`` (the QAPI ``driver`` value).
DRIVERS = DriverTable({
    "file": _file, "host_device": _host_device, "raw": _raw, "null-co": _null,
    "throttle": _throttle, "qcow2": _qcow2, "nbd": _nbd,
    "rbd": _rbd, "nfs": _nfs,
})


#: Drivers imported only when a blockdev-add names them, never by the warm-up
#: or a format probe (they have no signature): the nbd driver brings the NBD
#: client and protocol, which a daemon that never uses NBD does not load; the
#: rbd driver loads librados and librbd, the nfs driver libnfs.
ON_DEMAND = frozenset({"nbd", "rbd", "nfs"})


#: What QEMU reads of a file to probe its format.
PROBE_BYTES = 2048


def driver_class(name: str) -> type[BlockDriver] | None:
    """The driver class for a ``driver`` value, None when qmpd has none."""
    return DRIVERS.get(name)


def load_all() -> None:
    """Import every driver now (warming up, so the first blockdev-add does not)."""
    for name in DRIVERS:
        if name not in ON_DEMAND:
            DRIVERS[name]


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
    for name in DRIVERS:
        if name not in ON_DEMAND and DRIVERS[name].probe(head):
            return name
    return "raw"
