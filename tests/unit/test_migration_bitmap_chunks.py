"""The dirty-bitmap section's chunks: our writer read back by our reader (sans-IO)."""

from __future__ import annotations

import hypothesis.strategies as st
import pytest
from hypothesis import given

from qmpd.block.dirty_bitmap import DirtyBitmap
from qmpd.migration.stream import MigrationStreamError, StreamReader, StreamWriter, TimerState
from qmpd.migration.stream.bitmaps import (
    FLAG_BITMAP_NAME,
    FLAG_BITS,
    FLAG_COMPLETE,
    FLAG_DEVICE_NAME,
    FLAG_START,
    FLAG_ZEROES,
    BitmapChunk,
    MigratedBitmap,
    apply_bits,
)

CAPS = {"dirty-bitmaps": True}


def read_all(data: bytes, accept: bool = True) -> list[object]:
    reader = StreamReader(CAPS)
    chunks: list[object] = []
    if accept:
        reader.bitmap_sink = chunks.append
    events = [*reader.feed(data), *reader.close()]
    return [*chunks, *events]


def stream(bitmaps: list[tuple[MigratedBitmap, DirtyBitmap]]) -> bytes:
    writer = StreamWriter(CAPS, [m for m, _ in bitmaps])
    return writer.setup() + writer.complete("running", TimerState(1, 2),
                                            [b.to_bytes() for _, b in bitmaps])


def rebuilt(events: list[object], sizes: dict[tuple[str, str], int]) -> dict[
        tuple[str | None, str | None], DirtyBitmap]:
    out: dict[tuple[str | None, str | None], DirtyBitmap] = {}
    for event in events:
        if not isinstance(event, BitmapChunk):
            continue
        key = (event.node, event.name)
        if event.kind == "start":
            assert key not in out
            out[key] = DirtyBitmap(str(event.name), sizes[(str(event.node), str(event.name))],
                                   event.granularity)
        elif event.kind == "bits":
            bitmap = out[key]
            apply_bits(bitmap.bits, bitmap.granularity, event)
    return out


@given(
    size=st.integers(1, 300 << 20),
    granularity=st.sampled_from([512, 4096, 65536, 1 << 20]),
    writes=st.lists(st.tuples(st.integers(0, 300 << 20), st.integers(1, 1 << 22)), max_size=8),
)
def test_bits_travel_whole(size: int, granularity: int, writes: list[tuple[int, int]]) -> None:
    a = DirtyBitmap("a", size, granularity)
    b = DirtyBitmap("b", size, 65536, recording=False)
    for offset, length in writes:
        a.set_range(offset, length)
        b.set_range(offset // 2, length)
    meta = [MigratedBitmap("disk0", "a", granularity, True, False, size),
            MigratedBitmap("disk0", "b", 65536, False, True, size)]
    events = read_all(stream([(meta[0], a), (meta[1], b)]))
    got = rebuilt(events, {("disk0", "a"): size, ("disk0", "b"): size})
    assert got[("disk0", "a")].sha256() == a.sha256()
    assert got[("disk0", "b")].sha256() == b.sha256()
    starts = [e for e in events if isinstance(e, BitmapChunk) and e.kind == "start"]
    assert [(e.granularity, e.start_flags) for e in starts] == [(granularity, 1), (65536, 2)]
    assert [e.name for e in events if isinstance(e, BitmapChunk) and e.kind == "complete"] \
        == ["a", "b"]


def test_names_are_sent_only_when_they_change() -> None:
    size = 64 << 20
    meta = [MigratedBitmap("n0", "x", 65536, True, False, size),
            MigratedBitmap("n0", "y", 65536, True, False, size),
            MigratedBitmap("n1", "x", 65536, True, False, size)]
    writer = StreamWriter(CAPS, meta)
    raw = writer.bitmaps.setup()
    # n0/x: both names; n0/y: the bitmap's; n1/x: both again.
    assert raw == (bytes([FLAG_START | FLAG_DEVICE_NAME | FLAG_BITMAP_NAME]) + b"\x02n0\x01x"
                   + b"\x00\x01\x00\x00\x01"
                   + bytes([FLAG_START | FLAG_BITMAP_NAME]) + b"\x01y" + b"\x00\x01\x00\x00\x01"
                   + bytes([FLAG_START | FLAG_DEVICE_NAME | FLAG_BITMAP_NAME]) + b"\x02n1\x01x"
                   + b"\x00\x01\x00\x00\x01" + b"\x01")
    events = read_all(writer.setup() + writer.complete("running", None, [bytes(128)] * 3))
    chunks = [e for e in events if isinstance(e, BitmapChunk)]
    # Clean bitmaps go as ZEROES chunks, with no buffer.
    bits = [c for c in chunks if c.kind == "bits"]
    assert bits and all(c.flags & FLAG_ZEROES and c.data is None for c in bits)
    assert [(c.node, c.name) for c in chunks if c.flags & FLAG_COMPLETE] == [
        ("n0", "x"), ("n0", "y"), ("n1", "x")]
    assert all(c.flags & FLAG_BITS for c in bits)


def test_without_bitmaps_the_end_section_is_left_out() -> None:
    writer = StreamWriter(CAPS)
    assert b"dirty-bitmap" in writer.setup()
    tail = writer.complete("running", None)
    assert tail == StreamWriter({}).complete("running", None)


def test_a_reader_not_taking_bitmaps_refuses_them() -> None:
    size = 1 << 20
    meta = MigratedBitmap("disk0", "a", 65536, True, False, size)
    data = stream([(meta, DirtyBitmap("a", size, 65536))])
    with pytest.raises(MigrationStreamError) as exc:
        read_all(data, accept=False)
    assert "qmpd: dirty bitmaps in the migration stream are not supported" in str(exc.value)
    # A section with no bitmap in it (EOS only) is fine either way.
    empty = StreamWriter(CAPS)
    assert read_all(empty.setup() + empty.complete("running", None), accept=False)


def test_a_huge_buffer_is_refused_before_it_is_read() -> None:
    size = 1 << 20
    meta = MigratedBitmap("disk0", "a", 65536, True, False, size)
    dirty = DirtyBitmap("a", size, 65536)
    dirty.set_all()
    data = bytearray(stream([(meta, dirty)]))
    # The END section (id 3); the names went with START, so the chunk has none.
    at = data.index(b"\x03\x00\x00\x00\x03" + bytes([FLAG_BITS]))
    size_at = at + 5 + 1 + 12
    data[size_at:size_at + 8] = (10 * 1024 + 8).to_bytes(8, "big")
    with pytest.raises(MigrationStreamError) as exc:
        read_all(bytes(data))
    assert "Bitmap migration stream buffer allocation request is too large" in str(exc.value)
