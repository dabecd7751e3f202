"""The thin asyncio layer: monitor listeners and client connections.

Each connection is an :class:`asyncio.Protocol` that feeds whole buffers to
its :class:`~qmpd.qmp.session.QMPSession` and writes what comes back.
Requests of one connection run one at a time, in order; different
connections never wait for each other.  A client that stops reading is
paused (no more of its requests run) and, if events keep piling up for it
past the output limit, disconnected.  The server owns the tasks of commands in
flight: closing it cancels those still running, so none outlives it.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import inspect
import logging
import os
import socket
import ssl
from collections import deque
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from qmpd import eager, logs, net
from qmpd.errors import GenericError
from qmpd.net import StdioAddress, UnixAddress
from qmpd.qmp.budget import QMPInputBudget
from qmpd.qmp.config import DEFAULT_OUTPUT_LIMIT
from qmpd.qmp.config import MonitorConfig as MonitorConfig  # re-exported for the daemon
from qmpd.qmp.session import Incoming, QMPSession, Request

if TYPE_CHECKING:
    from qmpd.metrics import Metrics
    from qmpd.qmp.dispatch import Dispatcher
    from qmpd.qmp.events import EventBus

log = logging.getLogger(__name__)

#: Parsed requests a connection may hold before it stops reading its socket.
MAX_QUEUED_REQUESTS = 8
#: Requests of one connection run back to back before others get a turn.
MAX_REQUESTS_PER_TURN = 64
#: Output buffered for one client before it counts as not reading.
WRITE_HIGH_WATER = 256 * 1024


@dataclass(frozen=True)
class MonitorTls:
    """TLS on a monitor: the context, and who may talk once the handshake is done."""

    context: ssl.SSLContext
    #: Seconds a client may take to finish its handshake before it is dropped.
    handshake_timeout: float
    #: Given the peer's verified certificate (None without one): why it is refused, or None.
    authorize: Callable[[dict[str, Any] | None], str | None] | None = None
    #: Client monitors: the name the server's certificate must carry.
    hostname: str | None = None
class QMPConnection(asyncio.Protocol):
    """One client of one monitor."""

    def __init__(self, monitor: Monitor) -> None:
        self.monitor = monitor
        server = monitor.server
        self.session = QMPSession(
            server.version, pretty=monitor.config.pretty, budget=server.input_budget
        )
        self.pretty = monitor.config.pretty
        self.transport: asyncio.Transport | None = None
        self.queue: deque[Incoming] = deque()
        self.busy = False
        self.write_paused = False
        self.read_paused = False
        self.closed = False
        self.eof = False
        self._batch: list[bytes] | None = None
        #: Events to write at the end of this callback (see send_event).
        self._events: list[bytes] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._batch_size = 0
        self._fd_sock: socket.socket | None = None

    # --- asyncio callbacks ---------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, so no
        # isinstance check: any stream transport will do.
        stream = cast(asyncio.Transport, transport)
        self.transport = stream
        self._loop = asyncio.get_running_loop()
        tls = self.monitor.tls
        if tls is not None and tls.authorize is not None:
            # After the handshake, before the greeting: a refused client sees nothing.
            refused = tls.authorize(net.peer_certificate(transport))
            if refused is not None:
                log.warning("%s: client refused: %s", self.monitor.config.id, refused)
                self.closed = True
                stream.abort()
                return
        stream.set_write_buffer_limits(high=WRITE_HIGH_WATER)
        self.monitor.attach(self)
        if isinstance(self.monitor.config.address, UnixAddress):
            self._take_over_reading(stream)
        self._write(self.session.greeting())

    # --- file descriptors over UNIX sockets (getfd) -------------------------------

    def _take_over_reading(self, transport: asyncio.Transport) -> None:
        """Read with recvmsg ourselves, so SCM_RIGHTS descriptors arrive too.

        The transport still does all the writing.  Only asyncio's own loop
        lets two parties share a descriptor like this; under other loops
        (uvloop) descriptors cannot be passed.
        """
        loop = asyncio.get_running_loop()
        sock = transport.get_extra_info("socket")
        if sock is None or not isinstance(loop, asyncio.SelectorEventLoop):
            return
        try:
            transport.pause_reading()
            self._fd_sock = socket.socket(fileno=os.dup(sock.fileno()))
            self._fd_sock.setblocking(False)
            loop.add_reader(self._fd_sock.fileno(), self._on_readable)
        except (OSError, RuntimeError, NotImplementedError):
            self._fd_sock = None
            transport.resume_reading()

    def _on_readable(self) -> None:
        sock = self._fd_sock
        if sock is None:
            return
        try:
            data, ancdata, _flags, _addr = sock.recvmsg(
                256 * 1024, socket.CMSG_SPACE(16 * 4)
            )
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._stop_fd_reading()
            if self.transport is not None:
                self.transport.abort()
            return
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                usable = len(payload) - len(payload) % 4
                for fd in array.array("i", payload[:usable]):
                    self.session.add_passed_fd(fd)
        if not data:
            self._stop_fd_reading()
            self.eof_received()
            return
        self.data_received(data)

    def _stop_fd_reading(self) -> None:
        sock = self._fd_sock
        if sock is None:
            return
        self._fd_sock = None
        try:
            asyncio.get_running_loop().remove_reader(sock.fileno())
        except RuntimeError:
            pass
        sock.close()

    def data_received(self, data: bytes) -> None:
        try:
            dispatcher = self.monitor.server.dispatcher
            for item in self.session.receive_data(data):
                if isinstance(item, Request) and dispatcher.runs_out_of_band(self.session, item):
                    # OOB handlers are synchronous: the reply is bytes.
                    self._write(cast(bytes, dispatcher.dispatch(self.session, item)))
                    self.session.request_done(item)
                else:
                    self.queue.append(item)
        except Exception:  # a parser bug must not take the connection down
            log.exception("%s: cannot parse client input; input dropped", self.monitor.config.id)
            self.session.reset_input()
        self._process()

    def eof_received(self) -> bool | None:
        # QEMU notices end of input only after running what came before it,
        # so a client that half-closes still gets every reply.
        self.eof = True
        self._process()
        # TLS has no half-close: its transport closes whatever we answer.
        return None if self.monitor.tls is not None else True

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._stop_fd_reading()
        self.queue.clear()
        self.session.reset_input()
        self.session.close_passed_fds()
        self.monitor.detach(self)

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        self._process()

    # --- work ------------------------------------------------------------

    def _process(self) -> None:
        # Everything written while this runs (replies, and events raised by
        # these commands) goes out in one write, in order.
        if self._batch is not None:
            return
        self._flush_events()  # what was emitted before goes before the batch
        self._batch = []
        self._batch_size = 0
        try:
            self._run_queue()
        finally:
            self._flush_batch()
            self._batch = None
        if self.eof and not self.queue and not self.busy:
            self.close()
            return
        self._flow_control()

    def _flush_batch(self) -> None:
        batch = self._batch
        if batch:
            self._batch = []
            self._batch_size = 0
            if self.transport is not None and not self.closed:
                self.transport.write(b"".join(batch))

    def _run_queue(self) -> None:
        server = self.monitor.server
        dispatcher = server.dispatcher
        queue = self.queue
        done = 0
        while queue and not self.busy and not self.write_paused and not self.closed:
            if server.closing:
                return
            if self._batch_size > WRITE_HIGH_WATER:
                self._flush_batch()  # may pause writing: re-checked above
                continue
            done += 1
            if done > MAX_REQUESTS_PER_TURN:
                # Let other clients in; carry on at the next loop iteration.
                asyncio.get_running_loop().call_soon(self._process)
                return
            item = queue.popleft()
            if isinstance(item, bytes):
                self._write(item)
                continue
            try:
                reply = dispatcher.dispatch(self.session, item)
            except Exception as exc:  # e.g. a reply that cannot be encoded
                log.exception("%s: %s failed", self.monitor.config.id, item.command)
                reply = self.session.error_reply(item, GenericError(f"internal error: {exc}"))
            if not isinstance(reply, bytes):
                # A coroutine command starts here and now; most end here too
                # (no task, no turn of the loop), the others go on in a task.
                try:
                    finished, value = eager.start(reply)
                except asyncio.CancelledError:  # as a cancelled task: no reply
                    self.session.request_done(item)
                    continue
                if not finished:
                    self.busy = True
                    server.run_command(
                        self._finish(item, cast("eager.Started[bytes]", value)), reply)
                    return
                reply = cast(bytes, value)
            self.session.request_done(item)
            self._write(reply)

    async def _finish(self, request: Request, reply: eager.Started[bytes]) -> None:
        try:
            data = await reply
        finally:
            self.busy = False
            self.session.request_done(request)
        if not self.closed:
            self._write(data)
            self._process()

    def _flow_control(self) -> None:
        transport = self.transport
        if transport is None or self.closed:
            return
        backlog = len(self.queue) > MAX_QUEUED_REQUESTS or self.write_paused
        if backlog and not self.read_paused:
            self.read_paused = True
            if self._fd_sock is not None:
                asyncio.get_running_loop().remove_reader(self._fd_sock.fileno())
            else:
                transport.pause_reading()
        elif not backlog and self.read_paused:
            self.read_paused = False
            if self._fd_sock is not None:
                asyncio.get_running_loop().add_reader(self._fd_sock.fileno(), self._on_readable)
            else:
                transport.resume_reading()

    def _write(self, data: bytes) -> None:
        if self._events:  # events emitted before this come first
            self._flush_events()
        if self._batch is not None:
            self._batch.append(data)
            self._batch_size += len(data)
            return
        transport = self.transport
        if transport is None or self.closed:
            return
        transport.write(data)

    def send_event(self, plain: bytes, pretty: bytes | None) -> None:
        if self.session.negotiating or self.closed or self.transport is None:
            return
        data = pretty if self.pretty and pretty is not None else plain
        if self._batch is not None:
            self._write(data)
            self._check_backlog()
            return
        # Outside a command's batch (a job, a migration): written once this
        # callback is over, with every event it emits after this one, in one
        # write; a reply or a batch that comes first sends them first.  The
        # migration source's downtime, from STOP to completed, then has no
        # write to the client in it (QEMU 7.2 writes its events at once).
        if not self._events:
            try:
                # The loop that runs the transport (no getpid() of
                # asyncio.get_running_loop on every event).
                (self._loop or asyncio.get_running_loop()).call_soon(self._flush_events)
            except RuntimeError:  # the loop is closed (shutdown): at once, as before
                self._write(data)
                self._check_backlog()
                return
        self._events.append(data)

    def _flush_events(self) -> None:
        events = self._events
        if not events:
            return
        self._events = []
        transport = self.transport
        if transport is None or self.closed:
            return
        transport.write(events[0] if len(events) == 1 else b"".join(events))
        self._check_backlog()

    def _check_backlog(self) -> None:
        # Replies cannot pile up (requests stop running while output is
        # unread); events can, so they are what the output limit bounds.
        transport = self.transport
        if transport is None or self.closed:
            return
        if transport.get_write_buffer_size() > self.monitor.server.output_limit:
            log.warning(
                "%s: client does not read its output (%d bytes queued); disconnecting",
                self.monitor.config.id,
                transport.get_write_buffer_size(),
            )
            if self.monitor.server.metrics is not None:
                self.monitor.server.metrics.disconnects_for_backlog.inc()
            self.closed = True
            transport.abort()

    def close(self) -> None:
        self._flush_events()
        if self.transport is not None and not self.closed:
            self.transport.close()


class Monitor:
    """A listening QMP monitor and its connected clients."""

    def __init__(self, server: QMPServer, config: MonitorConfig,
                 tls: MonitorTls | None = None) -> None:
        self.server = server
        self.config = config
        self.tls = tls
        #: TLS monitors accept and shake hands themselves (one task per client).
        self._listen_sock: socket.socket | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.connections: set[QMPConnection] = set()
        self.listener: asyncio.AbstractServer | None = None
        self.unix: net.UnixListener | None = None
        self.bound: str | None = None  # where it really listens (port 0 resolved)
        self.stopped = False
        #: Connections made before start-up ended (client mode, wait=on).
        self._pending: list[socket.socket] = []

    @property
    def listening(self) -> bool:
        if self.stopped:
            return False
        if self.listener is None:
            return self.bound is not None  # stdio, client and TLS monitors
        return self.listener.is_serving()

    async def start(self) -> None:
        """Listen (or connect); clients are served only from :meth:`serve` on."""
        loop = asyncio.get_running_loop()
        config = self.config
        address = config.address
        if isinstance(address, StdioAddress):
            self.bound = str(address)
            return
        if config.client:
            self._pending.append(await net.connect(address))
            self.bound = f"{address} (client)"
            return
        listening = net.listen(address, mode=0o600)
        self.unix = listening.unix
        listen_sock = listening.sock
        self.bound = str(listening.address)
        try:
            if config.wait:
                logs.write_raw(f"{logs.PROG}: info: waiting for connection on: "
                               f"disconnected:{self.bound},server=on")
                conn_sock, _ = await net.accept(listen_sock)
                self._pending.append(conn_sock)
            if self.tls is not None:
                self._listen_sock = listen_sock
                return
            self.listener = await loop.create_server(
                lambda: QMPConnection(self), sock=listen_sock, backlog=128,
                start_serving=False,
            )
        except BaseException:
            listen_sock.close()
            if self.unix is not None:
                self.unix.unlink()
                self.unix = None
            raise

    async def serve(self) -> None:
        """Start-up is over: greet the clients that connected meanwhile, and new ones."""
        loop = asyncio.get_running_loop()
        if isinstance(self.config.address, StdioAddress):
            await self._serve_stdio()
        if self.tls is not None:
            for sock in self._pending:
                self._spawn(self._handshake(sock))
            self._pending.clear()
            if self._listen_sock is not None:
                self._spawn(self._accept_loop(self._listen_sock))
            return
        for sock in self._pending:
            await loop.connect_accepted_socket(lambda: QMPConnection(self), sock)
        self._pending.clear()
        if self.listener is not None:
            await self.listener.start_serving()

    # --- TLS: accept, then shake hands in a task per client ---------------------------

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _accept_loop(self, listen_sock: socket.socket) -> None:
        async for sock, _ in net.accept_each(listen_sock, lambda: not self.stopped,
                                             self.config.id):
            self._spawn(self._handshake(sock))

    async def _handshake(self, sock: socket.socket) -> None:
        """One client's handshake: a failure or a stall costs only this client."""
        tls = self.tls
        assert tls is not None
        try:
            peer = sock.getpeername()
        except OSError:
            peer = "?"
        try:
            if self.config.client:
                await net.tls_connect(sock, tls.context, lambda: QMPConnection(self),
                                      tls.hostname, tls.handshake_timeout)
            else:
                await net.tls_accept(sock, tls.context, lambda: QMPConnection(self),
                                     tls.handshake_timeout)
        except net.TlsFailed as exc:
            log.warning("%s: TLS handshake with %s failed: %s", self.config.id,
                        _peer_text(peer), exc)

    async def _serve_stdio(self) -> None:
        loop = asyncio.get_running_loop()
        conn = QMPConnection(self)
        # Own duplicates: the transports close them, not the process's 0 and 1.
        writer = os.fdopen(os.dup(1), "wb", buffering=0)
        out: asyncio.WriteTransport | None
        try:
            out, _ = await loop.connect_write_pipe(asyncio.BaseProtocol, writer)
        except ValueError:  # a regular file: written synchronously
            out = None
        conn.connection_made(_StdioTransport(out, writer))
        reader = os.fdopen(os.dup(0), "rb", buffering=0)
        try:
            await loop.connect_read_pipe(lambda: _StdinReader(conn), reader)
        except ValueError:  # a regular file: all of it is there already
            data = reader.read()
            reader.close()
            conn.data_received(data)
            conn.eof_received()

    def attach(self, conn: QMPConnection) -> None:
        self.connections.add(conn)
        self.server.events.subscribe(conn)
        metrics = self.server.metrics
        if metrics is not None:
            metrics.connections.labels(self.config.id).inc()
            metrics.clients.labels(self.config.id).inc()

    def detach(self, conn: QMPConnection) -> None:
        if conn in self.connections:
            self.connections.discard(conn)
            metrics = self.server.metrics
            if metrics is not None:
                metrics.clients.labels(self.config.id).dec()
        self.server.events.unsubscribe(conn)

    async def stop(self) -> None:
        """Stop listening, close every client, remove the socket file."""
        self.stopped = True
        if self.listener is not None:
            self.listener.close()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        if self._listen_sock is not None:
            self._listen_sock.close()
            self._listen_sock = None
        for conn in list(self.connections):
            conn.close()
        for sock in self._pending:
            sock.close()
        self._pending.clear()
        if self.unix is not None:
            self.unix.unlink()
            self.unix = None
        if self.listener is not None:
            try:
                await asyncio.wait_for(self.listener.wait_closed(), 2.0)
            except TimeoutError:
                pass
            self.listener = None


class QMPServer:
    """All monitors of the daemon, sharing one dispatcher and event bus."""

    def __init__(
        self,
        version: dict[str, Any],
        dispatcher: Dispatcher,
        events: EventBus,
        metrics: Metrics | None = None,
        output_limit: int = DEFAULT_OUTPUT_LIMIT,
        input_budget: QMPInputBudget | None = None,
    ) -> None:
        self.version = version
        self.dispatcher = dispatcher
        self.events = events
        self.metrics = metrics
        self.output_limit = output_limit
        #: Shared by every connection: unfinished input across all clients.
        self.input_budget = input_budget if input_budget is not None else QMPInputBudget()
        self.monitors: list[Monitor] = []
        #: Once set, no more requests are dispatched.
        self.closing = False
        self._commands: set[asyncio.Task[None]] = set()

    async def add_monitor(self, config: MonitorConfig, tls: MonitorTls | None = None) -> Monitor:
        monitor = Monitor(self, config, tls)
        await monitor.start()
        self.monitors.append(monitor)
        return monitor

    async def serve(self) -> None:
        """Serve every monitor's clients (after start-up, as QEMU's main loop does)."""
        for monitor in self.monitors:
            await monitor.serve()

    def run_command(
        self, finish: Coroutine[Any, Any, None], reply: Coroutine[Any, Any, bytes]
    ) -> None:
        """Run a coroutine command's ``finish`` (which awaits ``reply``) in a task we own."""
        task = asyncio.get_running_loop().create_task(finish)
        self._commands.add(task)
        task.add_done_callback(lambda done: self._command_done(done, reply))

    def _command_done(self, task: asyncio.Task[None], reply: Coroutine[Any, Any, bytes]) -> None:
        self._commands.discard(task)
        if inspect.getcoroutinestate(reply) == inspect.CORO_SUSPENDED:
            # Started in its first step, cancelled before its task went on:
            # the cancel reaches it where it waits, as a task's would.
            with contextlib.suppress(BaseException):
                reply.throw(asyncio.CancelledError())
        reply.close()
        if not task.cancelled() and task.exception() is not None:
            log.error("command task failed", exc_info=task.exception())

    async def cancel_commands(self) -> None:
        """Stop dispatching; cancel the commands in flight and wait until they have ended."""
        self.closing = True
        while self._commands:
            tasks = list(self._commands)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def close(self) -> None:
        """Graph changes have ended by now: what still runs is cancelled, unanswered."""
        await self.cancel_commands()
        for monitor in self.monitors:
            await monitor.stop()


def _peer_text(peer: Any) -> str:
    if isinstance(peer, tuple) and len(peer) >= 2:
        host = f"[{peer[0]}]" if ":" in str(peer[0]) else str(peer[0])
        return f"{host}:{peer[1]}"
    return str(peer)


class _StdioTransport(asyncio.Transport):
    """stdout for a stdio monitor: its pipe transport, or plain writes to a file."""

    def __init__(self, out: asyncio.WriteTransport | None, file: Any) -> None:
        super().__init__()
        self.out = out
        self.file = file

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self.out is not None:
            self.out.write(data)
        elif not self.file.closed:
            self.file.write(data)

    def get_write_buffer_size(self) -> int:
        return self.out.get_write_buffer_size() if self.out is not None else 0

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        if self.out is not None:
            self.out.set_write_buffer_limits(high, low)

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def is_closing(self) -> bool:
        return self.out.is_closing() if self.out is not None else self.file.closed

    def close(self) -> None:
        if self.out is not None:
            self.out.close()
        else:
            self.file.close()

    def abort(self) -> None:
        if self.out is not None:
            self.out.abort()
        else:
            self.file.close()


class _StdinReader(asyncio.Protocol):
    """Feeds stdin to a stdio monitor's connection; end of input stops only it."""

    def __init__(self, conn: QMPConnection) -> None:
        self.conn = conn

    def data_received(self, data: bytes) -> None:
        self.conn.data_received(data)

    def eof_received(self) -> bool | None:
        self.conn.eof_received()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.conn.monitor.detach(self.conn)
