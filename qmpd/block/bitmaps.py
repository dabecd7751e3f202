"""The dirty bitmap commands and their transaction actions (QEMU's
block/monitor/bitmap-qmp-cmds.c and the bitmap half of blockdev.c's
transaction), over the bitmaps each :class:`BlockNode` keeps.

Every action is split as QEMU splits it: ``prepare`` does the change (so
that later actions of the same transaction see it) and returns how to undo
it and how to finish it; a failing ``prepare`` undoes the prepared actions
in reverse order, and only when all succeeded are they committed.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from qmpd.block.dirty_bitmap import DirtyBitmap, default_granularity
from qmpd.block.driver import BlockNode
from qmpd.block.reloads import reloaded, reloading
from qmpd.errors import GenericError

#: BDRV_BITMAP_MAX_NAME_SIZE
MAX_NAME = 1023

# bdrv_dirty_bitmap_check's flags.
BUSY = 1
READ_ONLY = 2
INCONSISTENT = 4
DEFAULT = BUSY | READ_ONLY | INCONSISTENT
ALLOW_RO = BUSY | INCONSISTENT

Lookup = Callable[[str], BlockNode | None]


def check(bitmap: DirtyBitmap, flags: int) -> None:
    """bdrv_dirty_bitmap_check: refuse a busy, read-only or inconsistent bitmap."""
    if flags & BUSY and bitmap.busy:
        raise GenericError(f"Bitmap '{bitmap.name}' is currently in use by another"
                           " operation and cannot be used")
    if flags & READ_ONLY and bitmap.readonly:
        raise GenericError(f"Bitmap '{bitmap.name}' is readonly and cannot be modified")
    if flags & INCONSISTENT and bitmap.inconsistent:
        raise GenericError(f"Bitmap '{bitmap.name}' is inconsistent and cannot be used")


def bitmap_info(node: BlockNode) -> list[dict[str, Any]]:
    """BlockDeviceInfo's ``dirty-bitmaps``: newest first, QAPI's member order."""
    out = []
    for bitmap in reversed(node.dirty_bitmaps.values()):
        inconsistent = bitmap.inconsistent
        info: dict[str, Any] = {
            "name": bitmap.name,
            "count": 0 if inconsistent else bitmap.count(),
            "granularity": bitmap.granularity,
            "recording": bitmap.recording and not inconsistent,
            "busy": bitmap.busy,
            "persistent": bitmap.persistent,
        }
        if inconsistent:
            info["inconsistent"] = True
        out.append(info)
    return out


@dataclass
class Prepared:
    """One prepared action: how to take it back, and how to finish it."""

    abort: Callable[[], None] = lambda: None
    commit: Callable[[], None] = lambda: None
    #: What an action of another subsystem (a job) does on commit and abort.
    commit_async: Callable[[], Awaitable[None]] | None = None
    abort_async: Callable[[], Awaitable[None]] | None = None
    #: After every action was committed or aborted (QEMU's clean).
    clean_async: Callable[[], Awaitable[None]] | None = None


#: Transaction actions other subsystems prepare (blockdev-backup), by kind.
ExternalActions = Mapping[str, Callable[[dict[str, Any]], Awaitable[Prepared]]]


class Bitmaps:
    """The bitmap operations, on the nodes ``lookup`` finds by name."""

    def __init__(self, lookup: Lookup) -> None:
        self.lookup = lookup

    # --- lookups -------------------------------------------------------------------

    def node(self, name: str) -> BlockNode:
        """bdrv_lookup_bs(node, node) as block-dirty-bitmap-add uses it."""
        node = self.lookup(name)
        if node is None:
            raise GenericError(f"Cannot find device='{name}' nor node-name='{name}'")
        return node

    async def settled(self, name: str) -> None:
        """Wait until no activation reloads the node ``name`` (if any) or one
        below it: a persistent bitmap's checks read the image."""
        node = self.lookup(name)
        if node is not None:
            await reloaded(node)

    def find(self, node_name: str, name: str) -> tuple[BlockNode, DirtyBitmap]:
        """block_dirty_bitmap_lookup."""
        node = self.lookup(node_name)
        if node is None:
            raise GenericError(f"Node '{node_name}' not found")
        bitmap = node.dirty_bitmaps.get(name)
        if bitmap is None:
            raise GenericError(f"Dirty bitmap '{name}' not found")
        return node, bitmap

    # --- actions (prepare) ---------------------------------------------------------

    def add(self, args: dict[str, Any]) -> Prepared:
        name: str = args["name"]
        if not name:
            raise GenericError("Bitmap name cannot be empty")
        node = self.node(args["node"])
        granularity = args.get("granularity")
        if granularity is None:
            granularity = default_granularity(node.driver.cluster_size())
        elif granularity < 512 or granularity & (granularity - 1):
            raise GenericError("Granularity must be power of 2 and at least 512")
        persistent = bool(args.get("persistent", False))
        if persistent:
            node.driver.can_store_new_bitmap(name, granularity)
        if name in node.dirty_bitmaps:
            raise GenericError(f"Bitmap already exists: {name}")
        if len(name.encode("utf-8", "surrogatepass")) > MAX_NAME:
            raise GenericError(f"Bitmap name too long: {name}")
        bitmap = DirtyBitmap(name, node.size(), granularity, persistent=persistent,
                             recording=not args.get("disabled", False))
        node.dirty_bitmaps[name] = bitmap

        def abort() -> None:
            if node.dirty_bitmaps.get(name) is bitmap:
                del node.dirty_bitmaps[name]

        return Prepared(abort=abort)

    async def remove(self, args: dict[str, Any]) -> Prepared:
        """block_dirty_bitmap_remove without the release: the bitmap stays,
        busy, until commit (a persistent one leaves the image at once)."""
        node, bitmap = self.find(args["node"], args["name"])
        check(bitmap, BUSY | READ_ONLY)
        if bitmap.persistent and reloading(node):
            # Not over the image's metadata while an activation reloads it
            # (which may replace the bitmap, or fail): looked up again after.
            await reloaded(node)
            node, bitmap = self.find(args["node"], args["name"])
            check(bitmap, BUSY | READ_ONLY)
        if bitmap.persistent:
            await node.driver.remove_persistent_bitmap(bitmap.name)
        bitmap.busy = True

        def abort() -> None:
            bitmap.busy = False

        def commit() -> None:
            bitmap.busy = False
            if node.dirty_bitmaps.get(bitmap.name) is bitmap:
                del node.dirty_bitmaps[bitmap.name]

        return Prepared(abort=abort, commit=commit)

    def clear(self, args: dict[str, Any]) -> Prepared:
        _, bitmap = self.find(args["node"], args["name"])
        check(bitmap, DEFAULT)
        backup = bytes(bitmap.bits)
        bitmap.clear()
        return Prepared(abort=lambda: bitmap.load_bytes(backup))

    def enable(self, args: dict[str, Any]) -> Prepared:
        return self._set_recording(args, True)

    def disable(self, args: dict[str, Any]) -> Prepared:
        return self._set_recording(args, False)

    def _set_recording(self, args: dict[str, Any], recording: bool) -> Prepared:
        _, bitmap = self.find(args["node"], args["name"])
        check(bitmap, ALLOW_RO)
        was = bitmap.recording
        bitmap.recording = recording

        def abort() -> None:
            bitmap.recording = was

        return Prepared(abort=abort)

    def merge(self, args: dict[str, Any]) -> Prepared:
        """block_dirty_bitmap_merge: the sources OR'ed into a scratch bitmap
        first, so that the target is unchanged when one of them fails."""
        node, target = self.find(args["node"], args["target"])
        scratch = DirtyBitmap("", target.size, target.granularity)
        for source in args["bitmaps"]:
            if isinstance(source, str):
                found = node.dirty_bitmaps.get(source)
                if found is None:
                    raise GenericError(f"Dirty bitmap '{source}' not found")
            else:
                _, found = self.find(source["node"], source["name"])
            _check_merge(scratch, found)
            scratch.merge(found)
        check(target, DEFAULT)
        backup = bytes(target.bits)
        target.merge(scratch)
        return Prepared(abort=lambda: target.load_bytes(backup))

    def sha256(self, args: dict[str, Any]) -> dict[str, str]:
        _, bitmap = self.find(args["node"], args["name"])
        return {"sha256": bitmap.sha256()}

    # --- commands --------------------------------------------------------------------

    def run(self, kind: str, args: dict[str, Any]) -> None:
        """One of the commands that finish without waiting (all but remove)."""
        self._SYNC[kind](self, args).commit()

    async def run_async(self, kind: str, args: dict[str, Any]) -> None:
        (await self.prepare(kind, args)).commit()

    # --- transaction ---------------------------------------------------------------

    async def transaction(self, actions: list[dict[str, Any]],
                          properties: dict[str, Any] | None = None,
                          external: ExternalActions | None = None) -> None:
        """qmp_transaction: every action prepared in order, then all committed, or
        all aborted in reverse order.  ``external`` prepares the actions of
        other subsystems (jobs), which support completion-mode=grouped."""
        mode = (properties or {}).get("completion-mode", "individual")
        external = external or {}
        done: list[Prepared] = []
        try:
            for action in actions:
                kind = action["type"]
                if kind == "abort":
                    raise GenericError("Transaction aborted using Abort action")
                if kind in external:
                    done.append(await external[kind](action["data"]))
                    continue
                if mode != "individual":
                    raise GenericError(f"Action '{kind}' does not support Transaction "
                                       f"property completion-mode = {mode}")
                done.append(await self.prepare(kind, action["data"]))
        except BaseException:
            for prepared in reversed(done):
                prepared.abort()
                if prepared.abort_async is not None:
                    await prepared.abort_async()
            await _clean(done)
            raise
        for prepared in done:
            prepared.commit()
            if prepared.commit_async is not None:
                await prepared.commit_async()
        await _clean(done)

    async def prepare(self, kind: str, data: dict[str, Any]) -> Prepared:
        if kind == "block-dirty-bitmap-remove":
            return await self.remove(data)
        return self._SYNC[kind](self, data)

    _SYNC: dict[str, Callable[[Bitmaps, dict[str, Any]], Prepared]] = {}


Bitmaps._SYNC.update({
    "block-dirty-bitmap-add": Bitmaps.add,
    "block-dirty-bitmap-clear": Bitmaps.clear,
    "block-dirty-bitmap-enable": Bitmaps.enable,
    "block-dirty-bitmap-disable": Bitmaps.disable,
    "block-dirty-bitmap-merge": Bitmaps.merge,
})


async def _clean(done: list[Prepared]) -> None:
    for prepared in done:
        if prepared.clean_async is not None:
            await prepared.clean_async()


def _check_merge(dest: DirtyBitmap, source: DirtyBitmap) -> None:
    """bdrv_merge_dirty_bitmap's checks of a source (the scratch target passes its own)."""
    check(source, INCONSISTENT)
    if source.size != dest.size:
        raise GenericError(
            f"Bitmaps are of different sizes (destination size is {dest.size}, "
            f"source size is {source.size}) and can't be merged")
