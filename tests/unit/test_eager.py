"""Eager starts (qmpd.eager) and the graph lock's use of them (issue 10):
an operation that need not wait runs to its end without a task, one that
waits goes on in a task the lock owns, still to its end when its caller is
cancelled, and operations still run one after the other."""

from __future__ import annotations

import asyncio

import pytest

from qmpd import eager
from qmpd.block.serial import GraphLock
from qmpd.errors import GenericError


async def test_a_coroutine_that_does_not_wait_ends_in_the_first_step() -> None:
    steps: list[str] = []

    async def quick() -> int:
        steps.append("ran")
        return 7

    finished, value = eager.start(quick())
    assert (finished, value, steps) == (True, 7, ["ran"])


async def test_a_coroutine_that_waits_goes_on_in_a_task() -> None:
    loop = asyncio.get_running_loop()
    gate: asyncio.Future[int] = loop.create_future()
    steps: list[str] = []

    async def slow() -> int:
        steps.append("before")
        got = await gate
        steps.append("after")
        await asyncio.sleep(0)  # a bare yield is handed on too
        return got + 1

    finished, started = eager.start(slow())
    assert not finished and steps == ["before"]
    assert isinstance(started, eager.Started)
    task = loop.create_task(eager.resume(started))
    await asyncio.sleep(0)
    assert not task.done()
    gate.set_result(41)
    assert await task == 42
    assert steps == ["before", "after"]


async def test_cancelling_the_task_reaches_the_coroutine_where_it_waits() -> None:
    loop = asyncio.get_running_loop()
    gate: asyncio.Future[None] = loop.create_future()
    seen: list[str] = []

    async def waits() -> None:
        try:
            await gate
        except asyncio.CancelledError:
            seen.append("cancelled")
            raise
        finally:
            seen.append("finally")

    finished, started = eager.start(waits())
    assert not finished
    task = loop.create_task(eager.resume(started))  # type: ignore[arg-type]
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert seen == ["cancelled", "finally"]
    assert gate.cancelled()


async def test_errors_of_the_first_step_and_of_later_ones_reach_the_caller() -> None:
    async def fails_now() -> None:
        raise GenericError("now")

    with pytest.raises(GenericError, match="now"):
        eager.start(fails_now())

    async def fails_later() -> None:
        await asyncio.sleep(0)
        raise GenericError("later")

    finished, started = eager.start(fails_later())
    assert not finished
    with pytest.raises(GenericError, match="later"):
        await asyncio.get_running_loop().create_task(
            eager.resume(started))  # type: ignore[arg-type]


async def test_an_uncontended_operation_runs_without_a_task() -> None:
    lock = GraphLock()
    tasks_before = len(asyncio.all_tasks())
    seen: list[tuple[bool, int, int]] = []

    async def operation() -> str:
        seen.append((lock.locked, lock.generation, len(asyncio.all_tasks())))
        return "done"

    assert await lock.run(operation) == "done"
    # Under the lock, in the caller's task: no task of its own.
    assert seen == [(True, 1, tasks_before)]
    assert not lock.locked and lock.generation == 2


async def test_a_waiting_operation_ends_even_when_its_caller_is_cancelled() -> None:
    lock = GraphLock()
    loop = asyncio.get_running_loop()
    gate: asyncio.Future[None] = loop.create_future()
    steps: list[str] = []

    async def operation() -> None:
        steps.append("start")
        await gate
        await asyncio.sleep(0)
        steps.append("end")

    caller = loop.create_task(lock.run(operation))
    await asyncio.sleep(0)
    assert steps == ["start"] and lock.locked
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller
    assert lock.locked  # the operation still holds it, still running
    gate.set_result(None)
    await lock.close()  # waits for the operations in flight
    assert steps == ["start", "end"]
    assert not lock.locked
    with pytest.raises(GenericError, match="shutting down"):
        await lock.run(operation)


async def test_operations_still_run_one_after_the_other() -> None:
    lock = GraphLock()
    loop = asyncio.get_running_loop()
    gate: asyncio.Future[None] = loop.create_future()
    order: list[str] = []

    async def first() -> None:
        order.append("first start")
        await gate
        order.append("first end")

    async def second() -> None:
        order.append("second")  # never while the first holds the lock

    one = loop.create_task(lock.run(first))
    await asyncio.sleep(0)
    two = loop.create_task(lock.run(second))
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert order == ["first start"]
    gate.set_result(None)
    await asyncio.gather(one, two)
    assert order == ["first start", "first end", "second"]
