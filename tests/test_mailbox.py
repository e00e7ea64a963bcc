"""The mailbox: one message at a time per agent id, different ids concurrently."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from nats.aio.client import Client as NATS

from mesh import AgentId, MeshClient, Worker, WorkerConfig
from mesh.handlers.gateway import Gateway
from mesh.subjects import Subjects
from mesh.testing import eventually
from tests import agents
from tests.agents import Recorder


@pytest.fixture
async def worker(nc: NATS, subjects: Subjects, gateway: Gateway) -> AsyncIterator[Worker]:
    agents.PEAK_CONCURRENCY.clear()
    agents.RUNNING_TOTAL[:] = [0, 0]
    config = WorkerConfig(worker_id="mailbox", heartbeat_interval=0.5)
    async with Worker(nc, [Recorder], config, subjects) as running:
        await eventually(lambda: gateway.directory.live_workers("recorder"), timeout=5)
        yield running


async def test_one_agent_handles_one_message_at_a_time(
    nc: NATS, subjects: Subjects, worker: Worker
) -> None:
    client = MeshClient(nc, subjects=subjects)
    replies = await asyncio.gather(
        *(client.call(AgentId("recorder", "solo"), {"seconds": 0.02}) for _ in range(15))
    )
    assert [r["concurrent"] for r in replies] == [1] * 15
    assert agents.PEAK_CONCURRENCY["solo"] == 1
    assert worker.activations == 1


async def test_different_agents_run_concurrently(
    nc: NATS, subjects: Subjects, worker: Worker
) -> None:
    client = MeshClient(nc, subjects=subjects)
    keys = [f"k{i}" for i in range(8)]
    # Each agent gets two messages: they queue behind each other, not behind other agents.
    calls = [client.call(AgentId("recorder", k), {"seconds": 0.3}) for k in keys for _ in (1, 2)]
    started = asyncio.get_running_loop().time()
    await asyncio.gather(*calls)
    elapsed = asyncio.get_running_loop().time() - started
    assert all(agents.PEAK_CONCURRENCY[k] == 1 for k in keys)
    assert agents.RUNNING_TOTAL[1] == len(keys)
    # Serial would be 16 x 0.3 s; per-agent mailboxes in parallel take about 2 x 0.3 s.
    assert elapsed < 8 * 0.3, f"took {elapsed:.2f}s"
    assert worker.activations == len(keys)
