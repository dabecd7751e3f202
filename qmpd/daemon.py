"""The daemon: owns the event loop, the signals and the start-up/shutdown order.

It is the composition root: it builds every subsystem, hands each only the
services it uses, and runs their lifecycle through one AsyncExitStack, so
teardown is the reverse of start-up and touches only what started.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import resource
import signal
import socket
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import qmpd.commands  # noqa: F401  (registers the command handlers)
from qmpd import __version__, logs, net
from qmpd.block.core import BlockLayer
from qmpd.block.iopool import block_signals
from qmpd.block.registry import load_all
from qmpd.cli import BlockdevConfig, Config, HttpConfig, ObjectConfig, redact, redact_message
from qmpd.errors import ConfigError, QMPError
from qmpd.jobs.service import Jobs
from qmpd.nbd.config import ExportConfig, NbdServerConfig
from qmpd.objects import ObjectRegistry
from qmpd.objects.authz import check_peer
from qmpd.pidfile import PidFile
from qmpd.qmp.budget import QMPInputBudget
from qmpd.qmp.dispatch import Dispatcher
from qmpd.qmp.events import EventBus
from qmpd.qmp.server import MonitorConfig, MonitorTls, QMPServer
from qmpd.runstate import RunState
from qmpd.schema import Schema
from qmpd.services import Services
from qmpd.status import RecentEvents, Watcher, nodes_status
from qmpd.vm import VirtualMachine

if TYPE_CHECKING:
    import ssl

    from qmpd.http import Authorize, ConnectionGuard
    from qmpd.metrics import Metrics
    from qmpd.migration.manager import MigrationManager
    from qmpd.nbd.exports import BlockExports
    from qmpd.services import FdService

log = logging.getLogger("qmpd")

HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)

#: Commands whose argument checks are compiled during the warm-up, so their
#: first use does not pay for it: blockdev-add's is the largest (issue 10).
WARM_CHECKS = ("blockdev-add", "blockdev-del")

#: Run states in which the daemon is not doing its job yet (or any more).
NOT_READY_STATES = frozenset(
    {
        RunState.INMIGRATE,
        RunState.FINISH_MIGRATE,
        RunState.SHUTDOWN,
        RunState.INTERNAL_ERROR,
        RunState.IO_ERROR,
        RunState.GUEST_PANICKED,
        RunState.RESTORE_VM,
        RunState.SAVE_VM,
    }
)


class Daemon:
    """One qmpd process: QMP monitors, run state, HTTP, lifecycle."""

    def __init__(self, config: Config, schema: Schema | None = None) -> None:
        self.config = config
        self.name = config.name
        self.version_info = config.version_info()
        self.started = time.monotonic()
        #: Only --http reads metrics: without it prometheus_client is never imported.
        self.metrics: Metrics | None = None
        if any(isinstance(action, HttpConfig) for action in config.actions):
            from qmpd.metrics import Metrics

            self.metrics = Metrics()
        check = os.environ.get("QMPD_CHECK_SCHEMA") == "1"
        self.schema = schema or Schema()
        self.events = EventBus(self.metrics, self.schema if check else None)
        self.recent_events = RecentEvents()
        self.events.subscribe(self.recent_events)
        if config.incoming is not None:
            initial = RunState.INMIGRATE
        else:
            initial = RunState.PRELAUNCH
        self.objects = ObjectRegistry()
        self.objects.chardevs = self._chardevs
        self.block = BlockLayer(self.metrics, self.objects)
        self.pidfile = PidFile(config.pidfile) if config.pidfile else None
        if self.metrics is not None:
            self.metrics.watch_nodes(self.block.graph.all_nodes)
        self.exports = OnDemandExports(self._build_exports)
        self.vm = VirtualMachine(
            self.events, initial, autostart=not config.paused, block=self.block,
            metrics=self.metrics,
        )
        self.migration = OnDemandMigration(self._build_migration)
        self.block.graph.on_event = self.events.emit  # BLOCK_IMAGE_CORRUPTED
        self.vm.after_activation.append(self.migration.after_cont_activation)
        self.jobs = Jobs(self.block, self.events.emit)
        if self.metrics is not None:
            self.metrics.watch_jobs(self.jobs.manager.__iter__)
        self.exit_status = 0
        services = Services(
            control=self, vm=self.vm, block=self.block, events=self.events,
            exports=self.exports, objects=self.objects, migration=self.migration,
            jobs=self.jobs,
        )
        self.dispatcher = Dispatcher(self.schema, services, self.metrics, check_returns=check)
        self.qmp = QMPServer(
            self.version_info, self.dispatcher, self.events, self.metrics, config.output_limit,
            QMPInputBudget(config.qmp_input_total),
        )
        if self.metrics is not None:
            self.metrics.watch_qmp_input(self.qmp.input_budget)
        self.http_bound: list[str] = []
        self._http_listeners = 0
        self._stack = contextlib.AsyncExitStack()
        #: HTTP listeners, closed as one step of the teardown.
        self._http = contextlib.AsyncExitStack()
        self.shutting_down = False
        self._stopped = asyncio.Event()
        self._signals_seen = 0
        self._warm_up: asyncio.Future[None] | None = None

    def _chardevs(self) -> list[tuple[str, str]]:
        """QOM's /chardevs: one per monitor."""
        return [(m.config.id, "chardev-stdio" if isinstance(m.config.address, net.StdioAddress)
                 else "chardev-socket") for m in self.qmp.monitors]

    def _build_exports(self) -> BlockExports:
        # NBD is imported when first used (nbd-server-start, --nbd-server...).
        from qmpd.nbd.exports import BlockExports

        return BlockExports(self.block, self.events, self.metrics,
                            self.config.tls_handshake_timeout)

    def _build_migration(self) -> MigrationManager:
        # Migration is imported when first used (migrate, migrate-incoming...).
        from qmpd.migration.deps import MigrationMetrics, NoMigrationMetrics
        from qmpd.migration.manager import MigrationManager

        metrics: MigrationMetrics = (
            self.metrics if self.metrics is not None else NoMigrationMetrics())
        return MigrationManager(
            events=self.events, vm=self.vm, block=self.block, metrics=metrics,
            request_exit=self.request_exit, objects=self.objects,
            tls_handshake_timeout=self.config.tls_handshake_timeout,
        )

    # --- services for command handlers --------------------------------

    def request_shutdown(self, cause: str) -> None:
        """Begin a graceful shutdown: SHUTDOWN now, the rest after this turn."""
        if self.shutting_down:
            return
        self.shutting_down = True
        self._set_ready(False)
        _sd_notify("STOPPING=1")
        self.events.emit("SHUTDOWN", {"guest": False, "reason": cause})
        # Idle exports go now (their BLOCK_EXPORT_DELETED precedes quit's reply).
        self.exports.request_shutdown()
        # Let the current command's reply go out before listeners close.
        asyncio.get_running_loop().call_soon(self._stopped.set)

    def request_exit(self, status: int) -> None:
        """Leave at once with ``status`` (a failed incoming migration: QEMU exits 1)."""
        if self.shutting_down:
            return
        self.shutting_down = True
        self.exit_status = status
        self._set_ready(False)
        _sd_notify("STOPPING=1")
        asyncio.get_running_loop().call_soon(self._stopped.set)

    def _set_ready(self, ready: bool) -> None:
        if self.metrics is not None:
            self.metrics.ready.set(1 if ready else 0)

    def health(self) -> dict[str, Any]:
        return {
            "status": "ok",
            "run-state": self.vm.state.value,
            "uptime": round(time.monotonic() - self.started, 3),
            "version": __version__,
        }

    def run_state(self) -> str:
        return self.vm.state.value

    def status(self) -> dict[str, Any]:
        """``/api/status`` (schema/http/status.json): what a person on call
        wants at a glance; reads state, changes nothing."""
        problems = self.readiness_problems()
        migration = self.migration.status()
        return {
            **self.health(),
            "ready": not problems,
            "readiness-problems": problems,
            "nodes": nodes_status(self.block.graph.newest_first()),
            "exports": self.exports.status(),
            "jobs": self.jobs.query(),
            "migration": migration,
            "handover": self.migration.progress(),
            "events": self.recent_events.list(),
        }

    def watch(self, changed: Callable[[], None]) -> Callable[[], None]:
        sink = Watcher(changed)
        self.events.subscribe(sink)
        return functools.partial(self.events.unsubscribe, sink)

    def migration_failure(self) -> str | None:
        """Why the last outgoing migration failed (None if it did not)."""
        return self.migration.last_failure()

    def readiness_problems(self) -> list[str]:
        problems: list[str] = []
        if self.shutting_down:
            problems.append("shutting down")
        for monitor in self.qmp.monitors:
            if not monitor.listening:
                problems.append(f"monitor {monitor.config.id} is not listening")
        if len(self.qmp.monitors) < len(self.config.monitors):
            problems.append("not every monitor has started")
        if self.vm.state in NOT_READY_STATES:
            problems.append(f"run state is {self.vm.state.value}")
        nodes = self.block.graph.all_nodes()
        if self.vm.state == RunState.POSTMIGRATE and not any(n.active for n in nodes):
            problems.append(
                "migrated away: run state is postmigrate and every block node is inactive"
            )
        for node in self.block.graph.all_nodes():
            if node.activation_error:
                problems.append(f"node {node.node_name} failed activation: {node.activation_error}")
            backend = node.driver.readiness()
            if backend:
                problems.append(f"node {node.node_name}: {backend}")
        return problems

    # --- lifecycle ------------------------------------------------------

    def _monitor_tls(self, config: MonitorConfig) -> MonitorTls:
        """The monitor's TLS credentials and authz, held so object-del refuses them."""
        assert config.tls_creds is not None
        try:
            creds = self.objects.tls_creds(config.tls_creds,
                                           "client" if config.client else "server")
            authz = self.objects.authz(config.tls_authz) if config.tls_authz else None
            hostname = None
            if config.client and isinstance(config.address, net.InetAddress):
                hostname = config.address.host
            context = (creds.client_context(hostname) if config.client
                       else creds.server_context())
        except QMPError as exc:
            raise ConfigError(f"{config.origin or config.id}: {exc.desc}") from None
        user = f"monitor {config.id}"
        self.objects.hold(creds, user)
        if authz is not None:
            self.objects.hold(authz, user)
        return MonitorTls(
            context, self.config.tls_handshake_timeout,
            functools.partial(check_peer, authz) if authz is not None else None,
            hostname,
        )

    async def start(self, ready_fd: int | None = None) -> None:
        """Carry out the command line's actions in order, then start running."""
        _raise_open_file_limit()
        await self._enter_subsystems()
        for action in self.config.actions:
            if isinstance(action, MonitorConfig):
                tls = self._monitor_tls(action) if action.tls_creds else None
                try:
                    monitor = await self.qmp.add_monitor(action, tls)
                except net.ConnectFailed as exc:
                    raise ConfigError(f"{action.origin or action.id}: {exc.strerror}") from None
                except OSError as exc:
                    reason = exc.desc if isinstance(exc, net.ListenFailed) else exc.strerror
                    raise ConfigError(f"cannot listen on {action.address}: {reason}") from None
                log.info("QMP monitor %s on %s", action.id, monitor.bound)
            elif isinstance(action, ObjectConfig):
                try:
                    self.objects.add_object(action.options)
                except QMPError as exc:
                    raise ConfigError(f"--object {redact(action.text)}: "
                                      f"{redact_message(action.text, exc.desc)}") from None
            elif isinstance(action, HttpConfig):
                await self._start_http(action)
            elif isinstance(action, BlockdevConfig):
                await self._add_blockdev(action)
            elif isinstance(action, (NbdServerConfig, ExportConfig)):
                await self._nbd_action(action)
        if self.vm.state == RunState.PRELAUNCH and self.vm.autostart:
            self.vm.start()
        if self.config.incoming not in (None, "defer"):
            try:
                await self.migration.migrate_incoming(self.config.incoming)
            except QMPError as exc:
                raise ConfigError(f"--incoming {self.config.incoming}: {exc.desc}") from None
        if self.pidfile is not None:
            self.pidfile.write_pid()
        if ready_fd is not None:
            # The parent prints the listening line and exits; like QEMU, the
            # daemon lets go of the terminal's stderr once it is up.
            os.write(ready_fd, b"\0" + self.listening_summary().encode() + b"\n")
            os.close(ready_fd)
            devnull = os.open(os.devnull, os.O_RDWR)
            os.dup2(logs.log_fd() or devnull, 2)
            os.close(devnull)
        else:
            logs.announce(self.listening_summary())
        # As QEMU's main loop: clients are greeted once start-up is over.
        try:
            await self.qmp.serve()
        except OSError as exc:
            raise ConfigError(f"cannot serve QMP: {exc.strerror or exc}") from None
        self._set_ready(not self.readiness_problems())
        _sd_notify("READY=1")
        self._warm_up = asyncio.ensure_future(self._warm_up_after_start())

    async def _warm_up_after_start(self) -> None:
        """Spare the first blockdev-add the drivers' imports, its argument check's
        compilation and the I/O threads' start.

        The imports run on a worker thread, so the loop goes on answering
        clients.  Only the drivers are imported there: one package imported
        from two threads at once can hand a thread a half-initialised module
        (seen with prometheus_client), and the drivers' modules are imported
        elsewhere only through the registry or from initialised packages.
        """
        await asyncio.get_running_loop().run_in_executor(None, load_all)
        # On the loop, as every check is compiled (the compiler is not
        # thread-safe), between two clients' commands: well under a millisecond.
        for command in WARM_CHECKS:
            self.schema.check("arguments", command)
        await self.block.graph.run_io(_nothing)
        log.debug("warmed up: block drivers imported, I/O threads started")

    async def _enter_subsystems(self) -> None:
        """Bring the subsystems up in order, each pushing its own teardown.

        Teardown runs in reverse: migration ends, graph changes in flight
        finish (new ones are refused), exports answer their requests and send
        BLOCK_EXPORT_DELETED, QMP clients are flushed and closed, block nodes
        are flushed, marked clean and closed, HTTP stops, the pidfile goes.
        """
        stack = self._stack
        # Before any socket exists: a second daemon with this pidfile leaves
        # nothing behind.
        if self.pidfile is not None:
            self.pidfile.acquire()
            stack.callback(self.pidfile.release)
        await stack.enter_async_context(self._http)
        stack.push_async_callback(self.block.close_all)
        stack.push_async_callback(self.qmp.close)
        stack.push_async_callback(self.exports.shutdown)
        stack.push_async_callback(self.block.lock.close)
        stack.push_async_callback(self.jobs.close)  # force-cancels under the graph lock
        stack.push_async_callback(self.migration.close)

    async def _add_blockdev(self, cfg: BlockdevConfig) -> None:
        try:
            self.schema.validate_arguments("blockdev-add", cfg.options)
            await self.block.add(cfg.options, inactive=self.vm.state == RunState.INMIGRATE)
        except QMPError as exc:
            raise ConfigError(f"--blockdev {cfg.text}: {exc.desc}") from None

    async def _nbd_action(self, cfg: NbdServerConfig | ExportConfig) -> None:
        server = isinstance(cfg, NbdServerConfig)
        name = "nbd-server-start" if server else "block-export-add"
        try:
            self.schema.validate_arguments(name, cfg.options)
            if server:
                await self.exports.start_server(cfg.options)
            else:
                await self.exports.add(cfg.options)
        except QMPError as exc:
            option = "--nbd-server" if server else "--export"
            raise ConfigError(f"{option} {cfg.text}: {exc.desc}") from None

    async def _start_http(self, cfg: HttpConfig) -> None:
        # aiohttp costs a quarter of a second to import: only a daemon
        # serving HTTP pays for it (and after its monitors are up).
        from aiohttp import web

        from qmpd.http import REQUEST_TIMEOUT, ConnectionGuard, build_app

        # /metrics shows the NBD series (zero) before any export exists, as always.
        self.exports.get()
        context, authorize = self._http_tls(cfg) if cfg.tls_creds else (None, None)
        guard = ConnectionGuard(authorize=authorize)
        runner = web.AppRunner(build_app(self, guard), handle_signals=False,
                               access_log=None, keepalive_timeout=REQUEST_TIMEOUT)
        await runner.setup()
        self._http.push_async_callback(runner.cleanup)
        guard.factory = runner.server
        if context is not None:
            socks = await self._listen_https(cfg, context, guard)
        else:
            socks = await self._listen_http(cfg, guard)
        scheme = "https" if context is not None else "http"
        for sock in socks:
            addr = sock.getsockname()
            host, port = addr[0], addr[1]
            shown = f"[{host}]" if ":" in host else host
            self.http_bound.append(f"{scheme}://{shown}:{port}")
            log.info("HTTP listening on %s://%s:%s", scheme, shown, port)

    def _http_tls(self, cfg: HttpConfig) -> tuple[ssl.SSLContext, Authorize | None]:
        """The server context and authz check of an HTTPS listener, held until it stops."""
        assert cfg.tls_creds is not None
        try:
            creds = self.objects.tls_creds(cfg.tls_creds, "server")
            authz = self.objects.authz(cfg.tls_authz) if cfg.tls_authz else None
            context = creds.server_context()
        except QMPError as exc:
            raise ConfigError(f"{cfg.origin}: {exc.desc}") from None
        self._http_listeners += 1  # port 0 twice is two listeners: two users
        user = f"http listener {self._http_listeners} ({cfg.origin})"
        self.objects.hold(creds, user)
        self._http.callback(self.objects.release, creds, user)
        if authz is None:
            return context, None
        self.objects.hold(authz, user)
        self._http.callback(self.objects.release, authz, user)
        return context, functools.partial(check_peer, authz)

    async def _listen_http(self, cfg: HttpConfig, guard: ConnectionGuard) -> list[Any]:
        from qmpd.http import is_loopback

        try:
            server = await asyncio.get_running_loop().create_server(
                guard, cfg.host, cfg.port, reuse_address=True, start_serving=False)
        except OSError as exc:
            raise ConfigError(
                f"cannot serve HTTP on {cfg.host}:{cfg.port}: {exc.strerror}"
            ) from None
        self._http.callback(server.close)
        exposed = [s for s in server.sockets if not is_loopback(s)]
        if exposed and not cfg.insecure:
            where = exposed[0].getsockname()[0]
            server.close()
            raise ConfigError(
                f"{cfg.origin or '--http'}: plain HTTP on {where}, which is not a loopback "
                "address: serve HTTPS with tls-creds=ID, or add insecure=on")
        await server.start_serving()
        return list(server.sockets)

    async def _listen_https(self, cfg: HttpConfig, context: ssl.SSLContext,
                            guard: ConnectionGuard) -> list[Any]:
        from qmpd.http import HttpsListener

        try:
            listening = net.listen(net.InetAddress(cfg.host, str(cfg.port)), every_address=True)
        except OSError as exc:
            reason = exc.desc if isinstance(exc, net.ListenFailed) else exc.strerror
            raise ConfigError(f"cannot serve HTTP on {cfg.host}:{cfg.port}: {reason}") from None
        listener = HttpsListener(listening.socks, context, guard,
                                 self.config.tls_handshake_timeout)
        self._http.push_async_callback(listener.close)
        listener.start()
        return listening.socks

    def listening_summary(self) -> str:
        parts = [f"QMP on {m.bound}" for m in self.qmp.monitors]
        parts += [f"HTTP on {h}" for h in self.http_bound]
        nbd = self.exports.server_bound()
        if nbd is not None:
            parts.append(f"NBD on {nbd}")
        return "listening: " + ", ".join(parts)

    async def wait_stopped(self) -> None:
        await self._stopped.wait()

    async def shutdown(self) -> None:
        """Tear down what started, in reverse (see :meth:`_enter_subsystems`)."""
        self.shutting_down = True
        if self._warm_up is not None:
            self._warm_up.cancel()
        self.block.stop_waiting()
        await self._stack.aclose()

    def on_signal(self, signum: int) -> None:
        self._signals_seen += 1
        if self._signals_seen > 1:
            log.error("second signal %d: exiting at once", signum)
            os._exit(1)
        log.info("terminating on signal %d", signum)
        self.request_shutdown("host-signal")

    async def run(self, ready_fd: int | None = None) -> int:
        """Run until quit or a signal; the exit status is returned."""
        loop = asyncio.get_running_loop()
        loop.set_default_executor(ThreadPoolExecutor(initializer=block_signals))
        for signum in HANDLED_SIGNALS:
            loop.add_signal_handler(signum, self.on_signal, signum)
        try:
            # A signal during start-up (a monitor waiting for its first
            # client, say) ends it instead of waiting for ever.
            starting = asyncio.ensure_future(self.start(ready_fd))
            stopped = asyncio.ensure_future(self._stopped.wait())
            try:
                await asyncio.wait({starting, stopped}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for task in (stopped, starting):
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
        except ConfigError as exc:
            await self.shutdown()
            if ready_fd is not None:
                os.write(ready_fd, f"qmpd: {exc}\n".encode())
                os.close(ready_fd)
            raise
        await self.wait_stopped()
        await self.shutdown()
        # Past this point the process is exiting anyway: a late signal stays
        # pending (no thread takes it) instead of killing it with the default
        # action between removing asyncio's handler and ignoring the signal.
        signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED_SIGNALS)
        for signum in HANDLED_SIGNALS:
            loop.remove_signal_handler(signum)
            signal.signal(signum, signal.SIG_IGN)
        return self.exit_status


def _nothing() -> None:
    return None


def _raise_open_file_limit() -> None:
    """Thousands of nodes need thousands of descriptors: take what the hard limit allows."""
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard == resource.RLIM_INFINITY:
            hard = 1 << 20
        if soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError) as exc:
        log.warning("cannot raise the open-file limit: %s", exc)


def _sd_notify(message: str) -> None:
    """Tell systemd about our state when it asked (NOTIFY_SOCKET set)."""
    target = os.environ.get("NOTIFY_SOCKET")
    if not target:
        return
    if target.startswith("@"):
        target = "\0" + target[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.connect(target)
            sock.sendall(message.encode())
    except OSError as exc:
        log.warning("sd_notify to %s failed: %s", os.environ.get("NOTIFY_SOCKET"), exc)


class OnDemandExports:
    """The NBD server and exports (an ExportService), built at their first use.

    Until then there is nothing to stop or drain, and importing NBD would only
    slow every start-up down (issue 10).
    """

    def __init__(self, build: Callable[[], BlockExports]) -> None:
        self._build = build
        self._real: BlockExports | None = None
        self._shutdown_requested = False

    def get(self) -> BlockExports:
        if self._real is None:
            self._real = self._build()
            if self._shutdown_requested:
                self._real.request_shutdown()
        return self._real

    def server_bound(self) -> str | None:
        server = self._real.server if self._real is not None else None
        return server.bound if server is not None else None

    async def start_server(self, args: dict[str, Any]) -> None:
        await self.get().start_server(args)

    async def stop_server(self) -> None:
        await self.get().stop_server()

    async def add(self, args: dict[str, Any]) -> None:
        await self.get().add(args)

    async def legacy_add(self, args: dict[str, Any]) -> None:
        await self.get().legacy_add(args)

    async def delete(self, export_id: str, mode: str = "safe") -> None:
        await self.get().delete(export_id, mode)

    def query(self) -> list[dict[str, Any]]:
        return self.get().query()

    def status(self) -> list[dict[str, Any]]:
        """Exports and their clients; none before the first export (nothing is built)."""
        return self._real.status() if self._real is not None else []

    def request_shutdown(self) -> None:
        self._shutdown_requested = True
        if self._real is not None:
            self._real.request_shutdown()

    async def shutdown(self) -> None:
        if self._real is not None:
            await self._real.shutdown()


class OnDemandMigration:
    """Both directions of migration (a MigrationService), built at their first use.

    Until then no migration ran: nothing failed, nothing is to be closed.
    """

    def __init__(self, build: Callable[[], MigrationManager]) -> None:
        self._build = build
        self._real: MigrationManager | None = None

    def get(self) -> MigrationManager:
        if self._real is None:
            self._real = self._build()
        return self._real

    @property
    def fds(self) -> FdService:
        return self.get().fds

    def last_failure(self) -> str | None:
        return self._real.last_failure if self._real is not None else None

    def migrate(self, args: dict[str, Any]) -> None:
        self.get().migrate(args)

    async def migrate_incoming(self, uri_text: str, exit_on_error: bool = True) -> None:
        await self.get().migrate_incoming(uri_text, exit_on_error)

    def query(self) -> dict[str, Any]:
        return self.get().query()

    def status(self) -> dict[str, Any]:
        """query-migrate's answer, without building migration for it."""
        return self._real.query() if self._real is not None else {}

    def progress(self) -> dict[str, Any] | None:
        """The last migration's steps and timings (None before any)."""
        return self._real.progress() if self._real is not None else None

    def cancel(self) -> None:
        self.get().cancel()

    def continue_(self, state: str) -> None:
        self.get().continue_(state)

    def set_capabilities(self, caps: list[dict[str, Any]]) -> None:
        self.get().set_capabilities(caps)

    def query_capabilities(self) -> list[dict[str, Any]]:
        return self.get().query_capabilities()

    def set_parameters(self, params: dict[str, Any]) -> None:
        self.get().set_parameters(params)

    def query_parameters(self) -> dict[str, Any]:
        return self.get().query_parameters()

    def after_cont_activation(self) -> None:
        if self._real is not None:
            self._real.after_cont_activation()

    async def close(self) -> None:
        if self._real is not None:
            await self._real.close()
