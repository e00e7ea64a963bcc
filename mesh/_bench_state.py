"""The state part of ``mesh bench``: the state service beside raw KV, in the same run.

Latency: sequential puts (each expecting the version before) and gets of one agent's
small state through the state service, beside raw KV ``put`` and direct ``get`` of the
same bytes. Throughput: 32 writers, each updating its own agent with compare-and-set on
the version it last wrote, through the state service (the puts made together sent
together, as `StateClient` does), beside 32 raw KV writers doing
``update(key, value, last=revision)``, in each of `CAS_ROUNDS` rounds. Within a round
the two take turns, `SLICES` times each, so that both meet the same moments of a
machine whose speed drifts; then one request per put and `StateStore` (what a worker
does for its agents) are measured once, against the round's raw figure.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from nats.aio.client import Client as NATS

from mesh._kv import BucketConfig, ensure_bucket
from mesh._state_store import StateStore
from mesh.ids import AgentId
from mesh.state import StateAccess, StateClient
from mesh.subjects import Subjects

WRITERS = 32
#: Compare-and-set rounds: this machine's speed swings from one second to the next, so
#: the best round's figures are shown, and every round's kept.
CAS_ROUNDS = 3
#: Turns raw KV and the state service take within a round.
SLICES = 4
STATE = {"count": 0, "note": "x" * 40}


def _summary(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {
        "p50_ms": statistics.median(samples) * 1e3,
        "p95_ms": ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))] * 1e3,
    }


async def _timed(step: Callable[[int], Awaitable[object]], count: int) -> dict[str, float]:
    for n in range(min(100, count)):  # warm up
        await step(n)
    samples = []
    for n in range(count):
        started = time.perf_counter()
        await step(n)
        samples.append(time.perf_counter() - started)
    return _summary(samples)


#: One writer's part of a measurement: `updates` compare-and-sets, carrying on from
#: where its last part ended.
Writer = Callable[[int, int], Awaitable[None]]


async def _run(writer: Writer, updates: int) -> float:
    """Seconds it takes `WRITERS` writers to make `updates` updates each."""
    started = time.perf_counter()
    await asyncio.gather(*(writer(w, updates) for w in range(WRITERS)))
    return time.perf_counter() - started


async def _rate(writer: Writer, per_writer: int) -> float:
    return per_writer * WRITERS / await _run(writer, per_writer)


async def _taking_turns(first: Writer, second: Writer, per_writer: int) -> tuple[float, float]:
    """The rates of `first` and `second`, measured in `SLICES` alternating turns each
    (in alternating order)."""
    per_slice = max(1, per_writer // SLICES)
    seconds = [0.0, 0.0]
    for turn in range(SLICES):
        order = (0, 1) if turn % 2 == 0 else (1, 0)
        for index in order:
            seconds[index] += await _run((first, second)[index], per_slice)
    updates = per_slice * SLICES * WRITERS
    return updates / seconds[0], updates / seconds[1]


async def measure_state(nc: NATS, subjects: Subjects, count: int) -> dict[str, Any]:
    """Figures for the state service and raw KV; `count` operations per measurement."""
    js = nc.jetstream()
    raw = await ensure_bucket(js, BucketConfig(name=f"{subjects.prefix}-bench-raw"))
    store = StateClient(nc, subjects)
    value = orjson.dumps(STATE)
    results: dict[str, Any] = {}

    results["raw_kv_put"] = await _timed(lambda n: raw.put("lat", value), count)
    results["raw_kv_get"] = await _timed(lambda n: raw.get("lat"), count)

    latency_agent = AgentId("bench-state", "latency")
    version = (await store.put(latency_agent, STATE)).version

    async def state_put(n: int) -> None:
        nonlocal version
        version = (await store.put(latency_agent, STATE, expected_version=version)).version

    results["state_put"] = await _timed(state_put, count)
    results["state_get"] = await _timed(lambda n: store.get(latency_agent), count)

    per_writer = max(1, count * 4 // WRITERS)
    revisions = {w: await raw.put(f"cas{w}", value) for w in range(WRITERS)}

    async def raw_writer(w: int, updates: int) -> None:
        for _ in range(updates):
            revisions[w] = await raw.update(f"cas{w}", value, last=revisions[w])

    async def state_writer(access: StateAccess, prefix: str) -> Writer:
        versions = {
            w: (await access.put(AgentId("bench-state", f"{prefix}{w}"), STATE)).version
            for w in range(WRITERS)
        }

        async def write(w: int, updates: int) -> None:
            agent = AgentId("bench-state", f"{prefix}{w}")
            for n in range(updates):
                state = {"count": n, "note": STATE["note"]}
                versions[w] = (await access.put(agent, state, expected_version=versions[w])).version

        return write

    direct = StateStore(js, subjects)
    await direct.start()
    through_service = await state_writer(store, "svc")
    unbatched = await state_writer(StateClient(nc, subjects, batch=False), "one")
    workers_saving = await state_writer(direct, "kv")
    rounds = []
    for _ in range(CAS_ROUNDS):
        raw_rate, state_rate = await _taking_turns(raw_writer, through_service, per_writer)
        rounds.append(
            {
                "raw_kv_cas_per_s": raw_rate,
                "state_cas_per_s": state_rate,
                "state_unbatched_cas_per_s": await _rate(unbatched, per_writer),
                "store_cas_per_s": await _rate(workers_saving, per_writer),
            }
        )
    results.update(max(rounds, key=lambda r: r["state_cas_per_s"] / r["raw_kv_cas_per_s"]))
    results["cas_rounds"] = rounds
    results["writers"] = WRITERS
    await js.delete_key_value(f"{subjects.prefix}-bench-raw")
    return results


def state_lines(results: dict[str, Any], raw_rpc_p50_ms: float) -> list[str]:
    """What the bench prints about state."""
    r = results
    floor = r["raw_kv_get"]["p50_ms"] + raw_rpc_p50_ms
    return [
        f"state put p50 {r['state_put']['p50_ms']:.2f} ms, p95 {r['state_put']['p95_ms']:.2f} ms"
        f" (raw KV put p50 {r['raw_kv_put']['p50_ms']:.2f} ms)",
        f"state get p50 {r['state_get']['p50_ms']:.2f} ms, p95 {r['state_get']['p95_ms']:.2f} ms"
        f" (raw KV direct get p50 {r['raw_kv_get']['p50_ms']:.2f} ms; plus one request/reply"
        f" hop {floor:.2f} ms: {r['state_get']['p50_ms'] / floor:.2f}x)",
        f"state CAS updates, {r['writers']} writers, best of {len(r['cas_rounds'])} rounds:"
        f" {r['state_cas_per_s']:,.0f}/s through the state service"
        f" ({r['state_cas_per_s'] / r['raw_kv_cas_per_s']:.2f}x raw KV CAS at"
        f" {r['raw_kv_cas_per_s']:,.0f}/s, taking turns with it;"
        f" {_versus_raw(r, 'state_unbatched_cas_per_s')} with one request per put),"
        f" {_versus_raw(r, 'store_cas_per_s')} as workers save",
        "  each round, through the state service: "
        + ", ".join(_versus_raw(round_, "state_cas_per_s") for round_ in r["cas_rounds"]),
    ]


def _versus_raw(figures: dict[str, float], name: str) -> str:
    rate = figures[name]
    return f"{rate:,.0f}/s ({rate / figures['raw_kv_cas_per_s']:.2f}x)"
