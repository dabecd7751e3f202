"""DirtyBitmap against a plain model: one bool per granule."""

from __future__ import annotations

import hashlib
import itertools

from hypothesis import given
from hypothesis import strategies as st

from qmpd.block.dirty_bitmap import DirtyBitmap, default_granularity

GRANULARITIES = st.sampled_from([512, 4096, 65536])
OPS = st.lists(st.tuples(st.booleans(), st.integers(0, 1 << 20), st.integers(0, 300_000)),
               max_size=20)


def model_apply(model: list[bool], g: int, size: int, setting: bool, off: int, n: int) -> None:
    if setting:
        if n <= 0 or off >= size:
            return
        for k in range(off // g, (min(off + n, size) - 1) // g + 1):
            model[k] = True
        return
    for k in range(len(model)):
        start, end = k * g, min((k + 1) * g, size)
        if off <= start and end <= off + n:
            model[k] = False


@given(size=st.integers(1, 1 << 20), g=GRANULARITIES, ops=OPS)
def test_bits_follow_the_model(size: int, g: int, ops: list[tuple[bool, int, int]]) -> None:
    bitmap = DirtyBitmap("b", size, g)
    model = [False] * bitmap.granules
    for setting, off, n in ops:
        if setting:
            bitmap.set_range(off, n)
        else:
            bitmap.reset_range(off, n)
        model_apply(model, g, size, setting, off, n)
    assert [bitmap.get(k * g) for k in range(len(model))] == model
    assert bitmap.count() == sum(model) * g
    extents = bitmap.dirty_extents(0, size)
    covered = [False] * len(model)
    for start, length in extents:
        for k in range(start // g, (start + length - 1) // g + 1):
            covered[k] = True
    assert covered == model
    # merged: no two extents touch
    assert all(a + n < b for (a, n), (b, _) in itertools.pairwise(extents))
    packed = bytearray(-(-len(model) // 8))
    for k, dirty in enumerate(model):
        if dirty:
            packed[k // 8] |= 1 << (k % 8)
    assert bitmap.to_bytes() == bytes(packed)
    assert bitmap.sha256() == hashlib.sha256(bytes(packed).ljust(-(-len(packed) // 8) * 8,
                                                                  b"\0")).hexdigest()
    again = DirtyBitmap("c", size, g)
    again.load_bytes(b"\xff" * len(packed))
    assert again.count() == len(model) * g  # bits past the end do not count


def test_merge_and_clear() -> None:
    a = DirtyBitmap("a", 1 << 20, 65536)
    b = DirtyBitmap("b", 1 << 20, 4096)
    a.set_range(0, 1)
    b.set_range(200_000, 10)
    a.merge(b)
    assert a.dirty_extents(0, 1 << 20) == [(0, 65536), (196608, 65536)]
    a.clear()
    assert a.count() == 0
    a.set_all()
    assert a.count() == 1 << 20


def test_default_granularity() -> None:
    assert default_granularity(None) == 65536
    assert default_granularity(512) == 4096
    assert default_granularity(1 << 21) == 65536  # QSD 7.2 on a 2 MiB-cluster qcow2


def test_truncate_keeps_bits_and_clears_new_granules() -> None:
    bm = DirtyBitmap("t", 10 * 512, 512)
    bm.set_range(0, 10 * 512)
    bm.truncate(3 * 512 + 1)
    assert bm.granules == 4 and bm.dirty_granules() == 4
    bm.truncate(20 * 512)
    assert bm.dirty_granules() == 4 and not bm.get(4 * 512) and bm.get(3 * 512)
    assert len(bm.bits) == 3
