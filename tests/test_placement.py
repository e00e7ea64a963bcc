"""Single activation: placement races, moves, strategies, capacity, idle release."""

from __future__ import annotations

import asyncio
from collections import Counter

import nats
import orjson
import pytest
from nats.aio.client import Client as NATS
from nats.js.errors import KeyNotFoundError

from mesh import AgentId, MeshClient, NoWorkerAvailableError, Worker, WorkerConfig
from mesh.config import GatewayConfig
from mesh.handlers.gateway import Gateway
from mesh.handlers.registry import Registry
from mesh.subjects import Subjects
from mesh.testing import eventually
from tests import agents
from tests.agents import Pacer
from tests.helpers import live_worker_ids


async def _placed_worker(nc: NATS, subjects: Subjects, agent_id: AgentId) -> str | None:
    kv = await nc.jetstream().key_value(subjects.placement_bucket)
    try:
        entry = await kv.get(Subjects.agent_key(agent_id))
    except KeyNotFoundError:
        return None
    return None if entry.value is None else str(orjson.loads(entry.value)["worker_id"])


async def test_two_gateways_racing_place_each_new_id_on_exactly_one_worker(
    nats_url: str,
    nc: NATS,
    subjects: Subjects,
    registry: Registry,
    spawn_worker: type,
) -> None:
    for name in ("w1", "w2", "w3"):
        # Room for the whole burst: at capacity, new placements would get 503.
        spawn_worker("workers.counter:Counter", worker_id=name, extra_args=["--capacity", "400"])
    await eventually(
        lambda: live_worker_ids(nc, subjects, "counter"),
        timeout=15,
        message="workers registering",
    )
    second_nc = await nats.connect(nats_url, name="gateway-2")
    gateways = [Gateway(nc, subjects), Gateway(second_nc, subjects)]
    try:
        for gateway in gateways:
            await gateway.start()
        for gateway in gateways:
            await eventually(lambda g=gateway: len(g.directory.live_workers("counter")) == 3)
        client = MeshClient(nc, subjects=subjects)
        ids = [AgentId("counter", f"race-{i}") for i in range(200)]
        # Both increments of an id are in flight at once: through the queue group they
        # often land on different gateways, which then race to place the new agent.
        replies = await asyncio.gather(
            *(
                client.call(agent_id, {"by": 1}, message_type="Increment")
                for agent_id in ids
                for _ in range(2)
            )
        )
        served = [sum(e.num_requests for e in g._service.stats().endpoints) for g in gateways]
        assert all(count > 0 for count in served), served
        for n, agent_id in enumerate(ids):
            first, second = replies[2 * n], replies[2 * n + 1]
            assert first["worker"] == second["worker"], (agent_id, first, second)
            assert sorted((first["value"], second["value"])) == [1, 2]
            assert await _placed_worker(nc, subjects, agent_id) == first["worker"]
    finally:
        for gateway in gateways:
            await gateway.shutdown()
        await second_nc.drain()


async def test_agent_of_a_lapsed_worker_is_moved_and_keeps_answering(
    nc: NATS, subjects: Subjects, gateway: Gateway, spawn_worker: type
) -> None:
    first = spawn_worker("workers.counter:Counter", worker_id="first")
    await eventually(lambda: gateway.directory.live_workers("counter"), timeout=15)
    client = MeshClient(nc, subjects=subjects)
    target = AgentId("counter", "mover")
    assert (await client.call(target, {}, message_type="GetCount"))["worker"] == "first"
    spawn_worker("workers.counter:Counter", worker_id="second")
    await eventually(lambda: len(gateway.directory.live_workers("counter")) == 2, timeout=15)

    first.kill()
    await first.wait()
    await eventually(lambda: len(gateway.directory.live_workers("counter")) == 1, timeout=5)
    reply = await client.call(target, {}, message_type="GetCount")
    assert reply["worker"] == "second"
    assert await _placed_worker(nc, subjects, target) == "second"
    assert gateway.vanished_workers == 0  # moved because the heartbeat lapsed


@pytest.fixture
def reset_pacer() -> None:
    for table in (agents.CALLS, agents.CANCELLED, agents.SAVED):
        table.clear()


@pytest.mark.parametrize("strategy", ["least_connections", "adaptive"])
async def test_slow_worker_gets_fewer_new_activations(
    nc: NATS, subjects: Subjects, registry: Registry, spawn_worker: type, strategy: str
) -> None:
    spawn_worker("tests.agents:Pacer", worker_id="fast", env={"MESH_TEST_PACE": "0"})
    spawn_worker("tests.agents:Pacer", worker_id="slow", env={"MESH_TEST_PACE": "0.25"})
    config = GatewayConfig(strategies={"pacer": strategy})
    async with Gateway(nc, subjects, config) as gateway:
        assert gateway.strategy_name("pacer") == strategy
        await eventually(lambda: len(gateway.directory.live_workers("pacer")) == 2, timeout=15)
        client = MeshClient(nc, subjects=subjects)
        slots = asyncio.Semaphore(12)

        async def place(n: int) -> str:
            async with slots:
                reply = await client.call(AgentId("pacer", f"new-{n}"), {}, timeout=10)
                return str(reply["worker"])

        placed = Counter(await asyncio.gather(*(place(n) for n in range(120))))
    assert placed["fast"] + placed["slow"] == 120
    assert placed["slow"] < 0.3 * 120, placed


async def test_gateway_answers_503_when_every_worker_is_at_capacity(
    nc: NATS, subjects: Subjects, gateway: Gateway, reset_pacer: None
) -> None:
    config = WorkerConfig(worker_id="small", heartbeat_interval=0.5, capacity=2)
    async with Worker(nc, [Pacer], config, subjects):
        await eventually(lambda: gateway.directory.live_workers("pacer"), timeout=5)
        client = MeshClient(nc, subjects=subjects)
        busy = [
            asyncio.create_task(client.call(AgentId("pacer", f"b{i}"), {"seconds": 3.0}))
            for i in range(2)
        ]
        await eventually(lambda: gateway.stats("small").inflight == 2, timeout=2)
        with pytest.raises(NoWorkerAvailableError, match="at capacity"):
            await client.call(AgentId("pacer", "one-too-many"), {"seconds": 0})
        # An agent that is already placed there is still served: capacity gates new ones.
        results = await asyncio.gather(*busy)
        assert {r["worker"] for r in results} == {"small"}
        assert agents.CALLS["one-too-many"] == 0


async def test_idle_agent_is_deactivated_through_its_hook_and_its_placement_removed(
    nc: NATS, subjects: Subjects, gateway: Gateway, reset_pacer: None
) -> None:
    config = WorkerConfig(worker_id="tidy", heartbeat_interval=0.5, idle_timeout=0.3)
    async with Worker(nc, [Pacer], config, subjects) as worker:
        await eventually(lambda: gateway.directory.live_workers("pacer"), timeout=5)
        client = MeshClient(nc, subjects=subjects)
        target = AgentId("pacer", "sleepy")
        await client.call(target, {"seconds": 0})
        assert await _placed_worker(nc, subjects, target) == "tidy"

        async def released() -> bool:
            return await _placed_worker(nc, subjects, target) is None

        await eventually(released, timeout=5)
        assert agents.SAVED["sleepy"] == 1
        assert worker.activations == 0
        await eventually(lambda: gateway.placements.get(target) is None, timeout=2)
        await client.call(target, {"seconds": 0})
        assert await _placed_worker(nc, subjects, target) == "tidy"
        assert agents.CALLS["sleepy"] == 2


async def test_stateless_type_skips_placement_and_spreads_over_workers(
    nc: NATS, subjects: Subjects, gateway: Gateway, spawn_worker: type
) -> None:
    spawn_worker("workers.echo:Echo", worker_id="e1")
    spawn_worker("workers.echo:Echo", worker_id="e2")
    await eventually(lambda: len(gateway.directory.live_workers("echo")) == 2, timeout=15)
    client = MeshClient(nc, subjects=subjects)
    replies = [await client.call(AgentId("echo", "same-key"), {"text": "x"}) for _ in range(40)]
    assert {r["worker"] for r in replies} == {"e1", "e2"}
    assert await _placed_worker(nc, subjects, AgentId("echo", "same-key")) is None
    assert len(gateway.placements) == 0
