"""Block exports: the NBD server's lifecycle, the export registry, export I/O.

:class:`BlockExports` is what the QMP commands (``nbd-server-start``,
``block-export-add`` ...) and the daemon's shutdown talk to
(``ctx.services.exports``).  It also is the export catalog the protocol's
handshake consults.

An export is a *user* of its block node: it hangs off the node as a
``root`` edge (as a QEMU BlockBackend would), which is what makes
``blockdev-del`` answer ``Node x is in use`` and what carries its
permissions into the graph.  A writable export needs ``write`` on its node
(hence the image lock, as with QEMU); every export leaves everything but
``resize`` shared.  While its node is inactive an export asks for no
write permission at all, so that inactivation really drops the write lock
and activation takes it back.

Every connection to an export goes through the same :class:`BlockNode`, so
all clients share one coherent view of the image, and a FLUSH on one
connection covers the writes acknowledged on all of them:
``NBD_FLAG_CAN_MULTI_CONN`` is advertised unless ``max-connections`` is 1
(QEMU's rule).

Reads: a READ of 64 KiB or more is built from block status (holes go out
as hole chunks; the answer is remembered in :class:`DataRanges`), and a
range the node stores as-is in a host file (raw over file) is handed to the
server as a :class:`~qmpd.nbd.protocol.FileSpan` and sent with sendfile(2).

Deletion follows QEMU 7.2 (``block/export/export.c``): an export without
clients disappears at once and ``BLOCK_EXPORT_DELETED`` is sent before the
command returns; ``mode: hard`` with clients connected returns first,
finishes the clients' in-flight requests, drops them, and then sends the
event.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from qmpd.block.bitmaps import ALLOW_RO
from qmpd.block.bitmaps import check as check_bitmap
from qmpd.block.dirty_bitmap import DirtyBitmap
from qmpd.block.driver import (
    BdrvChild,
    BlockNode,
    BlockStatus,
    ChildRole,
    NodeUser,
    Perm,
    SoonRead,
    SoonWrite,
)
from qmpd.block.status import block_status_above
from qmpd.errors import GenericError
from qmpd.nbd import protocol as p
from qmpd.nbd.failure import NbdFailure
from qmpd.nbd.server import NbdConnection, NbdServer
from qmpd.nbd.tls import ServerTls, TlsConnection
from qmpd.net import parse_socket_address
from qmpd.objects.authz import Authz, check_peer
from qmpd.objects.tls import TlsCredsX509

if TYPE_CHECKING:
    from qmpd.block.core import BlockLayer
    from qmpd.metrics import Metrics
    from qmpd.objects.iothread import IOThread
    from qmpd.qmp.events import EventBus

log = logging.getLogger(__name__)

#: QEMU's id_wellformed(): a letter, then letters, digits, '-', '.', '_'.
_EXPORT_ID = re.compile(r"[A-Za-z][A-Za-z0-9._-]*")
#: Block-status calls one BLOCK_STATUS reply may make (the client asks again
#: for the rest).
MAX_STATUS_CALLS = 4096
#: Extents in one BLOCK_STATUS chunk (QEMU's NBD_MAX_BLOCK_STATUS_EXTENTS).
MAX_EXTENTS = (1 << 20) // 8
#: Reads at least this long are built from block status (holes are sent as
#: NBD_REPLY_TYPE_OFFSET_HOLE chunks); shorter ones are sent as data.
SPARSE_READ_MIN = 64 * 1024
_DF = int(p.CmdFlag.DF)
_FUA = int(p.CmdFlag.FUA)
#: Data ranges an export remembers (see :class:`DataRanges`).
MAX_DATA_RANGES = 64


@dataclass(eq=False)
class ExportUser(NodeUser):
    """An export as a user of a node, described as QEMU describes it.

    Its permissions (:meth:`NodeUser.permissions`) follow the node's state:
    ``write`` only for a writable export of an active node.
    """

    #: Called when the graph moves the export to another node.
    replaced: Callable[[], None] = field(default=lambda: None, repr=False)

    def describe(self) -> str:
        # Exports use an anonymous BlockBackend in QEMU.
        return "an unnamed block device"

    def child_replaced(self, old: BlockNode, new: BlockNode) -> None:
        self.replaced()


@dataclass
class ExportStats:
    """Counters of one export (the /metrics series)."""

    connections_total: int = 0
    requests: dict[str, int] = field(default_factory=dict)
    bytes: dict[str, int] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)


class DataRanges:
    """Ranges block status reported as data, so that READs skip the query.

    QEMU keeps the same kind of cache per node (its block-status cache):
    finding where data ends can cost a scan of the file (SEEK_HOLE on tmpfs
    walks the page cache).  Only data is remembered, never holes: should a
    range have become a hole since (another writer punched it), sending it
    as data (zeros) is still a correct READ reply.  This export's own
    WRITE_ZEROES and TRIM forget what they touch.
    """

    def __init__(self, limit: int = MAX_DATA_RANGES) -> None:
        self.limit = limit
        self.ranges: list[tuple[int, int]] = []  # disjoint, sorted

    def covers(self, start: int, end: int) -> bool:
        for a, b in self.ranges:
            if a <= start and end <= b:
                return True
            if a > start:
                return False
        return False

    def add(self, start: int, end: int) -> None:
        merged: list[tuple[int, int]] = []
        for a, b in self.ranges:
            if b < start or a > end:
                merged.append((a, b))
            else:
                start, end = min(a, start), max(b, end)
        merged.append((start, end))
        merged.sort()
        if len(merged) > self.limit:
            merged = [r for r in merged if r != (start, end)][: self.limit - 1]
            merged.append((start, end))
            merged.sort()
        self.ranges = merged

    def forget(self, start: int, end: int) -> None:
        self.ranges = [(a, b) for a, b in self.ranges if b <= start or a >= end]


def _status_flags(status: BlockStatus) -> int:
    return (0 if status.data else p.STATE_HOLE) | (p.STATE_ZERO if status.zero else 0)


def _depth(status: BlockStatus) -> int:
    """qemu:allocation-depth: 1 for the node itself, 2 for its backing ..., 0 for none."""
    return status.depth + 1 if status.allocated else 0


def _bitmap_extents(bitmap: DirtyBitmap, offset: int, length: int,
                    limit: int) -> list[tuple[int, int]]:
    """qemu:dirty-bitmap:NAME as QEMU's bitmap_to_extents: clean and dirty runs,
    at most ``limit`` of them (what does not fit is left for the next request)."""
    extents: list[tuple[int, int]] = []

    def add(n: int, flags: int) -> bool:
        if n <= 0:
            return True
        if extents and extents[-1][1] == flags:
            extents[-1] = (extents[-1][0] + n, flags)
            return True
        if len(extents) >= limit:
            return False
        extents.append((n, flags))
        return True

    pos = offset
    end = offset + length
    for start, n in bitmap.dirty_extents(offset, length):
        if not (add(start - pos, 0) and add(n, p.STATE_DIRTY)):
            return extents
        pos = start + n
    add(end - pos, 0)
    return extents


class NbdExport:
    """One export: a node, a name, its options, its clients and its I/O."""

    def __init__(
        self,
        owner: BlockExports,
        export_id: str,
        node: BlockNode,
        name: str,
        description: str,
        writable: bool,
        writethrough: bool,
        allow_inactive: bool,
        allocation_depth: bool,
    ) -> None:
        self.owner = owner
        self.id = export_id
        self.name = name
        self.description = description
        self.writable = writable
        self.writethrough = writethrough
        self.allow_inactive = allow_inactive
        self.allocation_depth = allocation_depth
        self.connections: set[NbdConnection] = set()
        self.shutting_down = False
        self.finished: asyncio.Future[None] | None = None
        self.stats = ExportStats()
        self.data_ranges = DataRanges()
        for name_ in p.COMMAND_NAMES.values():
            self.stats.requests[name_] = 0
            self.stats.bytes[name_] = 0
            self.stats.errors[name_] = 0
        self.user = ExportUser(
            kind="export", id=export_id, writable=writable, allow_inactive=allow_inactive
        )
        self.user.replaced = self._node_replaced
        self.edge = BdrvChild(name="root", role=ChildRole.image(), child=node, user=self.user)
        self.iothread: IOThread | None = None
        #: Exported dirty bitmaps by context name (busy while exported).
        self.bitmaps: dict[str, DirtyBitmap] = {}

    @property
    def node(self) -> BlockNode:
        """The exported node: whatever the export's edge points at (a job's
        pivot moves it, as QEMU's bdrv_replace_node moves a BlockBackend)."""
        return self.edge.child

    # --- what clients see -----------------------------------------------------------------


    def _node_replaced(self) -> None:
        self.data_ranges = DataRanges()

    @property
    def node_name(self) -> str:
        return self.node.node_name

    def size(self) -> int:
        # As QEMU: the export size is the node's, rounded down to 512 bytes.
        return self.edge.child.size() // 512 * 512

    def protocol_description(self, multi_conn: bool) -> p.ExportDescription:
        flags = p.TFlag.HAS_FLAGS | p.TFlag.SEND_FLUSH | p.TFlag.SEND_FUA | p.TFlag.SEND_CACHE
        if self.writable:
            flags |= p.TFlag.SEND_TRIM | p.TFlag.SEND_WRITE_ZEROES | p.TFlag.SEND_FAST_ZERO
        else:
            flags |= p.TFlag.READ_ONLY
        if multi_conn:
            flags |= p.TFlag.CAN_MULTI_CONN
        contexts: tuple[str, ...] = (p.BASE_ALLOCATION,)
        if self.allocation_depth:
            contexts += (p.ALLOCATION_DEPTH,)
        contexts += tuple(self.bitmaps)
        return p.ExportDescription(
            name=self.name, size=self.size(), flags=flags, description=self.description,
            contexts=contexts,
        )

    def info(self) -> dict[str, Any]:
        """BlockExportInfo, members in QAPI order."""
        return {
            "id": self.id,
            "type": "nbd",
            "node-name": self.node.node_name,
            "shutting-down": self.shutting_down,
        }

    # --- clients --------------------------------------------------------------------------

    def connection_opened(self, conn: NbdConnection) -> None:
        self.connections.add(conn)
        self.stats.connections_total += 1

    def connection_closed(self, conn: NbdConnection) -> None:
        self.connections.discard(conn)

    def count_error(self, command: str) -> None:
        self.stats.errors[command] = self.stats.errors.get(command, 0) + 1

    def _count(self, command: str, length: int, requests: int = 1) -> None:
        stats = self.stats
        stats.requests[command] += requests
        stats.bytes[command] += length

    def _check_active(self) -> None:
        if not self.node.active:
            raise NbdFailure(p.Errno.EPERM, "export is inactive")

    # --- I/O ------------------------------------------------------------------------------

    async def read(
        self, offset: int, length: int, sparse: bool
    ) -> list[tuple[int, int, p.ReadData]]:
        """READ: ``(offset, length, data)`` pieces covering the request, data None for zeros."""
        self._count("read", length)
        if not length:
            return []
        node = self.node
        end = offset + length
        if (
            not sparse
            or length < SPARSE_READ_MIN
            or not node.active
            or self.data_ranges.covers(offset, end)
        ):
            return [(offset, length, await self._data(offset, length))]
        ranges: list[tuple[int, int, bool]] = []  # offset, length, zero
        pos = offset
        calls = 0
        while pos < end:
            # Ask up to the end of the node: a protocol driver finds the
            # extent's end at no extra cost, and the answer serves later reads.
            status = await block_status_above(node, pos, max(node.size(), end) - pos)
            if status.data and not status.zero and status.length > 0:
                self.data_ranges.add(pos, pos + status.length)
            n = min(status.length, end - pos)
            calls += 1
            if n <= 0 or calls > MAX_STATUS_CALLS:
                ranges.append((pos, end - pos, False))
                break
            zero = status.zero
            if ranges and ranges[-1][2] == zero:
                start, prev, _ = ranges[-1]
                ranges[-1] = (start, prev + n, zero)
            else:
                ranges.append((pos, n, zero))
            pos += n
        if len(ranges) == 1 and not ranges[0][2]:
            return [(offset, length, await self._data(offset, length))]
        pieces: list[tuple[int, int, p.ReadData]] = []
        for start, n, zero in ranges:
            pieces.append((start, n, None if zero else await self._data(start, n)))
        return pieces

    async def _data(self, offset: int, length: int) -> bytes | p.FileSpan:
        """The bytes of a range, or where they sit in a host file for larger reads.

        A span is sent with sendfile(2) (one copy, in the kernel) instead of
        being read into memory and written out again.
        """
        node = self.node
        if length >= SPARSE_READ_MIN and node.reloading is None:
            host = node.driver.host_file(offset, length)
            if host is not None:
                node.stats.rd_bytes += length
                node.stats.rd_operations += 1
                return p.FileSpan(host[0], host[1], length)
        return await node.read(offset, length)

    def _forget_data(self, offset: int, length: int) -> None:
        self.data_ranges.forget(offset, offset + length)

    @property
    def calls_back(self) -> bool:
        return self.edge.child.driver.calls_back

    def io_plug(self) -> Callable[[], None]:
        node = self.node
        node.io_plug()
        return node.io_unplug

    def read_now(self, offset: int, length: int) -> bytes | None:
        """A small READ's data without waiting (:meth:`BlockNode.read_now`);
        None, having done nothing, when :meth:`read` must be awaited."""
        node = self.node
        if not length or length >= SPARSE_READ_MIN:
            return None
        try:
            data = node.read_now(offset, length)
        except BaseException:
            self._count("read", length)
            raise
        if data is not None:
            self._count("read", length)
        return data

    def write_now(self, offset: int, data: bytes | bytearray, fua: bool) -> bool:
        """:meth:`write` without waiting (:meth:`BlockNode.write_now`): True when
        done; False, having done nothing, when :meth:`write` must be awaited."""
        node = self.node
        if not node.active:
            return False
        try:
            done = node.write_now(offset, cast(bytes, data), fua or self.writethrough)
        except BaseException:
            self._count("write", len(data))
            raise
        if done:
            self._count("write", len(data))
        return done

    def read_many(self, requests: Sequence[p.Request], structured: bool,
                  done: Callable[[p.Request, Any, BaseException | None], None]) -> int:
        """READs started together without a coroutine, in order
        (:meth:`BlockNode.read_many`): those :meth:`read` would answer with
        one piece of data, read into memory.  How many were started, from the
        first; ``done(request, data, error)`` comes later for each.  The next
        one, if any, was not: it must be awaited with :meth:`read`."""
        node = self.edge.child
        driver = node.driver
        reads: list[SoonRead] = []
        total = 0
        for request in requests:
            offset, length = request.offset, request.length
            if not length or (length >= SPARSE_READ_MIN and (
                (structured and not request.flags & _DF
                 and not self.data_ranges.covers(offset, offset + length))
                or driver.host_file(offset, length) is not None
            )):
                break
            reads.append((offset, length, functools.partial(done, request)))
            total += length
        started = node.read_many(reads) if reads else 0
        if started:
            if started < len(reads):
                total = sum(read[1] for read in reads[:started])
            self._count("read", total, started)
        return started

    def write_many(self, requests: Sequence[p.Request],
                   done: Callable[[p.Request, Any, BaseException | None], None]) -> int:
        """WRITEs (their payloads received) started together without a
        coroutine, in order (:meth:`BlockNode.write_many`): how many were
        started, from the first; ``done(request, None, error)`` comes later
        for each.  The next one, if any, was not: it must be awaited with
        :meth:`write`."""
        writethrough = self.writethrough
        writes: list[SoonWrite] = []
        total = 0
        for request in requests:
            payload = request.payload  # (a bytearray the request owns: drivers only read it)
            assert payload is not None
            writes.append((request.offset, payload, writethrough or bool(request.flags & _FUA),
                           functools.partial(done, request)))
            total += len(payload)
        started = self.edge.child.write_many(writes)
        if started:
            if started < len(writes):
                total = sum(len(write[1]) for write in writes[:started])
            self._count("write", total, started)
        return started

    async def write(self, offset: int, data: bytes | bytearray, fua: bool) -> None:
        self._count("write", len(data))
        self._check_active()
        # The payload was received straight into a bytearray that belongs to
        # this request alone; drivers only read it, so it stands in for bytes.
        await self.node.write(offset, cast(bytes, data), fua or self.writethrough)

    async def write_zeroes(
        self, offset: int, length: int, no_hole: bool, fast: bool, fua: bool
    ) -> None:
        self._count("write zeroes", length)
        self._check_active()
        self._forget_data(offset, length)
        if fast:
            # Honoured only when there is nothing to do: the range already
            # reads as zeros (and is allocated, if NO_HOLE asks for that).
            # Anything else could need real writing, which is not "fast".
            pos, end = offset, offset + length
            while pos < end:
                status = await self.node.block_status(pos, end - pos)
                n = min(status.length, end - pos)
                if n <= 0 or not status.zero or (no_hole and not status.data):
                    raise NbdFailure(p.Errno.ENOTSUP, "writing to file failed")
                pos += n
            return
        await self.node.write_zeroes(offset, length, not no_hole, fua or self.writethrough)

    async def trim(self, offset: int, length: int, fua: bool) -> None:
        self._count("trim", length)
        self._check_active()
        self._forget_data(offset, length)
        await self.node.discard(offset, length)
        if fua or self.writethrough:
            await self.node.flush()

    async def flush(self) -> None:
        self._count("flush", 0)
        self._check_active()
        await self.node.flush()

    async def cache(self, offset: int, length: int) -> None:
        # A prefetch hint; the page cache does this job for qmpd's drivers.
        self._count("cache", length)
        self._check_active()

    async def block_status(
        self, offset: int, length: int, req_one: bool, contexts: dict[int, str]
    ) -> list[tuple[int, list[tuple[int, int]]]]:
        """One extent list per selected context, ``(length, flags)`` each.

        As QEMU's server: each context is walked over the whole backing
        chain on its own, and a status equal to the previous extent's
        extends it, so REQ_ONE's single extent runs as far as the status
        stays the same.
        """
        self._count("block status", length)
        self._check_active()
        limit = 1 if req_one else MAX_EXTENTS
        return [
            (cid, await self._extents(offset, length, limit, contexts[cid]))
            for cid in sorted(contexts)
        ]

    async def _extents(
        self, offset: int, length: int, limit: int, context: str
    ) -> list[tuple[int, int]]:
        bitmap = self.bitmaps.get(context)
        if bitmap is not None:
            return _bitmap_extents(bitmap, offset, length, limit)
        depth = context == p.ALLOCATION_DEPTH
        extents: list[tuple[int, int]] = []
        pos, end = offset, offset + length
        calls = 0
        while pos < end and calls < MAX_STATUS_CALLS:
            calls += 1
            status = await block_status_above(self.node, pos, end - pos)
            n = min(status.length, end - pos)
            if n <= 0:
                break
            flags = _depth(status) if depth else _status_flags(status)
            if extents and extents[-1][1] == flags:
                extents[-1] = (extents[-1][0] + n, flags)
            elif len(extents) < limit:
                extents.append((n, flags))
            else:
                break
            pos += n
        if not extents:  # the node shrank under the export: report data
            extents.append((length, 0 if not depth else 1))
        return extents


class BlockExports:
    """The NBD server and every export (QEMU's block-export and nbd modules)."""

    def __init__(
        self, block: BlockLayer, events: EventBus, metrics: Metrics | None = None,
        tls_handshake_timeout: float = 10.0,
    ) -> None:
        self.block = block
        self.events = events
        self.tls_handshake_timeout = tls_handshake_timeout
        self.server: NbdServer | None = None
        #: The credentials and authz objects the running server holds.
        self._held: list[Any] = []
        #: Every export by id, oldest first (shutting-down ones included).
        self.exports: dict[str, NbdExport] = {}
        #: Live exports by NBD name, oldest first (the NBD_OPT_LIST order).
        self.names: dict[str, NbdExport] = {}
        self.protocol_errors = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._detached: list[BlockNode] = []
        self._shutdown_requested = False
        if metrics is not None:
            metrics.registry.register(ExportCollector(self))

    # --- the catalog the handshake consults -----------------------------------------------

    def lookup(self, name: str) -> p.ExportDescription | None:
        export = self.names.get(name)
        if export is None or self.server is None:
            return None
        return export.protocol_description(self.server.multi_conn)

    def listing(self) -> list[tuple[str, str]]:
        return [(e.name, e.description) for e in self.names.values()]

    def export_by_name(self, name: str) -> NbdExport | None:
        return self.names.get(name)

    def stats_protocol_error(self) -> None:
        self.protocol_errors += 1

    # --- nbd-server-start / nbd-server-stop -----------------------------------------------

    async def start_server(self, args: dict[str, Any]) -> None:
        address = parse_socket_address(args["addr"])
        if self.server is not None:
            raise GenericError("NBD server already running")
        if self._shutdown_requested:
            raise GenericError("The daemon is shutting down")
        tls = self._server_tls(args)
        connection = functools.partial(TlsConnection, config=tls) if tls is not None else None
        server = NbdServer(self, address, args.get("max-connections", 0), connection)
        await server.start()
        self._hold(args)
        self.server = server

    def _server_tls(self, args: dict[str, Any]) -> ServerTls | None:
        """``tls-creds`` as QEMU checks it at start; ``tls-authz`` is looked up
        by id at each handshake, as QEMU does (it may come later)."""
        creds_id = args.get("tls-creds")
        if creds_id is None:
            return None
        context = self.block.objects.tls_creds(creds_id, "server").server_context()
        authz_id = args.get("tls-authz")
        check = functools.partial(self._check_peer, authz_id) if authz_id else None
        return ServerTls(context, check, self.tls_handshake_timeout)

    def _check_peer(self, authz_id: str, cert: dict[str, Any] | None) -> str | None:
        authz = self.block.objects.objects.get(authz_id)
        if not isinstance(authz, Authz):
            return f"Cannot find QAuthZ object '{authz_id}'"
        return check_peer(authz, cert)

    def _hold(self, args: dict[str, Any]) -> None:
        """The server's objects stay until nbd-server-stop (object-del refuses them)."""
        objects = self.block.objects
        for key in ("tls-creds", "tls-authz"):
            obj = objects.objects.get(args.get(key) or "") if "tls-creds" in args else None
            if isinstance(obj, (TlsCredsX509, Authz)):
                objects.hold(obj, "nbd-server")
                self._held.append(obj)

    def _release(self) -> None:
        for obj in self._held:
            self.block.objects.release(obj, "nbd-server")
        self._held.clear()

    async def stop_server(self) -> None:
        server = self.server
        if server is None:
            raise GenericError("NBD server not running")
        self.server = None
        self._release()
        server.stop_listening()
        server.abort_negotiating()
        # Every export goes, oldest first, each event before the return.
        for export in list(self.exports.values()):
            if not export.shutting_down:
                self._begin_shutdown(export)
                await self._drain_and_finalize(export)
            elif export.finished is not None:
                await asyncio.shield(export.finished)

    # --- block-export-add -----------------------------------------------------------------

    async def add(self, args: dict[str, Any]) -> None:
        export_id = args["id"]
        if not _EXPORT_ID.fullmatch(export_id):
            raise GenericError("Invalid block export id")
        if export_id in self.exports:
            raise GenericError(f"Block export id '{export_id}' is already in use")
        node_name = args["node-name"]
        node = self.block.graph.lookup(node_name)
        if node is None:
            raise GenericError(f"Cannot find device='' nor node-name='{node_name}'")
        allow_inactive = args.get("allow-inactive", False)
        if not node.active and not allow_inactive:
            # As QEMU 7.2/10.0 (libvirt's storage migration depends on it): the
            # export activates its node, which image locking refuses while
            # another process holds the image.  A waiting destination invalidates
            # such a node again when its migration completes.
            await self.block.graph.activate(node)
        # qmpd has one event loop: an iothread is only checked and held.
        iothread = (
            self.block.objects.iothread(args["iothread"]) if "iothread" in args else None
        )
        writable = args.get("writable", False)
        if writable and node.read_only:
            raise GenericError("Cannot export read-only node as writable")
        name = args.get("name", node_name)
        export = NbdExport(
            self, export_id, node, name, args.get("description", ""), writable,
            args.get("writethrough", False), allow_inactive, args.get("allocation-depth", False),
        )
        if iothread is not None:
            export.iothread = iothread
            iothread.users.add(export_id)
        await self._attach(export)
        try:
            if export_id in self.exports:  # added by another monitor meanwhile
                raise GenericError(f"Block export id '{export_id}' is already in use")
            if self.server is None:
                raise GenericError("NBD server not running")
            if len(name.encode()) > p.MAX_STRING:
                raise GenericError(f"export name '{name}' too long")
            description = args.get("description")
            if description is not None and len(description.encode()) > p.MAX_STRING:
                raise GenericError(f"description '{description}' too long")
            if name in self.names:
                raise GenericError(f"NBD server already has export named '{name}'")
            found = [self._check_bitmap(bitmap, node, writable)
                     for bitmap in args.get("bitmaps", [])]
        except BaseException:
            await self._detach(export)
            raise
        for bitmap in found:
            bitmap.busy = True
            export.bitmaps[p.DIRTY_BITMAP_PREFIX + bitmap.name] = bitmap
        self.exports[export_id] = export
        self.names[name] = export

    def _check_bitmap(self, ref: Any, node: BlockNode, writable: bool) -> DirtyBitmap:
        """An export's bitmap: by name on the node or below it (filters and
        backing files), or by node and name (QEMU's nbd_export_create)."""
        if isinstance(ref, str):
            below: BlockNode | None = node
            found = None
            while below is not None and found is None:
                found = below.dirty_bitmaps.get(ref)
                if found is None:
                    below = below.driver.status_fallback()
            if found is None or below is None:
                raise GenericError(f"Bitmap '{ref}' is not found")
            if (not writable and found.recording and not below.read_only
                    and below.cumulative_perms()[0] & Perm.WRITE):
                raise GenericError(f"Enabled bitmap '{ref}' incompatible with readonly export")
        else:
            _, found = self.block.bitmaps.find(ref["node"], ref["name"])
        check_bitmap(found, ALLOW_RO)
        return found

    async def _attach(self, export: NbdExport) -> None:
        try:
            await self.block.graph.add_user(export.edge)
        except BaseException:
            if export.iothread is not None:
                export.iothread.users.discard(export.id)
            raise

    async def _detach(self, export: NbdExport) -> None:
        if export.iothread is not None:
            export.iothread.users.discard(export.id)
        try:
            await self.block.graph.remove_user(export.edge)
        except Exception:  # dropping permissions cannot really fail
            log.exception("export %s: releasing node %s", export.id, export.node.node_name)

    # --- nbd-server-add (deprecated, QEMU 7.2 still has it) -------------------------------

    async def legacy_add(self, args: dict[str, Any]) -> None:
        device = args["device"]
        node = self.block.graph.lookup(device)
        if node is None:
            raise GenericError(f"Cannot find device='{device}' nor node-name='{device}'")
        if self.server is None:
            raise GenericError("NBD server not running")
        name = args.get("name", device)
        options: dict[str, Any] = {
            "type": "nbd",
            "id": name,
            "node-name": device,
            "name": name,
            # nbd-server-add quietly downgrades a read-only node's export.
            "writable": args.get("writable", False) and not node.read_only,
        }
        if "description" in args:
            options["description"] = args["description"]
        if "bitmap" in args:
            options["bitmaps"] = [args["bitmap"]]
        await self.add(options)

    # --- block-export-del / nbd-server-remove ---------------------------------------------

    async def delete(self, export_id: str, mode: str = "safe") -> None:
        export = self.exports.get(export_id)
        if export is None:
            raise GenericError(f"Export '{export_id}' is not found")
        if export.shutting_down:
            raise GenericError(f"Export '{export_id}' is already shutting down")
        if mode == "safe" and export.connections:
            raise GenericError(f"export '{export_id}' still in use")
        self._begin_shutdown(export)
        if not export.connections:
            await self._finalize(export)
            return
        self._drain_later(export)

    def _drain_later(self, export: NbdExport) -> None:
        """Finish ``export`` once its connections have ended, in a task we hold."""
        task = asyncio.get_running_loop().create_task(self._drain_and_finalize(export))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _begin_shutdown(self, export: NbdExport) -> None:
        export.shutting_down = True
        export.finished = asyncio.get_running_loop().create_future()
        if self.names.get(export.name) is export:
            del self.names[export.name]

    async def _drain_and_finalize(self, export: NbdExport) -> None:
        conns = list(export.connections)
        await asyncio.gather(*(c.drain() for c in conns), return_exceptions=True)
        await self._finalize(export)

    async def _finalize(self, export: NbdExport) -> None:
        for bitmap in export.bitmaps.values():
            bitmap.busy = False
        await self._detach(export)
        self._forget(export)

    def _forget(self, export: NbdExport) -> None:
        if self.exports.get(export.id) is export:
            del self.exports[export.id]
        if export.finished is not None and not export.finished.done():
            export.finished.set_result(None)
        self.events.emit("BLOCK_EXPORT_DELETED", {"id": export.id})

    # --- query-block-exports --------------------------------------------------------------

    def query(self) -> list[dict[str, Any]]:
        return [e.info() for e in reversed(self.exports.values())]

    def status(self) -> list[dict[str, Any]]:
        """Each export with its name and connected clients (``/api/status``)."""
        return [{**e.info(), "name": e.name,
                 "clients": sorted(conn.peer for conn in e.connections)}
                for e in reversed(self.exports.values())]

    # --- daemon shutdown ------------------------------------------------------------------

    def request_shutdown(self) -> None:
        """quit or a signal: stop listening; idle exports go now (events before the reply).

        Exports with clients are drained by :meth:`shutdown`.
        """
        if self._shutdown_requested:
            return
        self._shutdown_requested = True
        if self.server is not None:
            self.server.stop_listening()
            self.server.abort_negotiating()
        for export in list(self.exports.values()):
            if export.shutting_down:
                continue
            self._begin_shutdown(export)
            if export.connections:
                self._drain_later(export)
            else:
                self.block.graph.detach(export.edge)
                self._detached.append(export.node)
                self._forget(export)

    async def shutdown(self) -> None:
        """Drain every export (in-flight requests answered) before nodes close."""
        self.request_shutdown()
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
        for export in list(self.exports.values()):  # pragma: no cover - defensive
            await self._finalize(export)
        for node in self._detached:
            try:
                await self.block.graph.refresh_perms(node)
            except Exception:
                log.exception("releasing node %s", node.node_name)
        self._detached.clear()
        server, self.server = self.server, None
        if server is not None:
            await server.close()


class ExportCollector(Collector):
    """Per-export series for /metrics, read from the live registry at each scrape."""

    def __init__(self, exports: BlockExports) -> None:
        self.exports = exports

    def collect(self) -> Iterable[Any]:
        exports = list(self.exports.exports.values())
        server = self.exports.server
        running = GaugeMetricFamily(
            "qmpd_nbd_server_running", "1 while the NBD server is listening"
        )
        running.add_metric([], 1 if server is not None else 0)
        yield running
        clients = GaugeMetricFamily(
            "qmpd_nbd_server_connections", "Connections to the NBD server (any phase)"
        )
        clients.add_metric([], len(server.connections) if server is not None else 0)
        yield clients
        violations = CounterMetricFamily(
            "qmpd_nbd_protocol_errors",
            "NBD connections dropped for breaking the protocol",
        )
        violations.add_metric([], self.exports.protocol_errors)
        yield violations
        current = GaugeMetricFamily(
            "qmpd_nbd_export_clients", "Clients connected to an export", labels=["export"]
        )
        total = CounterMetricFamily(
            "qmpd_nbd_export_connections", "Clients that connected to an export",
            labels=["export"],
        )
        requests = CounterMetricFamily(
            "qmpd_nbd_export_requests", "NBD requests by export and command",
            labels=["export", "command"],
        )
        nbytes = CounterMetricFamily(
            "qmpd_nbd_export_bytes", "Bytes covered by NBD requests, by export and command",
            labels=["export", "command"],
        )
        errors = CounterMetricFamily(
            "qmpd_nbd_export_errors", "NBD requests answered with an error, by export and command",
            labels=["export", "command"],
        )
        for export in exports:
            stats = export.stats
            current.add_metric([export.id], len(export.connections))
            total.add_metric([export.id], stats.connections_total)
            for command, count in stats.requests.items():
                requests.add_metric([export.id, command], count)
                nbytes.add_metric([export.id, command], stats.bytes[command])
            for command, count in stats.errors.items():
                errors.add_metric([export.id, command], count)
        yield current
        yield total
        yield requests
        yield nbytes
        yield errors
