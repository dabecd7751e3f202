"""Dirty bitmaps (QEMU's BdrvDirtyBitmap): one bit per granule of a node.

Bit ``k`` covers bytes ``[k * granularity, (k + 1) * granularity)`` and
lives in byte ``k // 8`` at bit ``k % 8`` (least significant first).  That
is both qcow2's on-disk layout of bitmap data and the byte image of QEMU's
last hbitmap level on a little-endian host, which is what
``x-debug-block-dirty-bitmap-sha256`` hashes (padded to whole 64-bit words).
"""

from __future__ import annotations

MIN_GRANULARITY = 512
MAX_GRANULARITY = 1 << 31


def default_granularity(cluster_size: int | None) -> int:
    """QEMU's default (bdrv_get_default_bitmap_granularity): 64 KiB without a
    cluster size, else the cluster size within [4 KiB, 64 KiB]."""
    if not cluster_size:
        return 65536
    return min(65536, max(4096, cluster_size))


class DirtyBitmap:
    """The bits and the flags QEMU reports for one named bitmap."""

    __slots__ = (
        "bits",
        "busy",
        "granularity",
        "inconsistent",
        "migration",
        "name",
        "persistent",
        "readonly",
        "recording",
        "size",
    )

    def __init__(self, name: str, size: int, granularity: int, *, persistent: bool = False,
                 recording: bool = True, inconsistent: bool = False) -> None:
        self.name = name
        self.size = size
        self.granularity = granularity
        self.persistent = persistent
        self.recording = recording
        self.inconsistent = inconsistent
        #: In use by an export, a job or a migration: commands may not change it.
        self.busy = False
        #: Loaded from an image opened read-only: not to be changed by commands.
        self.readonly = False
        #: Sent by the ``dirty-bitmaps`` migration capability: then it is not
        #: stored in the image at inactivation (QEMU's persistence getter).
        self.migration = False
        self.bits = bytearray(-(-self.granules // 8))

    @property
    def stored(self) -> bool:
        """Whether the image format stores it (persistent, consistent, not migrating)."""
        return self.persistent and not self.inconsistent and not self.migration

    @property
    def granules(self) -> int:
        return -(-self.size // self.granularity)

    # --- bits -------------------------------------------------------------------

    def set_range(self, offset: int, length: int) -> None:
        """Mark every granule ``[offset, offset + length)`` touches."""
        if length <= 0 or offset >= self.size:
            return
        g = self.granularity
        first = offset // g
        last = min(offset + length - 1, self.size - 1) // g
        self._fill(first, last + 1, True)

    def reset_range(self, offset: int, length: int) -> None:
        """Clear the granules ``[offset, offset + length)`` covers whole (the
        end of the node counts as a granule's end)."""
        g = self.granularity
        first = -(-offset // g)
        end = self.granules if offset + length >= self.size else (offset + length) // g
        if end > first:
            self._fill(first, end, False)

    def _fill(self, first: int, end: int, value: bool) -> None:
        bits = self.bits
        while first < end and first & 7:
            self._bit(first, value)
            first += 1
        whole_end = end & ~7
        if whole_end > first:
            bits[first >> 3:whole_end >> 3] = (b"\xff" if value else b"\0") * (
                (whole_end - first) >> 3)
            first = whole_end
        while first < end:
            self._bit(first, value)
            first += 1

    def _bit(self, k: int, value: bool) -> None:
        if value:
            self.bits[k >> 3] |= 1 << (k & 7)
        else:
            self.bits[k >> 3] &= ~(1 << (k & 7)) & 0xFF

    def resize(self, size: int) -> None:
        """Follow a resize (bdrv_dirty_bitmap_truncate): granules past the new
        end are dropped, new ones are clean."""
        self.size = size
        n = -(-self.granules // 8)
        del self.bits[n:]
        self.bits.extend(bytes(n - len(self.bits)))
        spare = n * 8 - self.granules
        if spare and n:
            self.bits[-1] &= 0xFF >> spare

    def get(self, offset: int) -> bool:
        k = offset // self.granularity
        return bool(self.bits[k >> 3] >> (k & 7) & 1)

    def clear(self) -> None:
        self.bits[:] = bytes(len(self.bits))

    def set_all(self) -> None:
        self._fill(0, self.granules, True)

    def merge(self, other: DirtyBitmap) -> None:
        """OR ``other`` in (same size; granularities may differ)."""
        if other.granularity == self.granularity:
            merged = int.from_bytes(self.bits, "little") | int.from_bytes(other.bits, "little")
            self.bits[:] = merged.to_bytes(len(self.bits), "little")
            return
        for start, length in other.dirty_extents(0, other.size):
            self.set_range(start, length)

    def dirty_granules(self) -> int:
        return int.from_bytes(self.bits, "little").bit_count()

    def count(self) -> int:
        """Dirty bytes, whole granules (QEMU's ``count``)."""
        return self.dirty_granules() * self.granularity

    def dirty_extents(self, offset: int, length: int) -> list[tuple[int, int]]:
        """The dirty byte ranges within ``[offset, offset + length)``, merged."""
        g = self.granularity
        end = min(offset + length, self.size)
        out: list[tuple[int, int]] = []
        k = offset // g
        last = -(-end // g)
        value = int.from_bytes(self.bits, "little") >> k
        while k < last and value:
            if not value & 1:
                skip = (value & -value).bit_length() - 1
                k += skip
                value >>= skip
                continue
            run = (~value & (value + 1)).bit_length() - 1
            start = max(k * g, offset)
            stop = min((k + run) * g, end)
            if stop > start:
                out.append((start, stop - start))
            k += run
            value >>= run
        return out

    def truncate(self, size: int) -> None:
        """Follow the node to a new size (hbitmap_truncate): granules past the
        old end start clean, those past the new end are dropped."""
        old = bytes(self.bits)
        self.size = size
        self.bits = bytearray(-(-self.granules // 8))
        self.load_bytes(old)

    # --- serialization ----------------------------------------------------------

    def to_bytes(self) -> bytes:
        """The bits in qcow2's layout (see the module docstring)."""
        return bytes(self.bits)

    def load_bytes(self, data: bytes) -> None:
        """Take bits in qcow2's layout; bits past the last granule are ignored."""
        n = len(self.bits)
        self.bits[:] = data[:n].ljust(n, b"\0")
        spare = len(self.bits) * 8 - self.granules
        if spare and n:
            self.bits[-1] &= 0xFF >> spare

    def sha256(self) -> str:
        """``x-debug-block-dirty-bitmap-sha256``: the bits as 64-bit words."""
        import hashlib  # on first use: OpenSSL costs start-up milliseconds

        data = bytes(self.bits)
        return hashlib.sha256(data + bytes(-len(data) % 8)).hexdigest()
