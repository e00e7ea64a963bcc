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
from tests.helpers import assert_error


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


async def test_services_answer_an_oversized_request_413_before_reading_it(
    nc: NATS, subjects: Subjects, registry: Registry
) -> None:
    from mesh._micro import CONTROL_MAX_PAYLOAD
    from mesh.handlers.router import Router

    size = CONTROL_MAX_PAYLOAD + 1  # and not even JSON: it is never decoded
    async with Router(nc, subjects):
        for op in (("registry", "register"), ("router", "rule_put")):
            reply = await nc.request(subjects.service(*op), b"\xff" * size, timeout=5)
            error = assert_error(reply, 413, "PayloadTooLarge")
            assert str(size) in error["message"]


async def test_oversized_and_garbage_headers_get_a_bounded_400(
    nc: NATS, subjects: Subjects, gateway: Gateway, spawn_worker: type
) -> None:
    spawn_worker("workers.echo:Echo", worker_id="hdr")
    await eventually(lambda: gateway.directory.live_workers("echo"), timeout=15)
    huge_type = "X" * 100_000
    reply = await nc.request(
        subjects.rpc(AgentId("echo", "h")), b'{"text": "x"}', timeout=5,
        headers={"Mesh-Msg-Type": huge_type},
    )  # fmt: skip
    error = assert_error(reply, 400, "UnknownMessageType")
    assert reply.headers is not None and len(reply.headers["Nats-Service-Error"]) <= 1024
    assert len(error["message"]) < 2_000  # the name is not echoed back whole
    for content_type in ("text/html", "application/json; charset=\x7f", "\u00e9/x"):
        reply = await nc.request(
            subjects.rpc(AgentId("echo", "h")), b"\x00\x01garbage", timeout=5,
            headers={"Content-Type": content_type},
        )  # fmt: skip
        assert_error(reply, 400)
