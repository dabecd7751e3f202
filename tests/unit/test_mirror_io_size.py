"""How long a mirror's copies are: up to 4 MiB while nothing paces the job,
QEMU's 1 MiB (MAX_IO_BYTES) with a speed limit or in write-blocking mode, and
never more than ``buf-size``.  Counted as the writes reaching the target node
of a real mirror between two image files, in process."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from qmpd.block.core import BlockLayer
from tests.support.block import mirror_until_ready

MiB = 1 << 20
SIZE = 16 * MiB


@pytest.mark.parametrize(("options", "length"), [
    ({}, 4 * MiB),
    ({"speed": 1 << 40}, MiB),
    ({"copy-mode": "write-blocking"}, MiB),
    ({"buf-size": 2 * MiB}, 2 * MiB),
    ({"granularity": 8 * MiB}, 8 * MiB),
])
async def test_copy_lengths(layer: BlockLayer, tmp_path: Path, options: dict[str, Any],
                            length: int) -> None:
    src, tgt = tmp_path / "src.raw", tmp_path / "tgt.raw"
    data = os.urandom(SIZE)
    src.write_bytes(data)
    with open(tgt, "wb") as f:
        f.truncate(SIZE)
    await layer.add({"driver": "raw", "node-name": "src",
                     "file": {"driver": "file", "filename": str(src)}})
    target = await layer.add({"driver": "raw", "node-name": "tgt",
                              "file": {"driver": "file", "filename": str(tgt)}})
    await mirror_until_ready(layer, **options)
    assert target.stats.wr_bytes == SIZE
    assert target.stats.wr_operations == SIZE // length
    assert tgt.read_bytes() == data


@pytest.mark.parametrize("direct", [False, True])
async def test_copies_between_files_are_one_io_job_each(layer: BlockLayer, tmp_path: Path,
                                                        direct: bool) -> None:
    """qcow2 to qcow2 over files: each 4 MiB copy is one I/O job that reads the
    source file and writes the target file (a host file span), and the target
    ends up equal to the source (``qemu-img compare``).  A target opened with
    O_DIRECT (``cache.direct``) cannot take a span: the data is read first."""
    from tests.support.tools import qemu_img, qemu_io

    src, tgt = tmp_path / "src.qcow2", tmp_path / "tgt.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", src, str(SIZE))
    qemu_img("create", "-q", "-f", "qcow2", tgt, str(SIZE))
    qemu_io("-f", "qcow2", "-c", "write -P 0x5a 0 12M", "-c", "write -P 0x6b 12M 4M", src,
            check=True)
    await layer.add({"driver": "qcow2", "node-name": "src",
                     "file": {"driver": "file", "filename": str(src)}})
    await layer.add({"driver": "qcow2", "node-name": "tgt", "cache": {"direct": direct},
                     "file": {"driver": "file", "filename": str(tgt)}})
    jobs_run: list[str] = []
    pool_run = layer.graph.io.run

    async def counted(fn: Callable[..., Any], *args: Any) -> Any:
        jobs_run.append(fn.__name__)
        return await pool_run(fn, *args)

    layer.graph.io.run = counted  # type: ignore[method-assign]
    try:
        await mirror_until_ready(layer)
    finally:
        await layer.close_all()
    copies = [name for name in jobs_run if name in ("_copy_span", "read_span")]
    assert copies == (["read_span"] if direct else ["_copy_span"]) * (SIZE // (4 * MiB))
    qemu_img("compare", "-q", "-f", "qcow2", "-F", "qcow2", src, tgt)
