"""The jobs' reused copy buffers and their zero test (qmpd.jobs.inflight)."""

from __future__ import annotations

import pytest

from qmpd.jobs.inflight import CopyBuffers, is_zero

MiB = 1 << 20


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
