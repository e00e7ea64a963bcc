"""Agent activations on one worker: lazy creation, a mailbox per agent, deactivation.

At most one instance of an agent exists on a worker at any time, including while one
is being deactivated: a message that arrives then waits until ``on_deactivate`` has
returned and runs on a fresh instance.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, TypeVar

from mesh.agent import Agent
from mesh.errors import NoWorkerAvailableError
from mesh.ids import AgentId

if TYPE_CHECKING:
    from mesh._persistence import StateKeeper
    from mesh.client import MeshClient

logger = logging.getLogger(__name__)

#: Agents deactivated at once when a worker shuts down.
DEACTIVATE_TOGETHER = 64

T = TypeVar("T")


class Activation:
    """One live agent instance and its mailbox.

    The mailbox is a FIFO lock: messages for one agent run one at a time, in the order
    they arrived; messages for different agents do not wait for each other. A retired
    activation runs no more messages: those waiting move to the next instance.
    Stateless agent types have no mailbox: their messages run concurrently.
    """

    __slots__ = ("agent", "last_used", "mailbox", "pending", "retired")

    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self.mailbox = asyncio.Lock()
        self.last_used = time.monotonic()
        self.pending = 0
        self.retired = False

    @property
    def busy(self) -> bool:
        return self.pending > 0


class ActivationTable:
    """The agents a worker has activated, created on first use.

    Args:
        agent_classes: Agent type name -> class, for every type the worker hosts.
        client: Given to agents so that they can send to other agents.
        on_deactivated: Awaited after an agent's ``on_deactivate``, before a new
            instance of it may start (the worker releases its placement there).
        mailbox_limit: Messages one agent may have running or waiting; more get 503.
        keeper: Loads saved state into new instances of persistent agent types and
            saves it after each message. A message whose changes could not be saved
            (or whose handler failed after changing the state) retires the instance,
            so the next message starts from what is saved.
    """

    def __init__(
        self,
        agent_classes: dict[str, type[Agent]],
        client: MeshClient | None = None,
        on_deactivated: Callable[[AgentId], Awaitable[None]] | None = None,
        keeper: StateKeeper | None = None,
        mailbox_limit: int | None = None,
    ) -> None:
        self._classes = agent_classes
        self._mailbox_limit = mailbox_limit
        self._client = client
        self._on_deactivated = on_deactivated
        self._keeper = keeper
        self._retiring: set[asyncio.Task[bool]] = set()
        self._active: dict[AgentId, Activation] = {}
        self._creating: dict[AgentId, asyncio.Future[Activation]] = {}
        self._deactivating: dict[AgentId, asyncio.Future[None]] = {}

    def __len__(self) -> int:
        return len(self._active)

    def active_ids(self) -> list[AgentId]:
        return list(self._active)

    def counts_by_type(self, agent_types: list[str]) -> dict[str, int]:
        """Active instances of each of `agent_types`."""
        counts = dict.fromkeys(agent_types, 0)
        for agent_id in self._active:
            counts[agent_id.type] = counts.get(agent_id.type, 0) + 1
        return counts

    def agent_class(self, agent_type: str) -> type[Agent] | None:
        return self._classes.get(agent_type)

    def pending(self, agent_id: AgentId) -> int:
        """Messages for `agent_id` running or waiting in its mailbox."""
        activation = self._active.get(agent_id)
        return activation.pending if activation else 0

    async def _activation(self, agent_id: AgentId) -> Activation:
        while True:
            found = self._active.get(agent_id)
            if found is not None:
                return found
            leaving = self._deactivating.get(agent_id)
            if leaving is not None:
                await asyncio.shield(leaving)
                continue
            creating = self._creating.get(agent_id)
            if creating is not None:
                return await asyncio.shield(creating)
            return await self._create(agent_id)

    async def _create(self, agent_id: AgentId) -> Activation:
        future: asyncio.Future[Activation] = asyncio.get_running_loop().create_future()
        self._creating[agent_id] = future
        try:
            agent = self._classes[agent_id.type].create(agent_id, self._client)
            if self._keeper is not None and agent.persistent():
                agent._keeper = self._keeper
                await self._keeper.load(agent)
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

    def use_keeper(self, keeper: StateKeeper) -> None:
        """Load and save persistent agents' state with `keeper` from now on."""
        self._keeper = keeper

    async def run(
        self, agent_id: AgentId, work: Callable[[Agent], Awaitable[T]], epoch: int | None = None
    ) -> T:
        """Run `work` on the agent's instance, alone in its mailbox. `epoch`: the revision
        of the agent's placement on this worker, when the message names it."""
        while True:
            activation = self._active.get(agent_id) or await self._activation(agent_id)
            limit = self._mailbox_limit
            if limit is not None and activation.pending >= limit and not activation.agent.stateless:
                raise NoWorkerAvailableError(
                    f"{agent_id} has {activation.pending} messages running or waiting,"
                    f" its limit; try again later"
                )
            activation.pending += 1
            try:
                if activation.agent.stateless:
                    # Interchangeable instances keep no state: no mailbox, no waiting.
                    activation.last_used = time.monotonic()
                    return await work(activation.agent)
                async with activation.mailbox:
                    if activation.retired:
                        continue  # deactivated while this message waited: use the next one
                    activation.last_used = time.monotonic()
                    agent = activation.agent
                    if epoch is not None and (agent._epoch is None or epoch > agent._epoch):
                        agent._epoch = epoch  # placed (again) on this worker at that revision
                    if agent._keeper is None:
                        return await work(agent)
                    return await self._run_saving(agent, work)
            finally:
                activation.pending -= 1
                activation.last_used = time.monotonic()

    async def _run_saving(self, agent: Agent, work: Callable[[Agent], Awaitable[T]]) -> T:
        """Run one message on a persistent agent; save the state it changed."""
        keeper = agent._keeper
        assert keeper is not None
        try:
            result = await work(agent)
            if agent.autosave:
                await keeper.save(agent)
        except BaseException:
            # Changes that are not saved must not leak into the next message.
            if keeper.overtaken(agent) or (agent.autosave and await keeper.unsaved(agent)):
                self._retire_later(agent.id)
            raise
        return result

    def _retire_later(self, agent_id: AgentId) -> None:
        """Deactivate the agent once the message running now is done."""
        task = asyncio.create_task(self.deactivate(agent_id))
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    async def deactivate(self, agent_id: AgentId, *, idle_since: float | None = None) -> bool:
        """Deactivate one agent once its current message is done.

        Messages waiting for it run on a fresh instance, created after ``on_deactivate``
        has returned. With `idle_since` (a `time.monotonic` value), only an agent that
        has been idle since then is deactivated.

        Returns:
            Whether the agent was deactivated.
        """
        activation = self._active.get(agent_id)
        if activation is None:
            return False
        if idle_since is not None and (activation.busy or activation.last_used >= idle_since):
            return False
        activation.retired = True
        del self._active[agent_id]
        leaving: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._deactivating[agent_id] = leaving
        try:
            async with activation.mailbox:  # the message running now finishes first
                await activation.agent.on_deactivate()
        except Exception:
            logger.exception("on_deactivate of %s failed", agent_id)
        try:
            if self._on_deactivated is not None:
                await self._on_deactivated(agent_id)
        finally:
            del self._deactivating[agent_id]
            leaving.set_result(None)
        return True

    async def evict_idle(self, idle_timeout: float) -> int:
        """Deactivate agents unused for `idle_timeout` seconds; return how many."""
        cutoff = time.monotonic() - idle_timeout
        candidates = [
            agent_id
            for agent_id, activation in self._active.items()
            if not activation.busy and activation.last_used < cutoff
        ]
        evicted = 0
        for agent_id in candidates:
            evicted += await self.deactivate(agent_id, idle_since=cutoff)
        return evicted

    async def deactivate_all(self) -> None:
        """Deactivate every agent (shutdown), `DEACTIVATE_TOGETHER` at a time: each
        may wait for its message and release its placement."""
        pending = list(self._active)
        while pending:
            batch, pending = pending[:DEACTIVATE_TOGETHER], pending[DEACTIVATE_TOGETHER:]
            await asyncio.gather(*(self.deactivate(agent_id) for agent_id in batch))
        if self._retiring:
            await asyncio.gather(*self._retiring, return_exceptions=True)
