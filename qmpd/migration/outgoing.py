"""The source side of a live migration on shared storage.

The order of things is QEMU 7.2's, because management tools depend on it:
``setup`` (event before migrate's reply), pass 1, ``active``, stop (STOP)
and flush, [``pre-switchover`` until migrate-continue, ``device``],
inactivate every block node (flush, mark clean, drop write locks), pass 2,
the rest of the stream and EOF, ``completed``, run state ``postmigrate``.
Any failure after the stop re-activates the nodes (their caches are re-read:
another process may have opened the images meanwhile) and resumes the VM if
it was running.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import ssl
import time
from collections.abc import Callable
from typing import Any

from qmpd import logs, net
from qmpd.block.dirty_bitmap import DirtyBitmap
from qmpd.errors import GenericError
from qmpd.migration import stream
from qmpd.migration.bitmaps import outgoing_bitmaps
from qmpd.migration.channels import (
    Channel,
    ChannelError,
    FdStore,
    TlsSettings,
    connect,
)
from qmpd.migration.deps import BlockSide, Events, MigrationMetrics, RunStateSide
from qmpd.migration.state import (
    RUNNING_STATES,
    TRANSITIONS,
    MigrationSettings,
    MigrationStatus,
)
from qmpd.migration.stream.bitmaps import BitmapRefused, MigratedBitmap
from qmpd.runstate import RunState

log = logging.getLogger(__name__)

_S = MigrationStatus


#: The source's steps, each named when it begins (``progress()``).
SOURCE_STEPS = ("connecting", "sending the setup", "switchover: stop, inactivate, send",
                "waiting for the destination", "completed")


#: Enough runs for the interpreter to specialise the event encoder's code.
_REHEARSALS = 8


def _ms(seconds: float) -> int:
    return int(seconds * 1000)


def _mbps(nbytes: int, total_ms: int) -> float:
    """QEMU's figure: megabits per second over the whole migration."""
    if total_ms <= 0:
        return 0
    return nbytes * 8.0 / (total_ms / 1000.0) / 1000.0 / 1000.0


class _Cancelled(Exception):
    """migrate_cancel was asked: unwind at the next step."""


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


class OutgoingMigration:
    """migrate, migrate_cancel and migrate-continue: one source at a time."""

    def __init__(
        self, settings: MigrationSettings, fds: FdStore, *, events: Events,
        vm: RunStateSide, block: BlockSide, metrics: MigrationMetrics,
        tls: Callable[[], TlsSettings | None] = lambda: None,
    ) -> None:
        self.settings = settings
        self.fds = fds
        self.tls = tls
        self.events = events
        self.vm = vm
        self.block = block
        self.metrics = metrics
        self.status = _S.NONE
        self.error: str | None = None
        #: Why the last migration failed, also when error-desc stays empty.
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
        self.bytes_sent = 0
        self._bytes_at_start = 0
        self._window_end = 0.0
        self._window_used = 0
        self._bytes_out = metrics.migration_bytes.labels("out")
        self._gc_paused = False

    @property
    def capabilities(self) -> dict[str, bool]:
        return self.settings.capabilities

    @property
    def parameters(self) -> dict[str, Any]:
        return self.settings.parameters

    def _set(self, status: MigrationStatus) -> None:
        if status != self.status and status not in TRANSITIONS[self.status]:
            raise RuntimeError(f"migration: {self.status.value} -> {status.value} not allowed")
        self.status = status
        if self.capabilities["events"]:
            self.events.emit("MIGRATION", {"status": status.value})
        self.metrics.migration_status(status.value)

    @property
    def running(self) -> bool:
        return self.status in RUNNING_STATES

    @property
    def last_failure(self) -> str | None:
        """Why the last migration failed (None unless it did)."""
        if self.status != _S.FAILED:
            return None
        return self.failure_reason or self.error or "no reason recorded"

    def info(self) -> dict[str, Any] | None:
        """query-migrate's source view; None before the first migration."""
        status = self.status
        if status == _S.NONE:
            return None
        info: dict[str, Any] = {"status": status.value}
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

    def progress(self) -> dict[str, Any] | None:
        """Where the last migration has got, in the handover's steps (for
        /api/status: the stream is small, its steps are the progress), and
        its timings once it completed; None before the first migration."""
        status = self.status
        if status == _S.NONE:
            return None
        if status == _S.SETUP:
            done, step = 0, "connecting"
        elif status == _S.COMPLETED:
            done, step = len(SOURCE_STEPS) - 1, "completed"
        elif self.committed:
            done, step = 3, SOURCE_STEPS[3]
        elif status == _S.PRE_SWITCHOVER:
            done, step = 2, "paused before switchover"
        elif self.vm.state == RunState.FINISH_MIGRATE:
            done, step = 2, SOURCE_STEPS[2]
        elif status == _S.ACTIVE:
            done, step = 1, SOURCE_STEPS[1]
        else:  # failed, cancelling, cancelled
            done, step = 0, status.value
        info: dict[str, Any] = {
            "role": "source", "status": status.value, "step": step,
            "steps-done": done, "steps-total": len(SOURCE_STEPS) - 1,
            "bytes": self.bytes_sent - self._bytes_at_start,
        }
        if status == _S.COMPLETED:
            info.update({"setup-time": self.setup_time, "total-time": self.total_time,
                         "downtime": self.downtime})
        return info

    def migrate(self, args: dict[str, Any]) -> None:
        """Checks, the setup event, and the migration task; returns at once."""
        if args.get("resume"):
            raise GenericError("Cannot resume if there is no paused migration")
        # A failed one still giving the images back (it reported failed first,
        # as QEMU does) is in progress too: its clean-up is not over.
        if self.running or (self.task is not None and not self.task.done()):
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
            uri = net.parse_migration_uri(args["uri"])
            if uri.scheme == "fd" and not self.fds.has(uri.target):
                # QEMU looks the descriptor up before answering.
                raise GenericError(f"File descriptor named '{uri.target}' has not been found")
        except GenericError as exc:
            if not net.is_bad_protocol(exc):
                self.error = exc.desc
            self._set(_S.FAILED)
            raise
        self.task = asyncio.get_running_loop().create_task(self._outgoing(uri))

    async def _outgoing(self, uri: net.MigrationURI) -> None:
        writer = stream.StreamWriter(self.capabilities)
        sending: list[tuple[DirtyBitmap, MigratedBitmap]] = []
        stopped = False
        was_running = False
        inactivated = False
        closing: Channel | None = None  # completed already: only the close is left
        try:
            try:
                self.channel = await connect(uri, self.fds, self.tls())
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
            if self.capabilities["dirty-bitmaps"]:
                sending = self._take_bitmaps()
                writer = stream.StreamWriter(self.capabilities, [m for _, m in sending])
            await self._send(channel, writer.setup(), throttled=True)
            await asyncio.sleep(0)  # the iterative phase: nothing more to send
            self._check_cancel()
            # A destination that went away while we were iterating is noticed
            # here, before the VM stops, as a QEMU source notices it at its next
            # iteration's write.
            channel.check_peer()
            # Under the graph lock from here on, taken before the stop (not in
            # the downtime): a cont already under way finishes first, and one
            # that comes later sees finish-migrate.  Without a pause nothing
            # comes between the stop and the inactivation: one hold covers all.
            async with self.block.lock.held():
                # What the images have to write back is written now, while the
                # guest still runs: the downtime's flush then finds (mostly)
                # nothing, and runs on code the process has already been through.
                await self.block.write_back_early()
                self._check_cancel()
                # Switchover.
                runstate_at_switchover = self.vm.state
                was_running = runstate_at_switchover == RunState.RUNNING
                # The final sections depend only on that state: made before the
                # stop, the downtime only sends them.
                final = b"" if sending else writer.complete(runstate_at_switchover.value)
                # A collection in the downtime would be downtime: the switchover
                # allocates little, so the collector waits until it is over (or
                # until something has to be waited for).
                self._pause_gc()
                pause = self.capabilities["pause-before-switchover"]
                if not pause:
                    # The inactivation follows the stop at once: its code and
                    # data are made warm now (changing nothing), not in the
                    # downtime.  Held before switchover, the wait cools them again.
                    self._rehearse_switchover()
                stop_time = time.monotonic()
                stopped = True
                await self._stop_for_switchover(pause)
                if not pause:
                    inactivated = True  # if it fails, some nodes may be: re-activate them all
                    await self._inactivate(stop_time)
            if pause:
                self._set(_S.PRE_SWITCHOVER)
                self._resume_gc()
                await self.continue_event.wait()
                self._pause_gc()
                self._check_cancel()
                self._set(_S.DEVICE)
                self._check_cancel()
                inactivated = True
                async with self.block.lock.held():
                    await self._inactivate(stop_time)
            if sending:
                # The bits as the inactivation left them: nothing writes now.
                final = writer.complete(runstate_at_switchover.value,
                                        bits=[bitmap.to_bytes() for bitmap, _ in sending])
            # The downtime phase is never rate-limited (QEMU lifts the limit too).
            await self._send_now(channel, final)
            # The whole stream is out: the destination may be running already,
            # so a cancel from now on would only risk two active sides.
            self.committed = True
            if writer.return_path:
                # Until SHUT the destination has not confirmed it loaded the
                # stream: a cancel may still take the images back (if the
                # destination activated them, image locking refuses that).
                self.awaiting_shut = True
                self._resume_gc()
                try:
                    await self._wait_for_shut(channel)
                finally:
                    self.awaiting_shut = False
                self._check_cancel()  # a SHUT still buffered when the cancel came
            elif uri.scheme == "tcp" or channel.tls:
                # No return path: the destination's close is the only sign it
                # took the stream.  A TLS destination refusing this source (no
                # TLS, a certificate or DN it refuses) resets the connection
                # instead, maybe after every byte was written: QEMU 7.2's
                # source then often reports completed; this one never does.
                sent_at = time.monotonic()
                self.awaiting_shut = True
                self._resume_gc()
                try:
                    await self._wait_for_close(channel)
                finally:
                    self.awaiting_shut = False
                self._check_cancel()
                stop_time += time.monotonic() - sent_at  # the downtime ends when all is sent
            # As QEMU 7.2, completed once everything is written, and the channel
            # closed after: at once if the kernel has every byte, else (bytes
            # still queued here, or an exec: command to wait for) first.
            sent = channel.process is None and channel.write_buffer_empty()
            if not sent:
                await channel.close()
                self.channel = None
            now = time.monotonic()
            self.downtime = _ms(now - stop_time)
            self.total_time = _ms(now - self.start_time)
            self.mbps = _mbps(self.bytes_sent - self._bytes_at_start, self.total_time)
            self._set(_S.COMPLETED)
            self.vm.set_state(RunState.POSTMIGRATE)
            self._resume_gc()
            self.metrics.migration_done(self.total_time / 1000, self.downtime / 1000)
            if sent:
                self.channel = None
                closing = channel
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
        finally:
            self._resume_gc()
            self._release_bitmaps(sending, stored=self.status != _S.COMPLETED)
        if closing is not None:
            # Outside the handlers above: nothing may undo a completed migration.
            await closing.close()

    def _take_bitmaps(self) -> list[tuple[DirtyBitmap, MigratedBitmap]]:
        """The bitmaps that travel, busy until the end; the stream carries
        them, so inactivation does not store them in their images (QEMU
        leaves them marked in use there)."""
        try:
            sending = outgoing_bitmaps(
                sorted(self.block.graph.all_nodes(), key=lambda node: node.serial),
                self.parameters.get("block-bitmap-mapping"))
        except BitmapRefused as exc:
            logs.write_raw(f"{logs.ERROR}: {exc.message}")
            raise _Failed(None, exc.message) from None
        for bitmap, _ in sending:
            bitmap.busy = True
            bitmap.migration = True
        return sending

    @staticmethod
    def _release_bitmaps(sending: list[tuple[DirtyBitmap, MigratedBitmap]],
                         stored: bool) -> None:
        # A migration that did not complete leaves the source owning its
        # bitmaps, persistent ones to be stored again.
        for bitmap, _ in sending:
            bitmap.busy = False
            if stored:
                bitmap.migration = False

    def _rehearse_switchover(self) -> None:
        """The block layer's and the events' parts of the switchover, changing
        nothing (no node, lock, event or byte sent)."""
        self.block.rehearse_inactivation()
        if self.capabilities["events"]:
            rehearse = self.events.rehearse
            for _ in range(_REHEARSALS):
                rehearse("STOP")
                rehearse("MIGRATION_PASS", {"pass": 2})
                rehearse("MIGRATION", {"status": _S.COMPLETED.value})

    def _pause_gc(self) -> None:
        if gc.isenabled():
            gc.disable()
            self._gc_paused = True

    def _resume_gc(self) -> None:
        if self._gc_paused:
            self._gc_paused = False
            gc.enable()

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
            await self._send_now(channel, part)

    async def _send_now(self, channel: Channel, data: bytes | memoryview) -> None:
        """Write ``data`` in one piece, without rate limit (the downtime phase)."""
        assert channel.writer is not None
        try:
            channel.writer.write(data)
            await channel.writer.drain()
        except (ConnectionError, OSError) as exc:
            raise ChannelError(channel.write_error(exc)) from None
        self.bytes_sent += len(data)
        self._bytes_out.inc(len(data))

    async def _wait_for_shut(self, channel: Channel) -> None:
        """With a return path, the destination says SHUT once it has loaded everything.

        QEMU 7.2 marks the return path bad and fails without an error-desc
        (and without a message); qmpd says why on stderr.
        """
        messages = stream.ReturnPathReader()
        while True:
            try:
                data = await channel.reader.read(4096)
            except (ConnectionError, OSError):
                data = b""
            if not data:
                raise self._return_path_failure(
                    "return path: the destination closed the channel before SHUT")
            try:
                received = messages.feed(data)
            except stream.MigrationStreamError as exc:
                raise self._return_path_failure(f"return path: {exc.reason}") from None
            for message in received:
                if message.type == stream.RPMessageType.PONG:
                    continue
                if message.type != stream.RPMessageType.SHUT or message.value:
                    raise self._return_path_failure(
                        "return path: the destination reported a failure")
                return

    @staticmethod
    async def _wait_for_close(channel: Channel) -> None:
        """Until the destination closes the channel: EOF, nothing else, is success."""
        try:
            data = await channel.reader.read(1)
        except ssl.SSLError as exc:
            if isinstance(exc, ssl.SSLEOFError):
                return  # closed without close_notify, as QEMU 7.2 closes
            reason = net.tls_reason(exc)
            logs.write_raw(f"{logs.ERROR}: the destination refused the stream: {reason}")
            raise _Failed(f"TLS handshake failed: {reason}") from None
        except (ConnectionError, OSError) as exc:
            strerror = getattr(exc, "strerror", None) or "Connection reset by peer"
            logs.write_raw(f"{logs.ERROR}: the destination dropped the connection "
                           f"before taking the stream: {strerror}")
            raise _Failed(f"Unable to read from socket: {strerror}") from None
        if data:
            reason = "the destination sent data, but there is no return path"
            logs.write_raw(f"{logs.ERROR}: {reason}")
            raise _Failed(None, reason)

    @staticmethod
    def _return_path_failure(reason: str) -> _Failed:
        logs.write_raw(f"{logs.ERROR}: {reason}")
        return _Failed(None, reason)

    async def _stop_for_switchover(self, pause: bool) -> None:
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
        if pause:
            await self.block.flush_all()

    async def _inactivate(self, stop_time: float) -> None:
        """Pass 2, then every block node inactivated (graph lock held)."""
        self._check_cancel()
        # QEMU 7.2 completes its iterable state (ram: the pass-2 sync) before
        # it inactivates the images, so pass 2 is announced even if that fails.
        if self.capabilities["events"]:
            self.events.emit("MIGRATION_PASS", {"pass": 2})
        inactivating = time.monotonic()
        try:
            await self.block.inactivate_all()
        except Exception as exc:
            # QEMU 7.2 prints this line and records no error-desc; qmpd keeps
            # the reason too (query-migrate, log, /ready).
            logs.write_raw(
                f"{logs.ERROR}: qemu_savevm_state_complete_precopy_non_iterable: "
                "bdrv_inactivate_all() failed (-1)"
            )
            raise _Failed(self._inactivation_failure(exc)) from None
        if log.isEnabledFor(logging.INFO):
            log.info("migration switchover: stop to inactivation %.1f ms, inactivation %.1f ms",
                     (inactivating - stop_time) * 1000, (time.monotonic() - inactivating) * 1000)

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
            # inactive: activation re-reads everything, under the graph lock
            # as every other activation (no graph change meets its reload).
            try:
                async with self.block.lock.held():
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

    async def close(self) -> None:
        """Daemon shutdown: end the migration before the block layer closes."""
        task = self.task
        if task is not None and not task.done():
            self.cancel()
            if self.channel is not None:
                self.channel.abort()
            done, _ = await asyncio.wait({task}, timeout=10)
            if not done:
                task.cancel()
                await asyncio.wait({task}, timeout=5)


def _socket_error(exc: BaseException) -> str:
    if isinstance(exc, BrokenPipeError):
        return "Unable to write to socket: Broken pipe"
    if isinstance(exc, ConnectionResetError):
        return "Unable to write to socket: Connection reset by peer"
    strerror = getattr(exc, "strerror", None)
    return f"Unable to write to socket: {strerror or exc}"
