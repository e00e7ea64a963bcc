"""The deadline wheel: scopes that behave as asyncio.timeout does, on shared timers."""

from __future__ import annotations

import asyncio

import pytest

from mesh._deadlines import DeadlineWheel

TICK = 0.02


async def test_a_scope_past_its_deadline_raises_timeout_error_within_a_tick() -> None:
    wheel = DeadlineWheel(TICK)
    loop = asyncio.get_running_loop()
    started = loop.time()
    scope = wheel.scope(0.1)
    with pytest.raises(TimeoutError), scope:
        await asyncio.Event().wait()
    elapsed = loop.time() - started
    assert scope.expired
    assert 0.1 - 0.002 <= elapsed < 0.1 + TICK + 0.5  # kept late by a tick, not early
    task = asyncio.current_task()
    assert task is not None and task.cancelling() == 0  # the task can go on awaiting
    await asyncio.sleep(0)


async def test_a_scope_left_in_time_never_cancels_its_task() -> None:
    wheel = DeadlineWheel(TICK)
    scope = wheel.scope(0.05)
    with scope:
        await asyncio.sleep(0)
    # Time passes beyond the deadline: the task is not cancelled.
    await asyncio.sleep(0.05 + 3 * TICK)
    assert not scope.expired
    assert not wheel._timers  # the slot's timer fired, with nobody left to cancel


async def test_the_bodys_own_timeout_error_is_not_the_deadline() -> None:
    wheel = DeadlineWheel(TICK)
    scope = wheel.scope(30)
    with pytest.raises(TimeoutError, match="its own"), scope:
        raise TimeoutError("its own")
    assert not scope.expired


async def test_a_cancellation_from_outside_stays_a_cancellation() -> None:
    wheel = DeadlineWheel(TICK)
    entered = asyncio.Event()

    async def body() -> None:
        with wheel.scope(30):
            entered.set()
            await asyncio.Event().wait()

    task = asyncio.create_task(body())
    await entered.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_a_cancellation_during_expiry_is_not_swallowed() -> None:
    """Like asyncio.timeout: if the task is also cancelled from outside as the deadline
    passes, the outside cancellation wins."""
    wheel = DeadlineWheel(60.0)  # its timer would run in up to a minute: run by hand
    scope = wheel.scope(0)
    entered = asyncio.Event()

    async def body() -> None:
        with scope:
            entered.set()
            await asyncio.Event().wait()

    task = asyncio.create_task(body())
    await entered.wait()
    task.cancel()
    wheel._expire(next(iter(wheel._slots)))  # the deadline passes in the same turn
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_scopes_with_close_deadlines_share_one_timer() -> None:
    wheel = DeadlineWheel(1.0)
    entered = 0
    all_entered = asyncio.Event()
    release = asyncio.Event()

    async def body() -> None:
        nonlocal entered
        with wheel.scope(30):
            entered += 1
            if entered == 500:
                all_entered.set()
            await release.wait()

    tasks = [asyncio.create_task(body()) for _ in range(500)]
    async with asyncio.timeout(10):
        await all_entered.wait()
    assert sum(map(len, wheel._slots.values())) == 500
    assert len(wheel._timers) <= 2
    release.set()
    await asyncio.gather(*tasks)
    assert sum(map(len, wheel._slots.values())) == 0
    wheel.close()
    assert not wheel._timers and not wheel._slots


async def test_entering_outside_a_task_is_refused() -> None:
    wheel = DeadlineWheel(TICK)
    loop = asyncio.get_running_loop()
    outcome: asyncio.Future[BaseException | None] = loop.create_future()

    def enter() -> None:
        try:
            with wheel.scope(1):
                pass
        except BaseException as exc:
            outcome.set_result(exc)
        else:
            outcome.set_result(None)

    loop.call_soon(enter)  # a plain callback: no current task
    assert isinstance(await outcome, RuntimeError)
