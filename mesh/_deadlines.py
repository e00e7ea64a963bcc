"""Deadlines for many short tasks, on a coarse clock.

``asyncio.timeout`` schedules a timer of its own for every use, and cancels it after;
on uvloop that costs more than a small handler does. A `DeadlineWheel` keeps one timer
per `tick` of the future instead: a scope joins the set of its tick (a set insert) and
leaves it on exit (a discard), and the timer of a tick cancels the tasks whose scopes
are still in its set. A deadline is kept up to one tick late.

A scope behaves as ``asyncio.timeout`` does: its task is cancelled at the deadline, and
the cancellation leaves the scope as `TimeoutError` (unless something else cancelled
the task as well); `expired` tells a deadline from a `TimeoutError` of the task's own.
"""

from __future__ import annotations

import asyncio
import math
from types import TracebackType
from typing import Any

#: Seconds between the deadlines the wheel keeps: how late one can be kept.
TICK = 0.05


class DeadlineScope:
    """The deadline of the task that enters it (``with wheel.scope(seconds):``)."""

    __slots__ = ("_cancelling", "_seconds", "_slot", "_task", "_wheel", "expired")

    def __init__(
        self, wheel: DeadlineWheel, seconds: float, task: asyncio.Task[Any] | None
    ) -> None:
        self._wheel = wheel
        self._seconds = seconds
        self._task = task
        self._slot = 0
        self._cancelling = 0
        #: Whether the deadline passed while the scope was entered.
        self.expired = False

    def __enter__(self) -> DeadlineScope:
        task = self._task or asyncio.current_task()
        if task is None:
            raise RuntimeError("a deadline scope must be entered in a task")
        self._task = task
        self._cancelling = task.cancelling()
        self._slot = self._wheel._join(self, self._seconds)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._wheel._leave(self, self._slot)
        if self.expired:
            assert self._task is not None
            if self._task.uncancel() <= self._cancelling and exc_type is asyncio.CancelledError:
                raise TimeoutError from exc

    def _expire(self) -> None:
        task = self._task
        if task is not None and not task.done():
            self.expired = True
            task.cancel()


class DeadlineWheel:
    """Deadline scopes for the tasks of one event loop (see the module)."""

    def __init__(self, tick: float = TICK) -> None:
        self._tick = tick
        self._slots: dict[int, set[DeadlineScope]] = {}
        self._timers: dict[int, asyncio.TimerHandle] = {}

    def scope(self, seconds: float, task: asyncio.Task[Any] | None = None) -> DeadlineScope:
        """A deadline `seconds` from when the scope is entered, for `task` (the current
        one when not given; name it if you have it, to save looking it up)."""
        return DeadlineScope(self, seconds, task)

    def _join(self, scope: DeadlineScope, seconds: float) -> int:
        loop = asyncio.get_running_loop()
        slot = math.ceil((loop.time() + seconds) / self._tick)
        members = self._slots.get(slot)
        if members is None:
            members = self._slots[slot] = set()
            self._timers[slot] = loop.call_at(slot * self._tick, self._expire, slot)
        members.add(scope)
        return slot

    def _leave(self, scope: DeadlineScope, slot: int) -> None:
        members = self._slots.get(slot)
        if members is not None:
            members.discard(scope)

    def _expire(self, slot: int) -> None:
        self._timers.pop(slot, None)
        for scope in self._slots.pop(slot, ()):
            scope._expire()

    def close(self) -> None:
        """Drop every timer (the loop is ending); scopes still entered never expire."""
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        self._slots.clear()
