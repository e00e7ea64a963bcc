"""``mesh bench``: what mesh's request path costs, against raw NATS in the same run.

It starts its own NATS server, the gateway, the registry and router (in another
process) and one worker process, then measures for a 64-byte echo:

- ``raw_rpc``: nats-py request/reply to a plain responder process (the floor);
- ``gateway_rpc``: mesh RPC through the gateway to a placed agent;
- ``stateless_rpc``: mesh RPC through the gateway to a stateless type's pool;

each as sequential latency (p50/p95/p99) and throughput at several concurrency
levels; then ``inflight_100k``: that many requests in flight at once through the one
gateway (each held by its handler for a while), counting answers and errors and the
gateway's peak memory. Events: latency at a steady rate, and publish-to-handled
throughput in three bursts, each right after a raw JetStream ``publish_async`` burst
(the best burst is shown with the raw rate measured just before it, and every burst
is listed: this machine's speed varies from minute to minute). State
(`mesh._bench_state`): the state service's put/get latency and compare-and-set
throughput, and workers' saves, beside raw KV. It prints a table and, with
``--json PATH``, writes the figures.
"""

from __future__ import annotations

import asyncio
import os
import platform
import statistics
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import nats
import orjson
import psutil
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from pydantic import BaseModel
from rich.console import Console
from rich.table import Table

from mesh._bench_state import measure_state, state_lines
from mesh.agent import Agent, MessageContext, handler
from mesh.client import MeshClient
from mesh.config import ConnectConfig
from mesh.errors import MeshError, StateNotFoundError
from mesh.ids import AgentId, TopicId
from mesh.server import NatsServer, find_nats_server
from mesh.state import StateClient
from mesh.subjects import Subjects
from mesh.subscriptions import type_subscription
from mesh.testing import WorkerProcess, eventually

RAW_SUBJECT = "bench.raw"
TEXT = "x" * 53  # {"text":"xx..."} is 64 bytes
CONCURRENCY_LEVELS = (1, 16, 64, 256)


class Echo64(BaseModel):
    text: str
    hold: float = 0.0


class PlacedEcho(Agent, agent_type="bench-placed"):
    """Echo with identity: every key is one activation, placed on a worker."""

    @handler
    async def echo(self, message: Echo64, ctx: MessageContext) -> Echo64:
        return message


class PooledEcho(Agent, agent_type="bench-pooled", stateless=True):
    """Stateless echo; `hold` keeps the request in flight that long."""

    @handler
    async def echo(self, message: Echo64, ctx: MessageContext) -> Echo64:
        if message.hold:
            await asyncio.sleep(message.hold)
        return message


class BenchTick(BaseModel):
    sent: float
    #: Numbered events of a burst are counted, not timed one by one; -1 for a timed one.
    n: int = -1


HANDLED_SUBJECT = "bench.handled"


#: Distinct burst events this process handled.
_burst_seen: set[int] = set()
#: The sink reports its count of burst events every this many.
REPORT_EVERY = 100


@type_subscription("bench.load")
class BenchSink(Agent, agent_type="bench-sink"):
    """Handles bench events. A timed event's delay goes back to the bench on core NATS;
    burst events are counted, and the count reported every `REPORT_EVERY`, so that the
    measuring costs little beside what it measures."""

    @handler
    async def tick(self, message: BenchTick, ctx: MessageContext) -> None:
        if self._client is None:
            return
        if message.n < 0:
            delay = time.time() - message.sent
            await self._client.nc.publish(HANDLED_SUBJECT, b"t" + str(delay).encode())
            return
        _burst_seen.add(message.n)
        if len(_burst_seen) % REPORT_EVERY == 0:
            await self._client.nc.publish(HANDLED_SUBJECT, b"n" + str(len(_burst_seen)).encode())


#: Bursts of events measured, each beside a raw burst just before it; the best is shown.
EVENT_ROUNDS = 3


async def _raw_publish_rate(js: JetStreamContext, count: int, sources: int) -> float:
    """Raw JetStream publish_async: `count` acknowledged publishes per second."""
    payload = orjson.dumps({"sent": time.time()})
    started = time.perf_counter()
    acks = [await js.publish_async(f"bench.raw.s{n % sources}", payload) for n in range(count)]
    await asyncio.gather(*acks)
    return count / (time.perf_counter() - started)


async def _events(
    nc: NATS, subjects: Subjects, count: int, sources: int, rounds: int = EVENT_ROUNDS
) -> dict[str, Any]:
    """Latency at a steady rate; then `rounds` times a raw JetStream publish_async burst
    and a mesh publish-to-handled burst right after it, on the same machine."""
    js = nc.jetstream()
    await js.add_stream(name="BENCH_RAW", subjects=["bench.raw.>"], max_age=600)
    count -= count % REPORT_EVERY
    delays: list[float] = []
    steady_count = 500
    burst_handled = 0
    target = 0
    steady_done, burst_done = asyncio.Event(), asyncio.Event()

    async def note(msg: Msg) -> None:
        nonlocal burst_handled
        if msg.data.startswith(b"t"):
            delays.append(float(msg.data[1:]))
            if len(delays) >= steady_count:
                steady_done.set()
        else:
            burst_handled = max(burst_handled, int(msg.data[1:]))
            if burst_handled >= target:
                burst_done.set()

    sub = await nc.subscribe(HANDLED_SUBJECT, cb=note)
    headers = {"Content-Type": "application/json", "Mesh-Msg-Type": "BenchTick"}

    # Subjects made once, as for the raw publishes: what is measured is the delivery.
    topics = [subjects.events(TopicId("bench.load", f"s{n}")) for n in range(sources)]

    async def publish(n: int, numbered: bool) -> asyncio.Future[Any]:
        body = orjson.dumps({"sent": time.time(), "n": n if numbered else -1})
        ack: asyncio.Future[Any] = await js.publish_async(
            topics[n % sources], body, headers=headers
        )
        return ack

    # End-to-end latency at a steady, moderate rate (which also places every agent).
    for n in range(steady_count):
        await publish(n, numbered=False)
        await asyncio.sleep(1 / 500)
    async with asyncio.timeout(60):
        await steady_done.wait()
    # Throughput: bursts, publish to handled, each right after a raw burst. The sink
    # counts distinct numbers, so each burst numbers its events after the last one's.
    measured: list[dict[str, float]] = []
    for round_ in range(rounds):
        raw_rate = await _raw_publish_rate(js, count, sources)
        first, target = round_ * count, (round_ + 1) * count
        burst_done.clear()
        started = time.perf_counter()
        acks = [await publish(first + n, numbered=True) for n in range(count)]
        await asyncio.gather(*acks)
        async with asyncio.timeout(300):
            await burst_done.wait()
        rate = count / (time.perf_counter() - started)
        measured.append({"raw_publish_async_per_s": raw_rate, "handled_per_s": rate})
    await sub.unsubscribe()
    await js.delete_stream("BENCH_RAW")
    best = max(measured, key=lambda m: m["handled_per_s"])
    return {
        "events": count * rounds,
        "sources": sources,
        "handled": burst_handled,
        **best,
        "rounds": measured,
        "p50_ms": statistics.median(delays) * 1e3,
        "p95_ms": _percentile(delays, 0.95) * 1e3,
    }


async def _responder(url: str) -> None:
    nc = await nats.connect(url, name="bench-responder")

    async def echo(msg: Msg) -> None:
        await msg.respond(msg.data)

    await nc.subscribe(RAW_SUBJECT, cb=echo)
    await nc.flush()
    print("ready", flush=True)
    await asyncio.Event().wait()


Send = Callable[[], Awaitable[object]]


def _percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def _latency(send: Send, count: int) -> dict[str, float]:
    samples = []
    for _ in range(count):
        started = time.perf_counter()
        await send()
        samples.append(time.perf_counter() - started)
    return {
        "p50_ms": statistics.median(samples) * 1e3,
        "p95_ms": _percentile(samples, 0.95) * 1e3,
        "p99_ms": _percentile(samples, 0.99) * 1e3,
    }


async def _throughput(send: Send, count: int, concurrency: int) -> float:
    remaining = count

    async def loop() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            await send()

    started = time.perf_counter()
    await asyncio.gather(*(loop() for _ in range(concurrency)))
    return count / (time.perf_counter() - started)


async def _paced(send: Send, rate: float, seconds: float) -> dict[str, float]:
    """Open loop: start a request every 1/`rate` seconds, whatever the replies do."""
    samples: list[float] = []

    async def timed() -> None:
        started = time.perf_counter()
        await send()
        samples.append(time.perf_counter() - started)

    tasks = []
    begin = time.perf_counter()
    for n in range(int(rate * seconds)):
        delay = begin + n / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(timed()))
    await asyncio.gather(*tasks)
    return {
        "rate_per_s": rate,
        "p50_ms": statistics.median(samples) * 1e3,
        "p95_ms": _percentile(samples, 0.95) * 1e3,
        "p99_ms": _percentile(samples, 0.99) * 1e3,
    }


async def _measure(send: Send, requests: int) -> dict[str, Any]:
    await _latency(send, 200)  # warm up
    figures: dict[str, Any] = await _latency(send, min(requests, 2000))
    rates = {str(c): await _throughput(send, requests, c) for c in CONCURRENCY_LEVELS}
    figures["throughput_by_concurrency"] = rates
    figures["throughput_per_s"] = max(rates.values())
    return figures


async def _hold_inflight(
    client: MeshClient, gateway_pid: int, count: int, hold: float
) -> dict[str, Any]:
    """`count` requests in flight at once through one gateway, each held `hold` seconds."""
    gateway = psutil.Process(gateway_pid)
    peak_rss = gateway.memory_info().rss
    done = asyncio.Event()

    async def watch_memory() -> None:
        nonlocal peak_rss
        while not done.is_set():
            peak_rss = max(peak_rss, gateway.memory_info().rss)
            await asyncio.sleep(0.2)

    failures: Counter[str] = Counter()

    async def one(n: int) -> bool:
        try:
            reply = await client.call(
                AgentId("bench-pooled", f"k{n % 1000}"),
                {"text": TEXT, "hold": hold},
                timeout=180,
            )
        except MeshError as exc:
            failures[f"{int(exc.code)} {exc.message}"[:120]] += 1
            return False
        return isinstance(reply, dict) and reply.get("text") == TEXT

    watcher = asyncio.create_task(watch_memory())
    started = time.perf_counter()
    results = await asyncio.gather(*(one(n) for n in range(count)))
    wall = time.perf_counter() - started
    done.set()
    await watcher
    answered = sum(results)
    return {
        "sent": count,
        "answered": answered,
        "errors": count - answered,
        "wall_s": wall,
        "gateway_rss_mb": peak_rss / 2**20,
        "error_kinds": dict(failures.most_common(5)),
    }


def _machine() -> dict[str, Any]:
    version = subprocess.run(
        [find_nats_server(), "--version"], capture_output=True, text=True, check=False
    ).stdout.strip()
    return {
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "nats_server": version,
        "platform": platform.platform(),
    }


def _table(results: dict[str, Any], requests: int) -> Table:
    table = Table(title=f"64-byte echo, {requests} requests per concurrency level")
    for column in ("path", "p50 ms", "p95 ms", "p99 ms", "req/s (best)", "vs raw"):
        table.add_column(column, justify="right")
    raw = results["raw_rpc"]
    for name in ("raw_rpc", "gateway_rpc", "stateless_rpc"):
        row = results[name]
        table.add_row(
            name,
            f"{row['p50_ms']:.3f}",
            f"{row['p95_ms']:.3f}",
            f"{row['p99_ms']:.3f}",
            f"{row['throughput_per_s']:,.0f}",
            f"p50 {row['p50_ms'] / raw['p50_ms']:.2f}x, "
            f"rate {row['throughput_per_s'] / raw['throughput_per_s']:.2f}x",
        )
    return table


async def _state_served(nc: NATS) -> bool:
    try:
        await StateClient(nc, Subjects()).get(AgentId("bench-state", "probe"))
    except StateNotFoundError:
        return True
    return True


async def _subscribed(nc: NATS, agent_type: str) -> bool:
    reply = await nc.request("mesh.router.subscriptions", b"{}", timeout=2)
    listed = orjson.loads(reply.data).get("subscriptions", [])
    return any(r["subscription"]["agent_type"] == agent_type for r in listed)


async def run_bench(
    requests: int = 5000,
    events: int = 20_000,
    inflight: int = 100_000,
    hold: float = 5.0,
    json_path: str | None = None,
) -> int:
    """Measure everything and print the table; 0 when every held request was answered."""
    console = Console()
    results: dict[str, Any] = {"machine": _machine()}
    with NatsServer() as server:
        env = {**os.environ, "MESH_GATEWAY_MAX_IN_FLIGHT": str(inflight * 2)}
        responder = subprocess.Popen(  # noqa: ASYNC220 - starting it does not block
            [sys.executable, "-m", "mesh.bench", server.url], stdout=subprocess.PIPE, text=True
        )
        # The default prefix throughout, whatever MESH_PREFIX says: this is our own server.
        mesh_cli = [
            sys.executable,
            "-m",
            "mesh.cli",
            "--nats",
            server.url,
            "--prefix",
            "mesh",
            "serve",
        ]
        # The gateway in a process of its own, as in production: holding 100,000
        # requests, it must not delay the heartbeats the registry answers, nor events.
        control = subprocess.Popen([*mesh_cli, "registry", "router"])  # noqa: ASYNC220
        state = subprocess.Popen([*mesh_cli, "state"])  # noqa: ASYNC220
        gateway = subprocess.Popen([*mesh_cli, "gateway"], env=env)  # noqa: ASYNC220
        worker = WorkerProcess(
            server.url,
            ["mesh.bench:PlacedEcho", "mesh.bench:PooledEcho", "mesh.bench:BenchSink"],
            worker_id="bench-worker",
            heartbeat_interval=1.0,
            extra_args=["--max-in-flight", str(inflight * 2), "--capacity", str(inflight * 2)],
        ).start()
        client = await MeshClient.connect(ConnectConfig(url=server.url), subjects=Subjects())
        try:
            assert responder.stdout is not None
            await asyncio.wait_for(asyncio.to_thread(responder.stdout.readline), 10)
            nc = client.nc
            raw_payload = orjson.dumps({"text": TEXT})
            message = {"text": TEXT}

            async def raw() -> object:
                return await nc.request(RAW_SUBJECT, raw_payload, timeout=10)

            async def placed() -> object:
                return await client.call(AgentId("bench-placed", "k"), message, timeout=10)

            async def pooled() -> object:
                return await client.call(AgentId("bench-pooled", "k"), message, timeout=10)

            await eventually(placed, timeout=30, message="the bench worker answering")
            await eventually(pooled, timeout=30, message="the bench pool answering")
            for name, send in (
                ("raw_rpc", raw),
                ("gateway_rpc", placed),
                ("stateless_rpc", pooled),
            ):
                console.print(f"measuring {name}…")
                results[name] = await _measure(send, requests)
            console.print("gateway_rpc at a steady 1,000 requests/s…")
            results["gateway_rpc_at_1000_per_s"] = await _paced(placed, 1000, 5)
            console.print(f"events: {events:,} published, publish to handled…")
            await eventually(
                lambda: _subscribed(nc, "bench-sink"), timeout=30, message="bench subscription"
            )
            results["events"] = await _events(nc, Subjects(), events, sources=100)
            console.print("state: the state service and workers' saves beside raw KV…")
            await eventually(lambda: _state_served(nc), timeout=30, message="the state service")
            results["state"] = await measure_state(nc, Subjects(), 2000)
            console.print(f"holding {inflight:,} requests in flight for {hold:g}s each…")
            results["inflight_100k"] = await _hold_inflight(client, gateway.pid, inflight, hold)
        finally:
            await client.aclose()
            worker.stop()
            for process in (gateway, control, state, responder):
                process.terminate()
                process.wait(10)
    console.print(_table(results, requests))
    steady = results["gateway_rpc_at_1000_per_s"]
    console.print(
        f"gateway_rpc at 1,000 requests/s: p50 {steady['p50_ms']:.2f} ms,"
        f" p95 {steady['p95_ms']:.2f} ms, p99 {steady['p99_ms']:.2f} ms"
    )
    ev = results["events"]
    console.print(
        f"events: {ev['handled']:,}/{ev['events']:,} handled; best of {len(ev['rounds'])}"
        f" bursts {ev['handled_per_s']:,.0f}/s publish to handled"
        f" ({ev['handled_per_s'] / ev['raw_publish_async_per_s']:.2f}x raw JetStream"
        f" publish_async at {ev['raw_publish_async_per_s']:,.0f}/s just before);"
        f" latency at 500/s p50 {ev['p50_ms']:.1f} ms, p95 {ev['p95_ms']:.1f} ms"
    )
    bursts = [(r["handled_per_s"], r["raw_publish_async_per_s"]) for r in ev["rounds"]]
    console.print(
        "  each burst: " + ", ".join(f"{rate:,.0f}/s ({rate / raw:.2f}x)" for rate, raw in bursts)
    )
    for line in state_lines(results["state"], results["raw_rpc"]["p50_ms"]):
        console.print(line)
    held = results["inflight_100k"]
    console.print(
        f"in flight at once: {held['answered']:,}/{held['sent']:,} answered,"
        f" {held['errors']:,} errors, {held['wall_s']:.1f}s,"
        f" gateway peak RSS {held['gateway_rss_mb']:.0f} MiB"
    )
    if json_path:
        await asyncio.to_thread(
            Path(json_path).write_bytes, orjson.dumps(results, option=orjson.OPT_INDENT_2)
        )
        console.print(f"figures written to {json_path}")
    return 0 if held["errors"] == 0 else 1


if __name__ == "__main__":
    asyncio.run(_responder(sys.argv[1]))
