"""The destination side of a live migration on shared storage.

Nodes added while ``inmigrate`` are inactive (no write locks, nothing cached
is trusted).  Only once the whole stream has arrived and parsed:
invalidate-all (every node re-reads its metadata, children first; nodes
activated early by an export or ``cont`` are flushed and invalidated again),
then run state from the stream's globalstate and autostart.  If activation
fails the daemon stays paused with its nodes inactive; ``cont`` retries.  Any
other failure of the incoming task ends in ``failed`` with every node
inactive again (no write lock held), or exits, as configured.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections.abc import Callable
from typing import Any

from qmpd import logs, net
from qmpd.errors import GenericError
from qmpd.migration import stream
from qmpd.migration.bitmaps import IncomingBitmaps
from qmpd.migration.channels import Channel, FdStore, Listener, TlsSettings
from qmpd.migration.deps import BlockSide, Events, ExitRequest, MigrationMetrics, RunStateSide
from qmpd.migration.state import MigrationSettings, MigrationStatus
from qmpd.runstate import TRANSITIONS as RUN_STATE_TRANSITIONS
from qmpd.runstate import RunState

log = logging.getLogger(__name__)

_S = MigrationStatus


class _IncomingFailed(Exception):
    """The incoming migration failed: ``text`` for stderr, ``reason`` the error-desc."""

    def __init__(self, text: str, reason: str) -> None:
        super().__init__(reason)
        self.text = text
        self.reason = reason


def _rehearse_parsing(capabilities: dict[str, bool]) -> int:
    """Parse a stream like the one to come a few times, now (sans-IO, no side
    effect): the real one is parsed in the downtime, where parsing it on
    code run for the first time cost twice as much (~180 against ~80 us CPU
    for a stream without RAM; the interpreter specialises a function's code
    only after its first runs).  Returns how many parsed to the end."""
    writer = stream.StreamWriter(capabilities)
    data = writer.setup() + writer.complete("running")
    done = 0
    for _ in range(_REHEARSALS):
        reader = stream.StreamReader(capabilities)
        try:
            reader.feed(data)
            reader.close()
        except stream.MigrationStreamError:  # best effort: the real stream decides
            break
        done += reader.done
    return done


#: Enough runs for the interpreter to specialise the parser's code.
_REHEARSALS = 12


class IncomingMigration:
    """migrate-incoming (or -incoming): at most one per process."""

    def __init__(
        self, settings: MigrationSettings, fds: FdStore, *, events: Events,
        vm: RunStateSide, block: BlockSide, metrics: MigrationMetrics,
        request_exit: ExitRequest, tls: Callable[[], TlsSettings | None] = lambda: None,
    ) -> None:
        self.settings = settings
        self.tls = tls
        self.fds = fds
        self.events = events
        self.vm = vm
        self.block = block
        self.metrics = metrics
        self.request_exit = request_exit
        self.started = False
        self.status = _S.NONE
        self.error: str | None = None
        self.listener: Listener | None = None
        self.task: asyncio.Task[None] | None = None
        self.exit_on_error = True
        self.activation_error: str | None = None
        #: Activating the nodes at the end of the stream (``progress()``).
        self.activating = False
        #: How long activating every node took, in ms (None: it did not happen).
        self.activation_time: int | None = None
        self.bytes_received = 0
        self._bytes_in = metrics.migration_bytes.labels("in")

    @property
    def capabilities(self) -> dict[str, bool]:
        return self.settings.capabilities

    def _set(self, status: MigrationStatus) -> None:
        self.status = status
        if self.capabilities["events"]:
            self.events.emit("MIGRATION", {"status": status.value})
        self.metrics.migration_status(status.value)

    def progress(self) -> dict[str, Any] | None:
        """Where the incoming migration has got (for /api/status), and the
        activation's time once it completed; None before migrate-incoming."""
        if not self.started:
            return None
        status = self.status
        if status in (_S.COMPLETED, _S.FAILED):
            done, step = (3, "completed") if status == _S.COMPLETED else (0, "failed")
        elif self.activating:
            done, step = 2, "activating the nodes"
        elif status == _S.ACTIVE:
            done, step = 1, "receiving"
        else:
            done, step = 0, "waiting for the source"
        info: dict[str, Any] = {
            "role": "destination", "status": status.value, "step": step,
            "steps-done": done, "steps-total": 3, "bytes": self.bytes_received,
        }
        if self.activation_time is not None:
            info["activation-time"] = self.activation_time
        return info

    def info(self) -> dict[str, Any]:
        """query-migrate's destination view."""
        info: dict[str, Any] = {}
        if not self.started:
            return info
        if self.status != _S.NONE:
            info["status"] = self.status.value
        if self.listener is not None and self.status in (_S.NONE, _S.ACTIVE):
            if self.listener.addresses:
                info["socket-address"] = self.listener.addresses
        if self.error and self.status == _S.FAILED:
            info["error-desc"] = self.error
        if self.activation_error:
            info["error-desc"] = self.activation_error
        return info

    async def start(self, uri_text: str, exit_on_error: bool = True) -> None:
        if self.vm.state != RunState.INMIGRATE:
            raise GenericError("'-incoming' was not specified on the command line")
        if self.started:
            raise GenericError("The incoming migration has already been started")
        # QEMU 7.2 sends this one whatever the events capability says, and
        # before it looks at the URI: a refused URI still shows it.
        self.events.emit("MIGRATION", {"status": "setup"})
        try:
            uri = net.parse_migration_uri(uri_text)
        except GenericError as exc:
            if net.is_bad_protocol(exc):
                raise GenericError(f"unknown migration protocol: {uri_text}") from None
            raise
        listener = Listener(uri, self.fds, self.tls)
        await listener.start()
        self.listener = listener
        self.started = True
        self.exit_on_error = exit_on_error
        _rehearse_parsing(self.capabilities)  # before the stream, not in the downtime
        self.task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        """The incoming task: however it ends, the status is final, and a failure
        releases the images (or exits, as configured)."""
        assert self.listener is not None
        channel: Channel | None = None
        try:
            channel = await self.listener.accept()
            self._set(_S.ACTIVE)
            await self._load(channel)
        except asyncio.CancelledError:
            if channel is not None:
                channel.abort()
            raise
        except _IncomingFailed as exc:
            await self._failed(channel, exc.text, exc.reason)
        except Exception as exc:  # a bug or a refusal not foreseen: never hang holding images
            reason = f"incoming migration failed: {exc}"
            await self._failed(channel, f"{logs.ERROR}: {reason}", reason)

    async def _load(self, channel: Channel) -> None:
        assert self.listener is not None
        reader = stream.StreamReader(self.capabilities)
        bitmaps: IncomingBitmaps | None = None
        if self.capabilities["dirty-bitmaps"]:
            bitmaps = IncomingBitmaps(
                self.block.graph.nodes, lambda text: logs.write_raw(f"{logs.ERROR}: {text}"),
                self.settings.parameters.get("block-bitmap-mapping"))
            reader.bitmap_sink = bitmaps
        globalstate: str | None = None
        return_path = False
        try:
            while not reader.done:
                data = await channel.reader.read(256 * 1024)
                self.bytes_received += len(data)
                if data:
                    self._bytes_in.inc(len(data))
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
            if bitmaps is not None:
                bitmaps.cancel()
            raise _IncomingFailed(exc.render(logs.ERROR), exc.reason) from None
        except (ConnectionError, OSError) as exc:
            raise _IncomingFailed(
                f"{logs.ERROR}: load of migration failed: {exc.strerror or exc}", str(exc)
            ) from None
        self._check_globalstate(globalstate)
        if not return_path and channel.writer is not None and channel.kind == "socket":
            # The stream is in: an orderly close tells a source without a
            # return path that it was taken (it waits for that on tcp: and
            # TLS), before the activation rather than after it.
            channel.writer.close()
        # A collection between the end of the stream and RESUME would be
        # downtime: the collector waits until the run state is set.
        collecting = gc.isenabled()
        gc.disable()
        self.activating = True
        try:
            await self._complete(globalstate, bitmaps)
        finally:
            self.activating = False
            if collecting:
                gc.enable()
        if return_path and channel.writer is not None:
            try:
                channel.writer.write(stream.encode_rp_message(stream.RPMessageType.SHUT,
                                                              (0).to_bytes(4, "big")))
                await channel.writer.drain()
            except (ConnectionError, OSError):
                pass
        self._set(_S.COMPLETED)
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

    async def _failed(self, channel: Channel | None, text: str, reason: str) -> None:
        logs.write_raw(text)
        self.error = reason
        self._set(_S.FAILED)
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

    async def _complete(self, globalstate: str | None,
                        bitmaps: IncomingBitmaps | None = None) -> None:
        vm = self.vm
        graph = self.block.graph
        late = self.capabilities["late-block-activate"]
        activate = not (late and not vm.autostart)
        spent: float | None = None
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
            # The run state (RESUME) as soon as the nodes are ready; the
            # bookkeeping comes after.
            if bitmaps is not None:
                bitmaps.before_vm_start()
            self._enter_run_state(globalstate)
        if spent is not None:
            self.activation_time = round(spent * 1000)
            self.metrics.observe_activate_all(spent)
            log.info("incoming migration: %d block nodes activated in %.1f ms",
                     len(graph.nodes), spent * 1000)

    def _enter_run_state(self, globalstate: str | None) -> None:
        vm = self.vm
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

    async def close(self) -> None:
        """Daemon shutdown: stop listening and end the incoming task."""
        if self.listener is not None:
            self.listener.close()
        task = self.task
        if task is not None and not task.done():
            task.cancel()
            await asyncio.wait({task}, timeout=5)
