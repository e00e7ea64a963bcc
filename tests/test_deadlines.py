"""No caller waits past its deadline, and nothing runs for a caller who stopped waiting."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest
from nats.aio.client import Client as NATS

from mesh import (
    AgentId,
    AgentTypeNotFoundError,
    DeadlineExceededError,
    HandlerError,
    MeshClient,
    NoWorkerAvailableError,
    UnknownMessageTypeError,
    Worker,
    WorkerConfig,
)
from mesh._balancing import Health
from mesh.config import GatewayConfig
from mesh.handlers.gateway import Gateway
from mesh.handlers.registry import Registry
from mesh.subjects import Subjects
from mesh.testing import eventually
from tests import agents
from tests.agents import Pacer, PaceRelay
from tests.helpers import live_worker_ids

DEADLINE = 1.0


@pytest.fixture
async def pacers(nc: NATS, subjects: Subjects, registry: Registry) -> AsyncIterator[list[Worker]]:
    """Two in-process workers hosting Pacer, so the test can see every handler call."""
    for table in (agents.CALLS, agents.CANCELLED, agents.SAVED):
        table.clear()
    workers = [
        Worker(nc, [Pacer], WorkerConfig(worker_id=name, heartbeat_interval=0.5), subjects)
        for name in ("p1", "p2")
    ]
    for worker in workers:
        await worker.start()

    async def both_registered() -> bool:
        return await live_worker_ids(nc, subjects, "pacer") == {"p1", "p2"}

    await eventually(both_registered, timeout=5)
    yield workers
    for worker in workers:
        await worker.shutdown()


async def _timed(call: asyncio.Future[object] | object) -> tuple[object, float]:
    started = time.monotonic()
    try:
        result: object = await call  # type: ignore[misc]
    except Exception as exc:
        result = exc
    return result, time.monotonic() - started


@pytest.fixture
async def ready_gateway(gateway: Gateway, pacers: list[Worker]) -> Gateway:
    await eventually(lambda: len(gateway.directory.live_workers("pacer")) == 2, timeout=5)
    return gateway


async def test_unknown_type_answers_at_once(
    nc: NATS, subjects: Subjects, ready_gateway: Gateway
) -> None:
    client = MeshClient(nc, subjects=subjects)
    result, took = await _timed(client.call(AgentId("nobody", "x"), {}, timeout=DEADLINE))
    assert isinstance(result, AgentTypeNotFoundError)
    assert took < DEADLINE / 2


async def test_handler_returning_nothing_answers_with_an_empty_body(
    nc: NATS, subjects: Subjects, ready_gateway: Gateway
) -> None:
    reply = await nc.request(
        subjects.rpc(AgentId("pacer", "s1")), b'{"seconds": 0, "silent": true}', timeout=DEADLINE
    )
    assert reply.data == b""
    assert reply.headers is not None and "Nats-Service-Error-Code" not in reply.headers
    client = MeshClient(nc, subjects=subjects)
    assert await client.call(AgentId("pacer", "s2"), {"seconds": 0, "silent": True}) is None


async def test_unhandled_message_type_answers_at_once(
    nc: NATS, subjects: Subjects, ready_gateway: Gateway
) -> None:
    client = MeshClient(nc, subjects=subjects)
    result, took = await _timed(
        client.call(AgentId("pacer", "x"), {}, message_type="Sprint", timeout=DEADLINE)
    )
    assert isinstance(result, UnknownMessageTypeError)
    assert took < DEADLINE / 2


async def test_reply_that_cannot_be_encoded_is_a_500_at_once(
    nc: NATS, subjects: Subjects, ready_gateway: Gateway
) -> None:
    client = MeshClient(nc, subjects=subjects)
    result, took = await _timed(
        client.call(AgentId("pacer", "odd"), {"seconds": 0, "unencodable": True}, timeout=DEADLINE)
    )
    assert isinstance(result, HandlerError)
    assert "cannot be encoded" in str(result)
    assert took < DEADLINE / 2


async def test_handler_past_its_deadline_is_cancelled_and_not_retried(
    nc: NATS, subjects: Subjects, ready_gateway: Gateway, pacers: list[Worker]
) -> None:
    gateway = ready_gateway
    client = MeshClient(nc, subjects=subjects)
    target = AgentId("pacer", "overdue")
    result, took = await _timed(client.call(target, {"seconds": 10}, timeout=0.3))
    assert isinstance(result, DeadlineExceededError)
    assert 0.3 <= took < 0.3 + 0.5
    await eventually(lambda: agents.CANCELLED["overdue"] == 1, timeout=1)
    assert agents.CALLS["overdue"] == 1  # the gateway did not try it elsewhere
    placement = gateway.placements.get(target)
    assert placement is not None  # a timeout does not move the agent
    assert sum(w.activations for w in pacers) == 1


async def test_worker_dying_with_the_request_in_flight_answers_by_the_deadline(
    nc: NATS, subjects: Subjects, gateway: Gateway, spawn_worker: type
) -> None:
    doomed = spawn_worker("tests.agents:Pacer", worker_id="doomed")
    await eventually(lambda: live_worker_ids(nc, subjects, "pacer"), timeout=15)
    await eventually(lambda: gateway.directory.live_workers("pacer"), timeout=5)
    client = MeshClient(nc, subjects=subjects)
    call = asyncio.create_task(
        _timed(client.call(AgentId("pacer", "k"), {"seconds": 30}, timeout=DEADLINE))
    )
    await eventually(lambda: gateway.stats("doomed").inflight == 1, timeout=5)
    doomed.kill()
    result, took = await call
    # 504 at the deadline, or 503 sooner if the worker's entry lapsed first.
    assert isinstance(result, DeadlineExceededError | NoWorkerAvailableError), result
    assert took < DEADLINE + 0.5


async def test_nested_send_is_cancelled_with_its_handler_and_inherits_its_deadline(
    nc: NATS, subjects: Subjects, ready_gateway: Gateway
) -> None:
    gateway = ready_gateway
    relay = Worker(nc, [PaceRelay], WorkerConfig(worker_id="relay"), subjects)
    async with relay:
        await eventually(lambda: gateway.directory.live_workers("pace-relay"), timeout=5)
        client = MeshClient(nc, subjects=subjects)
        result, took = await _timed(
            client.call(AgentId("pace-relay", "r"), {"key": "deep", "seconds": 10}, timeout=0.4)
        )
        assert isinstance(result, DeadlineExceededError)
        assert took < 0.4 + 0.5
        # The relay's handler and the pacer it waited on were both cancelled, though the
        # relay asked for 30 s: the nested call carried the caller's 0.4 s.
        await eventually(lambda: agents.CANCELLED["relay:deep"] == 1, timeout=1)
        await eventually(lambda: agents.CANCELLED["deep"] == 1, timeout=1)


async def test_repeated_timeouts_make_a_worker_unhealthy_and_move_its_agents(
    nc: NATS, subjects: Subjects, registry: Registry, pacers: list[Worker]
) -> None:
    config = GatewayConfig(failures_before_unhealthy=2, cooldown=30)
    async with Gateway(nc, subjects, config) as gateway:
        await eventually(lambda: len(gateway.directory.live_workers("pacer")) == 2, timeout=5)
        client = MeshClient(nc, subjects=subjects)
        target = AgentId("pacer", "stuck")
        first = await client.call(target, {"seconds": 0})
        stuck_on = first["worker"]
        for _ in range(2):
            with pytest.raises(DeadlineExceededError):
                await client.call(target, {"seconds": 10}, timeout=0.2)
        assert gateway.health(stuck_on) is Health.UNHEALTHY
        moved = await client.call(target, {"seconds": 0})
        assert moved["worker"] != stuck_on
        placement = gateway.placements.get(target)
        assert placement is not None and placement.worker_id == moved["worker"]
