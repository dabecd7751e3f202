"""Dirty bitmaps that travel in the stream (the ``dirty-bitmaps`` capability).

The destination side follows QEMU 7.2's migration/block-dirty-bitmap.c: a
bitmap named in a START chunk is created on the node of that name, disabled
and busy until its COMPLETE; a node or bitmap that cannot be found cancels
the bitmaps' part of the migration (reported, the rest goes on), while a
bitmap that already exists, or a START it cannot take, fails the migration.
Just before the run state is entered, bitmaps that were enabled on the
source are enabled here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from qmpd.block.bitmaps import DEFAULT, check
from qmpd.block.dirty_bitmap import MIN_GRANULARITY, DirtyBitmap
from qmpd.block.driver import BlockNode
from qmpd.errors import GenericError
from qmpd.migration.stream.bitmaps import (
    START_PERSISTENT,
    START_RESERVED,
    BitmapChunk,
    BitmapRefused,
    MigratedBitmap,
    alias_map,
    apply_bits,
    serialization_size,
)


@dataclass
class _Loading:
    node: BlockNode
    bitmap: DirtyBitmap
    enabled: bool
    migrated: bool = False


class IncomingBitmaps:
    """The destination's bitmap state while a stream is read."""

    def __init__(self, nodes: Mapping[str, BlockNode], report: Callable[[str], None],
                 mapping: list[dict[str, Any]] | None = None) -> None:
        self._nodes = nodes
        self._report = report
        self._aliases = alias_map(mapping, False) if mapping is not None else None
        self._loading: list[_Loading] = []
        self.cancelled = False

    def __call__(self, chunk: BitmapChunk) -> None:
        if self.cancelled:
            return
        if chunk.node is None:
            self._cancel("Error: block device name is not set")
            return
        name = chunk.name
        persistent: bool | None = None
        if self._aliases is not None:
            mapped = self._aliases.get(chunk.node)
            if mapped is None:
                self._cancel(f"Error: Unknown node alias '{chunk.node}'")
                return
            target = self._nodes.get(mapped.other)
            if target is None:
                self._cancel(f"Cannot find device='' nor node-name='{mapped.other}'")
                return
            node = target
            if name is not None:
                if name not in mapped.bitmaps:
                    self._cancel(f"Error: Unknown bitmap alias '{name}' on node "
                                 f"'{node.node_name}' (alias '{chunk.node}')")
                    return
                name, persistent = mapped.bitmaps[name]
        else:
            found = self._nodes.get(chunk.node)
            if found is None:
                self._cancel(f"Cannot find device='{chunk.node}' nor "
                             f"node-name='{chunk.node}'")
                return
            node = found
        if name is None:
            self._cancel("Error: block device name is not set")
            return
        bitmap = node.dirty_bitmaps.get(name)
        kind = chunk.kind
        if kind == "start":
            self._start(node, name, chunk, bitmap, persistent)
            return
        if bitmap is None:
            self._cancel(f"Error: unknown dirty bitmap '{name}' for block device "
                         f"'{node.node_name}'")
            return
        if kind == "bits":
            self._bits(bitmap, chunk)
        elif kind == "complete":
            bitmap.busy = False
            for entry in self._loading:
                if entry.bitmap is bitmap:
                    entry.migrated = True

    def _start(self, node: BlockNode, name: str, chunk: BitmapChunk,
               existing: DirtyBitmap | None, persistent: bool | None) -> None:
        if existing is not None:
            raise BitmapRefused(f"Bitmap with the same name ('{name}') already exists on "
                                "destination")
        granularity = chunk.granularity
        if granularity < MIN_GRANULARITY or granularity & (granularity - 1):
            raise BitmapRefused("Granularity must be power of 2 and at least 512")
        if chunk.start_flags & START_RESERVED:
            raise BitmapRefused("Unknown flags in migrated dirty bitmap header: "
                                f"{chunk.start_flags:x}")
        bitmap = DirtyBitmap(name, node.size(), granularity, recording=False)
        node.dirty_bitmaps[name] = bitmap
        bitmap.persistent = (bool(chunk.start_flags & START_PERSISTENT) if persistent is None
                             else persistent)
        bitmap.busy = True
        self._loading.append(_Loading(node, bitmap, bool(chunk.start_flags & 1)))

    def _bits(self, bitmap: DirtyBitmap, chunk: BitmapChunk) -> None:
        if chunk.data is not None:
            needed = serialization_size(bitmap.granularity, chunk.first_byte, chunk.nr_bytes)
            if needed > len(chunk.data) or len(chunk.data) > -(-needed // 32) * 32:
                self._cancel("Migrated bitmap granularity doesn't match the destination "
                             f"bitmap '{bitmap.name}' granularity")
                return
        apply_bits(bitmap.bits, bitmap.granularity, chunk)

    def _cancel(self, message: str) -> None:
        """Report, and drop every bitmap not yet complete (QEMU's cancel)."""
        self._report(message)
        self.cancel()

    def cancel(self) -> None:
        if self.cancelled:
            return
        self.cancelled = True
        for entry in self._loading:
            if not entry.migrated:
                entry.node.dirty_bitmaps.pop(entry.bitmap.name, None)
        self._loading = [entry for entry in self._loading if entry.migrated]

    def before_vm_start(self) -> None:
        """Bitmaps enabled on the source record writes from now on."""
        for entry in self._loading:
            if entry.enabled:
                entry.bitmap.recording = True
        self._loading = [entry for entry in self._loading if not entry.migrated]


def outgoing_bitmaps(nodes: Iterable[BlockNode], mapping: list[dict[str, Any]] | None = None
                     ) -> list[tuple[DirtyBitmap, MigratedBitmap]]:
    """The named bitmaps a source sends, in QEMU's order (nodes oldest first,
    each node's bitmaps newest first), under the aliases of a
    ``block-bitmap-mapping`` if one is set (then only what it names goes);
    BitmapRefused names the first one that may not travel (QEMU then fails
    the migration at setup)."""
    aliases = alias_map(mapping, True) if mapping is not None else None
    out: list[tuple[DirtyBitmap, MigratedBitmap]] = []
    for node in nodes:
        if not node.dirty_bitmaps:
            continue
        node_alias = node.node_name
        renames: dict[str, tuple[str, bool | None]] | None = None
        if aliases is not None:
            entry = aliases.get(node.node_name)
            if entry is None:
                continue  # not mapped: not sent
            node_alias, renames = entry.other, entry.bitmaps
        if node_alias.startswith("#"):
            first = next(iter(reversed(node.dirty_bitmaps)))
            raise BitmapRefused(f"Bitmap '{first}' in a node with auto-generated name "
                                f"'{node_alias}' can't be migrated")
        for bitmap in reversed(node.dirty_bitmaps.values()):
            try:
                check(bitmap, DEFAULT)
            except GenericError as exc:
                hint = ("\nTry block-dirty-bitmap-remove to delete this bitmap from disk"
                        if bitmap.inconsistent and not bitmap.busy and not bitmap.readonly
                        else "")
                raise BitmapRefused(exc.desc + hint) from None
            name, persistent = bitmap.name, bitmap.persistent
            if renames is not None:
                if bitmap.name not in renames:
                    continue
                name, transform = renames[bitmap.name]
                if transform is not None:
                    persistent = transform
            out.append((bitmap, MigratedBitmap(
                node_alias, name, bitmap.granularity, bitmap.recording, persistent,
                node.size())))
    return out
