"""The interface every block driver implements, and what it is given.

One driver class per format or protocol (``file``, ``raw``, ``qcow2``,
``null-co``; :mod:`qmpd.block.registry` lists them).  A driver instance belongs
to one :class:`BlockNode` and reaches its children through the node
(``node.file``, ``node.backing``), never through the file system directly
unless it is a protocol driver.  Nodes, their edges (:class:`BdrvChild`) and
users (:class:`NodeUser`) live here too, so that the graph
(:mod:`qmpd.block.graph`) depends on this module and not the other way round.

Drivers raise :class:`~qmpd.errors.BlockDriverError` only: it is a QMP
GenericError carrying an errno, so it needs no translation on the way out.

All I/O methods are coroutines; blocking calls run in the I/O threads (``node.graph.run_io``).

Mutable metadata (qcow2's L1/L2 tables, refcounts) may be cached by a
driver.  Two methods manage that cache across a change of owner:

* :meth:`BlockDriver.inactivate` flushes everything and marks the image
  clean; afterwards the driver must not write, and must treat anything it
  still caches as untrusted.  The graph holds the node ``INACTIVATING``
  meanwhile, so no new write reaches the driver; a driver reads the
  node's state (``node.state``) and keeps no copy of it.
* :meth:`BlockDriver.invalidate_cache` (activation) throws away every piece
  of cached mutable metadata and reloads it from disk, keeping only the
  immutable configuration (options).  It is only called on an inactive node
  (the graph then marks it active to take its permissions, and requests wait
  until the reload is done: :meth:`BlockNode.hold_requests`).
  A driver that can do it as one blocking job offers that job through
  :meth:`BlockDriver.begin_reload` (activation of many nodes then batches the
  jobs of every node into a few I/O-thread hops); a format driver reads its
  file child in such a job through the child's :meth:`BlockDriver.blocking_reader`.
* :meth:`BlockDriver.refresh_inactive` runs before every read of an inactive
  node: what it cached may have been changed by the image's new owner.
"""

from __future__ import annotations

import asyncio
import functools
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from qmpd.block.accounting import NodeStats as NodeStats
from qmpd.block.blocking import BlockingRead, CacheReload, OpenJob
from qmpd.block.common import NODE_TRANSITIONS as NODE_TRANSITIONS
from qmpd.block.common import PERM_ALL as PERM_ALL
from qmpd.block.common import PERM_NAMES as PERM_NAMES
from qmpd.block.common import ChildRole as ChildRole
from qmpd.block.common import IoDone as IoDone
from qmpd.block.common import NodeGraph as NodeGraph
from qmpd.block.common import NodeState as NodeState
from qmpd.block.common import Perm as Perm
from qmpd.block.common import SoonRead as SoonRead
from qmpd.block.common import SoonWrite as SoonWrite
from qmpd.block.common import default_child_perms
from qmpd.block.common import perm_names as perm_names
from qmpd.block.dirty_bitmap import DirtyBitmap
from qmpd.block.extent import BlockStatus as BlockStatus
from qmpd.block.extent import HostSpan, read_span
from qmpd.block.tracked import RangeSerialiser
from qmpd.errors import BlockDriverError as BlockDriverError

#: Every permission set by value, and the bits as ints, for the hot paths.
_PERMS = tuple(Perm(value) for value in range(16))
_ALL = PERM_ALL.value


# The same by identity, for the hot paths (an enum member's hash is computed
# in Python, and reading NodeState.X goes through a descriptor).
_ACTIVE = NodeState.ACTIVE
_NEXT_STATES = {id(old): tuple(new) for old, new in NODE_TRANSITIONS.items()}


@dataclass(eq=False, slots=True)  # slots: read for every node at every (in)activation
class BdrvChild:
    """An edge: ``parent`` uses ``child`` in ``role`` under the name ``name``."""

    name: str
    role: ChildRole
    child: BlockNode
    parent: BlockNode | None = None
    user: NodeUser | None = None
    perm: Perm = Perm.NONE
    shared: Perm = PERM_ALL

    def perms(self) -> tuple[Perm, Perm]:
        """What the parent needs and shares: a node parent's as last computed,
        a user's as it says now."""
        if self.user is not None:
            return self.user.permissions(self.child)
        return self.perm, self.shared

    def describe(self) -> str:
        if self.parent is not None:
            return (
                f"node '{self.parent.node_name}' "
                f"(uses node '{self.child.node_name}' as '{self.name}' child)"
            )
        assert self.user is not None
        return f"{self.user.describe()} (uses node '{self.child.node_name}' as '{self.name}' child)"


class WriteHook:
    """Something that sees, gates or extends the writes to one node (a job's
    copy-before-write, a mirror's dirty tracking); every method does nothing
    by default.  Hooks sit in :attr:`BlockNode.write_hooks`."""

    async def before_write(self, node: BlockNode, offset: int, length: int) -> BlockNode | None:
        """Before a write, discard or zero write reaches the driver; may wait.

        Returns a node to send the request to instead (the node was replaced
        while the request waited, as a drained request goes to the new node),
        or None.
        """
        return None

    async def after_write(self, node: BlockNode, offset: int, length: int,
                          data: bytes | None) -> None:
        """After it succeeded; ``data`` is None for zeroes and discards.  The
        request completes only once this returns."""
        return None

    def write_failed(self, node: BlockNode, offset: int, length: int) -> None:
        """After it failed (what :meth:`before_write` started ends here)."""
        return None


@dataclass(eq=False)
class NodeUser:
    """Something outside the graph that uses a node (an export; a job tomorrow).

    The graph asks :meth:`permissions` whenever it recomputes the node's
    permissions, so what a user needs may follow the node's state.
    """

    kind: str
    id: str
    writable: bool
    allow_inactive: bool = False
    #: Set by a job: what ``blockdev-del`` says while the job holds the node
    #: (QEMU's op blocker).  Users without one are BlockBackends ("in use").
    blocker: str | None = None
    #: A job that stands between the node and its other users, as QEMU's
    #: mirror and backup filter nodes do: ``blockdev-del`` then names the
    #: job's blocker, not the users.
    fronts_users: bool = False

    def describe(self) -> str:
        return f"{self.kind} '{self.id}'"

    def child_replaced(self, old: BlockNode, new: BlockNode) -> None:
        """The graph moved this user from ``old`` to ``new`` (a mirror's pivot)."""
        return None

    def permissions(self, node: BlockNode) -> tuple[Perm, Perm]:
        """``(perm, shared)`` this user needs of ``node`` now.

        By default: consistent reads, and writes if writable, everything but
        resize shared; of an inactive node, nothing (QEMU's blk_root_inactivate).
        """
        if not node.active:
            return Perm.NONE, PERM_ALL
        return Perm.CONSISTENT_READ | Perm.WRITE if self.writable else Perm.CONSISTENT_READ, \
            PERM_ALL & ~Perm.RESIZE


@dataclass(eq=False, slots=True)  # slots: read for every node at every (in)activation
class BlockNode:
    """One node of the graph."""

    graph: NodeGraph
    node_name: str
    driver: BlockDriver = field(init=False)
    options: dict[str, Any] = field(default_factory=dict)
    auto_named: bool = False
    read_only: bool = False
    force_share: bool = False
    detect_zeroes: str = "off"
    discard_unmap: bool = False
    cache_direct: bool = False
    cache_no_flush: bool = False
    monitor_owned: bool = False
    state: NodeState = NodeState.ACTIVE
    activation_error: str | None = None
    children: dict[str, BdrvChild] = field(default_factory=dict)
    parents: list[BdrvChild] = field(default_factory=list)
    inline_children: list[BlockNode] = field(default_factory=list)
    stats: NodeStats = field(default_factory=NodeStats)
    serial: int = 0
    #: Named dirty bitmaps, oldest first (QEMU lists them newest first).
    dirty_bitmaps: dict[str, DirtyBitmap] = field(default_factory=dict)
    #: Jobs' hooks on the write path (empty: writes go straight to the driver).
    write_hooks: list[WriteHook] = field(default_factory=list)
    #: Anonymous bitmaps of jobs (an active commit's): never listed nor stored.
    internal_bitmaps: list[DirtyBitmap] = field(default_factory=list)
    #: Set while a job copies into the node (a stream): writes and its copies
    #: of a range do not overlap in time.
    serialiser: RangeSerialiser | None = None
    #: Writes under way that passed no hook: a job installing one waits for
    #: them (QEMU drains the node when it inserts its filter).
    plain_writes: int = 0
    #: Writes under way through the hooks (an inactivation waits for them too).
    hooked_writes: int = 0
    _writes_ended: asyncio.Future[None] | None = None
    #: Set while an inactivation waits for the writes under way: new ones are refused.
    quiesce_counter: int = 0
    #: Set while an activation reloads what the driver caches: the node is
    #: marked active (its permissions and locks are being taken) but its cache
    #: is not yet to be trusted, so requests wait for it (QEMU drains the node).
    reloading: asyncio.Future[None] | None = None
    #: io_plug's depth, and the children it plugged (unplugged even if detached).
    io_plugged: int = 0
    plugged_below: list[BlockNode] = field(default_factory=list)

    # --- structure ----------------------------------------------------------

    @property
    def file(self) -> BlockNode | None:
        edge = self.children.get("file")
        return edge.child if edge is not None else None

    @property
    def backing(self) -> BlockNode | None:
        edge = self.children.get("backing")
        return edge.child if edge is not None else None

    @property
    def active(self) -> bool:
        return self.state is _ACTIVE

    @property
    def is_writable(self) -> bool:
        return not self.read_only and self.active

    def set_state(self, state: NodeState) -> None:
        if state is not self.state and state not in _NEXT_STATES[id(self.state)]:
            raise RuntimeError(f"node {self.node_name}: {self.state} -> {state} not allowed")
        self.state = state

    def cumulative_perms(self) -> tuple[Perm, Perm]:
        perm, shared = 0, _ALL
        for edge in self.parents:
            edge_perm, edge_shared = edge.perms()
            perm |= int(edge_perm)
            shared &= int(edge_shared)
        return _PERMS[perm], _PERMS[shared]

    # --- I/O with the checks every caller needs -------------------------------

    def size(self) -> int:
        """The length in whole 512-byte sectors, as QEMU's ``bdrv_getlength``."""
        return -(-self.driver.size() // 512) * 512

    def _check_range(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.size():
            raise BlockDriverError("Input/output error: request beyond end of device", 5)

    def hold_requests(self) -> None:
        """From now until :meth:`release_requests`, requests wait: an activation
        marks the node active (to take its permissions) before its driver has
        reloaded what it caches (QEMU drains the node meanwhile)."""
        if self.reloading is None:
            self.reloading = asyncio.get_running_loop().create_future()

    def release_requests(self) -> None:
        """The requests waiting for the reload go on (active or not)."""
        reload = self.reloading
        if reload is not None:
            self.reloading = None
            reload.set_result(None)

    def io_plug(self) -> None:
        """Until the matching :meth:`io_unplug`, this node's driver and those
        below may hold back what is submitted and submit it together (QEMU's
        ``bdrv_io_plug``).  A plugged section never awaits."""
        self.io_plugged += 1
        if self.io_plugged == 1:
            self.driver.io_plug()
            self.plugged_below = [edge.child for edge in self.children.values()]
            for child in self.plugged_below:
                child.io_plug()

    def io_unplug(self) -> None:
        self.io_plugged -= 1
        if self.io_plugged == 0:
            below, self.plugged_below = self.plugged_below, []
            try:
                self.driver.io_unplug()
            finally:
                for child in below:
                    child.io_unplug()

    async def reloaded(self) -> None:
        """Once no activation's reload of this node is under way."""
        while (reload := self.reloading) is not None:
            await asyncio.shield(reload)

    async def _refresh_inactive(self) -> None:
        """Before a read of an inactive node (waits for an activation begun meanwhile)."""
        await self.driver.refresh_inactive()
        await self.reloaded()

    def _check_writable(self) -> None:
        if self.state is not _ACTIVE or self.quiesce_counter:
            raise BlockDriverError("Block node is inactive", 1)
        if self.read_only:
            raise BlockDriverError("Block node is read-only", 1)

    async def read(self, offset: int, length: int) -> bytes:
        if self.reloading is not None:
            await self.reloaded()
        self._check_range(offset, length)
        if self.state is NodeState.INACTIVE:
            await self._refresh_inactive()
        data = await self.driver.read(offset, length)
        self.stats.rd_bytes += length
        self.stats.rd_operations += 1
        return data

    async def read_into(self, offset: int, buf: memoryview) -> None:
        """:meth:`read` of ``len(buf)`` bytes into the caller's buffer (a
        writable byte view), which the caller then reuses: no copy per request."""
        length = buf.nbytes
        if self.reloading is not None:
            await self.reloaded()
        self._check_range(offset, length)
        if self.state is NodeState.INACTIVE:
            await self._refresh_inactive()
        await self.driver.read_into(offset, buf)
        self.stats.rd_bytes += length
        self.stats.rd_operations += 1

    async def write_view(self, offset: int, view: memoryview, fua: bool = False) -> None:
        """:meth:`write` from a borrowed buffer, valid only until this returns
        (the caller reuses it): drivers write it without copying it first."""
        if self.reloading is not None:
            await self.reloaded()
        if self.write_hooks or self.serialiser is not None or self.detect_zeroes != "off":
            # Hooks may keep the data, zero detection reads it as bytes.
            await self.write(offset, bytes(view), fua)
            return
        length = view.nbytes
        self.plain_writes += 1
        try:
            self._check_writable()
            self._check_range(offset, length)
            await self.driver.write_view(offset, view, fua)
            self._wrote(offset, length)
        finally:
            self._plain_write_done()

    async def write_span(self, offset: int, span: HostSpan) -> None:
        """:meth:`write_view` of the bytes of a host file span (a job's copy
        between files: :mod:`qmpd.block.extent`)."""
        if self.reloading is not None:
            await self.reloaded()
        if self.write_hooks or self.serialiser is not None or self.detect_zeroes != "off":
            await self.graph.run_io(read_span, span, span.scratch)
            await self.write_view(offset, span.scratch)
            return
        self.plain_writes += 1
        try:
            self._check_writable()
            self._check_range(offset, span.length)
            await self.driver.write_span(offset, span)
            self._wrote(offset, span.length)
        finally:
            self._plain_write_done()

    def _wrote(self, offset: int, length: int) -> None:
        """A write (or write-zeroes) reached the driver: dirty bitmaps and stats."""
        if self.dirty_bitmaps or self.internal_bitmaps:
            self.mark_dirty(offset, length)
        self.stats.wr_bytes += length
        self.stats.wr_operations += 1

    async def write(self, offset: int, data: bytes, fua: bool = False) -> None:
        if self.reloading is not None:
            await self.reloaded()
        if self.write_hooks:
            await self._hooked(offset, len(data), data, lambda n: n.write(offset, data, fua),
                               lambda: self._write(offset, data, fua))
            return
        self.plain_writes += 1
        try:
            if self.serialiser is not None:
                await self._write(offset, data, fua)
                return
            # The body again (see _write): no extra coroutine on the hot path.
            self._check_writable()
            self._check_range(offset, len(data))
            if self.detect_zeroes != "off" and data.count(0) == len(data):
                await self.driver.write_zeroes(
                    offset, len(data), may_unmap=self.detect_zeroes == "unmap", fua=fua
                )
            else:
                await self.driver.write(offset, data, fua)
            self._wrote(offset, len(data))
        finally:
            self._plain_write_done()

    def read_now(self, offset: int, length: int) -> bytes | None:
        """:meth:`read` without a coroutine when the driver need not wait
        (:meth:`BlockDriver.read_now`); None, having done nothing, otherwise."""
        if self.state is not _ACTIVE or self.reloading is not None:
            return None
        self._check_range(offset, length)
        data = self.driver.read_now(offset, length)
        if data is not None:
            self.stats.rd_bytes += length
            self.stats.rd_operations += 1
        return data

    def write_now(self, offset: int, data: bytes, fua: bool = False) -> bool:
        """:meth:`write` without a coroutine when nothing on the way waits: no
        write hooks, no serialiser, no zero detection, and a driver that writes
        in memory (:meth:`BlockDriver.write_now`).  True when done; False,
        having done nothing, when :meth:`write` must be awaited.  Nothing
        keeps ``data`` once it returns."""
        if self.write_hooks or self.serialiser is not None or self.detect_zeroes != "off" \
                or self.reloading is not None:
            return False
        self._check_writable()
        self._check_range(offset, len(data))
        if not self.driver.write_now(offset, data, fua):
            return False
        self._wrote(offset, len(data))
        return True

    def read_many(self, reads: Sequence[SoonRead]) -> int:
        """Start ``(offset, length, done)`` reads in order, without a coroutine,
        where the driver calls back (:meth:`BlockDriver.read_many`): how many
        were started, from the first; the next must be awaited with :meth:`read`
        (which reports a bad range).  Each ``done`` comes later."""
        driver = self.driver
        if not driver.calls_back or self.state is not _ACTIVE or self.reloading is not None:
            return 0
        size = self.size()
        n = 0
        for offset, length, _ in reads:
            if offset < 0 or length <= 0 or offset + length > size:
                break
            n += 1
        if not n:
            return 0
        return driver.read_many(reads if n == len(reads) else reads[:n], self.stats)

    def write_many(self, writes: Sequence[SoonWrite]) -> int:
        """:meth:`read_many` for ``(offset, data, fua, done)`` writes, when
        nothing on the way waits (as :meth:`write_now`); :meth:`write` refuses
        what this does not start.  ``data`` stays unchanged until its ``done``."""
        driver = self.driver
        if not driver.calls_back or self.write_hooks or self.serialiser is not None \
                or self.detect_zeroes != "off" or self.reloading is not None \
                or self.state is not _ACTIVE or self.read_only or self.quiesce_counter:
            return 0
        size = self.size()
        todo: list[SoonWrite] = []
        for offset, data, fua, done in writes:
            length = len(data)
            if offset < 0 or offset + length > size:
                break
            todo.append((offset, data, fua,
                         functools.partial(self._write_soon_done, offset, length, done)))
        if not todo:
            return 0
        self.plain_writes += len(todo)
        started = 0
        try:
            started = driver.write_many(todo)
        finally:
            for _ in range(len(todo) - started):
                self._plain_write_done()
        return started

    def _write_soon_done(self, offset: int, length: int, done: IoDone, _: Any,
                         error: BaseException | None) -> None:
        if error is None:
            self._wrote(offset, length)
        self._plain_write_done()
        done(None, error)

    def _plain_write_done(self) -> None:
        self.plain_writes -= 1
        if not self.plain_writes:
            self._wake_drains()

    def _wake_drains(self) -> None:
        ended, self._writes_ended = self._writes_ended, None
        if ended is not None and not ended.done():
            ended.set_result(None)

    async def drain_plain_writes(self) -> None:
        """Wait for the writes under way that passed no hook (after a hook was
        installed, new writes pass it: this ends)."""
        while self.plain_writes:
            await self._writes_change()

    async def drain_writes(self) -> None:
        """Wait for every write under way, hooked or not."""
        while self.plain_writes or self.hooked_writes:
            await self._writes_change()

    async def _writes_change(self) -> None:
        if self._writes_ended is None:
            self._writes_ended = asyncio.get_running_loop().create_future()
        await asyncio.shield(self._writes_ended)

    async def _write(self, offset: int, data: bytes, fua: bool) -> None:
        self._check_writable()
        self._check_range(offset, len(data))
        serialiser = self.serialiser
        token = await serialiser.begin_write(offset, len(data)) if serialiser is not None else 0
        try:
            if self.detect_zeroes != "off" and data.count(0) == len(data):
                await self.driver.write_zeroes(
                    offset, len(data), may_unmap=self.detect_zeroes == "unmap", fua=fua
                )
            else:
                await self.driver.write(offset, data, fua)
        finally:
            if serialiser is not None:
                serialiser.end_write(token)
        self._wrote(offset, len(data))

    async def write_zeroes(
        self, offset: int, length: int, may_unmap: bool = False, fua: bool = False
    ) -> None:
        if self.reloading is not None:
            await self.reloaded()
        if self.write_hooks:
            await self._hooked(offset, length, None,
                               lambda n: n.write_zeroes(offset, length, may_unmap, fua),
                               lambda: self._write_zeroes(offset, length, may_unmap, fua))
            return
        self.plain_writes += 1
        try:
            if self.serialiser is not None:
                await self._write_zeroes(offset, length, may_unmap, fua)
                return
            self._check_writable()
            self._check_range(offset, length)
            await self.driver.write_zeroes(offset, length, may_unmap and self.discard_unmap, fua)
            self._wrote(offset, length)
        finally:
            self._plain_write_done()

    async def _write_zeroes(self, offset: int, length: int, may_unmap: bool, fua: bool) -> None:
        self._check_writable()
        self._check_range(offset, length)
        serialiser = self.serialiser
        token = await serialiser.begin_write(offset, length) if serialiser is not None else 0
        try:
            await self.driver.write_zeroes(offset, length, may_unmap and self.discard_unmap, fua)
        finally:
            if serialiser is not None:
                serialiser.end_write(token)
        self._wrote(offset, length)

    async def discard(self, offset: int, length: int) -> None:
        if self.reloading is not None:
            await self.reloaded()
        if self.write_hooks:
            await self._hooked(offset, length, None, lambda n: n.discard(offset, length),
                               lambda: self._discard(offset, length))
            return
        self.plain_writes += 1
        try:
            await self._discard(offset, length)
        finally:
            self._plain_write_done()

    async def _discard(self, offset: int, length: int) -> None:
        self._check_writable()
        self._check_range(offset, length)
        await self.driver.discard(offset, length)
        if (self.dirty_bitmaps or self.internal_bitmaps) and self.discard_unmap:
            # discard=ignore drops it first
            self.mark_dirty(offset, length)

    async def _hooked(self, offset: int, length: int, data: bytes | None,
                      elsewhere: Callable[[BlockNode], Awaitable[None]],
                      here: Callable[[], Awaitable[None]]) -> None:
        """A request through :attr:`write_hooks`: each hook before it (one may
        send it to another node), the request, each hook after it."""
        self._check_writable()  # before a hook copies anything for it
        hooks = list(self.write_hooks)
        entered: list[WriteHook] = []
        counted = False
        try:
            for hook in hooks:
                other = await hook.before_write(self, offset, length)
                if other is not None and other is not self:
                    for done in reversed(entered):
                        done.write_failed(self, offset, length)
                    entered = []
                    await elsewhere(other)
                    return
                entered.append(hook)
            # Counted from here: one a hook holds back (a mirror's gate)
            # has reached nothing yet, and an inactivation must not wait for
            # it (it is refused when it goes on).
            if self.reloading is not None:
                await self.reloaded()
            self.hooked_writes += 1
            counted = True
            await here()
        except BaseException:
            for hook in reversed(entered):
                hook.write_failed(self, offset, length)
            raise
        else:
            for hook in entered:
                await hook.after_write(self, offset, length, data)
        finally:
            if counted:
                self.hooked_writes -= 1
                if not self.hooked_writes:
                    self._wake_drains()

    def mark_dirty(self, offset: int, length: int) -> None:
        """Record a change in every recording bitmap (bdrv_set_dirty)."""
        for bitmap in self.dirty_bitmaps.values():
            if bitmap.recording:
                bitmap.set_range(offset, length)
        for bitmap in self.internal_bitmaps:
            bitmap.set_range(offset, length)

    async def flush(self) -> None:
        self.stats.flush_operations += 1
        if self.reloading is not None:
            await self.reloaded()
        if self.cache_no_flush:
            return
        await self.driver.flush()

    async def block_status(self, offset: int, length: int) -> BlockStatus:
        if self.reloading is not None:
            await self.reloaded()
        self._check_range(offset, max(length, 0))
        if self.state is NodeState.INACTIVE:
            await self._refresh_inactive()
        return await self.driver.block_status(offset, length)


class BlockDriver(ABC):
    """One instance per node.  Subclasses set the class variables below."""

    #: The ``driver`` value in blockdev-add and ``drv`` in queries.
    format_name: ClassVar[str]
    #: Protocol drivers talk to storage; format drivers sit on a ``file`` child.
    is_protocol: ClassVar[bool] = False
    #: Whether nodes take a ``backing`` child, which their header may name.
    supports_backing: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # The graph's synchronous path calls only set_perm_now: a driver that
        # takes locks in set_perm and forgot it would silently take none there.
        if "set_perm" in cls.__dict__ and "set_perm_now" not in cls.__dict__:
            raise TypeError(f"{cls.__name__} overrides set_perm but not set_perm_now")

    #: Whether :meth:`read_many`/:meth:`write_many` may start requests now
    #: (the driver has an engine that calls back); while False the node does
    #: not try them, and pays nothing for them on its hot path.
    calls_back: bool = False

    def __init__(self, node: BlockNode) -> None:
        self.node = node

    @classmethod
    def probe(cls, head: bytes) -> bool:
        """Whether a file beginning with ``head`` is in this format (QEMU's
        ``bdrv_probe``); only formats with a signature answer True."""
        return False

    # --- lifecycle --------------------------------------------------------

    @abstractmethod
    async def open(self, options: dict[str, Any]) -> None:
        """Open with the validated blockdev options (children already exist)."""

    def begin_open(self, options: dict[str, Any]) -> OpenJob | None:
        """:meth:`open` as one blocking job, which a parent may extend (see
        :meth:`begin_open_over`); None: the graph awaits :meth:`open`."""
        return None

    def begin_open_over(self, options: dict[str, Any], below: OpenJob) -> OpenJob | None:
        """:meth:`open` in the same I/O-thread job as the ``begin_open`` of its
        ``file`` child (not yet open): one thread hop for both nodes.  The job
        runs ``below.run`` first and lets its error through as it is, and its
        finish runs ``below.finish`` first.  None: the child's job runs alone,
        then :meth:`open`."""
        return None

    async def close(self) -> None:
        """Release everything; the node is going away.  Flush first if writable."""
        return None

    def stop_waiting(self) -> None:
        """The daemon is closing every node: from now on requests must not wait
        for what may never come (an NBD server's return), so that shutdown is
        not held up; they fail instead.  Nothing to do by default."""
        return None

    # --- I/O ----------------------------------------------------------------

    @abstractmethod
    async def read(self, offset: int, length: int) -> bytes:
        """``length`` bytes from ``offset``; reads past the end are an error."""

    async def read_into(self, offset: int, buf: memoryview) -> None:
        """:meth:`read` into ``buf`` (a writable byte view of the length to
        read), so that a caller reusing its buffers saves an allocation and a
        copy per request; by default :meth:`read` copied into it."""
        buf[:] = await self.read(offset, buf.nbytes)

    async def write(self, offset: int, data: bytes, fua: bool = False) -> None:
        raise BlockDriverError("Operation not supported", 95)

    def read_now(self, offset: int, length: int) -> bytes | None:
        """:meth:`read` without waiting, where it is a memory copy; None, having
        done nothing, when :meth:`read` must be awaited (always, by default)."""
        return None

    def write_now(self, offset: int, data: bytes, fua: bool) -> bool:
        """:meth:`write` without waiting, where it is a memory copy: True when
        done; False, having done nothing, when :meth:`write` must be awaited
        (always, by default).  Keeps no reference to ``data`` (the caller
        may reuse its buffer)."""
        return False

    def io_plug(self) -> None:
        """Requests submitted from now until :meth:`io_unplug` may be held back
        and submitted together (:meth:`BlockNode.io_plug`); nothing by default."""
        return None

    def io_unplug(self) -> None:
        """Submit what was held back since :meth:`io_plug`."""
        return None

    def read_many(self, reads: Sequence[SoonRead], stats: NodeStats) -> int:
        """Start :meth:`read` of each ``(offset, length, done)`` (ranges checked)
        in order, handed to an engine that completes them on the event loop:
        how many were started, from the first.  Later, never before this
        returns, ``done(data, None)`` once the read is added to ``stats``
        (``rd_bytes``, ``rd_operations``), or ``done(None, BlockDriverError)``."""
        return 0

    def write_many(self, writes: Sequence[SoonWrite]) -> int:
        """:meth:`read_many` for ``(offset, data, fua, done)`` writes (nothing on
        the way waits): ``done(None, None)`` once written (and flushed, with
        ``fua``); ``data`` stays unchanged until then.  None by default."""
        return 0

    async def write_view(self, offset: int, view: memoryview, fua: bool = False) -> None:
        """:meth:`write` from a byte view the caller reuses once this returns
        (the driver must not keep it); by default as a copy through :meth:`write`."""
        await self.write(offset, bytes(view), fua)

    async def write_span(self, offset: int, span: HostSpan, fua: bool = False) -> None:
        """:meth:`write_view` of the bytes a host file span holds; by default
        read into the span's scratch buffer in an I/O thread first."""
        await self.node.graph.run_io(read_span, span, span.scratch)
        await self.write_view(offset, span.scratch, fua)

    async def write_zeroes(
        self, offset: int, length: int, may_unmap: bool = False, fua: bool = False
    ) -> None:
        await self.write(offset, bytes(length), fua)

    async def discard(self, offset: int, length: int) -> None:
        """A hint: the range's contents may be dropped (no-op by default)."""
        return None

    async def flush(self) -> None:
        """Make every completed write stable."""
        return None

    async def truncate(self, size: int) -> None:
        raise BlockDriverError("Image format driver does not support resize", 95)

    async def block_status(self, offset: int, length: int) -> BlockStatus:
        """This layer only: ``allocated=False`` leaves the range to
        :meth:`status_fallback` (see :mod:`qmpd.block.status`)."""
        return BlockStatus(length=length, data=True, zero=False)

    def status_fallback(self) -> BlockNode | None:
        """The node block status asks about ranges this one does not hold
        (QEMU's ``bdrv_filter_or_cow_bs``): the backing node; a filter
        driver returns the node it filters."""
        return self.node.backing

    def host_file(self, offset: int, length: int) -> tuple[int, int] | None:
        """``(fd, file offset)`` when the range is stored unchanged in a host file
        (page-cached, no O_DIRECT), so that it may be sent with sendfile(2).
        None when it is not (or not known)."""
        return None

    # --- sizes and information ----------------------------------------------

    @abstractmethod
    def size(self) -> int:
        """Virtual size in bytes (what the node presents to its users)."""

    def allocated_size(self) -> int | None:
        """Bytes the node occupies on the host (``actual-size``), if known."""
        return None

    def filename(self) -> str:
        """The name QEMU shows as ``file``/``filename`` for this node."""
        child = self.node.file
        return child.driver.filename() if child is not None else ""

    #: Options that change what the node shows, so that its filename must
    #: name them (QEMU's ``strong_runtime_opts``).
    strong_runtime_opts: tuple[str, ...] = ()

    def exact_filename(self) -> str:
        """A protocol node's own name when no strong option is set."""
        return ""

    def filename_options(self) -> dict[str, Any]:
        """What a ``json:`` filename needs besides ``driver`` to reopen the node."""
        return {}

    def auto_backing_file(self) -> str:
        """The backing file the image header names ("" for none)."""
        return ""

    def cache_stats(self) -> dict[str, tuple[int, int]]:
        """Metadata cache (hits, misses) by cache name, for /metrics."""
        return {}

    def locks_held(self) -> tuple[int, int] | None:
        """The image locks this node holds now, as permission bits: (the
        permissions it holds, the ones it refuses to share); None when the
        driver takes no locks (the default)."""
        return None

    def driver_metrics(self) -> dict[str, float]:
        """The driver's own per-node figures for /metrics, by name
        (``qmpd_block_driver_<name>``); none by default."""
        return {}

    def readiness(self) -> str | None:
        """A reason the node's backend is not ready (a storage cluster that
        does not answer), for /ready; None when it is (the default).  Called
        on the event loop: it must not block."""
        return None

    def raw_backing_file_name(self) -> str | None:
        """The header's backing file name exactly as stored (None without one)."""
        return None

    def backing_file_name(self) -> str | None:
        """The header's backing file resolved against the image's directory; opened
        when blockdev-add names no ``backing`` (None without one)."""
        return None

    def backing_format(self) -> str | None:
        """The header's backing format (None: probe the file)."""
        return None

    async def change_backing_file(self, name: str | None, fmt: str | None) -> None:
        """Store another backing file name and format in the image header
        (None: no backing file), QEMU's ``bdrv_change_backing_file``; formats
        without a header to rewrite refuse."""
        raise BlockDriverError("Operation not supported", 95)

    def image_info(self) -> dict[str, Any]:
        """Driver-specific members of ImageInfo (``cluster-size``, ``format-specific``,
        ``dirty-flag``, backing-file names)."""
        return {}

    # --- permissions ----------------------------------------------------------

    def child_perms(
        self, role: ChildRole, parent_perm: Perm, parent_shared: Perm
    ) -> tuple[Perm, Perm]:
        """What this node asks of a child in ``role``, given its own parents' needs.

        The default is QEMU's storage/COW rule set.
        """
        node = self.node
        # node.state, not the property: a hot path
        return default_child_perms(role, parent_perm, parent_shared,
                                   node.state is _ACTIVE, node.read_only)

    async def set_perm(self, perm: Perm, shared: Perm) -> None:
        """Protocol drivers turn permissions into image locks here."""
        return None

    def set_perm_now(self, perm: int, shared: int) -> bool:
        """:meth:`set_perm` without waiting (permissions as plain ints): True
        when done, False, having done nothing, when :meth:`set_perm` must be
        awaited instead.  A driver overriding :meth:`set_perm` must override
        this too (checked when the class is made); nothing to do by default.

        A node without children or users that turns inactive right after its
        last parent is not asked again: that parent's refresh has just passed
        it the same permissions (the graph's ``settled`` inactivation)."""
        return True

    def has_pending_writes(self) -> bool:
        """Whether :meth:`flush` or :meth:`inactivate` may write or sync anything.

        A scheduling hint only (the graph gives such nodes' trees a task each,
        so that their I/O overlaps); both are called whatever it says.  A node
        speaks for itself, not for its children.  Unknown, so True, by default.
        """
        return True

    # --- activation -----------------------------------------------------------

    async def inactivate(self) -> None:
        """Flush caches and mark the image clean; no writes after this."""
        await self.flush()

    def rehearse_inactivation(self) -> None:
        """Read what :meth:`inactivate_now` and the permission update after it
        read, changing nothing (no state, no lock, no write): a migration
        source runs this just before it stops, so that the inactivation in its
        downtime runs on warm code and data.  Nothing to read by default."""
        return None

    def inactivate_now(self) -> bool:
        """:meth:`inactivate` without waiting, when there is nothing to write
        back: True when done, False, having done nothing, when
        :meth:`inactivate` must be awaited instead (always, by default)."""
        return False

    async def invalidate_cache(self) -> None:
        """Drop and reload all cached mutable metadata (the node is inactive).

        By default through :meth:`begin_reload`, in one I/O-thread job.
        """
        reload = self.begin_reload()
        if reload is not None:
            await reload.finish(await reload.start(self.node.graph.run_io))

    def begin_reload(self) -> CacheReload | None:
        """Start :meth:`invalidate_cache` as one blocking job (dropping what the
        driver caches now); None when there is nothing to reload or the driver
        has to await something on the way."""
        return None

    def blocking_reader(self) -> BlockingRead | None:
        """``read([(offset, length), ...])`` that blocks and returns each range's
        bytes, for a parent's job in an I/O thread (past the end reads as
        zeros; the ranges may be read side by side); None if it has none."""
        return None

    def reads_inline(self) -> bool:
        """Whether :meth:`blocking_reader`'s reads are memory copies that never
        wait for a device, cheaper on the event loop than a thread hop."""
        return False

    # --- persistent dirty bitmaps (issue 11) ------------------------------------

    def can_store_new_bitmap(self, name: str, granularity: int) -> None:
        """Raise (QEMU's text) unless a persistent bitmap ``name`` can be added
        (bdrv_can_store_new_dirty_bitmap); formats without bitmaps refuse."""
        raise BlockDriverError(
            f"Can't store persistent bitmaps to {self.node.node_name}: "
            "Operation not supported", 95)

    def cluster_size(self) -> int | None:
        """bdrv_get_info's cluster size (the default bitmap granularity follows
        it); by default ImageInfo's ``cluster-size``, None without one."""
        size = self.image_info().get("cluster-size")
        return size if isinstance(size, int) else None

    async def store_persistent_bitmaps(self) -> None:
        """Write the node's persistent bitmaps to the image and clear their
        in-use marks (at inactivation and close); nothing by default."""
        return None

    async def remove_persistent_bitmap(self, name: str) -> None:
        """Delete a persistent bitmap from the image; nothing by default."""
        return None

    def reads_cached(self) -> bool:
        """Whether :meth:`blocking_reader`'s reads are served from memory (the
        host's page cache, kept at activation) rather than waiting for a
        device; see :attr:`CacheReload.waits`."""
        return False

    async def refresh_inactive(self) -> None:
        """Before each read or block-status request on an inactive node.

        Another process may own the image and change its metadata at any time,
        so a driver that caches metadata re-reads what the request depends on
        (qcow2 reloads its header and tables); :meth:`host_file` must not
        answer from such caches either.  Nothing to do by default.
        """
        return None
