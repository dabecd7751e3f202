"""Crafted qcow2 headers are refused with the text qemu-img 7.2 prints."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from tests.interop.test_qcow2_common import opened, qemu_img_create, run, run_async, tools

pytestmark = pytest.mark.qemu

# (name, header offset, struct format, value)
CASES = [
    ("l1-offset-unaligned", 40, ">Q", 0x10001),
    ("l1-size-huge", 36, ">I", 0x7FFFFFFF),
    ("refcount-table-offset-unaligned", 48, ">Q", 0x10001),
    ("refcount-table-clusters-huge", 56, ">I", 0x7FFFFFFF),
    ("cluster-bits-8", 20, ">I", 8),
    ("cluster-bits-22", 20, ">I", 22),
    ("snapshots-huge", 60, ">I", 0x7FFFFFFF),
    ("snapshots-65537", 60, ">I", 65537),
]


def _qemu_text(path: Path) -> str:
    proc = run("qemu-img", "info", "-f", "qcow2", path, check=False)
    assert proc.returncode != 0, proc.stdout
    line = proc.stderr.strip().splitlines()[-1]
    prefix = f"qemu-img: Could not open '{path}': "
    assert line.startswith(prefix), line
    return line[len(prefix):]


@pytest.mark.parametrize("name,offset,fmt,value", CASES, ids=[c[0] for c in CASES])
def test_crafted_header_refused_with_qemu_text(tmp_path: Path, name: str, offset: int,
                                               fmt: str, value: int) -> None:
    tools()
    img = tmp_path / f"{name}.qcow2"
    qemu_img_create(img, "16M")
    with open(img, "r+b") as f:
        f.seek(offset)
        f.write(struct.pack(fmt, value))
    expected = _qemu_text(img)

    async def attempt() -> str:
        try:
            async with opened(img):
                pass
        except Exception as exc:  # the driver's error, whatever its class
            return str(exc)
        return "<opened>"

    assert run_async(attempt()) == expected
