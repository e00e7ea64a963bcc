"""Agent activations on one worker: lazy creation, a mailbox per agent, idle eviction."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, TypeVar

from mesh.agent import Agent
from mesh.ids import AgentId

if TYPE_CHECKING:
    from mesh.client import MeshClient

logger = logging.getLogger(__name__)

T = TypeVar("T")


class Activation:
    """One live agent instance and its mailbox.

    The mailbox is a FIFO lock: messages for one agent run one at a time, in the order
    they arrived; messages for different agents do not wait for each other.
    """

    __slots__ = ("agent", "last_used", "mailbox", "pending")

    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self.mailbox = asyncio.Lock()
        self.last_used = time.monotonic()
        self.pending = 0

    @property
    def busy(self) -> bool:
        return self.pending > 0


class ActivationTable:
    """The agents a worker has activated, created on first use.

    Args:
        agent_classes: Agent type name -> class, for every type the worker hosts.
        client: Given to agents so that they can send to other agents.
    """

    def __init__(
        self, agent_classes: dict[str, type[Agent]], client: MeshClient | None = None
    ) -> None:
        self._classes = agent_classes
        self._client = client
        self._active: dict[AgentId, Activation] = {}
        self._creating: dict[AgentId, asyncio.Future[Activation]] = {}

    def __len__(self) -> int:
        return len(self._active)

    def agent_class(self, agent_type: str) -> type[Agent] | None:
        return self._classes.get(agent_type)

    async def _activation(self, agent_id: AgentId) -> Activation:
        found = self._active.get(agent_id)
        if found is not None:
            return found
        creating = self._creating.get(agent_id)
        if creating is not None:
            return await asyncio.shield(creating)
        future: asyncio.Future[Activation] = asyncio.get_running_loop().create_future()
        self._creating[agent_id] = future
        try:
            agent = self._classes[agent_id.type].create(agent_id, self._client)
            await agent.on_activate()
            activation = Activation(agent)
            self._active[agent_id] = activation
            future.set_result(activation)
            return activation
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: waiters get it, nobody else needs to
            raise
        finally:
            del self._creating[agent_id]

    async def run(self, agent_id: AgentId, work: Callable[[Agent], Awaitable[T]]) -> T:
        """Run `work` on the agent's instance, alone in its mailbox."""
        while True:
            activation = await self._activation(agent_id)
            activation.pending += 1
            try:
                async with activation.mailbox:
                    if self._active.get(agent_id) is not activation:
                        continue  # deactivated while this message waited: use a fresh one
                    activation.last_used = time.monotonic()
                    return await work(activation.agent)
            finally:
                activation.pending -= 1
                activation.last_used = time.monotonic()

    async def deactivate(self, agent_id: AgentId) -> bool:
        """Deactivate one agent once its current message is done; ``False`` if not active.

        Messages that were waiting for it run on a fresh activation.
        """
        activation = self._active.get(agent_id)
        if activation is None:
            return False
        async with activation.mailbox:
            if self._active.get(agent_id) is activation:
                await self._deactivate(agent_id)
        return True

    async def evict_idle(self, idle_timeout: float) -> int:
        """Deactivate agents unused for `idle_timeout` seconds; return how many."""
        cutoff = time.monotonic() - idle_timeout
        idle = [
            agent_id
            for agent_id, activation in self._active.items()
            if not activation.busy and activation.last_used < cutoff
        ]
        for agent_id in idle:
            await self._deactivate(agent_id)
        return len(idle)

    async def deactivate_all(self) -> None:
        for agent_id in list(self._active):
            await self._deactivate(agent_id)

    async def _deactivate(self, agent_id: AgentId) -> None:
        activation = self._active.pop(agent_id, None)
        if activation is None:
            return
        try:
            await activation.agent.on_deactivate()
        except Exception:
            logger.exception("on_deactivate of %s failed", agent_id)
