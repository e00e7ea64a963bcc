"""Agent types that tests run in workers, in-process or as `mesh worker tests.agents:X`."""

from __future__ import annotations

import asyncio
from collections import defaultdict

from pydantic import BaseModel, Field

from mesh import Agent, MessageContext, handler


class Nap(BaseModel):
    seconds: float = Field(ge=0, le=60)
    tag: str = ""


class Woke(BaseModel):
    tag: str
    worker: str
    key: str


class Boom(BaseModel):
    reason: str


class Sleeper(Agent, agent_type="sleeper"):
    """Sleeps as long as asked, then answers; raises on Boom."""

    @handler
    async def nap(self, message: Nap, ctx: MessageContext) -> Woke:
        await asyncio.sleep(message.seconds)
        return Woke(tag=message.tag, worker=ctx.worker_id, key=self.id.key)

    @handler
    async def boom(self, message: Boom, ctx: MessageContext) -> None:
        raise RuntimeError(message.reason)


class Visit(BaseModel):
    seconds: float = 0.05


class Overlap(BaseModel):
    key: str
    concurrent: int


#: agent key -> how many handlers ran at once at the peak (in-process tests read it).
PEAK_CONCURRENCY: dict[str, int] = defaultdict(int)
RUNNING: dict[str, int] = defaultdict(int)
RUNNING_TOTAL = [0, 0]  # now, peak across all keys


class Recorder(Agent, agent_type="recorder"):
    """Records how many of its handlers run at once, per key and overall."""

    @handler
    async def visit(self, message: Visit, ctx: MessageContext) -> Overlap:
        key = self.id.key
        RUNNING[key] += 1
        RUNNING_TOTAL[0] += 1
        PEAK_CONCURRENCY[key] = max(PEAK_CONCURRENCY[key], RUNNING[key])
        RUNNING_TOTAL[1] = max(RUNNING_TOTAL[1], RUNNING_TOTAL[0])
        try:
            await asyncio.sleep(message.seconds)
            return Overlap(key=key, concurrent=RUNNING[key])
        finally:
            RUNNING[key] -= 1
            RUNNING_TOTAL[0] -= 1
