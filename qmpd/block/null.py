"""The ``null-co`` protocol driver: a bottomless device for tests and benchmarks."""

from __future__ import annotations

from typing import Any

from qmpd.block.driver import BlockDriver, BlockStatus

_DEFAULT_SIZE = 1 << 30


class NullDriver(BlockDriver):
    """Options: ``size`` (default 1 GiB), ``read-zeroes`` (default off)."""

    format_name = "null-co"
    is_protocol = True
    strong_runtime_opts = ("size", "read-zeroes")

    def __init__(self, node: Any) -> None:
        super().__init__(node)
        self._size = _DEFAULT_SIZE
        self.read_zeroes = False

    async def open(self, options: dict[str, Any]) -> None:
        self._size = options.get("size", _DEFAULT_SIZE)
        self.read_zeroes = options.get("read-zeroes", False)

    async def read(self, offset: int, length: int) -> bytes:
        # QEMU leaves the buffer untouched without read-zeroes; zeros are
        # the only deterministic choice for Python buffers.
        return bytes(length)

    async def write(self, offset: int, data: bytes, fua: bool = False) -> None:
        return None

    async def write_zeroes(
        self, offset: int, length: int, may_unmap: bool = False, fua: bool = False
    ) -> None:
        return None

    async def block_status(self, offset: int, length: int) -> BlockStatus:
        # As QEMU: without read-zeroes the contents are undefined, which
        # block status reports as neither data nor zeros (not allocated).
        return BlockStatus(
            length=length, data=False, zero=self.read_zeroes, allocated=self.read_zeroes
        )

    def size(self) -> int:
        return self._size

    def filename(self) -> str:
        return "null-co://"

    def exact_filename(self) -> str:
        return "null-co://"

    async def truncate(self, size: int) -> None:
        self._size = size
