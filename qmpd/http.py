"""HTTP endpoints on the daemon's own loop: liveness, readiness, metrics."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

if TYPE_CHECKING:
    from qmpd.daemon import Daemon

DAEMON_KEY: web.AppKey[Daemon] = web.AppKey("daemon")


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
        body = {"status": "ready", "run-state": daemon.vm.state.value}
    # A failed migration leaves the source running (ready), but says why it failed.
    failure = daemon.migration.last_failure
    if failure is not None:
        body["migration-failed"] = failure
    return web.json_response(body, status=503 if reasons else 200)


async def metrics(request: web.Request) -> web.Response:
    daemon = request.app[DAEMON_KEY]
    daemon.metrics.ready.set(0 if daemon.readiness_problems() else 1)
    body = daemon.metrics.render()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def build_app(daemon: Daemon) -> web.Application:
    app = web.Application()
    app[DAEMON_KEY] = daemon
    for path in ("/health", "/healthz", "/livez"):
        app.router.add_get(path, health)
    for path in ("/ready", "/readyz"):
        app.router.add_get(path, ready)
    app.router.add_get("/metrics", metrics)
    return app
