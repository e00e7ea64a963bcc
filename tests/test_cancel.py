"""A caller that gives up on a request cancels the handler running it."""

from __future__ import annotations

import asyncio

import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from mesh import AgentId, MeshClient, MeshError
from mesh.handlers.gateway import Gateway
from mesh.subjects import Subjects
from mesh.testing import eventually
from tests.agents import CANCELLED_SUBJECT


@pytest.fixture
async def waiter(gateway: Gateway, spawn_worker: type) -> None:
    """A worker hosting the waiter agent, known to the gateway."""
    spawn_worker("tests.agents:Waiter", worker_id="waiting")
    await eventually(lambda: gateway.directory.live_workers("waiter"), timeout=15)


async def test_cancelling_a_call_cancels_the_remote_handler(
    nc: NATS, subjects: Subjects, gateway: Gateway, waiter: None
) -> None:
    cancelled: list[str] = []

    async def note(msg: Msg) -> None:
        cancelled.append(msg.data.decode())

    sub = await nc.subscribe(CANCELLED_SUBJECT, cb=note)
    client = MeshClient(nc, subjects=subjects)
    agent = AgentId("waiter", "w1")
    await client.call(agent, {"seconds": 0}, message_type="Wait")  # placed and warm
    call = asyncio.create_task(
        client.call(agent, {"seconds": 30}, message_type="Wait", headers={"Mesh-Request-Id": "r-1"})
    )
    await eventually(lambda: _running(gateway), timeout=10)
    call.cancel()
    await eventually(lambda: cancelled == ["r-1"], timeout=10, message="the handler cancelled")
    # The agent is free again at once: its mailbox is not held by the abandoned wait.
    await asyncio.wait_for(client.call(agent, {"seconds": 0}, message_type="Wait"), timeout=5)
    await sub.unsubscribe()


async def test_a_cancel_for_an_unknown_request_changes_nothing(
    nc: NATS, subjects: Subjects, gateway: Gateway, waiter: None
) -> None:
    client = MeshClient(nc, subjects=subjects)
    agent = AgentId("waiter", "w2")
    call = asyncio.create_task(client.call(agent, {"seconds": 1}, message_type="Wait"))
    await eventually(lambda: _running(gateway), timeout=10)
    await nc.publish(subjects.cancel(agent), headers={"Mesh-Request-Id": "not-this-one"})
    await nc.publish(subjects.cancel(agent))  # no request id at all
    assert await asyncio.wait_for(call, timeout=10) is None


def _running(gateway: Gateway) -> bool:
    return any(gateway._waiting_on.values())


async def test_a_cancel_that_arrives_before_its_request_still_cancels_it(
    nc: NATS, subjects: Subjects, gateway: Gateway, waiter: None
) -> None:
    client = MeshClient(nc, subjects=subjects)
    agent = AgentId("waiter", "w3")
    await client.call(agent, {"seconds": 0}, message_type="Wait")  # placed and listening
    await nc.publish(subjects.cancel(agent), headers={"Mesh-Request-Id": "early-1"})
    await nc.flush()
    with pytest.raises(MeshError, match="cancelled by its caller") as raised:
        await client.call(
            agent, {"seconds": 0}, message_type="Wait", headers={"Mesh-Request-Id": "early-1"}
        )
    assert raised.value.code == 503
    # Only that request: the next one runs.
    assert await client.call(agent, {"seconds": 0}, message_type="Wait") is None
