"""Workers that die or leave: lookups drop them in time, and callers do not notice."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import orjson
import pytest
from nats.aio.client import Client as NATS

from mesh import AgentId, MeshClient, MeshError
from mesh._balancing import Health
from mesh.handlers.gateway import Gateway
from mesh.subjects import Subjects
from mesh.testing import eventually
from tests.conftest import HEARTBEAT
from tests.helpers import live_worker_ids

AGENTS = ("workers.echo:Echo", "workers.counter:Counter")


@dataclass
class Outcomes:
    """Each call's start time and result, as the checker of a fault test wants them."""

    calls: list[tuple[float, str]] = field(default_factory=list)

    def ok_since(self, moment: float) -> int:
        return sum(1 for started, result in self.calls if started > moment and result == "ok")

    def failures(self) -> list[tuple[float, str]]:
        return [(started, result) for started, result in self.calls if result != "ok"]


async def _call_until(client: MeshClient, stop: asyncio.Event, outcomes: Outcomes) -> None:
    """Call counter agents one after another until `stop` is set, recording outcomes."""
    n = 0
    while not stop.is_set():
        n += 1
        started = time.monotonic()
        try:
            await client.call(
                AgentId("counter", f"k{n % 16}"), {"by": 1}, message_type="Increment", timeout=2
            )
            outcomes.calls.append((started, "ok"))
        except MeshError as exc:
            outcomes.calls.append((started, f"{int(exc.code)} {exc.message}"))


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
    outcomes = Outcomes()
    stop = asyncio.Event()
    callers = [asyncio.create_task(_call_until(client, stop, outcomes)) for _ in range(4)]
    await eventually(lambda: outcomes.ok_since(0) > 20, timeout=5)

    victim.kill()
    killed_at = time.monotonic()

    async def only_survivor() -> bool:
        return await live_worker_ids(nc, subjects, "counter") == {"survivor"}

    await eventually(only_survivor, timeout=3 * HEARTBEAT + 1.0, interval=0.02)
    dropped_at = time.monotonic()
    dropped_after = dropped_at - killed_at
    await eventually(lambda: outcomes.ok_since(dropped_at) > 40, timeout=5)
    stop.set()
    await asyncio.gather(*callers)

    assert await victim.wait() != 0
    assert dropped_after <= 3 * HEARTBEAT + 0.35, f"dropped after {dropped_after:.2f}s"
    # A call that reached the victim as it died has an unknown outcome: 503 ("went
    # away") once the gateway sees the victim's entry go, or 504 at its deadline. Each
    # caller has one call in flight, so at most one such loss per caller, and none
    # among the calls made once the registry had dropped the victim.
    failures = outcomes.failures()
    assert all(result.startswith(("503", "504")) for _, result in failures), failures
    assert len(failures) <= len(callers), failures
    assert all(started < dropped_at for started, _ in failures), failures
    reply = await client.call(AgentId("echo", "after"), {"text": "still here"})
    assert reply["worker"] == "survivor"
    assert survivor.process is not None and survivor.process.poll() is None


async def test_forward_to_a_worker_that_just_died_is_retried_on_another(
    nc: NATS, subjects: Subjects, gateway: Gateway, spawn_worker: type
) -> None:
    # Slow heartbeats: the directory still believes in the victim after it died.
    victim = spawn_worker(*AGENTS, worker_id="victim", heartbeat_interval=5.0)
    spawn_worker(*AGENTS, worker_id="survivor", heartbeat_interval=5.0)
    await eventually(lambda: len(gateway.directory.live_workers("counter")) == 2, timeout=15)
    client = MeshClient(nc, subjects=subjects)
    victim_keys = []
    for n in range(64):
        reply = await client.call(AgentId("counter", f"k{n}"), {}, message_type="GetCount")
        if reply["worker"] == "victim":
            victim_keys.append(f"k{n}")
    assert victim_keys, "no key was placed on the victim"

    victim.kill()
    await victim.wait()
    record = gateway.directory.worker("victim")
    assert record is not None and gateway.directory.is_live(record)

    for key in victim_keys:
        reply = await client.call(AgentId("counter", key), {}, message_type="GetCount")
        assert reply["worker"] == "survivor"
    # One forward found the victim gone; it was marked unhealthy, so the other agents
    # placed there moved without trying it again.
    assert gateway.vanished_workers == 1
    assert gateway.health("victim") is Health.UNHEALTHY
    placements = await nc.jetstream().key_value(subjects.placement_bucket)
    for key in victim_keys:
        entry = await placements.get(f"counter.{key}")
        assert orjson.loads(entry.value)["worker_id"] == "survivor"


async def test_a_call_in_flight_on_a_worker_that_dies_is_answered_503_when_it_lapses(
    nc: NATS, subjects: Subjects, gateway: Gateway, spawn_worker: type
) -> None:
    victim = spawn_worker("tests.agents:Sleeper", worker_id="doomed")
    await eventually(lambda: gateway.directory.live_workers("sleeper"), timeout=15)
    client = MeshClient(nc, subjects=subjects)
    started = time.monotonic()
    call = asyncio.create_task(
        client.call(AgentId("sleeper", "s1"), {"seconds": 30}, message_type="Nap", timeout=30)
    )
    await eventually(lambda: gateway._waiting_on.get("doomed"), timeout=10)
    victim.kill()
    with pytest.raises(MeshError) as raised:
        await asyncio.wait_for(call, timeout=15)
    # Not the 30 s deadline: a few heartbeat intervals, until the worker's entry lapsed.
    assert raised.value.code == 503
    assert "went away" in raised.value.message
    assert time.monotonic() - started < 15
    spawn_worker("tests.agents:Sleeper", worker_id="heir")
    await eventually(lambda: gateway.directory.live_workers("sleeper"), timeout=15)
    reply = await eventually(
        lambda: client.call(AgentId("sleeper", "s1"), {"seconds": 0}, message_type="Nap"),
        timeout=15,
    )
    assert reply["worker"] == "heir"
