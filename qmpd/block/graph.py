"""The block graph: nodes, the edges between them, permissions, node state.

A :class:`BlockNode` owns one driver instance and its children (``file``,
``backing``) through :class:`BdrvChild` edges (both defined with the driver
contract, :mod:`qmpd.block.driver`).  Each edge carries the permissions the
parent needs and the ones it shares; a node's cumulative permissions decide
what a protocol driver locks in the image file.  Users outside the graph
(exports; jobs tomorrow) are :class:`NodeUser` objects: :meth:`BlockGraph.add_user`
checks what their ``permissions`` callback asks for against the other parents.

Node state is explicit (:class:`NodeState`):

* ``ACTIVE``: may hold write permission and locks, may trust its cache;
* ``INACTIVATING``: writing back, refuses new writes, still trusts its cache;
* ``INACTIVE``: holds no write lock, refuses writes, its cached mutable
  metadata is untrusted.

Drivers read the state from their node; they keep no copy of it.

The only way from inactive to active is :meth:`BlockGraph.activate`
(invalidate_cache, children first); the only way back is
:meth:`BlockGraph.inactivate` (flush first).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from qmpd.block.blocking import CacheReload
from qmpd.block.driver import (
    PERM_ALL,
    BdrvChild,
    ChildRole,
    NodeUser,
    Perm,
    perm_names,
)

# Re-exported: the graph's users name nodes and their state through it.
from qmpd.block.driver import BlockNode as BlockNode
from qmpd.block.driver import NodeState as NodeState
from qmpd.block.inactivation import GraphInactivation, hold_writes, release, written_from_outside
from qmpd.block.iopool import IOPool
from qmpd.errors import GenericError
from qmpd.objects import ObjectRegistry

if TYPE_CHECKING:
    from qmpd.metrics import Metrics

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class NodeConfig:
    """Generic options of a node, after defaults and inheritance."""

    read_only: bool
    force_share: bool
    detect_zeroes: str
    discard_unmap: bool
    cache_direct: bool
    cache_no_flush: bool
    auto_read_only: bool


def check_pair(node: BlockNode, needs: BdrvChild, refuses: BdrvChild) -> None:
    """Refuse (QEMU's text) when ``needs`` needs what ``refuses`` does not share."""
    clash = needs.perms()[0] & ~refuses.perms()[1]
    if clash:
        raise GenericError(
            f"Permission conflict on node '{node.node_name}': permissions "
            f"'{perm_names(clash)}' are both required by {needs.describe()} "
            f"and unshared by {refuses.describe()}."
        )


def _run_all(reloads: list[CacheReload]) -> list[tuple[bool, Any]]:
    """In an I/O thread: each reload's blocking part, its result or its error."""
    results: list[tuple[bool, Any]] = []
    for reload in reloads:
        try:
            results.append((True, reload.run()))
        except Exception as exc:
            results.append((False, exc))
    return results


def _drop_event(name: str, data: dict[str, Any]) -> None:
    """The event hook of a graph without a daemon."""


class BlockGraph(GraphInactivation):
    """All nodes of the daemon, in creation order, and the I/O thread pool."""

    def __init__(
        self,
        metrics: Metrics | None = None,
        objects: ObjectRegistry | None = None,
        io_threads: int = 16,
    ) -> None:
        self.nodes: dict[str, BlockNode] = {}
        #: The objects drivers refer to (throttle groups).
        self.objects = objects if objects is not None else ObjectRegistry()
        self.metrics = metrics
        self.io = IOPool(io_threads)
        self._serial = 0
        #: Bumped by every change of the nodes or edges (a cache key for what
        #: is derived from the graph's shape, such as node file names).
        self.shape = 0
        #: _root_groups and the shape it was worked out for.
        self._roots: tuple[int, list[list[BlockNode]]] = (-1, [])
        self._auto_counter = 0
        self._rng = random.Random()
        #: Where drivers send QMP events (``BLOCK_IMAGE_CORRUPTED``): the daemon
        #: connects its event bus; a graph used alone drops them.
        self.on_event: Callable[[str, dict[str, Any]], None] = _drop_event

    def close(self) -> None:
        """Stop the I/O threads (the graph may still start them again on use)."""
        self.io.shutdown()

    async def run_io(self, fn: Callable[..., T], *args: Any) -> T:
        """Run a blocking call in the I/O thread pool."""
        return await self.io.run(fn, *args)

    def new_auto_name(self) -> str:
        name = f"#block{self._auto_counter}{self._rng.randrange(100):02d}"
        self._auto_counter += 1
        return name

    def new_node(self, name: str, auto_named: bool, config: NodeConfig) -> BlockNode:
        node = BlockNode(
            graph=self,
            node_name=name,
            auto_named=auto_named,
            read_only=config.read_only,
            force_share=config.force_share,
            detect_zeroes=config.detect_zeroes,
            discard_unmap=config.discard_unmap,
            cache_direct=config.cache_direct,
            cache_no_flush=config.cache_no_flush,
        )
        return node

    def register(self, node: BlockNode) -> None:
        # Registration order is creation order: an inline child is registered
        # before its parent, as in QEMU, so queries list the parent first.
        self._serial += 1
        self.shape += 1
        node.serial = self._serial
        self.nodes[node.node_name] = node

    def unregister(self, node: BlockNode) -> None:
        self.shape += 1
        if self.nodes.get(node.node_name) is node:
            del self.nodes[node.node_name]

    def lookup(self, name: str) -> BlockNode | None:
        return self.nodes.get(name)

    def newest_first(self) -> list[BlockNode]:
        return sorted(self.nodes.values(), key=lambda n: n.serial, reverse=True)

    # --- permissions ----------------------------------------------------------

    def attach(
        self,
        parent: BlockNode | None,
        child: BlockNode,
        name: str,
        role: ChildRole,
        user: NodeUser | None = None,
    ) -> BdrvChild:
        # QEMU 10.0: an active node makes unrestricted use of its children.
        if parent is not None and parent.active and not child.active:
            raise GenericError(
                f"Inactive '{child.node_name}' can't be a {name} child of active "
                f"'{parent.node_name}'"
            )
        edge = BdrvChild(name=name, role=role, child=child, parent=parent, user=user)
        self.shape += 1
        child.parents.append(edge)
        if parent is not None:
            parent.children[name] = edge
        return edge

    def detach(self, edge: BdrvChild) -> None:
        self.shape += 1
        if edge in edge.child.parents:
            edge.child.parents.remove(edge)
        if edge.parent is not None and edge.parent.children.get(edge.name) is edge:
            del edge.parent.children[edge.name]

    async def refresh_perms(self, node: BlockNode) -> None:
        """Recompute what ``node`` asks of its children, down to the locks.

        Raises GenericError with QEMU's text on a conflict inside the
        process; protocol drivers raise on a conflict with other processes.
        """
        perm, shared = node.cumulative_perms()
        if node.force_share:
            shared = PERM_ALL
        await node.driver.set_perm(perm, shared)
        for edge in node.children.values():
            child_perm, child_shared = node.driver.child_perms(edge.role, perm, shared)
            if child_perm & (Perm.WRITE | Perm.RESIZE) and edge.child.read_only:
                raise GenericError("Block node is read-only")
            old = (edge.perm, edge.shared)
            edge.perm, edge.shared = child_perm, child_shared
            try:
                self._check_conflicts(edge.child)
                await self.refresh_perms(edge.child)
            except Exception:
                edge.perm, edge.shared = old
                raise

    def _check_conflicts(self, node: BlockNode) -> None:
        for a in node.parents:
            for b in node.parents:
                if a is not b:
                    check_pair(node, a, b)

    async def add_user(self, edge: BdrvChild) -> None:
        """Let ``edge.user`` use ``edge.child`` with the permissions it asks for.

        Refused with QEMU's text when its needs clash with another parent's
        sharing (or the other way round); the node is then left as it was.
        """
        node = edge.child
        # QEMU's order: the new user's needs against each other parent's
        # sharing, then the other way round.
        for other in node.parents:
            check_pair(node, edge, other)
            check_pair(node, other, edge)
        self.shape += 1
        node.parents.append(edge)
        try:
            await self.refresh_perms(node)
        except BaseException:
            self.detach(edge)
            try:
                await self.refresh_perms(node)
            except Exception:  # the first error is the one to report
                log.exception("node %s: releasing %s", node.node_name, edge.describe())
            raise

    async def remove_user(self, edge: BdrvChild) -> None:
        """Drop a user's edge and the permissions it held."""
        self.detach(edge)
        await self.refresh_perms(edge.child)

    # --- activation -------------------------------------------------------------

    def roots(self) -> list[BlockNode]:
        """Nodes no other node uses, oldest first (activation order)."""
        return [
            n for n in sorted(self.nodes.values(), key=lambda n: n.serial)
            if not any(e.parent is not None for e in n.parents)
        ]

    async def activate(
        self, node: BlockNode, seen: dict[int, asyncio.Future[None]] | None = None
    ) -> None:
        """Activate ``node`` and its children, children first (bdrv_activate).

        ``seen`` lets concurrent activations share a child: the second one
        waits for the first instead of racing it.
        """
        seen = seen if seen is not None else {}
        pending = seen.get(id(node))
        if pending is not None:
            await pending
            return
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        seen[id(node)] = done
        try:
            for edge in list(node.children.values()):
                await self.activate(edge.child, seen)
            if not node.active:
                await self._activate_one(node)
        except BaseException as exc:
            done.set_exception(exc)
            done.exception()  # retrieved here; waiters re-raise it
            raise
        done.set_result(None)

    async def _activate_one(self, node: BlockNode) -> None:
        start = time.perf_counter()
        await self._begin_activation(node)
        try:
            await node.driver.invalidate_cache()
        except BaseException as exc:  # cancelled too: it stays inactive
            self._activation_failed(node, exc)
            raise
        await self._end_activation(node, start)

    async def _begin_activation(self, node: BlockNode) -> None:
        """Mark ``node`` active and take its permissions (and so its locks);
        requests wait until its cache is reloaded (:meth:`BlockNode.hold_requests`)."""
        node.hold_requests()
        node.set_state(NodeState.ACTIVE)
        try:
            # Its users ask nothing of it while inactive: their needs meet
            # each other's sharing again now (QEMU's blk_root_activate).
            self._check_conflicts(node)
            await self.refresh_perms(node)
        except BaseException as exc:
            self._activation_failed(node, exc)
            raise

    def _activation_failed(self, node: BlockNode, exc: BaseException) -> None:
        node.set_state(NodeState.INACTIVE)
        node.release_requests()
        node.activation_error = str(exc) or type(exc).__name__  # (a cancellation has no text)
        log.error("activation of node %s failed: %s", node.node_name, node.activation_error)

    async def _end_activation(self, node: BlockNode, start: float) -> None:
        node.release_requests()
        node.activation_error = None
        node.stats.invalidations += 1
        for edge in node.parents:
            if edge.parent is not None and edge.parent.active:
                await self.refresh_perms(edge.parent)
        spent = time.perf_counter() - start
        node.stats.activation_seconds = spent
        if self.metrics is not None:
            self.metrics.observe_activation(spent)

    async def activate_all(self, concurrency: int = 8) -> None:
        """Activate every inactive node, children first, in waves.

        A wave is every node whose children are all active: each one takes its
        permissions (locks) here, then the drivers' reloads (page-cache drop,
        header and tables) run in at most ``concurrency`` I/O-thread jobs for
        the whole wave (or here, when served from memory), and each node
        finishes here.  Independent trees share
        waves, so their I/O overlaps; no task or future per node.

        Each node is activated whole or not at all (it stays inactive, with
        its error recorded and logged under its name; a parent is not tried
        over a child that failed); the first failure, children first from the
        oldest root, is raised once every node has been tried.
        """
        order: list[BlockNode] = []
        seen: set[int] = set()

        def visit(node: BlockNode) -> None:
            if id(node) in seen:
                return
            seen.add(id(node))
            for edge in node.children.values():
                visit(edge.child)
            order.append(node)

        for root in self.roots():
            visit(root)
        # Thousands of nodes allocate enough to start full collections over
        # the whole heap, which cost more than the activation itself: the
        # cyclic collector waits until the handover is done.
        collecting = gc.isenabled()
        gc.disable()
        # Held from the start (each released at its own end): a parent's driver
        # calls its child's directly, and would meet a child mid-reload.
        held = [node for node in order if not node.active and node.reloading is None]
        for node in held:
            node.hold_requests()
        try:
            await self._activate_in_waves(order, concurrency)
        finally:
            for node in held:  # whatever the way out, no request waits for ever
                node.release_requests()
            if collecting:
                gc.enable()

    async def _activate_in_waves(self, order: list[BlockNode], concurrency: int) -> None:
        failed: dict[int, BaseException] = {}
        settled: set[int] = set()
        blocked: set[int] = set()  # over a child that failed: not tried, stays inactive
        # A node whose one user is a parent activated later in this run takes
        # its locks with that parent's (final) permissions instead of twice,
        # first with those of an inactive parent: fewer lock calls, the same
        # bytes in the end (see _settle_deferred for a parent that fails).
        inactive = {id(node) for node in order if not node.active}
        deferred = {
            id(node) for node in order
            if id(node) in inactive and len(node.parents) == 1
            and node.parents[0].parent is not None and id(node.parents[0].parent) in inactive
        }
        pending = order
        try:
            while pending:
                wave: list[BlockNode] = []
                later: list[BlockNode] = []
                for node in pending:
                    children = [id(edge.child) for edge in node.children.values()]
                    if any(child in failed or child in blocked for child in children):
                        blocked.add(id(node))
                        settled.add(id(node))
                    elif all(child in settled for child in children):
                        wave.append(node)
                    else:
                        later.append(node)
                if len(later) == len(pending):  # not a tree (cannot happen): one by one
                    wave, later = later[:1], later[1:]
                await self._activate_wave(wave, failed, concurrency, deferred)
                settled.update(id(node) for node in wave)
                pending = later
        except BaseException:
            # Cancelled: a deferred node whose parent did not get as far as
            # taking the locks holds none, so it is not active either.
            for node in order:
                parent = node.parents[0].parent if id(node) in deferred else None
                if parent is not None and node.active and not parent.active:
                    node.set_state(NodeState.INACTIVE)
            raise
        await self._settle_deferred(order, deferred, failed)
        for node in order:
            error = failed.get(id(node))
            if error is not None:
                raise error

    async def _settle_deferred(self, order: list[BlockNode], deferred: set[int],
                               failed: dict[int, BaseException]) -> None:
        """A deferred node whose parent failed takes its own locks now, as it
        would have at its own activation (or fails as it would have then)."""
        for node in order:
            parent = node.parents[0].parent if id(node) in deferred else None
            if parent is None or parent.active or not node.active:
                continue
            try:
                await self.refresh_perms(node)
            except Exception as exc:
                self._activation_failed(node, exc)
                failed[id(node)] = exc

    async def _activate_wave(
        self, wave: list[BlockNode], failed: dict[int, BaseException], concurrency: int,
        deferred: set[int],
    ) -> None:
        """Begin each node of ``wave`` (locks, on the loop) slice by slice.

        A slice's reloads that wait for a device go to the I/O threads as soon
        as it is begun, and its nodes finish as soon as their job is done: the
        loop's work overlaps the disk's.  Reloads served from memory (the page
        cache) run right here, slice by slice with a turn for other clients in
        between: a thread hop costs more than they do, and in parallel threads
        they would only take turns at the GIL (measured, in process, on two
        cores: 0.32 against 0.67 ms at K=1, 135 against 165 ms at K=1000).
        """
        start = time.perf_counter()
        todo = [node for node in wave if not node.active]
        if not todo:
            return
        size = -(-len(todo) // min(len(todo), concurrency))
        unfinished: dict[int, BlockNode] = {}
        awaited: list[BlockNode] = []
        running: dict[asyncio.Future[list[tuple[bool, Any]]],
                      list[tuple[BlockNode, CacheReload]]] = {}
        try:
            for first in range(0, len(todo), size):
                jobs: list[tuple[BlockNode, CacheReload]] = []
                cached: list[tuple[BlockNode, CacheReload]] = []
                for node in todo[first:first + size]:
                    if id(node) in deferred:
                        node.hold_requests()
                        node.set_state(NodeState.ACTIVE)
                    else:
                        try:
                            await self._begin_activation(node)
                        except Exception as exc:
                            failed[id(node)] = exc
                            continue
                    unfinished[id(node)] = node
                    try:
                        reload = node.driver.begin_reload()
                    except Exception as exc:
                        del unfinished[id(node)]
                        self._activation_failed(node, exc)
                        failed[id(node)] = exc
                        continue
                    if reload is None:
                        awaited.append(node)
                    elif reload.waits:
                        jobs.append((node, reload))
                    else:
                        cached.append((node, reload))
                if jobs:
                    running[asyncio.ensure_future(
                        self.io.run(_run_all, [reload for _, reload in jobs]))] = jobs
                if cached:
                    results = _run_all([reload for _, reload in cached])
                    await self._finish_reloads(cached, results, unfinished, start, failed)
                    if first + size < len(todo):
                        await asyncio.sleep(0)
            if awaited:
                outcomes = await asyncio.gather(
                    *(node.driver.invalidate_cache() for node in awaited),
                    return_exceptions=True,
                )
                for node, outcome in zip(awaited, outcomes, strict=True):
                    del unfinished[id(node)]
                    await self._settle(node, outcome, start, failed)
            while running:
                done, _ = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
                for finished in done:
                    await self._finish_reloads(running.pop(finished), finished.result(),
                                               unfinished, start, failed)
        except BaseException as exc:
            # Cancelled half-way: what did not finish stays inactive.
            for started in running:
                started.cancel()
            for node in unfinished.values():
                if node.active:
                    self._activation_failed(node, exc)
            raise

    async def _finish_reloads(
        self, jobs: list[tuple[BlockNode, CacheReload]], results: list[tuple[bool, Any]],
        unfinished: dict[int, BlockNode], start: float, failed: dict[int, BaseException],
    ) -> None:
        for (node, reload), (ok, value) in zip(jobs, results, strict=True):
            error: BaseException | None = None
            try:
                if not ok:
                    raise value
                await reload.finish(value)
            except Exception as exc:
                error = exc
            del unfinished[id(node)]
            await self._settle(node, error, start, failed)

    async def _settle(
        self, node: BlockNode, outcome: BaseException | None, start: float,
        failed: dict[int, BaseException],
    ) -> None:
        if outcome is None:
            await self._end_activation(node, start)
        else:
            self._activation_failed(node, outcome)
            if not isinstance(outcome, Exception):
                raise outcome  # cancelled
            failed[id(node)] = outcome

    async def reload_active(self, nodes: Iterable[BlockNode]) -> None:
        """Flush and invalidate active ``nodes`` again, keeping them active.

        A node activated early on a waiting migration destination (an export,
        ``cont``) may hold metadata from before the source's last writes; this
        writes back what it has (parents first, new writes refused meanwhile),
        then re-reads everything (children first), as activation does.
        """
        order: list[BlockNode] = []
        seen: set[int] = set()

        def visit(node: BlockNode) -> None:
            if id(node) in seen or not node.active:
                return
            seen.add(id(node))
            for edge in node.children.values():
                visit(edge.child)
            order.append(node)

        for node in nodes:
            visit(node)
        # As an inactivation: the writes under way end first, new ones are
        # refused until the reload is over (the drivers' own go on).
        tops = await hold_writes([node for node in order if written_from_outside(node)], order)
        try:
            for node in reversed(order):
                await self.write_back(node)
            await self._reload_written_back(order)
        finally:
            release(tops)

    async def _reload_written_back(self, order: list[BlockNode]) -> None:
        held = [node for node in order if node.reloading is None]  # as activate_all
        for node in held:
            node.hold_requests()
        try:
            for i, node in enumerate(order):
                node.set_state(NodeState.ACTIVE)
                try:
                    await node.driver.invalidate_cache()
                except Exception as exc:
                    # This node and those not reloaded yet (written back) trust
                    # nothing they cached: inactive, for activate_all (cont) to retry.
                    for rest in order[i:]:
                        rest.set_state(NodeState.INACTIVE)
                    for rest in order[i:]:  # their children's locks follow
                        try:
                            await self.refresh_perms(rest)
                        except Exception as undo:
                            log.error("node %s: %s", rest.node_name, undo)
                    node.activation_error = str(exc)
                    log.error("invalidation of node %s failed: %s", node.node_name, exc)
                    raise
                finally:
                    node.release_requests()
                node.stats.invalidations += 1
        finally:
            for node in held:
                node.release_requests()

    def all_nodes(self) -> Iterable[BlockNode]:
        return list(self.nodes.values())
