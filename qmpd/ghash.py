"""Which leftover key QEMU names in "Parameter 'x' is unexpected".

QEMU's input visitor copies an object's keys (in QDict order) into a GLib
hash table, removes each key as its member is visited, and names the first
key it finds when iterating what is left.  GLib iterates in slot order, so
the answer depends on GLib's hash function, probing, and the resizes that
inserts and removals trigger.  This models GLib 2.74 (Debian 12, as built
with QEMU 7.2) closely enough to give the same answer.
"""

from __future__ import annotations

_UNUSED = 0
_TOMBSTONE = 1
_MIN_SHIFT = 3
_PRIME_MOD = (
    1, 2, 3, 7, 13, 31, 61, 127, 251, 509, 1021, 2039, 4093, 8191, 16381, 32749, 65521,
    131071, 262139, 524287, 1048573, 2097143, 4194301, 8388593, 16777213, 33554393,
    67108859, 134217689, 268435399, 536870909, 1073741789, 2147483647,
)
_MASK32 = 0xFFFFFFFF


def g_str_hash(key: str) -> int:
    h = 5381
    for byte in key.encode("utf-8", "surrogatepass"):
        signed = byte - 256 if byte >= 128 else byte
        h = (h * 33 + signed) & _MASK32
    return h


class _Table:
    def __init__(self) -> None:
        self._set_shift(_MIN_SHIFT)
        self.hashes = [_UNUSED] * self.size
        self.keys: list[str | None] = [None] * self.size
        self.nnodes = 0
        self.noccupied = 0

    def _set_shift(self, shift: int) -> None:
        self.size = 1 << shift
        self.mod = _PRIME_MOD[shift]
        self.mask = self.size - 1

    def _index(self, hash_value: int) -> int:
        return ((hash_value * 11) & _MASK32) % self.mod

    def _lookup(self, key: str) -> tuple[int, int]:
        hash_value = g_str_hash(key)
        if hash_value < 2:
            hash_value = 2
        index = self._index(hash_value)
        step = 0
        first_tombstone = -1
        while self.hashes[index] != _UNUSED:
            node_hash = self.hashes[index]
            if node_hash == hash_value and self.keys[index] == key:
                return index, hash_value
            if node_hash == _TOMBSTONE and first_tombstone < 0:
                first_tombstone = index
            step += 1
            index = (index + step) & self.mask
        return (first_tombstone if first_tombstone >= 0 else index), hash_value

    def _maybe_resize(self) -> None:
        if (self.size > self.nnodes * 4 and self.size > 1 << _MIN_SHIFT) or (
            self.size <= self.noccupied + self.noccupied // 16
        ):
            self._resize()

    def _resize(self) -> None:
        old_size = self.size
        target = int(self.nnodes * 1.333)
        shift = 0
        while target:
            target >>= 1
            shift += 1
        self._set_shift(max(shift, _MIN_SHIFT))
        if self.size > old_size:
            self.hashes += [_UNUSED] * (self.size - old_size)
            self.keys += [None] * (self.size - old_size)
        moved = [False] * max(self.size, old_size)
        for i in range(old_size):
            node_hash = self.hashes[i]
            if node_hash < 2:
                self.hashes[i] = _UNUSED
                continue
            if moved[i]:
                continue
            self.hashes[i] = _UNUSED
            key = self.keys[i]
            self.keys[i] = None
            while True:
                index = self._index(node_hash)
                step = 0
                while moved[index]:
                    step += 1
                    index = (index + step) & self.mask
                moved[index] = True
                replaced_hash = self.hashes[index]
                replaced_key = self.keys[index]
                self.hashes[index] = node_hash
                self.keys[index] = key
                if replaced_hash < 2:
                    break
                node_hash, key = replaced_hash, replaced_key
        if self.size < old_size:
            del self.hashes[self.size :]
            del self.keys[self.size :]
        self.noccupied = self.nnodes

    def insert(self, key: str) -> None:
        index, hash_value = self._lookup(key)
        old = self.hashes[index]
        if old >= 2:
            return
        self.hashes[index] = hash_value
        self.keys[index] = key
        self.nnodes += 1
        if old == _UNUSED:
            self.noccupied += 1
            self._maybe_resize()

    def remove(self, key: str) -> None:
        index, _ = self._lookup(key)
        if self.hashes[index] < 2:
            return
        self.hashes[index] = _TOMBSTONE
        self.keys[index] = None
        self.nnodes -= 1
        self._maybe_resize()

    def first(self) -> str | None:
        for i in range(self.size):
            if self.hashes[i] >= 2:
                return self.keys[i]
        return None


def first_unexpected(keys_in_qdict_order: list[str], visited: list[str]) -> str | None:
    """The key QEMU reports as unexpected, given the members it visited in order."""
    table = _Table()
    for key in keys_in_qdict_order:
        table.insert(key)
    for key in visited:
        table.remove(key)
    return table.first()
