"""A keyed counter: one count per agent key, saved through the state service.

``counter/alice`` and ``counter/bob`` are different agents with their own counts.
Each counts one message at a time, so concurrent increments never get lost; each
count is saved before the increment is answered, so it survives the worker (SIGKILL
included): the next activation, on whichever worker, continues from it.
Run it with ``python -m workers.counter`` or ``mesh worker workers.counter:Counter``.
"""

from __future__ import annotations

from pydantic import BaseModel, Field

from mesh import Agent, MessageContext, handler

LIMIT = 1_000_000


class Increment(BaseModel):
    by: int = Field(1, gt=0, description="how much to add; must be positive")


class GetCount(BaseModel):
    pass


class Count(BaseModel):
    key: str
    value: int
    worker: str


class Tally(BaseModel):
    value: int = 0


class CounterOverflowError(Exception):
    """The count would pass the limit."""


class Counter(Agent, agent_type="counter", state=Tally):
    """Counts increments, per key."""

    state: Tally

    @handler
    async def increment(self, message: Increment, ctx: MessageContext) -> Count:
        if self.state.value + message.by > LIMIT:
            raise CounterOverflowError(f"counter {self.id.key} would pass {LIMIT}")
        self.state.value += message.by
        return Count(key=self.id.key, value=self.state.value, worker=ctx.worker_id)

    @handler
    async def get(self, message: GetCount, ctx: MessageContext) -> Count:
        return Count(key=self.id.key, value=self.state.value, worker=ctx.worker_id)


if __name__ == "__main__":
    from mesh.cli import worker_main

    worker_main([Counter])
