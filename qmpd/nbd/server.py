"""The asyncio NBD server: a listener and one connection object per client.

Everything protocol-shaped happens in :mod:`qmpd.nbd.protocol`; this module
moves bytes and runs the validated requests against an export.  What it
needs from the exports is the :class:`ServedExport` and :class:`ExportRegistry`
protocols (implemented by :mod:`qmpd.nbd.exports`, which imports this module,
never the other way round).

Per connection:

* requests run concurrently and are answered as soon as they finish, so
  replies may overtake each other (cookies match them up).  A request starts
  at once, in the callback that parsed it, and usually finishes there too;
  only one that has to wait (for the I/O thread pool) continues later;
* at most :data:`MAX_IN_FLIGHT` requests and :data:`MAX_IN_FLIGHT_BYTES` of
  payload are in flight; beyond that, and whenever the client does not read
  its replies (more than :data:`WRITE_HIGH_WATER` queued), the server stops
  reading the socket.  So a connection's memory is bounded and a client that
  stops reading only ever stalls itself;
* a protocol violation (bad magic, unknown client flags, an option or WRITE
  too large to skip) closes the connection; an invalid request gets an error
  reply and the connection goes on, as with QEMU;
* no payload is copied in Python: WRITE data is received into its own
  buffer, replies leave with ``sendmsg`` (those of every request that one
  reader callback completed together, at its end: never held back while the
  client waits), and large READs of a range stored as-is in a host file are
  sent with ``sendfile``;
* one connection never holds the event loop for long (:data:`PUMP_BUDGET`,
  :data:`FLUSH_BUDGET`): other clients and the QMP monitor stay responsive
  while an export runs at full speed.

The listener accepts connections itself so that it can stop accepting while
``max-connections`` clients are connected (QEMU leaves further clients in the
listen backlog, and so does qmpd).
"""

from __future__ import annotations

import asyncio
import errno
import functools
import itertools
import logging
import os
import socket
import time
from collections import deque
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, Protocol

from qmpd import net
from qmpd.errors import GenericError
from qmpd.nbd import protocol as p
from qmpd.nbd.failure import error_reply

log = logging.getLogger(__name__)

#: Requests one connection may have in flight (nbdcopy pipelines 64).
MAX_IN_FLIGHT = 64
#: Payload bytes (READ and WRITE lengths) one connection may have in flight;
#: a single request is always admitted, up to the protocol's 32 MiB.
MAX_IN_FLIGHT_BYTES = 64 * 1024 * 1024
#: Replies queued for a client before it counts as not reading ...
WRITE_HIGH_WATER = 4 * 1024 * 1024
#: ... and until it has read this far down again.
WRITE_LOW_WATER = 1024 * 1024
#: Socket send buffer asked for (the kernel caps it).
SOCKET_BUFFER = 1024 * 1024
_IOV_MAX = 1024
#: Replies (and their bytes) that may wait for the rest of a WRITE payload
#: being received, when no more than HOLD_MISSING bytes of it are to come.
HOLD_REPLIES = 8
HOLD_BYTES = 64 * 1024
HOLD_MISSING = 256 * 1024
#: Bytes one flush sends before yielding the loop (the writer callback,
#: level-triggered, comes back for the rest).
FLUSH_BUDGET = 1024 * 1024
#: Receives one wake-up of the reader may do while the socket fills the
#: buffers, and while a WRITE's payload comes in (the client refills it).
READS_PER_WAKEUP, PAYLOAD_READS_PER_WAKEUP = 4, 16
#: How long one connection may process requests before yielding the loop
#: (to other clients and to the QMP monitor).
PUMP_BUDGET = 0.0005
#: A client must finish its handshake within this many seconds.
HANDSHAKE_TIMEOUT = 10.0
#: How long a drain waits for in-flight requests and unread replies.
DRAIN_TIMEOUT = 5.0


# Commands and flags as plain ints: comparing a request's int with an enum
# member costs an attribute lookup through the enum class per request.
_READ = int(p.Cmd.READ)
_WRITE = int(p.Cmd.WRITE)
_FUA = int(p.CmdFlag.FUA)
_DF = int(p.CmdFlag.DF)
#: How a request started with read_many/write_many completes: (request, data, error).
SoonDone = Callable[[p.Request, Any, BaseException | None], None]


class ServedExport(Protocol):
    """An export as its connections use it: its I/O, its counters, its clients."""

    @property
    def id(self) -> str: ...

    @property
    def node_name(self) -> str: ...

    def size(self) -> int: ...

    def connection_opened(self, conn: NbdConnection) -> None: ...

    def connection_closed(self, conn: NbdConnection) -> None: ...

    def count_error(self, command: str) -> None: ...

    async def read(self, offset: int, length: int,
                   sparse: bool) -> list[tuple[int, int, p.ReadData]]: ...

    @property
    def calls_back(self) -> bool:
        """Whether its node's driver completes requests by calling back (never
        in memory: read_now and write_now would only say no)."""
        ...

    def read_now(self, offset: int, length: int) -> bytes | None: ...

    def io_plug(self) -> Callable[[], None]:
        """Let the node hold back what is submitted until the returned
        function is called (:meth:`BlockNode.io_plug`)."""
        ...

    def write_now(self, offset: int, data: bytes | bytearray, fua: bool) -> bool: ...

    def read_many(self, requests: Sequence[p.Request], structured: bool, done: SoonDone) -> int:
        """Start READs together: how many, from the first (the next is awaited)."""

    def write_many(self, requests: Sequence[p.Request], done: SoonDone) -> int:
        """Start WRITEs together as :meth:`read_many` starts READs."""

    async def write(self, offset: int, data: bytes | bytearray, fua: bool) -> None: ...

    async def write_zeroes(self, offset: int, length: int, no_hole: bool, fast: bool,
                           fua: bool) -> None: ...

    async def trim(self, offset: int, length: int, fua: bool) -> None: ...

    async def flush(self) -> None: ...

    async def cache(self, offset: int, length: int) -> None: ...

    async def block_status(self, offset: int, length: int, req_one: bool, contexts: dict[int, str]
                           ) -> list[tuple[int, list[tuple[int, int]]]]: ...


class ExportRegistry(p.ExportCatalog, Protocol):
    """The server's view of the export registry: the handshake's catalog and more."""

    def export_by_name(self, name: str) -> ServedExport | None: ...

    def stats_protocol_error(self) -> None: ...


class NbdConnection:
    """One client: handshake, then transmission, on a non-blocking socket.

    The connection does its own socket I/O through the loop's reader and
    writer callbacks: requests are received straight into their buffers
    (:meth:`qmpd.nbd.protocol.Transmission.get_buffer`), and replies leave
    with one ``sendmsg`` of their parts (header and data), queued as
    memoryviews when the socket is full, so no payload is copied in Python.

    A request runs eagerly: its coroutine is stepped at once and finishes
    inside the same callback when the block layer does not have to wait;
    only if it suspends does it continue from the future it waits for.
    """

    #: Replies go to the socket as they are (TLS seals them first).
    sends_plain = True

    def __init__(self, server: NbdServer, sock: socket.socket) -> None:
        self.server = server
        self.exports = server.exports
        self.loop = asyncio.get_running_loop()
        self.sock = sock
        self.fd = sock.fileno()
        self.handshake: p.ServerHandshake | None = p.ServerHandshake(server.exports)
        self.tx: p.Transmission | None = None
        self.replies = p.Replies(False)
        self.export: ServedExport | None = None
        self.in_flight = 0
        self.in_flight_bytes = 0
        self.write_paused = False
        self.reading = False
        self.draining = False
        self.closed = False
        self._close_when_idle = False
        self._pumping = False
        self._resume_pending = False
        self._flush_soon = False
        self._unsent_replies = 0
        self._in_reader = False
        self._out: deque[bytes | memoryview | p.FileSpan] = deque()
        self._out_bytes = 0
        self._writing = False
        self._idle = asyncio.Event()
        self._idle.set()
        self._lost: asyncio.Future[None] = self.loop.create_future()
        self._timer: asyncio.TimerHandle | None = None
        self.peer = "?"

    # --- lifecycle ----------------------------------------------------------------------

    def start(self) -> None:
        sock = self.sock
        sock.setblocking(False)
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
            try:
                self.peer = str(sock.getpeername())
            except OSError:
                pass
        else:
            self.peer = "unix"
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER)
        except OSError:
            pass
        self.server.connections.add(self)
        self._timer = self.loop.call_later(HANDSHAKE_TIMEOUT, self._handshake_timeout)
        assert self.handshake is not None
        self._send([self.handshake.data_to_send()])
        self._set_reading(True)

    def _close(self) -> None:
        """Drop the connection now (whatever is queued is lost)."""
        if self.closed:
            return
        self._set_reading(False)
        self.closed = True
        self.draining = True
        if self._writing:
            self.loop.remove_writer(self.fd)
            self._writing = False
        self._out.clear()
        self._out_bytes = 0
        if self._timer is not None:
            self._timer.cancel()
        self.sock.close()
        self.server.connections.discard(self)
        if not self._lost.done():
            self._lost.set_result(None)
        self.server.connection_gone()
        self._release()

    def _release(self) -> None:
        """Leave the export once closed and nothing of ours runs against its node."""
        if self.closed and self.in_flight == 0 and self.export is not None:
            self.export.connection_closed(self)

    def _finish(self, parse_rest: bool = False) -> None:
        """No more requests: answer those in flight, send everything, close.

        ``parse_rest``: requests already received still run (end of input); otherwise nothing
        more is taken.  A client not taking its last replies is dropped after :data:`DRAIN_TIMEOUT`.
        """
        if not parse_rest:
            self.draining = True
        if self._close_when_idle:
            return
        self._close_when_idle = True
        self._set_reading(False)
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self.loop.call_later(DRAIN_TIMEOUT, self._close)

    def _close_after_output(self) -> None:
        """Close once every queued reply has been sent."""
        self._finish()
        if not self._out:
            self._close()
        else:
            self._schedule_flush()

    # --- socket I/O --------------------------------------------------------------------------

    def _set_reading(self, on: bool) -> None:
        if self.closed or on == self.reading:
            return
        if on:
            self.loop.add_reader(self.fd, self._readable)
        else:
            self.loop.remove_reader(self.fd)
        self.reading = on

    def _readable(self) -> None:
        # The replies of every request this callback completes leave together
        # when it ends: one sendmsg (one TLS record) for the batch the client
        # sent, and none held back while the client waits for them.
        self._in_reader = True
        # The requests of one receive go to the driver together.
        unplug = self.export.io_plug() if self.export is not None else None
        try:
            self._receive()
        finally:
            self._in_reader = False
            if unplug is not None:
                unplug()
        if self._unsent_replies and not self.closed and not self._payload_coming():
            self._kick()

    def _payload_coming(self) -> bool:
        """Whether replies may wait for the next reader callback: the client is
        in the middle of a WRITE's payload, which it sends whatever replies it
        gets, so that callback comes soon (and a few replies leave together).
        Bounded: a few small replies, for the last 256 KiB of a payload."""
        tx = self.tx
        return (
            tx is not None and 0 < tx.payload_missing <= HOLD_MISSING and self.reading
            and self._unsent_replies < HOLD_REPLIES and self._out_bytes < HOLD_BYTES
            and not self._close_when_idle
        )

    def _receive(self) -> None:
        # A few receives per wake-up while the socket keeps filling our
        # buffers: fewer trips through the event loop for bulk transfers,
        # within the same time budget as one pump.
        deadline = time.perf_counter() + PUMP_BUDGET
        for count in range(1, PAYLOAD_READS_PER_WAKEUP + 1):
            try:
                if self.tx is not None:
                    tx = self.tx
                    buf = tx.get_buffer()
                    want = len(buf)
                    n = self.sock.recv_into(buf)
                    if n:
                        tx.buffer_updated(n)
                else:
                    want = 65536
                    data = self.sock.recv(want)
                    n = len(data)
                    if n and self.handshake is not None:
                        self.handshake.receive_data(data)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.debug("NBD client %s: %s", self.peer, exc)
                self._close()
                return
            try:
                if not n:
                    self._eof()
                elif self.tx is not None:
                    if not self.tx.payload_missing:  # (else nothing to parse)
                        self._pump()
                else:
                    self._pump_handshake()
            except Exception:  # a bug must not take the daemon down: drop this client
                log.exception("NBD client %s: internal error; disconnecting", self.peer)
                self._close()
                return
            if not self.reading or self._resume_pending:
                return
            # In a payload even a short receive goes on (the client sent more
            # meanwhile): a trip through the event loop and a wake-up saved.
            if not (self.tx is not None and self.tx.payload_missing) \
                    and (n < want or count >= READS_PER_WAKEUP):
                return
            if time.perf_counter() > deadline:
                return

    def _eof(self) -> None:
        # The client sends nothing more: answer what it sent, then close.
        self._set_reading(False)
        if self.tx is None:
            self._close()
            return
        self._finish(parse_rest=True)
        self._pump()

    def _send(self, parts: Sequence[p.ReplyPart], at_once: bool = False) -> None:
        """Queue a reply's parts (in order, never interleaved with another reply's).

        They leave together with whatever else is ready in this turn of the
        loop (one sendmsg for many small replies): at the end of the reader
        callback that received the request, or in a callback scheduled for
        that (for a request that had to wait).  ``at_once``: outside a reader
        callback, they leave now.
        """
        if self.closed:
            return
        out = self._out
        now = at_once and not self._in_reader and not self._pumping
        sent = 0
        if now and not out and self.sends_plain:
            # Straight from its parts (nothing is queued before it); a
            # FileSpan among them (TypeError) goes through the queue.
            try:
                sent = self.sock.sendmsg(parts)  # type: ignore[arg-type]
            except (BlockingIOError, InterruptedError, TypeError):
                pass
            except OSError as exc:
                log.debug("NBD client %s: %s", self.peer, exc)
                self._close()
                return
            if sent and sent == sum(map(len, parts)):
                return  # (nothing left of it)
        for part in parts:
            out.append(part)
            self._out_bytes += len(part)
        self._unsent_replies += 1
        if sent:
            self._consumed(sent)
        if now:
            self._kick()
        elif not self._pumping:
            self._schedule_flush()
        if self._out_bytes > WRITE_HIGH_WATER and not self.write_paused:
            self.write_paused = True
            self._set_reading(False)

    def _schedule_flush(self) -> None:
        """Flush in a callback of its own, soon: replies that complete in the
        same turn of the loop (outside a reader callback) leave together."""
        if self._writing or self.closed or self._flush_soon:
            return
        self._flush_soon = True
        self.loop.call_soon(self._deferred_flush)

    def _deferred_flush(self) -> None:
        self._flush_soon = False
        self._kick()

    def _kick(self) -> None:
        """Send what can go now; wait for the socket to take the rest."""
        if self.closed or self._writing:
            return
        if self._out:
            self._flush()
            if self.closed:
                return
        if self._out:
            self.loop.add_writer(self.fd, self._writable)
            self._writing = True
        self._after_flush()

    def _after_flush(self) -> None:
        """Bookkeeping once the socket took what it could: close, or read again."""
        if not self._out:
            if self._writing:
                self.loop.remove_writer(self.fd)
                self._writing = False
            if self._close_when_idle and self.in_flight == 0 and not self._resume_pending:
                self._close()
                return
        if self.write_paused and self._out_bytes <= WRITE_LOW_WATER:
            self.write_paused = False
            if self.tx is not None:
                if not self._resume_pending:
                    self._resume_pending = True
                    self.loop.call_soon(self._resume)
            elif self.handshake is not None:
                self._set_reading(True)
                self.loop.call_soon(self._resume_handshake)

    def _flush(self) -> None:
        """Send what the socket takes now: buffers with sendmsg, spans with sendfile."""
        out = self._out
        self._unsent_replies = 0
        sock = self.sock
        budget = FLUSH_BUDGET
        while out and budget > 0:
            head = out[0]
            try:
                if isinstance(head, p.FileSpan):
                    sent = os.sendfile(self.fd, head.fd, head.offset, head.length)
                    if sent == 0:  # the file shrank: the promised bytes read as zeros
                        out[0] = memoryview(bytes(head.length))
                        continue
                    self._out_bytes -= sent
                    budget -= sent
                    if sent < head.length:
                        out[0] = p.FileSpan(head.fd, head.offset + sent, head.length - sent)
                        return
                    out.popleft()
                    continue
                buffers: list[bytes | memoryview] = []
                for item in itertools.islice(out, _IOV_MAX):
                    if isinstance(item, p.FileSpan):
                        break
                    buffers.append(item)
                total = sum(map(len, buffers))
                sent = sock.sendmsg(buffers) if len(buffers) > 1 else sock.send(buffers[0])
                if sent == total and len(buffers) == len(out):  # all of it, as usual
                    out.clear()
                    self._out_bytes -= sent
                    return
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if isinstance(head, p.FileSpan) and exc.errno in (errno.EINVAL, errno.ENOSYS):
                    # sendfile cannot do this pair of descriptors: copy instead.
                    out[0] = memoryview(_pread_zero_filled(head))
                    continue
                log.debug("NBD client %s: %s", self.peer, exc)
                self._close()
                return
            budget -= sent
            self._consumed(sent)
            if sent < total:
                return

    def _consumed(self, sent: int) -> None:
        """The socket took the first ``sent`` bytes of the buffers queued."""
        out = self._out
        self._out_bytes -= sent
        while sent:
            first = out[0]
            assert not isinstance(first, p.FileSpan)
            if sent >= len(first):
                sent -= len(first)
                out.popleft()
            else:
                out[0] = memoryview(first)[sent:]
                sent = 0

    def _writable(self) -> None:
        self._flush()
        if not self.closed:
            self._after_flush()

    # --- handshake ------------------------------------------------------------------------

    def _handshake_timeout(self) -> None:
        if self.tx is None and not self.closed:
            log.info("NBD client %s: handshake timed out", self.peer)
            self._close()

    def _pump_handshake(self) -> None:
        hs = self.handshake
        assert hs is not None
        while not self.write_paused and not self.closed:
            event = hs.next_event()
            out = hs.data_to_send()
            if out:
                self._send([out])
            if isinstance(event, p.NeedData):
                return
            if isinstance(event, p.StartTls):
                self._start_tls(event.leftover)
                return
            self.handshake = None
            if isinstance(event, p.HandshakeClosed):
                if event.failed:
                    self._negotiation_failed(event.reason, after_output=True)
                elif event.graceful:
                    log.debug("NBD client %s: %s", self.peer, event.reason)
                    self._close_after_output()
                else:
                    log.info("NBD client %s: %s; disconnecting", self.peer, event.reason)
                    self.exports.stats_protocol_error()
                    self._close()
                return
            self._start_transmission(event)
            return
        self._set_reading(False)

    # --- TLS (after NBD_OPT_STARTTLS) ---------------------------------------------------

    def _negotiation_failed(self, reason: str, after_output: bool = False) -> None:
        log.warning("NBD client %s: option negotiation failed: %s", self.peer, reason)
        self.handshake = None
        if after_output:
            self._close_after_output()
        else:
            self._close()

    def _start_tls(self, leftover: bytes) -> None:
        """STARTTLS was accepted (only a TLS server's handshake does that)."""
        raise NotImplementedError

    def _start_transmission(self, done: p.HandshakeDone) -> None:
        export = self.exports.export_by_name(done.export.name)
        if export is None:  # pragma: no cover - looked up in this very turn
            self._close()
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.export = export
        export.connection_opened(self)
        self.replies = p.Replies(done.structured)
        self.tx = p.Transmission(
            export.size, bool(done.flags & p.TFlag.READ_ONLY), done.structured, done.contexts
        )
        if done.leftover:
            self.tx.receive_data(done.leftover)
        self._pump()

    # --- transmission ----------------------------------------------------------------------

    def _admit(self) -> bool:
        return (
            not self.draining
            and not self.write_paused
            and self.in_flight < MAX_IN_FLIGHT
            and self.in_flight_bytes < MAX_IN_FLIGHT_BYTES
        )

    def _pump(self) -> None:
        if self._pumping or self.closed:
            return  # the outer call goes on with the next event
        tx = self.tx
        assert tx is not None
        self._pumping = True
        deadline = time.perf_counter() + PUMP_BUDGET
        count = 0
        # READs and WRITEs for a driver that calls back go down the graph
        # together (one call per layer, not per request), a run of one kind
        # at a time, in order with the other requests.
        batch: list[p.Request] | None = [] if self.export is not None \
            and self.export.calls_back else None
        try:
            while True:
                while self._admit():
                    count += 1
                    if count & 7 == 0 and time.perf_counter() > deadline:
                        # Long enough: let other clients and the monitor in.
                        if not self._resume_pending:
                            self._resume_pending = True
                            self.loop.call_soon(self._resume)
                        break
                    event = tx.next_event()
                    if isinstance(event, p.Request):
                        if batch is not None:
                            kind = event.type
                            batched = kind == _READ or kind == _WRITE
                            if batch and (not batched or batch[0].type != kind):
                                run, batch = batch, []
                                self._start_many(run)
                            if batched:
                                batch.append(event)
                                self._began(event.length)
                                continue
                        self._start(event)
                    elif isinstance(event, p.NeedData):
                        break
                    elif isinstance(event, p.Rejected):
                        self._rejected(event)
                    elif isinstance(event, p.Disconnect):
                        self._finish()
                    else:
                        # Bad framing: nothing more can be parsed.  What is in
                        # flight is still answered, then the connection closes.
                        log.info("NBD client %s: %s; disconnecting", self.peer, event.reason)
                        self.exports.stats_protocol_error()
                        if event.cookie is not None:
                            self._send([self.replies.error(event.cookie, p.Errno.EINVAL,
                                                           event.reason)])
                        self._finish()
                if not batch:
                    break
                run, batch = batch, []
                self._start_many(run)
                # Those of them answered at once (awaited, and failed) may
                # have made room for requests parsed since: go on with them.
                if self._resume_pending or not (self._admit() and tx.event_ready()):
                    break
        finally:
            try:
                if batch:  # (a bug stopped the loop) what it took is answered
                    self._start_many(batch)
            finally:
                self._pumping = False
        if self.closed:
            return
        if self._unsent_replies and not self._in_reader:
            self._schedule_flush()
        self._set_reading(
            self._admit() and not tx.finished and not self._close_when_idle
            and not self._resume_pending
        )
        if self._close_when_idle and self.in_flight == 0 and not self._resume_pending:
            self._close_after_output()

    def _resume(self) -> None:
        self._resume_pending = False
        if not self.closed:
            self._pump()

    def _resume_handshake(self) -> None:
        if not self.closed and self.handshake is not None:
            self._pump_handshake()

    def _rejected(self, event: p.Rejected) -> None:
        assert self.export is not None
        request = event.request
        self.export.count_error(request.command_name)
        self._send([self.replies.error(request.cookie, event.error, event.message)])
        if event.fatal:
            # The payload was not read: nothing after it can be parsed.
            log.info("NBD client %s: %s; disconnecting", self.peer, event.message)
            self._finish()

    def _start(self, request: p.Request) -> None:
        kind = request.type
        if kind == _WRITE or kind == _READ:
            # Most small requests complete without waiting (those for a
            # driver that calls back need no coroutine either: _start_many).
            export = self.export
            assert export is not None
            size = request.length
            try:
                if kind == _WRITE:
                    payload = request.payload
                    assert payload is not None
                    fua = request.flags & _FUA != 0
                    if export.write_now(request.offset, payload, fua):
                        self._send((self.replies.ok(request.cookie),))
                        # write_now keeps nothing of the payload: the next may reuse it.
                        assert self.tx is not None
                        self.tx.recycle(payload)
                        return
                else:
                    offset = request.offset
                    data = export.read_now(offset, size)
                    if data is not None:
                        self._send(self.replies.read_data(request.cookie, offset, data))
                        return
            except Exception as exc:
                self._send(self._failure(export, request, exc))
                return
        else:
            size = 0
        self._began(size)
        self._step(self._execute(request, size))

    def _start_many(self, batch: list[p.Request]) -> None:
        """Start READs (or WRITEs) parsed together, and counted in flight, in
        order; one that cannot start so is awaited where it stands."""
        export = self.export
        assert export is not None
        while batch:
            try:
                if batch[0].type == _READ:
                    started = export.read_many(batch, self.replies.structured, self._soon_done)
                else:
                    started = export.write_many(batch, self._soon_done)
            except Exception as exc:
                # A bug: the layers raise before they submit anything, so
                # none of these started; each is answered, once.
                log.exception("NBD client %s: internal error starting requests", self.peer)
                for request in batch:
                    self._ended(request.length, self._failure(export, request, exc))
                return
            if started == len(batch):
                return
            request = batch[started]
            self._step(self._execute(request, request.length))
            batch = batch[started + 1:]

    def _began(self, size: int) -> None:
        if not self.in_flight:
            self._idle.clear()
        self.in_flight += 1
        self.in_flight_bytes += size

    def _soon_done(self, request: p.Request, data: Any, error: BaseException | None) -> None:
        """A READ or WRITE started with read_many/write_many completed."""
        export = self.export
        assert export is not None
        if error is not None:
            parts: Sequence[p.ReplyPart] = self._failure(export, request, error)
        elif request.type == _READ:
            parts = self.replies.read_data(request.cookie, request.offset, data)
        else:
            parts = (self.replies.ok(request.cookie),)
        payload = request.payload
        if payload is not None and self.tx is not None \
                and len(payload) >= p.Transmission.RECYCLE_MIN:
            # Nothing holds a WRITE's payload once the driver has completed
            # it: the next WRITE of its length may be received into it.
            self.tx.recycle(payload)
        # Sent at once, not with the others the driver completes in this
        # callback: the client works on it while they are answered (its
        # requests and ours then overlap instead of moving in one convoy).
        self._ended(request.length, parts, at_once=True)

    def _ended(self, size: int, parts: Sequence[p.ReplyPart], at_once: bool = False) -> None:
        self.in_flight -= 1
        self.in_flight_bytes -= size
        self._send(parts, at_once)
        if self.in_flight == 0:
            self._idle.set()
        if self.closed:
            self._release()
            return
        tx = self.tx
        if self.reading and not self._close_when_idle and tx is not None \
                and not tx.event_ready():
            return  # still reading, nothing parsed waits: a pump would find nothing
        self._pump()

    def _step(self, coro: Coroutine[Any, Any, None], _done: object = None) -> None:
        """Run ``coro`` until it finishes or waits; continue when its future is done.

        This is what an asyncio Task does, minus the Task: most requests
        complete without ever waiting, and then cost no Task at all.  It is
        Python 3.12's ``asyncio.eager_task_factory``, which 3.11 lacks; a
        Task per request costs 40-65 % more server CPU per 4 KiB request
        (tests/bench/nbd_bench.py).  Like a Task, the stepper must clear the
        future's ``_asyncio_future_blocking`` (asyncio's documented marker of
        future-like objects) as soon as it takes the future: while it is set,
        anyone else awaiting that future gets "await wasn't used with future".
        """
        try:
            waited = coro.send(None)
        except StopIteration:
            return
        if waited is None:  # a bare yield (asyncio.sleep(0))
            self.loop.call_soon(self._step, coro)
            return
        waited._asyncio_future_blocking = False
        waited.add_done_callback(functools.partial(self._step, coro))

    async def _execute(self, request: p.Request, size: int) -> None:
        export = self.export
        assert export is not None
        try:
            parts = await self._run(export, request)
        except Exception as exc:
            parts = self._failure(export, request, exc)
        self._ended(size, parts)

    def _failure(
        self, export: ServedExport, request: p.Request, exc: BaseException
    ) -> list[p.ReplyPart]:
        """The error reply of a request that raised ``exc``, counted and logged."""
        export.count_error(request.command_name)
        return [error_reply(self.replies, request, exc, export.node_name, export.id)]

    async def _run(self, export: ServedExport, request: p.Request) -> list[p.ReplyPart]:
        kind = request.type
        cookie = request.cookie
        flags = request.flags
        if kind == _READ:
            pieces = await export.read(
                request.offset, request.length,
                sparse=self.replies.structured and not flags & _DF,
            )
            return self.replies.read_parts(cookie, request.offset, pieces)
        if kind == _WRITE:
            assert request.payload is not None
            await export.write(request.offset, request.payload, bool(flags & _FUA))
        elif kind == p.Cmd.WRITE_ZEROES:
            await export.write_zeroes(
                request.offset, request.length,
                no_hole=bool(flags & p.CmdFlag.NO_HOLE),
                fast=bool(flags & p.CmdFlag.FAST_ZERO),
                fua=bool(flags & p.CmdFlag.FUA),
            )
        elif kind == p.Cmd.TRIM:
            await export.trim(request.offset, request.length, bool(flags & p.CmdFlag.FUA))
        elif kind == p.Cmd.FLUSH:
            await export.flush()
        elif kind == p.Cmd.CACHE:
            await export.cache(request.offset, request.length)
        elif kind == p.Cmd.BLOCK_STATUS:
            assert self.tx is not None
            per_context = await export.block_status(
                request.offset, request.length, bool(flags & p.CmdFlag.REQ_ONE),
                self.tx.contexts,
            )
            return [self.replies.block_status(cookie, per_context)]
        return [self.replies.ok(cookie)]

    # --- shutdown ----------------------------------------------------------------------------

    def abort(self) -> None:
        self._close()

    async def drain(self, timeout: float = DRAIN_TIMEOUT) -> None:
        """Stop taking requests, answer those in flight, flush replies, close.

        Returns once no request of this connection runs any more, even one
        whose client went away: only then may its node be released.
        """
        self.draining = True
        self._set_reading(False)
        if not self.closed:
            if self.tx is None:  # still negotiating: nothing to finish
                self._close()
            else:
                try:
                    await asyncio.wait_for(self._idle.wait(), timeout)
                    self._close_after_output()
                    await asyncio.wait_for(asyncio.shield(self._lost), timeout)
                except TimeoutError:
                    log.warning("NBD client %s did not finish in %.0f s; dropped",
                                self.peer, timeout)
                    self._close()
        await self._idle.wait()


def _pread_zero_filled(span: p.FileSpan) -> bytes:
    data = os.pread(span.fd, span.length, span.offset)
    return data + bytes(span.length - len(data))


class NbdServer:
    """The daemon's NBD server: one listening socket, any number of exports."""

    def __init__(
        self, exports: ExportRegistry, address: net.SocketAddress, max_connections: int = 0,
        connection: Callable[[NbdServer, socket.socket], NbdConnection] | None = None,
    ) -> None:
        self.exports = exports
        #: Makes the connection object for an accepted socket (a TLS server
        #: passes :class:`qmpd.nbd.tls.TlsConnection`).
        self.connection = connection or NbdConnection
        self.address = address
        self.max_connections = max_connections
        self.connections: set[NbdConnection] = set()
        #: Refused clients, read until they hang up (they hold no slot).
        self.lingering: set[NbdConnection] = set()
        self.sock: socket.socket | None = None
        self.bound = str(address)
        self._accept_task: asyncio.Task[None] | None = None
        self._slot_free = asyncio.Event()
        self._unix: net.UnixListener | None = None

    @property
    def multi_conn(self) -> bool:
        """Every connection goes through the same node: FLUSH/FUA are global."""
        return self.max_connections != 1

    async def start(self) -> None:
        try:
            listening = net.listen(self.address)
        except net.ListenFailed as exc:
            raise GenericError(exc.desc) from None
        self._unix = listening.unix
        self.sock = listening.sock
        if isinstance(self.address, net.InetAddress):
            host, port = self.sock.getsockname()[:2]
            self.bound = str(net.InetAddress(host, str(port)))
        self._accept_task = asyncio.get_running_loop().create_task(self._accept_loop())

    def connection_gone(self) -> None:
        self._slot_free.set()

    async def _accept_loop(self) -> None:
        assert self.sock is not None
        listener = self.sock
        while True:
            while self.max_connections and len(self.connections) >= self.max_connections:
                self._slot_free.clear()
                await self._slot_free.wait()
            try:
                conn, _addr = await net.accept(listener)
            except asyncio.CancelledError:
                raise
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    log.warning("NBD server: cannot accept: %s", exc.strerror)
                    await asyncio.sleep(0.1)
                    continue
                if listener.fileno() < 0:
                    return
                log.warning("NBD server: accept failed: %s", exc)
                continue
            self.connection(self, conn).start()

    def stop_listening(self) -> None:
        """Close the listening socket (synchronously); connections stay."""
        if self._accept_task is not None:
            self._accept_task.cancel()
            self._accept_task = None
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        if self._unix is not None:
            self._unix.unlink()
            self._unix = None

    def abort_negotiating(self) -> None:
        """Drop clients that have not reached an export yet."""
        for conn in [*self.connections, *self.lingering]:  # (lingering: refused)
            if conn.export is None:
                conn.abort()

    async def close(self) -> None:
        self.stop_listening()
        for conn in list(self.lingering):
            conn.abort()
        conns = list(self.connections)
        await asyncio.gather(*(c.drain() for c in conns), return_exceptions=True)
