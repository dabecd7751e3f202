"""HTTP endpoints on the daemon's own loop: liveness, readiness, metrics, status.

Plain HTTP, or HTTPS with a ``tls-creds-x509`` object (:class:`HttpsListener`:
each client's handshake in a task of its own, bounded by the handshake
timeout, its failure logged; an authz checks the client's DN before aiohttp
sees a byte).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import json
import logging
import os
import socket
import ssl
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import TYPE_CHECKING, Any, Protocol, cast

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from qmpd import net

if TYPE_CHECKING:
    from qmpd.metrics import Metrics


class HealthService(Protocol):
    """What the HTTP endpoints need from the daemon, and nothing more."""

    @property
    def metrics(self) -> Metrics | None:
        """Made whenever --http is given (None only for a daemon without HTTP)."""

    def health(self) -> dict[str, Any]: ...

    def readiness_problems(self) -> list[str]: ...

    def run_state(self) -> str: ...

    def migration_failure(self) -> str | None: ...

    def status(self) -> dict[str, Any]: ...

    def watch(self, changed: Callable[[], None]) -> Callable[[], None]:
        """Call ``changed`` on every event; returns the way to stop."""


DAEMON_KEY: web.AppKey[HealthService] = web.AppKey("daemon")


class _Streams:
    """The status streams open, and the one status they all send.

    Every stream wakes on the same events, so the status is made once per
    change (or once per tick) and shared: N open pages cost what one does.
    """

    def __init__(self) -> None:
        self.open: set[asyncio.Event] = set()
        self.closing = False
        self.generation = 0
        self._stop: Callable[[], None] | None = None
        self._made: tuple[int, float, bytes] | None = None

    def join(self, daemon: HealthService, changed: asyncio.Event) -> None:
        if not self.open:
            self._stop = daemon.watch(self._changed)
        self.open.add(changed)

    def leave(self, changed: asyncio.Event) -> None:
        self.open.discard(changed)
        if not self.open and self._stop is not None:
            self._stop()
            self._stop = None
            self._made = None

    def _changed(self) -> None:
        self.generation += 1
        for changed in self.open:
            changed.set()

    def body(self, daemon: HealthService) -> bytes:
        """The status as one SSE message, made again only after a change or
        when the last one is older than half a tick (progress moves silently)."""
        now = time.monotonic()
        made = self._made
        if made is None or made[0] != self.generation or now - made[1] >= STATUS_TICK / 2:
            made = (self.generation, now,
                    b"data: " + _compact(daemon.status()).encode() + b"\n\n")
            self._made = made
        return made[2]


STREAMS_KEY: web.AppKey[_Streams] = web.AppKey("streams", _Streams)

#: A status stream's longest silence (what moves without an event: progress).
STATUS_TICK = 1.0
#: Events closer together than this are answered by one status.
STATUS_COALESCE = 0.05

log = logging.getLogger("qmpd")

#: Given a TLS client's verified certificate (None without one): why it is refused, or None.
Authorize = Callable[[dict[str, Any] | None], str | None]

#: A connection must complete a request within this many seconds of opening
#: or of its previous response, or it is closed (idle and slow clients alike).
REQUEST_TIMEOUT = 10.0
#: Connections served at once; more are closed as they arrive, so HTTP
#: clients can never use up the descriptors QMP and the block layer need.
MAX_CONNECTIONS = 100


async def health(request: web.Request) -> web.Response:
    """200 whenever the event loop answers at all."""
    daemon = request.app[DAEMON_KEY]
    return web.json_response(daemon.health())


async def ready(request: web.Request) -> web.Response:
    """200 when the daemon serves its job, 503 with the reasons otherwise."""
    daemon = request.app[DAEMON_KEY]
    reasons = daemon.readiness_problems()
    body: dict[str, Any]
    if reasons:
        body = {"status": "not-ready", "reasons": reasons}
    else:
        body = {"status": "ready", "run-state": daemon.run_state()}
    # A failed migration leaves the source running (ready), but says why it failed.
    failure = daemon.migration_failure()
    if failure is not None:
        body["migration-failed"] = failure
    return web.json_response(body, status=503 if reasons else 200)


async def api_status(request: web.Request) -> web.Response:
    """The daemon at a glance, as JSON (schema/http/status.json)."""
    return web.json_response(request.app[DAEMON_KEY].status(), dumps=_compact)


#: JSON without the spaces (a third smaller at 1000 nodes, and quicker to make).
_compact = functools.partial(json.dumps, separators=(",", ":"))


async def page(request: web.Request) -> web.Response:
    """The status page: one file of HTML, CSS and script, nothing fetched elsewhere."""
    return web.Response(body=_page(), content_type="text/html", charset="utf-8")


@functools.cache
def _page() -> bytes:
    with open(os.path.join(os.path.dirname(__file__), "page", "index.html"), "rb") as f:
        return f.read()


async def api_events(request: web.Request) -> web.StreamResponse:
    """Server-sent events: the status now, again after each event (bursts
    coalesced) and every :data:`STATUS_TICK` seconds (job progress)."""
    daemon = request.app[DAEMON_KEY]
    streams = request.app[STREAMS_KEY]
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                       "Cache-Control": "no-cache"})
    await resp.prepare(request)
    changed = asyncio.Event()
    streams.join(daemon, changed)
    try:
        while not streams.closing:
            changed.clear()
            await resp.write(streams.body(daemon))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), STATUS_TICK)
            await asyncio.sleep(STATUS_COALESCE)
    except (ConnectionError, asyncio.CancelledError):
        pass
    finally:
        streams.leave(changed)
    return resp


async def _end_streams(app: web.Application) -> None:
    streams = app[STREAMS_KEY]
    streams.closing = True
    for changed in list(streams.open):
        changed.set()


async def metrics(request: web.Request) -> web.Response:
    daemon = request.app[DAEMON_KEY]
    if daemon.metrics is None:
        raise web.HTTPNotFound()
    daemon.metrics.ready.set(0 if daemon.readiness_problems() else 1)
    body = daemon.metrics.render()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def build_app(daemon: HealthService, guard: ConnectionGuard | None = None) -> web.Application:
    app = web.Application(middlewares=[guard.middleware] if guard is not None else [])
    app[DAEMON_KEY] = daemon
    for path in ("/health", "/healthz", "/livez"):
        app.router.add_get(path, health)
    for path in ("/ready", "/readyz"):
        app.router.add_get(path, ready)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/api/status", api_status)
    app.router.add_get("/api/events", api_events)
    app.router.add_get("/", page)
    app[STREAMS_KEY] = _Streams()
    app.on_shutdown.append(_end_streams)
    return app


class ConnectionGuard:
    """Protocol factory around aiohttp's: a connection cap and a request deadline."""

    def __init__(self, limit: int = MAX_CONNECTIONS, timeout: float = REQUEST_TIMEOUT,
                 authorize: Authorize | None = None) -> None:
        #: aiohttp's protocol factory, set once its runner is set up.
        self.factory: Callable[[], asyncio.BaseProtocol] | None = None
        self.limit = limit
        self.timeout = timeout
        self.authorize = authorize
        self.connections: dict[asyncio.BaseTransport, _GuardedConnection] = {}

    def __call__(self) -> asyncio.Protocol:
        return _GuardedConnection(self)

    @web.middleware
    async def middleware(
        self, request: web.Request,
        handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
    ) -> web.StreamResponse:
        conn = self.connections.get(request.transport) if request.transport else None
        if conn is None:
            return await handler(request)
        conn.busy += 1
        try:
            return await handler(request)
        finally:
            conn.busy -= 1
            conn.arm()


class _GuardedConnection(asyncio.Protocol):
    def __init__(self, guard: ConnectionGuard) -> None:
        self.guard = guard
        self.inner: Any = None
        self.transport: asyncio.BaseTransport | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.busy = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        if len(self.guard.connections) >= self.guard.limit:
            transport.close()
            return
        if self.guard.authorize is not None:
            # After the handshake, before aiohttp: a refused client gets no answer.
            refused = self.guard.authorize(net.peer_certificate(transport))
            if refused is not None:
                log.warning("HTTP: client %s refused: %s",
                            _peer_text(transport.get_extra_info("peername")), refused)
                cast(asyncio.Transport, transport).abort()
                return
        assert self.guard.factory is not None
        self.guard.connections[transport] = self
        self.inner = self.guard.factory()
        self.inner.connection_made(transport)
        self.arm()

    def arm(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
        if self.transport is not None and not self.transport.is_closing():
            loop = asyncio.get_running_loop()
            self.timer = loop.call_later(self.guard.timeout, self._expire)

    def _expire(self) -> None:
        self.timer = None
        if self.busy:
            self.arm()
        elif self.transport is not None:
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        if self.inner is not None:
            self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received() if self.inner is not None else None

    def pause_writing(self) -> None:
        if self.inner is not None:
            self.inner.pause_writing()

    def resume_writing(self) -> None:
        if self.inner is not None:
            self.inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.transport is not None:
            self.guard.connections.pop(self.transport, None)
        if self.inner is not None:
            self.inner.connection_lost(exc)


def _peer_text(peer: Any) -> str:
    if isinstance(peer, tuple) and len(peer) >= 2:
        host = f"[{peer[0]}]" if ":" in str(peer[0]) else str(peer[0])
        return f"{host}:{peer[1]}"
    return str(peer)


def is_loopback(sock: socket.socket) -> bool:
    """Whether a listening socket is bound to a loopback address only."""
    try:
        host = sock.getsockname()[0]
        address = ipaddress.ip_address(str(host).split("%", 1)[0])
    except (OSError, ValueError, IndexError):
        return False
    mapped = getattr(address, "ipv4_mapped", None)  # ::ffff:127.0.0.1
    return bool((mapped or address).is_loopback)


class HttpsListener:
    """Accepts on listening sockets and shakes hands in one task per client.

    A failed, refused or stalled handshake costs only its own client (dropped
    after ``handshake_timeout``), and is logged with its reason.  At most
    ``limit`` handshakes run at once; more connections are closed as they come.
    """

    def __init__(self, socks: list[socket.socket], context: ssl.SSLContext,
                 guard: ConnectionGuard, handshake_timeout: float,
                 limit: int = MAX_CONNECTIONS) -> None:
        self.socks = socks
        self.context = context
        self.guard = guard
        self.handshake_timeout = handshake_timeout
        self.limit = limit
        self.handshakes = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False

    def start(self) -> None:
        for sock in self.socks:
            self._spawn(self._accept_loop(sock))

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _accept_loop(self, listen_sock: socket.socket) -> None:
        async for sock, peer in net.accept_each(listen_sock, lambda: not self._closed, "HTTP"):
            if self.handshakes >= self.limit:
                log.warning("HTTP: %d TLS handshakes already under way; %s dropped",
                            self.handshakes, _peer_text(peer))
                sock.close()
                continue
            self._spawn(self._handshake(sock, peer))

    async def _handshake(self, sock: socket.socket, peer: Any) -> None:
        self.handshakes += 1
        try:
            await net.tls_accept(sock, self.context, self.guard, self.handshake_timeout)
        except net.TlsFailed as exc:
            log.warning("HTTP: TLS handshake with %s failed: %s", _peer_text(peer), exc)
        except asyncio.CancelledError:
            sock.close()
            raise
        finally:
            self.handshakes -= 1

    async def close(self) -> None:
        """Stop accepting and drop the handshakes under way (served connections stay)."""
        self._closed = True
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        for sock in self.socks:
            sock.close()
