"""Live migration on shared storage: the source and destination sides.

The order of things is QEMU 7.2's, because management tools depend on it:

Source: ``setup`` (event before migrate's reply), pass 1, ``active``, stop
(STOP) and flush, [``pre-switchover`` until migrate-continue, ``device``],
inactivate every block node (flush, mark clean, drop write locks), pass 2,
the rest of the stream and EOF, ``completed``, run state ``postmigrate``.
Any failure after the stop re-activates the nodes (their caches are
re-read: another process may have opened the images meanwhile) and resumes
the VM if it was running.

Destination: nodes added while ``inmigrate`` are inactive (no write locks,
nothing cached is trusted).  Only once the whole stream has arrived and
parsed: invalidate-all (every node re-reads its metadata, children first;
nodes activated early by an export or ``cont`` are flushed and invalidated
again), then run state from the stream's globalstate and autostart.  If
activation fails the daemon stays paused with its nodes inactive; ``cont``
retries.  Any other failure of the incoming task ends in ``failed`` with every
node inactive again (no write lock held), or exits, as configured.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from qmpd import logs
from qmpd.errors import GenericError
from qmpd.migration import stream
from qmpd.migration.channels import (
    Channel,
    ChannelError,
    FdStore,
    Listener,
    MigrationURI,
    connect,
    is_protocol_error,
    parse_uri,
)
from qmpd.migration.deps import BlockSide, Events, ExitRequest, MigrationMetrics, RunStateSide
from qmpd.migration.state import (
    CAPABILITIES,
    DEFAULT_PARAMETERS,
    RUNNING_STATES,
    TRANSITIONS,
    MigrationStatus,
    check_capabilities,
    check_parameters,
    normalize_parameters,
)
from qmpd.runstate import TRANSITIONS as RUN_STATE_TRANSITIONS
from qmpd.runstate import RunState

log = logging.getLogger(__name__)

_S = MigrationStatus


def _ms(seconds: float) -> int:
    return int(seconds * 1000)


def _mbps(nbytes: int, total_ms: int) -> float:
    """QEMU's figure: megabits per second over the whole migration."""
    if total_ms <= 0:
        return 0
    return nbytes * 8.0 / (total_ms / 1000.0) / 1000.0 / 1000.0


class _Cancelled(Exception):
    """migrate_cancel was asked: unwind at the next step."""


class _IncomingFailed(Exception):
    """The incoming migration failed: ``text`` for stderr, ``reason`` the error-desc."""

    def __init__(self, text: str, reason: str) -> None:
        super().__init__(reason)
        self.text = text
        self.reason = reason


class _Failed(Exception):
    """The migration failed; ``desc`` is the error-desc (None: QEMU records none),
    ``reason`` what the log says (``desc`` by default)."""

    def __init__(self, desc: str | None, reason: str | None = None) -> None:
        super().__init__(desc)
        self.desc = desc
        self.reason = reason or desc


def _ram_stats(dirty_sync_count: int, mbps: float) -> dict[str, Any]:
    """A -M none QEMU has no RAM: every counter is zero but the page size.

    The dirty bitmap is synchronised once at setup and once at completion;
    mbps is computed when the migration completes (0 before).
    """
    keys = (
        "transferred", "remaining", "total", "duplicate", "skipped", "normal",
        "normal-bytes", "dirty-pages-rate", "mbps", "dirty-sync-count", "postcopy-requests",
        "page-size", "multifd-bytes", "pages-per-second", "precopy-bytes", "downtime-bytes",
        "postcopy-bytes", "dirty-sync-missed-zero-copy",
    )
    out: dict[str, Any] = dict.fromkeys(keys, 0)
    out["mbps"] = mbps
    out["page-size"] = 4096
    out["dirty-sync-count"] = dirty_sync_count
    return out


class MigrationManager:
    """Both directions of migration for one daemon."""

    def __init__(
        self, *, events: Events, vm: RunStateSide, block: BlockSide,
        metrics: MigrationMetrics, request_exit: ExitRequest,
    ) -> None:
        self.events = events
        self.vm = vm
        self.block = block
        self.metrics = metrics
        self.request_exit = request_exit
        self.capabilities: dict[str, bool] = dict.fromkeys(CAPABILITIES, False)
        self.parameters: dict[str, Any] = dict(DEFAULT_PARAMETERS)
        self.fds = FdStore()
        # Outgoing.
        self.status = _S.NONE
        self.error: str | None = None
        #: Why the last outgoing migration failed, also when error-desc stays empty.
        self.failure_reason: str | None = None
        self.start_time = 0.0
        self.setup_time = 0
        self.total_time = 0
        self.downtime = 0
        self.task: asyncio.Task[None] | None = None
        self.channel: Channel | None = None
        self.continue_event = asyncio.Event()
        self.cancel_requested = False
        self.committed = False
        self.awaiting_shut = False
        self.mbps = 0.0
        self._bytes_at_start = 0
        self._window_end = 0.0
        self._window_used = 0
        # Incoming.
        self.incoming_started = False
        self.incoming_status = _S.NONE
        self.incoming_error: str | None = None
        self.listener: Listener | None = None
        self.incoming_task: asyncio.Task[None] | None = None
        self.exit_on_error = True
        self.activation_error: str | None = None
        self.bytes_sent = 0
        self.bytes_received = 0

    # --- helpers ------------------------------------------------------------------

    def _event(self, status: MigrationStatus) -> None:
        if self.capabilities["events"]:
            self.events.emit("MIGRATION", {"status": status.value})

    def _set(self, status: MigrationStatus) -> None:
        if status != self.status and status not in TRANSITIONS[self.status]:
            raise RuntimeError(f"migration: {self.status.value} -> {status.value} not allowed")
        self.status = status
        self._event(status)
        self.metrics.migration_status(status.value)

    def _set_incoming(self, status: MigrationStatus) -> None:
        self.incoming_status = status
        self._event(status)
        self.metrics.migration_status(status.value)

    @property
    def running(self) -> bool:
        return self.status in RUNNING_STATES

    @property
    def last_failure(self) -> str | None:
        """Why the last outgoing migration failed (None unless it did)."""
        if self.status != _S.FAILED:
            return None
        return self.failure_reason or self.error or "no reason recorded"

    # --- capabilities and parameters ---------------------------------------------------

    def set_capabilities(self, caps: list[dict[str, Any]]) -> None:
        if self.running:
            raise GenericError("There's a migration process in progress")
        new = dict(self.capabilities)
        for item in caps:
            new[item["capability"]] = item["state"]
        check_capabilities(new, self.parameters)
        self.capabilities = new

    def query_capabilities(self) -> list[dict[str, Any]]:
        return [{"capability": name, "state": self.capabilities[name]} for name in CAPABILITIES]

    def set_parameters(self, params: dict[str, Any]) -> None:
        params = normalize_parameters(params)
        merged = {**self.parameters, **params}
        check_parameters(params)
        if "max-cpu-throttle" in params or "cpu-throttle-initial" in params:
            check_parameters(
                {"max-cpu-throttle": merged["max-cpu-throttle"],
                 "cpu-throttle-initial": merged["cpu-throttle-initial"]}
            )
        if self.capabilities["zero-copy-send"] and (
            params.get("multifd-compression", "none") != "none" or params.get("tls-creds")
        ):
            raise GenericError(
                "Zero copy only available for non-compressed non-TLS multifd migration"
            )
        self.parameters = merged

    def query_parameters(self) -> dict[str, Any]:
        return dict(self.parameters)

    # --- query-migrate --------------------------------------------------------------------

    def query(self) -> dict[str, Any]:
        info: dict[str, Any] = {}
        # The destination's view first; the source's overwrites it.
        if self.incoming_started:
            if self.incoming_status != _S.NONE:
                info["status"] = self.incoming_status.value
            if self.listener is not None and self.incoming_status in (_S.NONE, _S.ACTIVE):
                if self.listener.addresses:
                    info["socket-address"] = self.listener.addresses
            if self.incoming_error and self.incoming_status == _S.FAILED:
                info["error-desc"] = self.incoming_error
            if self.activation_error:
                info["error-desc"] = self.activation_error
        status = self.status
        if status == _S.NONE:
            return info
        info = {"status": status.value}
        if status == _S.SETUP:
            return info
        if status in (_S.ACTIVE, _S.PRE_SWITCHOVER, _S.DEVICE, _S.CANCELLING, _S.COMPLETED):
            now = time.monotonic()
            info["setup-time"] = self.setup_time
            if status == _S.COMPLETED:
                info["downtime"] = self.downtime
                info["total-time"] = self.total_time
            else:
                info["total-time"] = _ms(now - self.start_time)
                info["expected-downtime"] = self.parameters["downtime-limit"]
            if status == _S.COMPLETED:
                info["ram"] = _ram_stats(2, self.mbps)
            else:
                info["ram"] = _ram_stats(1 if status == _S.ACTIVE else 2, 0)
            return info
        if self.error is not None:
            info["error-desc"] = self.error
        return info

    # --- source -------------------------------------------------------------------------

    def migrate(self, args: dict[str, Any]) -> None:
        """Checks, the setup event, and the migration task; returns at once."""
        if args.get("resume"):
            raise GenericError("Cannot resume if there is no paused migration")
        if self.running:
            raise GenericError("There's a migration process in progress")
        state = self.vm.state
        if state == RunState.INMIGRATE:
            raise GenericError("Guest is waiting for an incoming migration")
        if state == RunState.POSTMIGRATE:
            raise GenericError("Can't migrate the vm that was paused due to previous migration")
        if args.get("blk") or args.get("inc") or self.capabilities["block"]:
            raise GenericError(
                "qmpd migrates over shared storage: block migration (blk, inc, the 'block' "
                "capability) is not supported"
            )
        self.error = None
        self.failure_reason = None
        self.cancel_requested = False
        self.committed = False
        self.awaiting_shut = False
        self.mbps = 0.0
        self._bytes_at_start = self.bytes_sent
        self._window_end = 0.0
        self._window_used = 0
        self.continue_event = asyncio.Event()
        self.start_time = time.monotonic()
        self._set(_S.SETUP)
        try:
            uri = parse_uri(args["uri"])
            if uri.scheme == "fd" and not self.fds.has(uri.target):
                # QEMU looks the descriptor up before answering.
                raise GenericError(f"File descriptor named '{uri.target}' has not been found")
        except GenericError as exc:
            if not is_protocol_error(exc):
                self.error = exc.desc
            self._set(_S.FAILED)
            raise
        self.task = asyncio.get_running_loop().create_task(self._outgoing(uri))

    async def _outgoing(self, uri: MigrationURI) -> None:
        writer = stream.StreamWriter(self.capabilities)
        stopped = False
        was_running = False
        inactivated = False
        try:
            try:
                self.channel = await connect(uri, self.fds)
            except ChannelError as exc:
                self.error = str(exc)
                logs.write_raw(f"{logs.ERROR}: {self.error}")
                self._set(_S.FAILED)
                return
            channel = self.channel
            self._check_cancel()
            if self.capabilities["events"]:
                self.events.emit("MIGRATION_PASS", {"pass": 1})
            # As in QEMU, setup ends once the setup data is queued; sending it
            # (rate-limited by max-bandwidth) is part of the active phase.
            self.setup_time = _ms(time.monotonic() - self.start_time)
            self._set(_S.ACTIVE)
            await self._send(channel, writer.setup(), throttled=True)
            await asyncio.sleep(0)  # the iterative phase: nothing more to send
            self._check_cancel()
            # A destination that went away while we were iterating is noticed
            # here, before the VM stops, as a QEMU source notices it at its next
            # iteration's write.
            channel.check_peer()
            # Switchover.
            runstate_at_switchover = self.vm.state
            was_running = runstate_at_switchover == RunState.RUNNING
            stop_time = time.monotonic()
            stopped = True
            # Under the graph lock: a cont already under way finishes first, and
            # one that comes later sees finish-migrate.
            async with self.block.lock.held():
                await self._stop_for_switchover()
            flushed = time.monotonic()
            if self.capabilities["pause-before-switchover"]:
                self._set(_S.PRE_SWITCHOVER)
                await self.continue_event.wait()
                self._check_cancel()
                self._set(_S.DEVICE)
            self._check_cancel()
            # QEMU 7.2 completes its iterable state (ram: the pass-2 sync) before
            # it inactivates the images, so pass 2 is announced even if that fails.
            if self.capabilities["events"]:
                self.events.emit("MIGRATION_PASS", {"pass": 2})
            inactivating = time.monotonic()
            try:
                async with self.block.lock.held():
                    await self.block.inactivate_all()
            except Exception as exc:
                inactivated = True  # some nodes may be: re-activate them all
                # QEMU 7.2 prints this line and records no error-desc; qmpd keeps
                # the reason too (query-migrate, log, /ready).
                logs.write_raw(
                    f"{logs.ERROR}: qemu_savevm_state_complete_precopy_non_iterable: "
                    "bdrv_inactivate_all() failed (-1)"
                )
                raise _Failed(self._inactivation_failure(exc)) from None
            inactivated = True
            log.info("migration switchover: flush %.1f ms, inactivation %.1f ms",
                     (flushed - stop_time) * 1000, (time.monotonic() - inactivating) * 1000)
            # The downtime phase is never rate-limited (QEMU lifts the limit too).
            await self._send(channel, writer.complete(runstate_at_switchover.value),
                             throttled=False)
            # The whole stream is out: the destination may be running already,
            # so a cancel from now on would only risk two active sides.
            self.committed = True
            if writer.return_path:
                # Until SHUT the destination has not confirmed it loaded the
                # stream: a cancel may still take the images back (if the
                # destination activated them, image locking refuses that).
                self.awaiting_shut = True
                try:
                    await self._wait_for_shut(channel)
                finally:
                    self.awaiting_shut = False
                self._check_cancel()  # a SHUT still buffered when the cancel came
            await channel.close()
            self.channel = None
            now = time.monotonic()
            self.downtime = _ms(now - stop_time)
            self.total_time = _ms(now - self.start_time)
            self.mbps = _mbps(self.bytes_sent - self._bytes_at_start, self.total_time)
            self.metrics.migration_done(self.total_time / 1000, self.downtime / 1000)
            self._set(_S.COMPLETED)
            self.vm.set_state(RunState.POSTMIGRATE)
            log.info("migration completed: %d block nodes handed over in %d ms "
                     "(downtime %d ms); the source is in postmigrate",
                     len(self.block.graph.nodes), self.total_time, self.downtime)
        except (asyncio.CancelledError, _Cancelled):
            await self._abort_outgoing(stopped, was_running, inactivated, cancelled=True)
        except (_Failed, ChannelError, OSError, ConnectionError) as exc:
            if self.cancel_requested:
                await self._abort_outgoing(stopped, was_running, inactivated, cancelled=True)
                return
            if isinstance(exc, _Failed):
                self.error = exc.desc
                self.failure_reason = exc.reason
            elif isinstance(exc, ChannelError):
                self.error = str(exc)
            else:
                self.error = _socket_error(exc)
            if self.error is not None:
                logs.write_raw(f"{logs.ERROR}: {self.error}")
            await self._abort_outgoing(stopped, was_running, inactivated, cancelled=False)
        except Exception as exc:  # a bug: never leave the VM stopped with inactive nodes
            log.exception("migration failed unexpectedly")
            self.error = f"internal error: {exc}"
            await self._abort_outgoing(stopped, was_running, inactivated, cancelled=False)

    def _inactivation_failure(self, exc: BaseException) -> str:
        """error-desc for a refused inactivation: the users that refused it, by name."""
        blockers = [
            f"node '{node.node_name}' is in use by writable {edge.user.kind} "
            f"'{edge.user.id}' without allow-inactive"
            for node in self.block.graph.all_nodes() if node.active
            for edge in node.parents
            if edge.user is not None and edge.user.writable and not edge.user.allow_inactive
        ]
        return "Failed to inactivate block nodes: " + ("; ".join(blockers) or str(exc))

    def _check_cancel(self) -> None:
        if self.cancel_requested:
            raise _Cancelled

    async def _send(self, channel: Channel, data: bytes, throttled: bool) -> None:
        """Write ``data``; while ``throttled``, at most max-bandwidth/10 bytes per 100 ms.

        QEMU's rate limit works in windows of 100 ms (XFER_LIMIT_RATIO 10); a
        limit under 10 bytes/s gives a zero budget, which QEMU treats as no
        limit.  The parameter is read again for every window, so a change made
        with migrate-set-parameters during the migration takes effect at once.
        """
        assert channel.writer is not None
        view = memoryview(data)
        while view:
            budget = self.parameters["max-bandwidth"] // 10 if throttled else 0
            if budget <= 0:
                part, view = view, view[len(view):]
            else:
                now = time.monotonic()
                if now >= self._window_end:
                    self._window_end = now + 0.1
                    self._window_used = 0
                room = budget - self._window_used
                if room <= 0:
                    await asyncio.sleep(self._window_end - now)
                    self._check_cancel()
                    continue
                part, view = view[:room], view[room:]
                self._window_used += len(part)
            try:
                channel.writer.write(part)
                await channel.writer.drain()
            except (ConnectionError, OSError) as exc:
                raise ChannelError(channel.write_error(exc)) from None
            self.bytes_sent += len(part)
            self.metrics.migration_bytes.labels("out").inc(len(part))

    async def _wait_for_shut(self, channel: Channel) -> None:
        """With a return path, the destination says SHUT once it has loaded everything.

        QEMU 7.2 marks the return path bad and fails without an error-desc
        (and without a message); qmpd says why on stderr.
        """
        while True:
            try:
                head = await channel.reader.readexactly(4)
                kind = int.from_bytes(head[:2], "big")
                length = int.from_bytes(head[2:], "big")
                data = await channel.reader.readexactly(length)
            except (asyncio.IncompleteReadError, ConnectionError, OSError):
                reason = "return path: the destination closed the channel before SHUT"
                logs.write_raw(f"{logs.ERROR}: {reason}")
                raise _Failed(None, reason) from None
            if kind == stream.RPMessageType.PONG:
                continue
            if kind != stream.RPMessageType.SHUT or int.from_bytes(data[:4] or b"\0", "big"):
                reason = "return path: the destination reported a failure"
                logs.write_raw(f"{logs.ERROR}: {reason}")
                raise _Failed(None, reason)
            return

    async def _stop_for_switchover(self) -> None:
        vm = self.vm
        if vm.state == RunState.RUNNING:
            vm.set_state(RunState.FINISH_MIGRATE)
            self.events.emit("STOP")
        else:
            vm.set_state(RunState.FINISH_MIGRATE)
        # QEMU flushes every node when it stops the VM.  Held in pre-switchover,
        # the images must be on disk (a storage daemon may take them over there);
        # otherwise inactivation, which flushes every node it inactivates, comes
        # next with nothing in between, and a flush here would only double the
        # fdatasync calls in the downtime.
        if self.capabilities["pause-before-switchover"]:
            await self.block.flush_all()

    async def _abort_outgoing(
        self, stopped: bool, was_running: bool, inactivated: bool, cancelled: bool
    ) -> None:
        """Give the images back to this side and resume, in QEMU 7.2's order.

        A failure is announced first (MIGRATION failed, then RESUME); a
        cancel last (RESUME, then MIGRATION cancelled), as QEMU's migration
        thread sets ``cancelled`` only when it cleans up.
        """
        if self.channel is not None:
            self.channel.abort()
            await self.channel.reap()
            self.channel = None
        cancelled = cancelled or self.status == _S.CANCELLING
        if not cancelled:
            self._set(_S.FAILED)
            self.failure_reason = self.failure_reason or self.error
            log.error("migration failed: %s", self.failure_reason or "no reason recorded")
        if inactivated or stopped:
            # Another process may have opened the images while we were
            # inactive: activation re-reads everything.
            try:
                await self.block.activate_all()
            except Exception as exc:
                # The destination may have taken the images (its lock refuses
                # us): never run without them; cont retries the activation.
                log.error("could not re-activate block nodes after migration: %s; "
                          "the source stays stopped", exc)
                was_running = False
        if stopped:
            if was_running:
                self.vm.start()
            else:
                # QEMU 7.2 (sic): a source that was not running ends in postmigrate.
                self.vm.set_state(RunState.POSTMIGRATE)
        if cancelled:
            self._set(_S.CANCELLED)

    def cancel(self) -> None:
        """migrate_cancel: never interrupts a block operation half-way.

        The migration task notices the request at its next step (a write to
        the aborted channel fails, the pre-switchover wait ends, or it checks
        the flag); only a connect still in progress is interrupted.
        """
        if not self.running or self.cancel_requested:
            return
        if self.committed and not self.awaiting_shut:
            return
        self.cancel_requested = True
        if self.status == _S.SETUP and self.channel is None:
            if self.task is not None:
                self.task.cancel()
            return
        self._set(_S.CANCELLING)
        self.continue_event.set()
        if self.channel is not None:
            self.channel.abort()

    def continue_(self, state: str) -> None:
        if self.status.value != state:
            raise GenericError(f"Migration not in expected state: {self.status.value}")
        self.continue_event.set()

    # --- destination ---------------------------------------------------------------------

    async def migrate_incoming(self, uri_text: str, exit_on_error: bool = True) -> None:
        if self.vm.state != RunState.INMIGRATE:
            raise GenericError("'-incoming' was not specified on the command line")
        if self.incoming_started:
            raise GenericError("The incoming migration has already been started")
        # QEMU 7.2 sends this one whatever the events capability says, and
        # before it looks at the URI: a refused URI still shows it.
        self.events.emit("MIGRATION", {"status": "setup"})
        try:
            uri = parse_uri(uri_text)
        except GenericError as exc:
            if is_protocol_error(exc):
                raise GenericError(f"unknown migration protocol: {uri_text}") from None
            raise
        listener = Listener(uri, self.fds)
        await listener.start()
        self.listener = listener
        self.incoming_started = True
        self.exit_on_error = exit_on_error
        self.incoming_task = asyncio.get_running_loop().create_task(self._incoming())

    async def _incoming(self) -> None:
        """The incoming task: however it ends, the status is final, and a failure
        releases the images (or exits, as configured)."""
        assert self.listener is not None
        channel: Channel | None = None
        try:
            channel = await self.listener.accept()
            self._set_incoming(_S.ACTIVE)
            await self._load(channel)
        except asyncio.CancelledError:
            if channel is not None:
                channel.abort()
            raise
        except _IncomingFailed as exc:
            await self._incoming_failed(channel, exc.text, exc.reason)
        except Exception as exc:  # a bug or a refusal not foreseen: never hang holding images
            reason = f"incoming migration failed: {exc}"
            await self._incoming_failed(channel, f"{logs.ERROR}: {reason}", reason)

    async def _load(self, channel: Channel) -> None:
        assert self.listener is not None
        reader = stream.StreamReader(self.capabilities)
        globalstate: str | None = None
        return_path = False
        try:
            while not reader.done:
                data = await channel.reader.read(256 * 1024)
                self.bytes_received += len(data)
                if data:
                    self.metrics.migration_bytes.labels("in").inc(len(data))
                events = reader.feed(data) if data else reader.close()
                for event in events:
                    if isinstance(event, stream.GlobalState):
                        globalstate = event.runstate
                    elif (
                        isinstance(event, stream.Command)
                        and event.command == stream.MigCommand.PING
                        and reader.return_path_open
                        and channel.writer is not None
                    ):
                        channel.writer.write(stream.encode_rp_message(
                            stream.RPMessageType.PONG, event.ping_value.to_bytes(4, "big")))
                    elif isinstance(event, stream.StreamWarning):
                        # QEMU reports these with error_report (or warn_report,
                        # whose "warning: " the message keeps).
                        level = logs.PROG if event.message.startswith("warning: ") else logs.ERROR
                        logs.write_raw(f"{level}: {event.message}")
                if not data:
                    break
            return_path = reader.return_path_open
        except stream.MigrationStreamError as exc:
            raise _IncomingFailed(exc.render(logs.ERROR), exc.reason) from None
        except (ConnectionError, OSError) as exc:
            raise _IncomingFailed(
                f"{logs.ERROR}: load of migration failed: {exc.strerror or exc}", str(exc)
            ) from None
        self._check_globalstate(globalstate)
        await self._incoming_complete(globalstate)
        if return_path and channel.writer is not None:
            try:
                channel.writer.write(stream.encode_rp_message(stream.RPMessageType.SHUT,
                                                              (0).to_bytes(4, "big")))
                await channel.writer.drain()
            except (ConnectionError, OSError):
                pass
        self._set_incoming(_S.COMPLETED)
        log.info("incoming migration completed: %d bytes received, run state %s",
                 self.bytes_received, self.vm.state.value)
        await channel.close()
        self.listener.close()

    def _check_globalstate(self, globalstate: str | None) -> None:
        """A run state this side may not enter from inmigrate fails the load before
        anything is activated (QEMU 7.2 aborts the process there)."""
        if globalstate is None or globalstate == "running":
            return
        try:
            target = RunState(globalstate)
        except ValueError:
            return  # treated as paused
        current = self.vm.state
        if target != current and target not in RUN_STATE_TRANSITIONS[current]:
            reason = (f"invalid runstate transition: '{self.vm.state.value}' -> "
                      f"'{globalstate}'")
            raise _IncomingFailed(f"{logs.ERROR}: {reason}", reason)

    async def _incoming_failed(self, channel: Channel | None, text: str, reason: str) -> None:
        logs.write_raw(text)
        self.incoming_error = reason
        self._set_incoming(_S.FAILED)
        if channel is not None:
            channel.abort()
            await channel.reap()
        if self.listener is not None:
            self.listener.close()
        # Nodes activated early (cont, an export) or by a load that failed late
        # give their locks back: a failed destination holds nothing.
        try:
            async with self.block.lock.held():
                await self.block.inactivate_all()
        except Exception as exc:
            log.error("could not release the block nodes after the failed migration: %s", exc)
        if self.exit_on_error:
            self.request_exit(1)

    async def _incoming_complete(self, globalstate: str | None) -> None:
        vm = self.vm
        graph = self.block.graph
        late = self.capabilities["late-block-activate"]
        activate = not (late and not vm.autostart)
        # Nodes activated before the stream ended (an export, cont) may cache
        # metadata from before the source's last writes: re-read them too
        # (QEMU 7.2 skips them, conformance fact 39).
        async with self.block.lock.held():
            early = [node for node in graph.all_nodes() if node.active]
            if activate or early:
                start = time.monotonic()
                try:
                    if early:
                        await graph.reload_active(early)
                        log.info("incoming migration: %d block nodes activated early were "
                                 "invalidated again", len(early))
                    if activate:
                        await self.block.activate_all()
                except Exception as exc:
                    # Never run on stale caches: stay paused, nodes inactive; cont retries.
                    self.activation_error = f"Could not activate block devices: {exc}"
                    logs.write_raw(f"{logs.ERROR}: {self.activation_error}")
                    vm.autostart = False
                    # The trees that did activate give their locks back too (QEMU 7.2
                    # leaves them active): nothing is held while nothing may run.
                    try:
                        await self.block.inactivate_all()
                    except Exception as undo:
                        log.error("could not inactivate block nodes again: %s", undo)
                else:
                    self.activation_error = None
                    spent = time.monotonic() - start
                    self.metrics.observe_activate_all(spent)
                    log.info("incoming migration: %d block nodes activated in %.1f ms",
                             len(graph.nodes), spent * 1000)
        if globalstate is None or globalstate == "running":
            if vm.autostart:
                vm.start()
            else:
                vm.set_state(RunState.PAUSED)
        else:
            try:
                vm.set_state(RunState(globalstate))
            except ValueError:
                vm.set_state(RunState.PAUSED)

    def after_cont_activation(self) -> None:
        """cont activated everything: a failed activation is resolved."""
        self.activation_error = None

    async def close(self) -> None:
        """Daemon shutdown: end both directions before the block layer closes."""
        task = self.task
        if task is not None and not task.done():
            self.cancel()
            if self.channel is not None:
                self.channel.abort()
            done, _ = await asyncio.wait({task}, timeout=10)
            if not done:
                task.cancel()
                await asyncio.wait({task}, timeout=5)
        if self.listener is not None:
            self.listener.close()
        incoming = self.incoming_task
        if incoming is not None and not incoming.done():
            incoming.cancel()
            await asyncio.wait({incoming}, timeout=5)


def _socket_error(exc: BaseException) -> str:
    if isinstance(exc, BrokenPipeError):
        return "Unable to write to socket: Broken pipe"
    if isinstance(exc, ConnectionResetError):
        return "Unable to write to socket: Connection reset by peer"
    strerror = getattr(exc, "strerror", None)
    return f"Unable to write to socket: {strerror or exc}"
