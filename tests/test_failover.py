"""Workers that die or leave: lookups drop them in time, and callers do not notice."""

from __future__ import annotations

import asyncio
import time
from collections import Counter

from nats.aio.client import Client as NATS

from mesh import AgentId, MeshClient, MeshError
from mesh.handlers.gateway import Gateway
from mesh.subjects import Subjects
from mesh.testing import eventually
from tests.conftest import HEARTBEAT
from tests.helpers import live_worker_ids

AGENTS = ("workers.echo:Echo", "workers.counter:Counter")


async def _call_until(client: MeshClient, stop: asyncio.Event, outcomes: Counter[str]) -> None:
    """Call counter agents one after another until `stop` is set, counting outcomes."""
    n = 0
    while not stop.is_set():
        n += 1
        try:
            await client.call(AgentId("counter", f"k{n % 16}"), {"by": 1}, message_type="Increment")
            outcomes["ok"] += 1
        except MeshError as exc:
            outcomes[f"{int(exc.code)} {exc.message}"] += 1


async def test_killed_worker_drops_out_of_lookups_and_calls_keep_succeeding(
    nc: NATS, subjects: Subjects, gateway: Gateway, spawn_worker: type
) -> None:
    victim = spawn_worker(*AGENTS, worker_id="victim")
    survivor = spawn_worker(*AGENTS, worker_id="survivor")

    async def both_live() -> bool:
        return await live_worker_ids(nc, subjects, "counter") == {"victim", "survivor"}

    await eventually(both_live, timeout=15)
    await eventually(lambda: len(gateway.directory.live_workers("counter")) == 2, timeout=5)

    client = MeshClient(nc, subjects=subjects)
    outcomes: Counter[str] = Counter()
    stop = asyncio.Event()
    callers = [asyncio.create_task(_call_until(client, stop, outcomes)) for _ in range(4)]
    await eventually(lambda: outcomes["ok"] > 20, timeout=5)

    victim.kill()
    killed_at = time.monotonic()

    async def only_survivor() -> bool:
        return await live_worker_ids(nc, subjects, "counter") == {"survivor"}

    await eventually(only_survivor, timeout=3 * HEARTBEAT + 1.0, interval=0.02)
    dropped_after = time.monotonic() - killed_at
    calls_before = outcomes["ok"]
    await eventually(lambda: outcomes["ok"] > calls_before + 20, timeout=5)
    stop.set()
    await asyncio.gather(*callers)

    assert await victim.wait() != 0
    assert dropped_after <= 3 * HEARTBEAT + 0.25, f"dropped after {dropped_after:.2f}s"
    assert set(outcomes) == {"ok"}, outcomes
    reply = await client.call(AgentId("echo", "after"), {"text": "still here"})
    assert reply["worker"] == "survivor"
    assert survivor.process is not None and survivor.process.poll() is None
