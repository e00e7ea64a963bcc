"""``mesh bench``: request/reply through the gateway to a worker, against raw NATS.

Both paths run in the same session on the same embedded server, with the same
client process and 64-byte payloads:

- raw: client -> a plain nats-py responder process;
- mesh: client -> gateway process -> worker process (echo agent) and back.

It prints latency (sequential p50/p99) and throughput (``concurrency`` requests in
flight) for both, and their ratios, which is what to compare across machines.
"""

from __future__ import annotations

import asyncio
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable

import nats
from nats.aio.msg import Msg
from rich.console import Console
from rich.table import Table

from mesh.client import MeshClient
from mesh.config import ConnectConfig
from mesh.ids import AgentId
from mesh.server import NatsServer
from mesh.testing import WorkerProcess, eventually

RAW_SUBJECT = "bench.raw"
PAYLOAD_TEXT = "x" * 40  # about 64 bytes of JSON with the field name


async def _responder(url: str) -> None:
    nc = await nats.connect(url, name="bench-responder")

    async def echo(msg: Msg) -> None:
        await msg.respond(msg.data)

    await nc.subscribe(RAW_SUBJECT, cb=echo)
    await nc.flush()
    print("ready", flush=True)
    await asyncio.Event().wait()


async def _latencies(send: Callable[[], Awaitable[object]], count: int) -> list[float]:
    samples = []
    for _ in range(count):
        started = time.perf_counter()
        await send()
        samples.append(time.perf_counter() - started)
    return samples


async def _throughput(send: Callable[[], Awaitable[object]], count: int, concurrency: int) -> float:
    remaining = count

    async def loop() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            await send()

    started = time.perf_counter()
    await asyncio.gather(*(loop() for _ in range(concurrency)))
    return count / (time.perf_counter() - started)


def _percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def run_bench(requests: int = 5000, concurrency: int = 32) -> int:
    """Measure both paths and print the table; 0 on success."""
    console = Console()
    with NatsServer() as server:
        responder = subprocess.Popen(  # noqa: ASYNC220 - starting it does not block
            [sys.executable, "-m", "mesh.bench", server.url], stdout=subprocess.PIPE, text=True
        )
        services = subprocess.Popen(  # noqa: ASYNC220
            [sys.executable, "-m", "mesh.cli", "--nats", server.url, "serve", "registry", "gateway"]
        )
        worker = WorkerProcess(server.url, ["workers.echo:Echo"], worker_id="bench-worker").start()
        try:
            assert responder.stdout is not None
            await asyncio.wait_for(asyncio.to_thread(responder.stdout.readline), 10)
            client = await MeshClient.connect(ConnectConfig(url=server.url))
            nc = client.nc
            payload = b'{"text":"' + PAYLOAD_TEXT.encode() + b'"}'
            target = AgentId("echo", "bench")
            message = {"text": PAYLOAD_TEXT}

            async def raw() -> object:
                return await nc.request(RAW_SUBJECT, payload, timeout=5)

            async def via_mesh() -> object:
                return await client.call(target, message, timeout=5)

            await eventually(via_mesh, timeout=20, message="the echo worker answering")
            results = {}
            for name, send in (("raw NATS", raw), ("mesh", via_mesh)):
                await _latencies(send, 200)  # warm up
                samples = await _latencies(send, min(requests, 2000))
                rate = await _throughput(send, requests, concurrency)
                results[name] = (
                    statistics.median(samples) * 1e6,
                    _percentile(samples, 0.99) * 1e6,
                    rate,
                )
            await client.aclose()
        finally:
            worker.stop()
            services.terminate()
            responder.terminate()
            services.wait(10)
            responder.wait(10)
    table = Table(title=f"request/reply, {requests} requests, {concurrency} in flight")
    for column in ("path", "p50 µs", "p99 µs", "req/s"):
        table.add_column(column, justify="right")
    for name, (p50, p99, rate) in results.items():
        table.add_row(name, f"{p50:.0f}", f"{p99:.0f}", f"{rate:,.0f}")
    raw_p50, raw_p99, raw_rate = results["raw NATS"]
    mesh_p50, mesh_p99, mesh_rate = results["mesh"]
    table.add_row(
        "mesh / raw",
        f"{mesh_p50 / raw_p50:.2f}x",
        f"{mesh_p99 / raw_p99:.2f}x",
        f"{mesh_rate / raw_rate:.2f}x",
    )
    console.print(table)
    return 0


if __name__ == "__main__":
    asyncio.run(_responder(sys.argv[1]))
