"""The jobs' reused copy buffers and their zero test (qmpd.jobs.inflight)."""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

import pytest

from qmpd.buffers import ALIGNED_MIN, ALIGNMENT, aligned_buffer
from qmpd.jobs.inflight import CopyBuffers, is_zero

MiB = 1 << 20


def address(buf: memoryview) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(buf))


@pytest.mark.parametrize("where", [0, 1, MiB - 1, MiB, MiB + 1, 3 * MiB - 1])
def test_is_zero_finds_one_byte_anywhere(where: int) -> None:
    buf = bytearray(3 * MiB)
    assert is_zero(buf, 0, len(buf))
    buf[where] = 7
    assert not is_zero(buf, 0, len(buf))
    assert is_zero(buf, 0, where)
    assert is_zero(buf, where + 1, len(buf) - where - 1)
    assert not is_zero(buf, where, 1)


def test_is_zero_refuses_a_range_beyond_the_buffer() -> None:
    with pytest.raises(ValueError):
        is_zero(bytearray(16), 8, 9)


def test_copy_buffers_are_reused_up_to_keep() -> None:
    pool = CopyBuffers(4096, keep=1)
    a = pool.take()
    b = pool.take()
    assert len(a) == len(b) == 4096 and a is not b
    pool.give(a)
    pool.give(b)  # beyond keep: dropped
    assert pool.take() is a
    assert pool.take() is not b


def test_copy_buffers_are_page_aligned() -> None:
    """The kernel copies into unaligned memory several times slower (qmpd.buffers)."""
    pool = CopyBuffers(MiB, keep=2)
    for buf in (pool.take(), pool.take()):
        assert len(buf) == MiB and not buf.readonly
        assert address(buf) % ALIGNMENT == 0
        assert is_zero(buf, 0, MiB)


@pytest.mark.parametrize("size", [1, 4095, ALIGNED_MIN - 1, ALIGNED_MIN, 3 * MiB + 5])
def test_aligned_buffer_sizes(size: int) -> None:
    buf = aligned_buffer(size)
    assert len(buf) == size and is_zero(buf, 0, size)
    buf[size - 1] = 1  # writable to its last byte
    assert not is_zero(buf, 0, size)
    if size >= ALIGNED_MIN:
        assert address(buf) % ALIGNMENT == 0


def test_preadv_fills_an_aligned_buffer(tmp_path: Path) -> None:
    data = os.urandom(MiB + 512)
    path = tmp_path / "f"
    path.write_bytes(data)
    buf = aligned_buffer(MiB)
    fd = os.open(path, os.O_RDONLY)
    try:
        assert os.preadv(fd, [buf], 512) == MiB
    finally:
        os.close(fd)
    assert bytes(buf) == data[512:]
