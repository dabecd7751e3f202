"""RefBlock.replace_all: a run of refcounts set in one slice (qmpd.block.qcow2.refcount)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from qmpd.block.qcow2.refcount import RefBlock

CLUSTER = 512


@pytest.mark.parametrize("order", [3, 4, 5, 6])
@given(data=st.data())
def test_replace_all_is_all_or_nothing(order: int, data: st.DataObject) -> None:
    blk = RefBlock.new(order, CLUSTER)
    top = (1 << (1 << order)) - 1
    values = data.draw(st.lists(st.sampled_from([0, 1, 2, top]), min_size=blk.entries,
                                max_size=blk.entries))
    for i, v in enumerate(values):
        blk.set(i, v)
    start = data.draw(st.integers(0, blk.entries - 1))
    stop = data.draw(st.integers(start + 1, blk.entries))
    old = data.draw(st.sampled_from([0, 1, 2]))
    new = data.draw(st.sampled_from([0, 1, top]))
    changed = blk.replace_all(start, stop, old, new)
    assert changed == all(v == old for v in values[start:stop])
    want = list(values)
    if changed:
        want[start:stop] = [new] * (stop - start)
    assert [blk.get(i) for i in range(blk.entries)] == want
    # The on-disk form decodes to the same values.
    again = RefBlock.from_bytes(order, blk.to_bytes())
    assert [again.get(i) for i in range(blk.entries)] == want


@pytest.mark.parametrize("order", [0, 1, 2])
def test_sub_byte_widths_take_the_slow_path(order: int) -> None:
    blk = RefBlock.new(order, CLUSTER)
    assert not blk.replace_all(0, 8, 0, 1)
    assert [blk.get(i) for i in range(8)] == [0] * 8
