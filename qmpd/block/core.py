"""The block layer as the rest of the daemon sees it: add, delete, query, activate.

:class:`BlockLayer` turns validated QMP options into nodes (with QEMU's
defaults, inheritance and errors), keeps the graph consistent when an add
fails half-way, and implements the run-state hooks (flush all, activate
all) and the node queries.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
from typing import TYPE_CHECKING, Any

from qmpd.block import chain
from qmpd.block.bitmaps import Bitmaps, bitmap_info
from qmpd.block.blocking import OpenJob
from qmpd.block.driver import BlockDriverError, ChildRole
from qmpd.block.filename import FilenameMemo, path_combine, refresh_filename
from qmpd.block.graph import BlockGraph, BlockNode, NodeConfig, NodeState
from qmpd.block.registry import driver_class, probe_format
from qmpd.block.reloads import reload_under_way, reloaded, reloads_done, subtree
from qmpd.block.serial import GraphLock
from qmpd.errors import DeviceNotFound, GenericError
from qmpd.objects import ObjectRegistry
from qmpd.qmp.encode import Encoded

if TYPE_CHECKING:
    from qmpd.metrics import Metrics

log = logging.getLogger(__name__)

_NodeReply = tuple["BlockNode", Encoded]

_IMAGE_ROLE = ChildRole.image()
_NODE_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_.-]*")
_MAX_NODE_NAME = 31


#: Deepest backing chain opened from image headers (qmpd opens it recursively).
MAX_BACKING_CHAIN = 100

def check_node_name(name: str) -> None:
    if not _NODE_NAME.fullmatch(name):
        raise GenericError(f"Invalid node-name: '{name}'")
    if len(name) > _MAX_NODE_NAME:
        raise GenericError("Node name too long")


class BlockLayer:
    """Block services for commands, the run state and migration."""

    def __init__(
        self, metrics: Metrics | None = None, objects: ObjectRegistry | None = None
    ) -> None:
        self.objects = objects if objects is not None else ObjectRegistry()
        self.graph = BlockGraph(metrics, self.objects)
        self.metrics = metrics
        #: Held by every operation that changes the graph or a node's state.
        self.lock = GraphLock()
        #: Last query-named-block-nodes reply per (node name, flat): the node,
        #: and its info with the encoding (reused while the info is equal).
        self._node_replies: dict[tuple[str, bool], _NodeReply] = {}
        #: File names of the last query, valid while their key stays the same.
        self._filenames_key: tuple[int, int] = (-1, -1)
        self._filenames: FilenameMemo = {}
        #: The dirty bitmap commands and transaction actions.
        self.bitmaps = Bitmaps(self.graph.lookup)

    # --- blockdev-add -------------------------------------------------------------

    async def add(self, options: dict[str, Any], inactive: bool = False) -> BlockNode:
        """blockdev-add: create the node tree ``options`` describes, or nothing."""
        if "node-name" not in options:
            raise GenericError("'node-name' must be specified for the root node")
        created: list[BlockNode] = []
        try:
            node = await self._open(options, None, created, inactive, role_name=None)
            await self.graph.refresh_perms(node)
        except BaseException:
            await self._rollback(created)
            raise
        node.monitor_owned = True
        return node

    async def open_ref(self, ref: str | dict[str, Any]) -> tuple[BlockNode, bool]:
        """bdrv_open_blockdev_ref: a node by name, or a new one (not the monitor's)
        from inline options; and whether it is new (the caller closes it)."""
        if isinstance(ref, str):
            node = self.graph.lookup(ref)
            if node is None:
                raise GenericError(f"Cannot find device='{ref}' nor node-name='{ref}'")
            return node, False
        created: list[BlockNode] = []
        try:
            node = await self._open(ref, None, created, False, role_name=None)
            await self.graph.refresh_perms(node)
        except BaseException:
            await self._rollback(created)
            raise
        return node, True

    async def _rollback(self, created: list[BlockNode]) -> None:
        for node in reversed(created):
            for edge in list(node.children.values()):
                self.graph.detach(edge)
            try:
                await node.driver.close()
            except Exception:  # best effort while unwinding
                log.exception("closing %s after a failed add", node.node_name)
            self.graph.unregister(node)

    def _config(
        self, options: dict[str, Any], parent: NodeConfig | None, role_name: str | None
    ) -> NodeConfig:
        cache = options.get("cache", {})
        inherited = parent or NodeConfig(False, False, "off", False, False, False, False)
        read_only = options.get("read-only", inherited.read_only if parent else False)
        if role_name == "backing":
            read_only = True
        force_share = options.get("force-share", inherited.force_share if parent else False)
        if force_share and not read_only:
            raise GenericError("force-share=on can only be used with read-only images")
        discard = options.get("discard")
        discard_unmap = inherited.discard_unmap if discard is None else discard == "unmap"
        detect_zeroes = options.get("detect-zeroes", "off")
        if detect_zeroes == "unmap" and not discard_unmap:
            raise GenericError(
                "setting detect-zeroes to unmap is not allowed without setting discard "
                "operation to unmap"
            )
        return NodeConfig(
            read_only=read_only,
            force_share=force_share,
            detect_zeroes=detect_zeroes,
            discard_unmap=discard_unmap,
            cache_direct=cache.get("direct", inherited.cache_direct),
            cache_no_flush=cache.get("no-flush", inherited.cache_no_flush),
            auto_read_only=options.get("auto-read-only", inherited.auto_read_only),
        )

    async def _open(
        self,
        options: dict[str, Any],
        parent: NodeConfig | None,
        created: list[BlockNode],
        inactive: bool,
        role_name: str | None,
        chain: tuple[str, ...] = (),
    ) -> BlockNode:
        node, config, job, driver_opts = await self._create(
            options, parent, created, inactive, role_name)
        await self._finish_open(node, config, job, driver_opts, created, inactive, chain)
        return node

    async def _finish_open(
        self,
        node: BlockNode,
        config: NodeConfig,
        job: OpenJob | None,
        driver_opts: dict[str, Any],
        created: list[BlockNode],
        inactive: bool,
        chain: tuple[str, ...],
    ) -> None:
        """Open a created node, then the backing file its header names."""
        if job is None:
            await node.driver.open(driver_opts)
        else:
            await job.finish(await job.start(self.graph.run_io))
        if node.driver.supports_backing and "backing" not in driver_opts:
            await self._open_backing_from_header(node, config, created, inactive, chain)

    async def _create(
        self,
        options: dict[str, Any],
        parent: NodeConfig | None,
        created: list[BlockNode],
        inactive: bool,
        role_name: str | None,
    ) -> tuple[BlockNode, NodeConfig, OpenJob | None, dict[str, Any]]:
        """The node with its children attached and registered, not yet open:
        and its open as one job (None: ``driver.open``).  An inline ``file``
        child without a backing is opened in its parent's job if the parent's
        driver can (one thread hop for both)."""
        driver_name = options["driver"]
        cls = driver_class(driver_name)
        if cls is None:
            raise GenericError(f"Unknown driver '{driver_name}'")
        name = options.get("node-name")
        if name is not None:
            check_node_name(name)
            if self.graph.lookup(name) is not None:
                raise GenericError(f"Duplicate nodes with node-name='{name}'")
        config = self._config(options, parent, role_name)
        if options.get("active") is False:
            inactive = True
        auto = name is None
        node = self.graph.new_node(name or self.graph.new_auto_name(), auto, config)
        node.options = options
        node.state = NodeState.INACTIVE if inactive else NodeState.ACTIVE
        node.driver = cls(node)
        below: OpenJob | None = None
        # Children first: QEMU registers an inline child before its parent.
        for child_name in ("file", "backing"):
            if child_name not in options:
                continue
            ref = options[child_name]
            if ref is None:
                continue
            if child_name == "file" and isinstance(ref, dict) \
                    and options.get("backing") is None and "active" not in ref:
                # Opened in the parent's job only where no other check (a
                # backing, an inactive child of an active parent) comes
                # between the two opens: the errors keep their order.
                child, below = await self._create_file(ref, config, created, inactive)
            else:
                child = await self._resolve_ref(ref, config, created, inactive, child_name)
            role = ChildRole.COW if child_name == "backing" else _IMAGE_ROLE
            self.graph.attach(node, child, child_name, role)
            if isinstance(ref, dict):
                node.inline_children.append(child)
        self.graph.register(node)
        created.append(node)
        driver_opts = dict(options)
        if config.auto_read_only:
            driver_opts["_auto_read_only"] = True
        if below is not None:
            job = node.driver.begin_open_over(driver_opts, below)
            if job is not None:
                return node, config, job, driver_opts
            await below.finish(await below.start(self.graph.run_io))
        return node, config, node.driver.begin_open(driver_opts), driver_opts

    async def _create_file(
        self,
        options: dict[str, Any],
        parent: NodeConfig,
        created: list[BlockNode],
        inactive: bool,
    ) -> tuple[BlockNode, OpenJob | None]:
        """An inline ``file`` child: open, or with its open job still to run."""
        node, config, job, driver_opts = await self._create(
            options, parent, created, inactive, "file")
        if job is not None and not node.driver.supports_backing:
            return node, job
        await self._finish_open(node, config, job, driver_opts, created, inactive, ())
        return node, None

    async def _resolve_ref(
        self,
        ref: Any,
        parent: NodeConfig,
        created: list[BlockNode],
        inactive: bool,
        role_name: str,
    ) -> BlockNode:
        if isinstance(ref, str):
            node = self.graph.lookup(ref)
            if node is None:
                raise GenericError(f"Cannot find device='{ref}' nor node-name='{ref}'")
            return node
        return await self._open(ref, parent, created, inactive, role_name)

    async def _open_backing_from_header(
        self,
        node: BlockNode,
        config: NodeConfig,
        created: list[BlockNode],
        inactive: bool,
        chain: tuple[str, ...],
    ) -> None:
        driver = node.driver
        path = driver.backing_file_name()
        if not path:
            return
        # A header may name any file, or a protocol: only local files are
        # followed, never a json: description or another protocol (nbd:,
        # http:, ...) that the user did not ask for.
        name = driver.raw_backing_file_name() or ""
        if name.startswith("json:"):
            raise GenericError("Could not open backing file: json: backing file names "
                               "are not supported")
        protocol = _protocol(name)
        if protocol == "file":
            path = path_combine(driver.filename(), name[len("file:"):])
        elif protocol is not None:
            raise GenericError(f"Could not open backing file: Unknown protocol '{protocol}'")
        # The images above, by real path: a header naming one of them loops.
        chain = chain or (os.path.realpath(driver.filename()),)
        real = os.path.realpath(path)
        if real in chain:
            raise _ChainRefused(
                f"Backing file '{driver.raw_backing_file_name()}' creates an infinite loop."
            )
        if len(chain) >= MAX_BACKING_CHAIN:
            raise _ChainRefused(
                f"Backing chain of '{chain[0]}' is longer than {MAX_BACKING_CHAIN} images"
            )
        fmt = driver.backing_format() or probe_format(path)
        options = {
            "driver": fmt,
            "file": {"driver": "file", "filename": path},
        }
        try:
            child = await self._open(options, config, created, inactive, "backing",
                                     (*chain, real))
        except _ChainRefused:
            raise
        except GenericError as exc:
            raise GenericError(f"Could not open backing file: {exc.desc}") from None
        self.graph.attach(node, child, "backing", ChildRole.COW)
        node.inline_children.append(child)

    # --- blockdev-del ------------------------------------------------------------------

    async def delete(self, name: str) -> None:
        node = self.graph.lookup(name)
        if node is None:
            raise GenericError(f"Failed to find node with node-name='{name}'")
        fronted = any(edge.user is not None and edge.user.fronts_users for edge in node.parents)
        if not fronted and any(edge.user is not None and edge.user.blocker is None
                               for edge in node.parents):
            raise GenericError(f"Node {name} is in use")
        for edge in node.parents:
            if edge.user is not None and edge.user.blocker is not None:
                raise GenericError(f"Node '{name}' is busy: {edge.user.blocker}")
        for edge in node.parents:
            if edge.parent is not None and edge.name == "backing":
                raise GenericError(
                    f"Node '{name}' is busy: node is used as backing hd of "
                    f"'{edge.parent.node_name}'"
                )
        if not node.monitor_owned:
            raise GenericError(f"Node {name} is not owned by the monitor")
        if node.parents:
            raise GenericError(f"Block device {name} is in use")
        try:
            await self.close_node(node)
        except BlockDriverError as exc:
            # The node is gone all the same (closed, unregistered); QEMU's
            # bdrv_close ignores a failed flush too, and a delete that failed
            # for a node that no longer exists would only mislead.
            log.warning("blockdev-del %s: writing back failed: %s", name, exc.desc)

    async def close_node(self, node: BlockNode) -> None:
        """Flush, mark clean, close; then the inline children nobody else uses."""
        try:
            try:
                if node.active and not node.read_only:
                    await self.graph.write_back(node)
            finally:
                # Released even when writing back failed (an fd, a connection).
                await node.driver.close()
        finally:
            self.graph.unregister(node)
            for edge in list(node.children.values()):
                self.graph.detach(edge)
                child = edge.child
                if child in node.inline_children and not child.parents:
                    await self.close_node(child)
                elif child.parents or child.monitor_owned:
                    await self.graph.refresh_perms(child)

    def stop_waiting(self) -> None:
        """Shutdown begins: requests stop waiting for what may never come (an
        NBD server's return), so that exports finish theirs and nodes close."""
        for node in list(self.graph.nodes.values()):
            node.driver.stop_waiting()

    async def close_all(self) -> None:
        """Clean shutdown: every node flushed and closed, parents first.

        Closing a root closes the inline children nobody else uses; a child
        added by name becomes a root then, closed in the next round (each
        round unregisters at least the roots it closes)."""
        self.stop_waiting()
        while roots := self.graph.roots():
            for node in reversed(roots):
                try:
                    await self.close_node(node)
                except BlockDriverError as exc:
                    # An I/O error (an NBD server gone, a full disk): QEMU's
                    # bdrv_close ignores a failed flush; not a bug to trace.
                    log.warning("closing node %s: %s", node.node_name, exc.desc)
                except Exception:
                    log.exception("closing node %s", node.node_name)

    async def snapshot(self, node: str, overlay: str) -> None:
        """blockdev-snapshot."""
        await chain.snapshot(self, node, overlay)

    # --- run-state hooks ---------------------------------------------------------------

    async def flush_all(self) -> None:
        await self.graph.flush_all()

    async def write_back_early(self) -> None:
        await self.graph.write_back_early()

    async def activate_all(self) -> None:
        # An activation already under way (blockdev-set-active of one node)
        # finishes first: one that skipped its nodes as active would reload
        # their parents over a driver still reloading, and return before it.
        await reloads_done(self.graph.all_nodes)
        await self.graph.activate_all()

    async def inactivate_all(self) -> None:
        # Not over an activation's reload: the drivers would write back (and
        # store bitmaps) from the caches being replaced.
        await reloads_done(self.graph.all_nodes)
        await self.graph.inactivate_all()

    def rehearse_inactivation(self) -> None:
        self.graph.rehearse_inactivation()

    # --- other commands ----------------------------------------------------------------

    def find(self, device: str | None, node_name: str | None) -> BlockNode:
        name = node_name if node_name is not None else device
        node = self.graph.lookup(name or "")
        if node is None:
            raise DeviceNotFound(
                f"Cannot find device='{device or ''}' nor node-name='{node_name or ''}'"
            )
        return node

    async def resize(self, node: BlockNode, size: int) -> None:
        if size < 0:
            raise GenericError("Parameter 'size' expects a >0 size")
        # An activation marks a node active before its driver (or one below)
        # has reloaded what it caches: the resize waits for that, as requests
        # do, instead of changing metadata the reload is reading.
        while True:
            if not node.active:
                raise GenericError("Permission 'resize' unavailable on inactive node")
            if node.read_only:
                raise GenericError("Block node is read-only")
            reload = reload_under_way(subtree(node))
            if reload is None:
                break
            await asyncio.shield(reload)
        await node.driver.truncate(size)
        # bdrv_co_truncate's bdrv_dirty_bitmap_truncate, on every node resized.
        for below in subtree(node):
            for bitmap in below.dirty_bitmaps.values():
                if bitmap.size != below.size():
                    bitmap.truncate(below.size())

    async def set_active(self, node_name: str | None, active: bool) -> None:
        nodes = [self.find(None, node_name)] if node_name is not None else None
        if active:
            if nodes is None:
                await self.activate_all()
            else:
                # As activate_all: not alongside another activation's reload.
                await reloaded(nodes[0])
                await self.graph.activate(nodes[0])
        elif nodes is None:
            try:
                await self.inactivate_all()
            except BlockDriverError as exc:
                raise GenericError(
                    f"Failed to inactivate all nodes: {os.strerror(exc.errno)}"
                ) from None
        else:
            await reloaded(nodes[0])  # as inactivate_all
            for parent in nodes[0].parents:
                if parent.parent is not None and parent.parent.active:
                    raise GenericError("Node has active parent node")
            try:
                await self.graph.inactivate(nodes[0])
            except BlockDriverError as exc:
                # QEMU 10.0 names only the errno; the log keeps the user.
                log.info("inactivation of %s refused: %s", nodes[0].node_name, exc)
                raise GenericError(
                    f"Failed to inactivate node: {os.strerror(exc.errno)}"
                ) from None

    # --- queries -------------------------------------------------------------------------

    def named_nodes(self, flat: bool) -> list[dict[str, Any]]:
        # Every member is computed afresh; only the encoding is reused, when
        # a node's info equals the last one (most nodes, most queries).  ==
        # ignores member order and True == 1 == 1.0: safe because each member
        # comes from the same expression every time (a bool stays a bool) and
        # in the same order.  (A marshal comparison, strict, cost 9 ms here.)
        # File names follow the graph's shape and the state that operations
        # under the graph lock change (a header's backing name): kept while
        # neither moved.
        shape = (self.graph.shape, self.lock.generation)
        if shape != self._filenames_key:
            self._filenames_key, self._filenames = shape, {}
        memo = self._filenames
        old = self._node_replies
        new: dict[tuple[str, bool], _NodeReply] = {}
        out: list[dict[str, Any]] = []
        for node in self.graph.newest_first():
            info = self.device_info(node, flat, memo)
            key = (node.node_name, flat)
            last = old.get(key)
            if last is not None and last[0] is node and last[1] == info:
                reply = last[1]
            else:
                reply = Encoded(info)
            new[key] = (node, reply)
            out.append(reply)
        # Keep the other flavour's entries for nodes that still exist.
        for key, entry in old.items():
            if key[1] != flat and self.graph.lookup(key[0]) is entry[0]:
                new[key] = entry
        self._node_replies = new
        return out

    def device_info(
        self, node: BlockNode, flat: bool, memo: FilenameMemo | None = None
    ) -> dict[str, Any]:
        if memo is None:
            memo = {}
        filename = refresh_filename(node, memo)
        image = self.image_info(node, flat, filename, memo)
        # QEMU counts the chain only while it walks it for the nested image
        # info (a flat query reports 0), through backing links and filters
        # (bdrv_filter_or_cow_bs).
        depth = 0
        backing = None if flat else node.driver.status_fallback()
        while backing is not None:
            depth += 1
            backing = backing.driver.status_fallback()
        # Members in QAPI order: QEMU's output order depends on it.
        info: dict[str, Any] = {
            "file": filename,
            "node-name": node.node_name,
            "ro": node.read_only,
            "drv": node.driver.format_name,
        }
        if node.backing is not None:
            info["backing_file"] = refresh_filename(node.backing, memo)
        info["backing_file_depth"] = depth
        info["encrypted"] = False
        info["detect_zeroes"] = node.detect_zeroes
        info["bps"] = 0
        info["bps_rd"] = 0
        info["bps_wr"] = 0
        info["iops"] = 0
        info["iops_rd"] = 0
        info["iops_wr"] = 0
        info["image"] = image
        info["cache"] = {
            "writeback": True,
            "direct": node.cache_direct,
            "no-flush": node.cache_no_flush,
        }
        info["write_threshold"] = 0
        if node.dirty_bitmaps:  # omitted, not empty, without bitmaps
            # Part of the info, so the cached encoding is redone when a count changes.
            info["dirty-bitmaps"] = bitmap_info(node)
        info["active"] = node.active
        return info

    def image_info(
        self,
        node: BlockNode,
        flat: bool,
        filename: str | None = None,
        memo: FilenameMemo | None = None,
    ) -> dict[str, Any]:
        driver = node.driver
        extra = driver.image_info()
        image: dict[str, Any] = {
            "filename": refresh_filename(node, memo) if filename is None else filename,
            "format": driver.format_name,
        }
        if "dirty-flag" in extra:
            image["dirty-flag"] = extra.pop("dirty-flag")
        actual = driver.allocated_size()
        if actual is not None:
            image["actual-size"] = actual
        image["virtual-size"] = node.size()
        for key in ("cluster-size", "backing-filename", "full-backing-filename",
                    "backing-filename-format"):
            if key in extra:
                image[key] = extra.pop(key)
        below = node.driver.status_fallback()
        if not flat and below is not None:
            image["backing-image"] = self.image_info(below, flat, None, memo)
        image.update(extra)
        return image



class _ChainRefused(GenericError):
    """The chain as a whole is refused (a loop, too deep): reported as it is,
    not prefixed again by every image above."""


def _protocol(name: str) -> str | None:
    """QEMU's path_has_protocol: a colon before any slash names a protocol."""
    head, colon, _ = name.partition(":")
    if not colon or "/" in head:
        return None
    return head
