"""The run-state machine and the VM's stop/cont rules, with the events they emit.

Real objects throughout: the transition table, an EventBus with a sink that
keeps what it receives, the daemon's metrics, and block hooks without devices.
"""

from __future__ import annotations

import itertools
import json
from typing import Any

import pytest

from qmpd.errors import GenericError
from qmpd.metrics import Metrics
from qmpd.qmp.events import EventBus
from qmpd.runstate import TRANSITIONS, InvalidTransition, RunState, RunStateMachine
from qmpd.vm import VirtualMachine

S = RunState


class Received:
    """An event sink that keeps the names of the events it gets."""

    pretty = False

    def __init__(self) -> None:
        self.names: list[str] = []

    def send_event(self, plain: bytes, pretty: bytes | None) -> None:
        self.names.append(json.loads(plain)["event"])


def vm(state: RunState, autostart: bool = True) -> tuple[VirtualMachine, Received, Metrics]:
    metrics = Metrics()
    bus = EventBus(metrics)
    sink = Received()
    bus.subscribe(sink)
    return VirtualMachine(bus, state, autostart=autostart, metrics=metrics), sink, metrics


def published(metrics: Metrics) -> str:
    """The run state the metrics show."""
    states = [s for s in RunState
              if metrics.registry.get_sample_value("qmpd_run_state", {"qmpd_run_state": s.value})]
    assert len(states) == 1, states
    return states[0].value


# --- the table ---------------------------------------------------------------------


@pytest.mark.parametrize(("old", "new"), list(itertools.product(RunState, RunState)))
def test_every_pair_follows_the_table(old: RunState, new: RunState) -> None:
    machine = RunStateMachine(old)
    allowed = new == old or new in TRANSITIONS[old]
    assert machine.can_set(new) is allowed
    if allowed:
        machine.set(new)
        assert machine.state == new
    else:
        with pytest.raises(InvalidTransition) as caught:
            machine.set(new)
        assert (caught.value.old, caught.value.new) == (old, new)
        assert machine.state == old


@pytest.mark.parametrize(
    ("old", "new"),
    [
        # QEMU 7.2's runstate_transitions_def, a few edges migration and cont rely on.
        (S.PRELAUNCH, S.RUNNING),
        (S.PRELAUNCH, S.INMIGRATE),
        (S.INMIGRATE, S.RUNNING),
        (S.INMIGRATE, S.PAUSED),
        (S.INMIGRATE, S.POSTMIGRATE),
        (S.RUNNING, S.PAUSED),
        (S.RUNNING, S.FINISH_MIGRATE),
        (S.FINISH_MIGRATE, S.POSTMIGRATE),
        (S.FINISH_MIGRATE, S.RUNNING),
        (S.POSTMIGRATE, S.RUNNING),
        (S.PAUSED, S.RUNNING),
        (S.SHUTDOWN, S.PAUSED),
    ],
)
def test_allowed_transitions(old: RunState, new: RunState) -> None:
    machine = RunStateMachine(old)
    machine.set(new)
    assert machine.state == new


@pytest.mark.parametrize(
    ("old", "new"),
    [
        (S.PRELAUNCH, S.PAUSED),
        (S.SHUTDOWN, S.RUNNING),
        (S.POSTMIGRATE, S.INMIGRATE),
        (S.SAVE_VM, S.PAUSED),
        (S.RUNNING, S.INMIGRATE),
        (S.PAUSED, S.SHUTDOWN),
    ],
)
def test_refused_transitions_keep_the_state(old: RunState, new: RunState) -> None:
    machine = RunStateMachine(old)
    assert not machine.can_set(new)
    with pytest.raises(InvalidTransition, match=f"^invalid runstate transition: "
                                                f"'{old.value}' -> '{new.value}'$"):
        machine.set(new)
    assert machine.state == old


def test_same_state_is_always_allowed() -> None:
    for state in RunState:
        machine = RunStateMachine(state)
        machine.set(state)
        assert machine.state == state


def test_needs_reset() -> None:
    assert {s for s in RunState if RunStateMachine(s).needs_reset} == {
        S.INTERNAL_ERROR, S.SHUTDOWN}


# --- stop, cont and their events -----------------------------------------------------


def test_new_vm_publishes_its_state() -> None:
    machine, sink, metrics = vm(S.PRELAUNCH)
    assert published(metrics) == "prelaunch" and sink.names == []
    machine.start()
    assert machine.state == S.RUNNING and sink.names == ["RESUME"]
    assert published(metrics) == "running"
    machine.start()
    assert sink.names == ["RESUME"]


async def test_stop_emits_stop_once() -> None:
    machine, sink, metrics = vm(S.RUNNING)
    await machine.stop()
    assert machine.state == S.PAUSED and sink.names == ["STOP"]
    assert published(metrics) == "paused"
    await machine.stop()
    assert machine.state == S.PAUSED and sink.names == ["STOP"]


async def test_stop_while_inmigrate_only_clears_autostart() -> None:
    machine, sink, _ = vm(S.INMIGRATE)
    await machine.stop()
    assert machine.state == S.INMIGRATE and not machine.autostart and sink.names == []


async def test_cont_resumes_and_runs_the_activation_hooks() -> None:
    machine, sink, _ = vm(S.PAUSED)
    order: list[Any] = []
    machine.after_activation.append(lambda: order.append(machine.state))
    await machine.cont()
    assert machine.state == S.RUNNING and sink.names == ["RESUME"]
    assert order == [S.PAUSED]  # hooks run before the VM resumes


async def test_cont_while_inmigrate_sets_autostart() -> None:
    machine, sink, _ = vm(S.INMIGRATE, autostart=False)
    await machine.cont()
    assert machine.state == S.INMIGRATE and machine.autostart and sink.names == []


@pytest.mark.parametrize(
    ("state", "desc"),
    [
        (S.SHUTDOWN, "Resetting the Virtual Machine is required"),
        (S.INTERNAL_ERROR, "Resetting the Virtual Machine is required"),
        (S.FINISH_MIGRATE, "Migration is not finalized yet"),
    ],
)
async def test_cont_refused(state: RunState, desc: str) -> None:
    machine, sink, _ = vm(state)
    with pytest.raises(GenericError, match=f"^{desc}$"):
        await machine.cont()
    assert machine.state == state and sink.names == []


async def test_cont_while_suspended_does_nothing() -> None:
    machine, sink, _ = vm(S.SUSPENDED)
    await machine.cont()
    assert machine.state == S.SUSPENDED and sink.names == []


async def test_cont_after_migrating_away() -> None:
    machine, sink, _ = vm(S.POSTMIGRATE)
    await machine.cont()
    assert machine.state == S.RUNNING and sink.names == ["RESUME"]
