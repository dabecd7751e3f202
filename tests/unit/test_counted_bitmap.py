"""A mirror's bitmap keeps its dirty count as it changes: the count must be
what counting every bit says, whatever the ranges."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from qmpd.block.dirty_bitmap import DirtyBitmap
from qmpd.jobs.inflight import CountedBitmap

_OPS = st.lists(st.tuples(st.sampled_from(["set", "reset", "all"]),
                          st.integers(0, 70_000), st.integers(0, 70_000)), max_size=40)


@settings(max_examples=200)
@given(size=st.integers(1, 66_000), granularity=st.sampled_from([512, 1024, 4096]), ops=_OPS)
def test_count_follows_the_bits(size: int, granularity: int,
                                ops: list[tuple[str, int, int]]) -> None:
    counted = CountedBitmap("", size, granularity)
    plain = DirtyBitmap("", size, granularity)
    for op, offset, length in ops:
        for bitmap in (counted, plain):
            if op == "set":
                bitmap.set_range(offset, length)
            elif op == "reset":
                bitmap.reset_range(offset, length)
            else:
                bitmap.set_all()
        assert counted.bits == plain.bits
        assert counted.count() == plain.count()
        assert counted.dirty_granules() == int.from_bytes(counted.bits, "little").bit_count()
