"""QEMU's run states and the transition table of QEMU 7.2."""

from __future__ import annotations

from enum import StrEnum


class RunState(StrEnum):
    """RunState, in QAPI's order."""

    DEBUG = "debug"
    INMIGRATE = "inmigrate"
    INTERNAL_ERROR = "internal-error"
    IO_ERROR = "io-error"
    PAUSED = "paused"
    POSTMIGRATE = "postmigrate"
    PRELAUNCH = "prelaunch"
    FINISH_MIGRATE = "finish-migrate"
    RESTORE_VM = "restore-vm"
    RUNNING = "running"
    SAVE_VM = "save-vm"
    SHUTDOWN = "shutdown"
    SUSPENDED = "suspended"
    WATCHDOG = "watchdog"
    GUEST_PANICKED = "guest-panicked"
    COLO = "colo"


_S = RunState

#: Allowed transitions in QEMU 7.2 (softmmu/runstate.c).  Setting a state to
#: itself is always allowed and does nothing.
TRANSITIONS: dict[RunState, frozenset[RunState]] = {
    _S.PRELAUNCH: frozenset({_S.INMIGRATE, _S.RUNNING, _S.FINISH_MIGRATE}),
    _S.DEBUG: frozenset({_S.RUNNING, _S.FINISH_MIGRATE, _S.PRELAUNCH, _S.SUSPENDED}),
    _S.INMIGRATE: frozenset(
        {
            _S.INTERNAL_ERROR, _S.IO_ERROR, _S.PAUSED, _S.RUNNING, _S.SHUTDOWN,
            _S.SUSPENDED, _S.WATCHDOG, _S.GUEST_PANICKED, _S.FINISH_MIGRATE,
            _S.PRELAUNCH, _S.POSTMIGRATE, _S.COLO,
        }
    ),
    _S.INTERNAL_ERROR: frozenset({_S.PAUSED, _S.FINISH_MIGRATE, _S.PRELAUNCH}),
    _S.IO_ERROR: frozenset({_S.RUNNING, _S.FINISH_MIGRATE, _S.PRELAUNCH}),
    _S.PAUSED: frozenset(
        {_S.RUNNING, _S.FINISH_MIGRATE, _S.POSTMIGRATE, _S.PRELAUNCH, _S.COLO}
    ),
    _S.POSTMIGRATE: frozenset({_S.RUNNING, _S.FINISH_MIGRATE, _S.PRELAUNCH}),
    _S.FINISH_MIGRATE: frozenset(
        {_S.RUNNING, _S.PAUSED, _S.POSTMIGRATE, _S.PRELAUNCH, _S.COLO}
    ),
    _S.RESTORE_VM: frozenset({_S.RUNNING, _S.PRELAUNCH}),
    _S.COLO: frozenset({_S.RUNNING, _S.PRELAUNCH, _S.SHUTDOWN}),
    _S.RUNNING: frozenset(
        {
            _S.DEBUG, _S.INTERNAL_ERROR, _S.IO_ERROR, _S.PAUSED, _S.FINISH_MIGRATE,
            _S.RESTORE_VM, _S.SAVE_VM, _S.SHUTDOWN, _S.WATCHDOG, _S.GUEST_PANICKED,
            _S.COLO, _S.SUSPENDED,
        }
    ),
    _S.SAVE_VM: frozenset({_S.RUNNING}),
    _S.SHUTDOWN: frozenset({_S.PAUSED, _S.FINISH_MIGRATE, _S.PRELAUNCH, _S.COLO}),
    _S.SUSPENDED: frozenset({_S.RUNNING, _S.FINISH_MIGRATE, _S.PRELAUNCH, _S.COLO}),
    _S.WATCHDOG: frozenset({_S.RUNNING, _S.FINISH_MIGRATE, _S.PRELAUNCH, _S.COLO}),
    _S.GUEST_PANICKED: frozenset({_S.RUNNING, _S.FINISH_MIGRATE, _S.PRELAUNCH}),
}


class InvalidTransition(RuntimeError):
    """A transition QEMU would abort on; qmpd refuses it and keeps running."""

    def __init__(self, old: RunState, new: RunState) -> None:
        super().__init__(f"invalid runstate transition: '{old.value}' -> '{new.value}'")
        self.old = old
        self.new = new


class RunStateMachine:
    """The current run state; every change goes through the table."""

    def __init__(self, initial: RunState = RunState.PRELAUNCH) -> None:
        self.state = initial

    def can_set(self, new: RunState) -> bool:
        """Whether :meth:`set` would accept ``new`` (the same state always is)."""
        return new == self.state or new in TRANSITIONS[self.state]

    def set(self, new: RunState) -> None:
        if not self.can_set(new):
            raise InvalidTransition(self.state, new)
        self.state = new

    @property
    def needs_reset(self) -> bool:
        return self.state in (RunState.INTERNAL_ERROR, RunState.SHUTDOWN)
