"""SIGTERM drains a worker: in-flight calls finish, nothing fails, the worker leaves cleanly."""

from __future__ import annotations

import asyncio

from nats.aio.client import Client as NATS
from nats.js.errors import KeyNotFoundError

from mesh import AgentId, MeshClient
from mesh._control import control_request
from mesh.handlers.gateway import Gateway
from mesh.records import WorkerRecord
from mesh.subjects import Subjects
from mesh.testing import eventually
from tests.helpers import live_worker_ids


async def test_sigterm_drains_in_flight_calls_without_error(
    nc: NATS, subjects: Subjects, gateway: Gateway, spawn_worker: type
) -> None:
    leaving = spawn_worker("tests.agents:Sleeper", worker_id="leaving")
    spawn_worker("tests.agents:Sleeper", worker_id="staying")

    async def both_live() -> bool:
        return await live_worker_ids(nc, subjects, "sleeper") == {"leaving", "staying"}

    await eventually(both_live, timeout=15)
    await eventually(lambda: len(gateway.directory.live_workers("sleeper")) == 2, timeout=5)

    client = MeshClient(nc, subjects=subjects)
    naps = [
        asyncio.create_task(
            client.call(
                AgentId("sleeper", f"k{i}"),
                {"seconds": 1.0, "tag": str(i)},
                message_type="Nap",
                timeout=10,
            )
        )
        for i in range(24)
    ]

    async def leaving_is_busy() -> bool:
        record = await control_request(
            nc, subjects.worker_ctl("leaving", "stats"), None, WorkerRecord, timeout=1
        )
        return record is not None and record.load.inflight > 0

    await eventually(leaving_is_busy, timeout=5)
    leaving.terminate()
    # Once gateways know it is draining, new agents go to the other worker.
    await eventually(
        lambda: [w.id for w in gateway.directory.live_workers("sleeper")] == ["staying"],
        timeout=5,
    )
    during = await client.call(
        AgentId("sleeper", "during"), {"seconds": 0}, message_type="Nap", timeout=10
    )

    replies = await asyncio.gather(*naps)
    assert await leaving.wait(15) == 0
    assert sorted(int(r["tag"]) for r in replies) == list(range(24))
    assert {r["worker"] for r in replies} == {"leaving", "staying"}
    assert during["worker"] == "staying"
    workers_kv = await nc.jetstream().key_value(subjects.workers_bucket)
    try:
        await workers_kv.get("leaving")
        raise AssertionError("the drained worker is still registered")
    except KeyNotFoundError:
        pass
    assert await live_worker_ids(nc, subjects, "sleeper") == {"staying"}
