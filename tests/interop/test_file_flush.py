"""A failed fdatasync is never forgotten (QEMU's page_cache_inconsistent).

The failure is real: the node's descriptor number is pointed at /dev/null,
whose fdatasync fails with EINVAL, for one flush, and then back at the image.
Every later flush must still fail, as the kernel may have dropped the pages
that did not reach the disk and will not report it again.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from qmpd.block.file import FileDriver
from qmpd.block.graph import BlockGraph
from qmpd.block.qcow2.standalone import close_image, open_image
from tests.interop.test_qcow2_common import qemu_img_create, tools


async def test_flush_error_is_sticky(tmp_path: Path) -> None:
    tools()
    img = tmp_path / "disk.qcow2"
    qemu_img_create(img, 1 << 20)
    graph = BlockGraph()
    try:
        node = await open_image(graph, str(img))
        assert node.file is not None
        file_driver = node.file.driver
        assert isinstance(file_driver, FileDriver)
        fd = file_driver.fd
        await node.write(0, b"\x5a" * 65536)
        saved = os.dup(fd)
        null = os.open(os.devnull, os.O_RDWR)
        try:
            os.dup2(null, fd)
            with pytest.raises(OSError) as first:
                await node.flush()
            assert first.value.errno == errno.EINVAL
        finally:
            os.dup2(saved, fd)
            os.close(saved)
            os.close(null)
        # The image's own descriptor is back and fdatasync would succeed on it.
        os.fdatasync(fd)
        for _ in range(3):
            with pytest.raises(OSError) as later:
                await node.flush()
            assert later.value.errno == errno.EIO
        await node.write(65536, b"\x11" * 512)
        with pytest.raises(OSError):
            await node.flush()
        with pytest.raises(OSError):
            await close_image(node)
    finally:
        graph.close()
