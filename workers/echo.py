"""An echo agent: replies with what it was sent, and says who answered.

Run a worker for it with ``python -m workers.echo`` or ``mesh worker workers.echo:Echo``,
then ``mesh call echo/alice '{"text": "hi"}'``.
"""

from __future__ import annotations

import asyncio

from pydantic import BaseModel, Field

from mesh import Agent, MessageContext, handler


class Ping(BaseModel):
    text: str
    delay: float = Field(0.0, ge=0.0, le=60.0, description="seconds to wait before replying")


class Pong(BaseModel):
    text: str
    agent: str
    worker: str


class Echo(Agent, agent_type="echo", stateless=True):
    """Replies with the text it was sent."""

    @handler
    async def ping(self, message: Ping, ctx: MessageContext) -> Pong:
        if message.delay:
            await asyncio.sleep(message.delay)
        return Pong(text=message.text, agent=str(self.id), worker=ctx.worker_id)


if __name__ == "__main__":
    from mesh.cli import worker_main

    worker_main([Echo])
