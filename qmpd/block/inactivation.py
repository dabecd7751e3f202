"""Inactivation: the end of a handover's source side, and of ``stop`` (QEMU's
bdrv_inactivate_all), with the flushes and write-backs that lead up to it.

:class:`GraphInactivation` holds these steps of :class:`qmpd.block.graph.BlockGraph`
(which it is a base of): flush, write back, drop write permissions and locks,
parents first; what needs no waiting in one synchronous pass.
"""

from __future__ import annotations

import asyncio
import errno
import itertools
import logging
import operator
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from qmpd.block.driver import PERM_ALL, BlockDriverError, BlockNode, NodeState, NodeUser, Perm
from qmpd.block.reloads import subtree
from qmpd.errors import GenericError

# Logged as the graph (the split is internal): filters and logs name it so.
log = logging.getLogger("qmpd.block.graph")

_serial = operator.attrgetter("serial")
# Read once: a member read through its enum class goes through a descriptor.
_ACTIVE, _INACTIVATING, _INACTIVE = NodeState.ACTIVE, NodeState.INACTIVATING, NodeState.INACTIVE


_PERMS = tuple(Perm(value) for value in range(16))
_PERM_ALL = int(PERM_ALL)
_WRITE_OR_RESIZE = int(Perm.WRITE | Perm.RESIZE)


def _refusing_user(node: BlockNode) -> NodeUser | None:
    """A writable user of ``node`` without allow-inactive: its inactivation is refused."""
    for edge in node.parents:
        user = edge.user
        if user is not None and user.writable and not user.allow_inactive:
            return user
    return None


def _check_inactivatable(node: BlockNode) -> None:
    user = _refusing_user(node)
    if user is not None:
        raise BlockDriverError(
            f"Node '{node.node_name}' is in use by {user.describe()}", errno.EPERM
        )


async def hold_writes(tops: list[BlockNode], members: list[BlockNode]) -> list[BlockNode]:
    """Refuse new writes into ``tops`` and wait for those under way on
    ``members``; returns ``tops``, for the caller to :func:`release` once
    the inactivation (or re-read) is over."""
    for top in tops:
        top.quiesce_counter += 1
    try:
        while (busy := next((n for n in members if n.plain_writes or n.hooked_writes),
                            None)) is not None:
            await busy.drain_writes()
    except BaseException:
        release(tops)
        raise
    return tops


def release(tops: list[BlockNode]) -> None:
    """The end of :func:`hold_writes`."""
    for top in tops:
        top.quiesce_counter -= 1


def written_from_outside(node: BlockNode) -> bool:
    """A root (what uses it is outside the graph), or a node a writing user writes into."""
    if not node.parents:
        return True
    uses = False
    for edge in node.parents:
        if edge.user is not None:
            if edge.user.writable:
                return True
        else:
            uses = True
    return not uses


def _unused(child: BlockNode, deferred: set[int] | tuple[()]) -> bool:
    """Whether no other node parent still uses ``child`` (active, or inactive
    with its permissions still to update)."""
    for other in child.parents:
        parent = other.parent
        if other.user is None and parent is not None and (
                parent.state is _ACTIVE or (deferred and id(parent) in deferred)):
            return False
    return True


def _has_pending_writes(members: list[BlockNode]) -> bool:
    """Whether flushing or inactivating these nodes may wait for I/O."""
    for node in members:
        if node.state is _ACTIVE and node.driver.has_pending_writes():
            return True
    return False



class GraphInactivation:
    """The inactivation steps of the block graph (a base of BlockGraph)."""

    if TYPE_CHECKING:
        nodes: dict[str, BlockNode]
        shape: int
        _roots: tuple[int, list[list[BlockNode]]]

        async def refresh_perms(self, node: BlockNode) -> None: ...

        def _check_conflicts(self, node: BlockNode) -> None: ...

    async def inactivate(self, node: BlockNode) -> None:
        """Flush, mark clean, drop write permissions and locks (parents first).

        What needs no waiting (nodes with nothing to write back, locks to let
        go) is done in one synchronous pass; the nodes whose driver has to
        wait are finished here afterwards, their subtrees with them.
        """
        tops = await self.quiesce(node)
        try:
            later: list[tuple[BlockNode, bool]] = []
            self._inactivate_now(node, later, set())
            await self._finish_later(later)
        finally:
            release(tops)

    async def quiesce(self, node: BlockNode | None = None) -> list[BlockNode]:
        """Before an inactivation below ``node`` (every node: None): refuse new
        writes into the trees' top nodes and the nodes a writing user (an
        export) writes into, as they would be refused a moment later, and wait
        for the writes under way, as QEMU drains before it inactivates (one
        still in a driver's thread or in librbd would land after the
        write-back and the lock release, on an image another host may own by
        then).  Returns the nodes refusing writes, for the caller to let go
        (:func:`release`) once the inactivation is over, not before: a node
        waiting for its turn to write back is still active, and a request
        already queued on the loop would otherwise slip in.  The drivers' own
        writes (a format's write-back into its file) go on.  A tree whose
        inactivation will be refused (a writable user without allow-inactive)
        is left alone."""
        everything = list(self.nodes.values()) if node is None else list(subtree(node))
        tops: list[BlockNode] = []
        for n in everything:
            if _refusing_user(n) is not None:
                tops, members = self._quiesce_trees(node, everything)
                break
            if n is node or written_from_outside(n):
                tops.append(n)
        else:
            members = everything
        return await hold_writes(tops, members)

    def _quiesce_trees(self, node: BlockNode | None, everything: list[BlockNode]
                       ) -> tuple[list[BlockNode], list[BlockNode]]:
        """:meth:`quiesce`'s nodes when some tree's inactivation will be refused."""
        trees = self.trees() if node is None else [([node], everything)]
        tops: list[BlockNode] = []
        members: list[BlockNode] = []
        for roots, nodes in trees:
            if any(_refusing_user(n) is not None for n in nodes):
                continue  # it stays active: nothing to wait for nor refuse
            members += nodes
            tops += roots
            tops += (n for n in nodes if n not in roots and written_from_outside(n))
        return tops, members

    async def _finish_later(self, later: list[tuple[BlockNode, bool]]) -> None:
        # A child shared with a node whose permissions are still to update
        # waits for that one too: its locks follow what its parents ask.
        deferred = {id(node) for node, written_back in later if written_back}
        for pending, written_back in later:
            if written_back:
                try:
                    await self.refresh_perms(pending)
                finally:
                    if pending.state is _INACTIVATING:
                        pending.set_state(_INACTIVE)
                deferred.discard(id(pending))
                for edge in list(pending.children.values()):
                    if _unused(edge.child, deferred):
                        await self._inactivate_slowly(edge.child)
            else:
                await self._inactivate_slowly(pending)

    async def _inactivate_slowly(self, node: BlockNode) -> None:
        if node.state is _INACTIVE:
            await self._inactivate_children(node)  # see _inactivate_now
            return
        _check_inactivatable(node)
        await self.write_back(node)
        try:
            await self.refresh_perms(node)  # still inactivating: see _inactivate_now
        finally:
            node.set_state(_INACTIVE)
        await self._inactivate_children(node)

    async def _inactivate_children(self, node: BlockNode) -> None:
        for edge in list(node.children.values()):
            if _unused(edge.child, ()):
                await self._inactivate_slowly(edge.child)

    def _inactivate_now(
        self, node: BlockNode, later: list[tuple[BlockNode, bool]], deferred: set[int],
        settled: bool = False,
    ) -> None:
        """:meth:`inactivate`'s steps without waiting, as far as drivers can go.

        A node whose driver must wait for its write-back is left active, one
        whose locks must wait is left without its children's permissions
        updated; both go to ``later`` (with whether the write-back is done),
        and their children wait for them (``deferred`` holds the latter).

        ``settled``: the parent that just turned inactive has refreshed this
        node's permissions, and no other parent can change them any more.  A
        node without children or users then has nothing to refresh once
        inactive (the same permissions again, with no child to pass them on
        to and no user asking for less): one permission update per file node
        under a format node instead of two (it also drops the write locks
        while the node is still active, as before).
        """
        state = node.state
        if state is _INACTIVE:
            # Left so by a failed activation or re-read: what it still has
            # active below it goes too.
            for edge in node.children.values():
                if edge.child.state is _ACTIVE and _unused(edge.child, deferred):
                    self._inactivate_now(edge.child, later, deferred)
            return
        used = False
        for edge in node.parents:
            if edge.user is not None:
                _check_inactivatable(node)
                used = True
                break
        # ACTIVE or INACTIVATING -> INACTIVATING -> INACTIVE (or back to
        # ACTIVE): set_state's allowed moves, written out on this hot path.
        node.state = _INACTIVATING
        try:
            done = node.driver.inactivate_now()
        except BaseException:
            node.state = _ACTIVE
            raise
        if not done:
            node.state = _ACTIVE
            later.append((node, False))
            return
        if not used:
            node.state = _INACTIVE
        children = node.children
        # A node with users takes what they ask of it once inactive (nothing:
        # QEMU's blk_root_inactivate) while still inactivating: its driver
        # drops its locks then, as an inactive one no longer changes them.
        if not (settled and not used and not children):
            try:
                refreshed = self._refresh_perms_now(node)
            except BaseException:
                node.state = _INACTIVE  # written back: it may not write again
                raise
            if not refreshed:  # a used node stays inactivating until then
                deferred.add(id(node))
                later.append((node, True))
                return
        node.state = _INACTIVE
        if children:
            for edge in children.values():  # inactivation changes no node's children
                child = edge.child
                # A child used by this node alone is unused now (the usual case).
                if len(child.parents) == 1 or _unused(child, deferred):
                    self._inactivate_now(child, later, deferred, True)

    def _refresh_perms_now(self, node: BlockNode) -> bool:
        """:meth:`refresh_perms` without waiting, in plain ints; False when a
        driver has to wait (whatever was already done, :meth:`refresh_perms`
        computes and applies the same again; the edges down to that driver's
        node keep their permissions until then)."""
        perm, shared = 0, _PERM_ALL
        for edge in node.parents:
            if edge.user is None:
                perm |= edge.perm._value_
                shared &= edge.shared._value_
            else:
                user_perm, user_shared = edge.user.permissions(node)
                perm |= user_perm._value_
                shared &= user_shared._value_
        if node.force_share:
            shared = _PERM_ALL
        return self._set_perms_now(node, perm, shared)

    def _set_perms_now(self, node: BlockNode, perm: int, shared: int) -> bool:
        """:meth:`_refresh_perms_now` given what the parents of ``node`` ask."""
        driver = node.driver
        if not driver.set_perm_now(perm, shared):
            return False
        for edge in node.children.values():
            child_perm, child_shared = driver.child_perms(edge.role, _PERMS[perm], _PERMS[shared])
            child = edge.child
            if child_perm._value_ & _WRITE_OR_RESIZE and child.read_only:
                raise GenericError("Block node is read-only")
            old = (edge.perm, edge.shared)
            edge.perm, edge.shared = child_perm, child_shared
            try:
                if len(child.parents) > 1:
                    self._check_conflicts(child)
                    applied = self._refresh_perms_now(child)
                else:  # this edge alone: what it asks is what the child gets
                    applied = self._set_perms_now(
                        child, child_perm._value_,
                        _PERM_ALL if child.force_share else child_shared._value_)
                if not applied:
                    # Not applied below: the edge keeps what its child holds,
                    # so that refresh_perms going back on a failure restores that.
                    edge.perm, edge.shared = old
                    return False
            except Exception:
                edge.perm, edge.shared = old
                raise
        return True

    async def write_back(self, node: BlockNode) -> None:
        """The driver's inactivate, with new writes refused meanwhile; a node
        whose driver fails stays active."""
        node.set_state(_INACTIVATING)
        try:
            await node.driver.inactivate()
        except BaseException:
            node.set_state(_ACTIVE)
            raise

    def _root_groups(self) -> list[list[BlockNode]]:
        """The roots of :meth:`trees`, oldest first: without a node used by
        two nodes (the usual graph), each root is a tree of its own.

        Kept while the graph's shape stays: a migration source works them out
        when it rehearses, before it stops, not in the downtime."""
        shape, roots = self._roots
        if shape == self.shape:
            return roots
        roots = self._work_out_root_groups()
        self._roots = (self.shape, roots)
        return roots

    def _work_out_root_groups(self) -> list[list[BlockNode]]:
        roots: list[list[BlockNode]] = []
        for node in sorted(self.nodes.values(), key=_serial):
            parents = node.parents
            if not parents:  # the usual root: no loop to run
                roots.append([node])
                continue
            uses = 0
            for edge in parents:
                if edge.parent is not None:
                    uses += 1
            if not uses:
                roots.append([node])
            elif uses > 1:
                return [tree_roots for tree_roots, _ in self.trees()]
        return roots

    def trees(self) -> list[tuple[list[BlockNode], list[BlockNode]]]:
        """Connected groups of nodes: (roots oldest first, members newest first)."""
        ordered = sorted(self.nodes.values(), key=_serial)
        group: dict[int, int] = {}
        count = 0
        for node in ordered:
            if id(node) in group:
                continue
            group[id(node)] = count
            stack = [node]
            while stack:
                current = stack.pop()
                for edge in current.children.values():
                    if id(edge.child) not in group:
                        group[id(edge.child)] = count
                        stack.append(edge.child)
                for edge in current.parents:
                    parent = edge.parent
                    if parent is not None and id(parent) not in group:
                        group[id(parent)] = count
                        stack.append(parent)
            count += 1
        # One pass each way over the nodes in creation order: no sort per tree.
        roots: list[list[BlockNode]] = [[] for _ in range(count)]
        members: list[list[BlockNode]] = [[] for _ in range(count)]
        for node in ordered:
            for edge in node.parents:
                if edge.parent is not None:
                    break
            else:
                roots[group[id(node)]].append(node)
        for node in reversed(ordered):
            members[group[id(node)]].append(node)
        return list(zip(roots, members, strict=True))

    async def _per_tree(
        self, work: Callable[[list[BlockNode], list[BlockNode]], Awaitable[None]]
    ) -> None:
        """Run ``work`` on every tree; separate trees share nothing, so side by side.

        Only trees with something to write or sync (:meth:`BlockDriver.has_pending_writes`)
        get a task each, to wait for their I/O together; the others, which
        would finish without waiting, run one after another in this task
        (the hint only decides this: every tree gets the same work; a lone
        tree always runs here).  The first error, in creation order, is
        raised once every tree is done.
        """
        trees = self.trees()
        errors: list[BaseException | None] = [None] * len(trees)
        busy = [i for i, (_, members) in enumerate(trees)
                if _has_pending_writes(members)] if len(trees) > 1 else []
        waiting: asyncio.Future[list[BaseException | None]] | None = None
        if busy:
            waiting = asyncio.gather(*(work(*trees[i]) for i in busy), return_exceptions=True)
        busy_set = set(busy)
        try:
            for i, (roots, members) in enumerate(trees):
                if waiting is not None and i in busy_set:
                    continue
                try:
                    await work(roots, members)
                except Exception as exc:
                    errors[i] = exc
            if waiting is not None:
                for i, result in zip(busy, await waiting, strict=True):
                    errors[i] = result
        except BaseException:
            if waiting is not None:
                waiting.cancel()
            raise
        for error in errors:
            if error is not None:
                raise error

    async def inactivate_all(self) -> None:
        """Inactivate every node, parents first inside a tree, trees concurrently.

        Each tree goes as far as it can without waiting first (all of it,
        when nothing is left to write back); what is left of the trees that
        must wait then runs side by side, a task each.  The first error, in
        creation order, is raised once every tree is done.
        """
        tops = await self.quiesce()
        try:
            await self._inactivate_all()
        finally:
            release(tops)

    async def _inactivate_all(self) -> None:
        trees = self._root_groups()
        errors: list[BaseException | None] = [None] * len(trees)
        rest: list[tuple[int, Awaitable[None]]] = []
        # Shared by the trees while they stay empty (a node deferred is one left for later).
        later: list[tuple[BlockNode, bool]] = []
        deferred: set[int] = set()
        for i, roots in enumerate(trees):
            try:
                for j, root in enumerate(roots):
                    self._inactivate_now(root, later, deferred)
                    if later:
                        rest.append((i, self._finish_inactivation(later, roots[j + 1:])))
                        later, deferred = [], set()
                        break
            except Exception as exc:
                errors[i] = exc
                later, deferred = [], set()
        if len(rest) == 1:
            i, job = rest[0]
            try:
                await job
            except Exception as exc:
                errors[i] = exc
        elif rest:
            results = await asyncio.gather(*(job for _, job in rest), return_exceptions=True)
            for (i, _), result in zip(rest, results, strict=True):
                if isinstance(result, BaseException) and not isinstance(result, Exception):
                    raise result
                errors[i] = result
        for error in errors:
            if error is not None:
                raise error

    def rehearse_inactivation(self, runs: int = 12, few: int = 8) -> None:
        """Go through what :meth:`inactivate_all` reads, changing nothing.

        The first ``few`` nodes, ``runs`` times (enough for the interpreter
        to specialise the code they share with the inactivation): their
        parents and their drivers' checks and lock plans
        (:meth:`BlockDriver.rehearse_inactivation`).  A migration source runs
        this just before it stops: after an idle wait, inactivating one node
        took ~70 us on cold caches against ~13 us back to back.  Only a few
        nodes: over many, the inactivation warms itself as it goes (a pass
        over 1000 took ~6 ms).  Best effort: a driver that fails here fails
        where it counts later, so the error is only logged."""
        nodes = list(itertools.islice(self.nodes.values(), few))
        try:
            self._root_groups()
            for _ in range(runs):
                for node in nodes:
                    if node.state is not _ACTIVE:
                        continue
                    for edge in node.parents:  # as _inactivate_now does
                        if edge.user is not None:
                            break
                    node.driver.rehearse_inactivation()
        except Exception as exc:
            log.debug("rehearsing the inactivation: %s", exc)

    async def _finish_inactivation(
        self, later: list[tuple[BlockNode, bool]], roots: list[BlockNode]
    ) -> None:
        await self._finish_later(later)
        for root in roots:
            await self.inactivate(root)

    async def flush_all(self) -> None:
        """Flush every active node, newest first inside a tree, trees concurrently."""

        async def work(roots: list[BlockNode], members: list[BlockNode]) -> None:
            for node in members:
                if node.active:
                    await node.flush()

        await self._per_tree(work)

    async def write_back_early(self) -> None:
        """Flush the trees that have something to write or sync, side by side,
        and leave the others alone: a migration source does this before it
        stops, so that its switchover (which flushes every node again) finds
        little or nothing left to write.  Best effort: a failure is logged
        here, and met again (and reported) by the switchover's own flush."""
        dirty = False
        for node in self.nodes.values():
            if node.state is _ACTIVE and node.driver.has_pending_writes():
                dirty = True
                break
        if not dirty:
            return

        async def flush(members: list[BlockNode]) -> None:
            for node in members:
                if node.state is _ACTIVE:
                    await node.flush()

        busy = [members for _, members in self.trees() if _has_pending_writes(members)]
        results = await asyncio.gather(*(flush(members) for members in busy),
                                       return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                if not isinstance(result, Exception):
                    raise result
                log.info("flush before the switchover failed: %s", result)
