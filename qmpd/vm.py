"""The "virtual machine" qmpd pretends to run: QEMU's stop/cont/start rules.

qmpd has no vCPUs, but management tooling drives the same run states as
on QEMU (and migration depends on them), so stop, cont and the STOP/RESUME
events behave as QEMU 7.2's do.  Block devices are reached through
:class:`BlockHooks`, which the block layer implements.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from qmpd.errors import GenericError
from qmpd.runstate import RunState, RunStateMachine

if TYPE_CHECKING:
    from qmpd.metrics import Metrics
    from qmpd.qmp.events import EventBus


class BlockHooks(Protocol):
    """What run-state changes ask of the block layer."""

    async def flush_all(self) -> None: ...

    async def activate_all(self) -> None: ...


class NoBlockDevices:
    """Block hooks for a daemon without block devices."""

    async def flush_all(self) -> None:
        return None

    async def activate_all(self) -> None:
        return None


class VirtualMachine:
    """Run state plus autostart, with the events QEMU emits around them."""

    def __init__(
        self,
        events: EventBus,
        initial: RunState,
        autostart: bool,
        block: BlockHooks | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.events = events
        self.machine = RunStateMachine(initial)
        self.autostart = autostart
        self.block: BlockHooks = block or NoBlockDevices()
        self.metrics = metrics
        #: Called after cont has activated every node.
        self.after_activation: list[Callable[[], None]] = []
        self._publish()

    @property
    def state(self) -> RunState:
        return self.machine.state

    def set_state(self, state: RunState) -> None:
        self.machine.set(state)
        self._publish()

    def _publish(self) -> None:
        if self.metrics is not None:
            self.metrics.run_state.state(self.machine.state.value)

    def start(self) -> None:
        """vm_start: RESUME, then running; nothing if already running."""
        if self.machine.state == RunState.RUNNING:
            return
        self.events.emit("RESUME")
        self.set_state(RunState.RUNNING)

    async def stop(self) -> None:
        """The stop command."""
        state = self.machine.state
        if state == RunState.INMIGRATE:
            # Only remembered: the daemon stays paused after migration.
            self.autostart = False
            return
        if state == RunState.RUNNING:
            self.set_state(RunState.PAUSED)
            self.events.emit("STOP")
        await self.block.flush_all()

    async def cont(self) -> None:
        """The cont command, as QEMU 7.2 orders its checks."""
        state = self.machine.state
        if self.machine.needs_reset:
            raise GenericError("Resetting the Virtual Machine is required")
        if state == RunState.SUSPENDED:
            return
        if state == RunState.FINISH_MIGRATE:
            raise GenericError("Migration is not finalized yet")
        await self.block.activate_all()
        for hook in self.after_activation:
            hook()
        if self.machine.state == RunState.INMIGRATE:
            self.autostart = True
        else:
            self.start()
