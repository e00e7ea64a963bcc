"""The activation table on its own: single instance per id through deactivation."""

from __future__ import annotations

import asyncio

from mesh._activations import ActivationTable
from mesh.agent import Agent
from mesh.ids import AgentId
from tests import agents
from tests.agents import Recorder, Visit

TARGET = AgentId("recorder", "solo")


def _table() -> ActivationTable:
    agents.INSTANCES.clear()
    agents.EVENTS.clear()
    agents.PEAK_CONCURRENCY.clear()
    return ActivationTable({"recorder": Recorder})


async def _visit(table: ActivationTable, seconds: float) -> object:
    async def work(agent: Agent) -> object:
        assert isinstance(agent, Recorder)
        return await agent.visit(Visit(seconds=seconds), None)  # type: ignore[arg-type]

    return await table.run(TARGET, work)


async def test_idle_eviction_spares_an_agent_that_became_busy() -> None:
    table = _table()
    await _visit(table, 0)
    running = asyncio.create_task(_visit(table, 0.2))
    await asyncio.sleep(0)  # let it enter the mailbox
    assert table.pending(TARGET) == 1
    assert await table.evict_idle(0.0) == 0
    await running
    assert await table.evict_idle(0.0) == 1
    assert len(table) == 0


async def test_message_during_deactivation_waits_for_a_fresh_instance() -> None:
    table = _table()
    await _visit(table, 0)
    leaving = asyncio.create_task(table.deactivate(TARGET))
    await asyncio.sleep(0)  # deactivation has started: on_deactivate is running
    await _visit(table, 0)
    assert await leaving
    assert agents.EVENTS["solo"] == ["activate", "deactivate", "activate"]
    assert agents.INSTANCES["solo"] == 2
    assert agents.PEAK_CONCURRENCY["solo"] == 1


async def test_deactivating_an_unknown_agent_is_a_no_op() -> None:
    table = _table()
    assert not await table.deactivate(AgentId("recorder", "nobody"))


async def test_shutdown_deactivates_many_agents_together_but_boundedly() -> None:
    from mesh._activations import DEACTIVATE_TOGETHER

    leaving = 0
    peak = 0

    async def released(agent_id: AgentId) -> None:  # as a worker releases a placement
        nonlocal leaving, peak
        leaving += 1
        peak = max(peak, leaving)
        await asyncio.sleep(0.01)
        leaving -= 1

    table = ActivationTable({"recorder": Recorder}, on_deactivated=released)
    for n in range(3 * DEACTIVATE_TOGETHER):

        async def work(agent: Agent) -> None:
            return None

        await table.run(AgentId("recorder", f"r{n}"), work)
    assert len(table) == 3 * DEACTIVATE_TOGETHER
    await table.deactivate_all()
    assert len(table) == 0
    assert peak == DEACTIVATE_TOGETHER  # together, never more than the bound
