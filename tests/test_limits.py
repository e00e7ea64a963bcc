"""Limits answer at once instead of waiting: in-flight caps and shutdown grace."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest
from nats.aio.client import Client as NATS

from mesh import AgentId, MeshClient, NoWorkerAvailableError, Worker, WorkerConfig
from mesh.config import GatewayConfig
from mesh.handlers.gateway import Gateway
from mesh.handlers.registry import Registry
from mesh.subjects import Subjects
from mesh.testing import eventually
from tests.agents import Sleeper


@pytest.fixture
async def tight_gateway(nc: NATS, subjects: Subjects, registry: Registry) -> AsyncIterator[Gateway]:
    async with Gateway(nc, subjects, GatewayConfig(max_in_flight=1)) as service:
        yield service


async def test_gateway_at_its_in_flight_limit_answers_503_at_once(
    nc: NATS, subjects: Subjects, tight_gateway: Gateway
) -> None:
    config = WorkerConfig(worker_id="w", heartbeat_interval=0.5)
    async with Worker(nc, [Sleeper], config, subjects):
        await eventually(lambda: tight_gateway.directory.live_workers("sleeper"), timeout=5)
        client = MeshClient(nc, subjects=subjects)
        slow = asyncio.create_task(
            client.call(AgentId("sleeper", "a"), {"seconds": 0.5}, message_type="Nap")
        )
        await eventually(lambda: tight_gateway._service.in_flight == 1, timeout=2)
        started = time.monotonic()
        with pytest.raises(NoWorkerAvailableError, match="limit of 1"):
            await client.call(AgentId("sleeper", "b"), {"seconds": 0}, message_type="Nap")
        assert time.monotonic() - started < 1.0  # at once, not after the 10 s deadline
        assert (await slow)["key"] == "a"


async def test_worker_shutdown_keeps_to_its_grace_and_answers_the_rest_503(
    nc: NATS, subjects: Subjects, gateway: Gateway
) -> None:
    config = WorkerConfig(worker_id="hasty", heartbeat_interval=0.5, drain_timeout=0.5)
    worker = Worker(nc, [Sleeper], config, subjects)
    await worker.start()
    await eventually(lambda: gateway.directory.live_workers("sleeper"), timeout=5)
    client = MeshClient(nc, subjects=subjects)
    naps = [
        asyncio.create_task(
            client.call(AgentId("sleeper", f"k{i}"), {"seconds": 5}, message_type="Nap")
        )
        for i in range(3)
    ]
    await eventually(lambda: worker._service.in_flight == 3, timeout=2)
    started = time.monotonic()
    await worker.shutdown()
    assert time.monotonic() - started < 2.0
    results = await asyncio.gather(*naps, return_exceptions=True)
    assert all(isinstance(r, NoWorkerAvailableError) for r in results), results
    assert all("shutting down" in str(r) for r in results)
