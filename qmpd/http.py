"""HTTP endpoints on the daemon's own loop: liveness, readiness, metrics."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Protocol

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

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


DAEMON_KEY: web.AppKey[HealthService] = web.AppKey("daemon")

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
    return app


class ConnectionGuard:
    """Protocol factory around aiohttp's: a connection cap and a request deadline."""

    def __init__(self, limit: int = MAX_CONNECTIONS, timeout: float = REQUEST_TIMEOUT) -> None:
        #: aiohttp's protocol factory, set once its runner is set up.
        self.factory: Callable[[], asyncio.BaseProtocol] | None = None
        self.limit = limit
        self.timeout = timeout
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
