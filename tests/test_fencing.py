"""Zombie workers: a worker paused past its heartbeat lapse resumes as a stale owner.
Its state writes for agents that moved meanwhile are refused, and it drops them."""

from __future__ import annotations

import asyncio
import os
import signal

import orjson
from nats.aio.client import Client as NATS

from mesh import AgentId, MeshClient
from mesh.handlers.gateway import Gateway
from mesh.handlers.state import StateService
from mesh.state import StateClient
from mesh.subjects import Subjects
from mesh.testing import eventually
from tests.helpers import assert_error


async def _activations(nc: NATS, subjects: Subjects, worker_id: str) -> int:
    reply = await nc.request(subjects.worker_ctl(worker_id, "stats"), b"", timeout=2)
    return int(orjson.loads(reply.data)["load"]["activations"])


async def test_a_resumed_stale_owner_cannot_write_and_drops_moved_agents(
    nc: NATS, subjects: Subjects, gateway: Gateway, state_service: StateService, spawn_worker: type
) -> None:
    client = MeshClient(nc, subjects=subjects)
    zombie = spawn_worker("workers.counter:Counter", worker_id="zombie")
    await eventually(lambda: gateway.directory.live_workers("counter"), timeout=15)
    moved, stale, stays = (AgentId("counter", k) for k in ("moved", "stale", "stays"))
    for agent in (moved, stale, stays):
        reply = await client.call(agent, {"by": 1}, message_type="Increment")
        assert reply["worker"] == "zombie"
    placements = await nc.jetstream().key_value(subjects.placement_bucket)
    old_epoch = (await placements.get(Subjects.agent_key(stale))).revision
    spawn_worker("workers.counter:Counter", worker_id="heir")
    await eventually(lambda: len(gateway.directory.live_workers("counter")) == 2, timeout=15)

    os.kill(zombie.pid, signal.SIGSTOP)
    try:
        await eventually(
            lambda: [w.id for w in gateway.directory.live_workers("counter")] == ["heir"],
            timeout=10,
            message="the paused worker lapsing",
        )
        for agent in (moved, stale):  # the gateway moves them to the heir
            reply = await client.call(agent, {"by": 1}, message_type="Increment")
            assert (reply["worker"], reply["value"]) == ("heir", 2)
        # A request that reached the zombie before it stopped, handled when it resumes:
        late = nc.request(
            subjects.worker_rpc("zombie", stale),
            b'{"by": 100}',
            timeout=10,
            headers={"Mesh-Msg-Type": "Increment", "Mesh-Placement-Epoch": str(old_epoch)},
        )
        late_reply = asyncio.ensure_future(late)
        await asyncio.sleep(0.2)
    finally:
        os.kill(zombie.pid, signal.SIGCONT)
    error = assert_error(await late_reply, 409, "Fenced")
    assert "zombie" in error["message"] and "heir" in error["message"]
    store = StateClient(nc, subjects)
    saved = await store.get(stale)
    assert (saved.state, saved.writer) == ({"value": 2}, "heir")  # nothing from the zombie
    # Back, the zombie re-registers and drops what moved; what did not move stays.
    await eventually(
        lambda: _is(_activations(nc, subjects, "zombie"), 1), timeout=15, message="drop moved"
    )
    reply = await client.call(stays, {"by": 1}, message_type="Increment")
    assert (reply["worker"], reply["value"]) == ("zombie", 2)


async def _is(value: object, expected: int) -> bool:
    return await value == expected  # type: ignore[misc]
