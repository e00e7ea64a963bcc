"""What a worker's event path costs, without a publisher competing for the CPU.

    python bench/drain_events.py [--events 40000] [--rounds 3]

A registry, router and gateway, and one ``mesh worker`` hosting the bench's event
sink. Each round stops the worker (SIGSTOP), publishes N events from 100 sources into
the stream, lets the worker go on (SIGCONT) and times it until the sink has handled
them all. It reports events per second and the worker's CPU time per event (from
``/proc``), and the server's: the worker's own cost per event, which is what bounds
``mesh bench``'s publish-to-handled figure on a machine whose cores the publisher
and the server share.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import time

import orjson
from nats.aio.msg import Msg

from mesh.bench import HANDLED_SUBJECT, _subscribed
from mesh.client import MeshClient
from mesh.config import ConnectConfig
from mesh.ids import TopicId
from mesh.server import NatsServer
from mesh.subjects import Subjects
from mesh.testing import WorkerProcess, eventually

SOURCES = 100
HEADERS = {"Content-Type": "application/json", "Mesh-Msg-Type": "BenchTick"}


def cpu_seconds(pid: int) -> float:
    """User and system CPU time of a process so far."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def main(events: int, rounds: int) -> None:
    with NatsServer() as server:
        assert server.pid is not None
        cli = [sys.executable, "-m", "mesh.cli", "--nats", server.url, "--prefix", "mesh"]
        control = subprocess.Popen([*cli, "serve", "registry", "router"])  # noqa: ASYNC220
        gateway = subprocess.Popen([*cli, "serve", "gateway"])  # noqa: ASYNC220
        worker = WorkerProcess(
            server.url, ["mesh.bench:BenchSink"], worker_id="drain-worker", heartbeat_interval=1.0
        ).start()
        client = await MeshClient.connect(ConnectConfig(url=server.url), subjects=Subjects())
        js = client.nc.jetstream()
        handled = 0
        target = 0
        done = asyncio.Event()

        async def note(msg: Msg) -> None:  # the sink reports its count every 100 events
            nonlocal handled
            if msg.data.startswith(b"n"):
                handled = max(handled, int(msg.data[1:]))
                if handled >= target:
                    done.set()

        topics = [Subjects().events(TopicId("bench.load", f"s{n}")) for n in range(SOURCES)]
        try:
            await eventually(lambda: _subscribed(client.nc, "bench-sink"), timeout=30)
            await client.nc.subscribe(HANDLED_SUBJECT, cb=note)
            for round_ in range(rounds + 1):  # the first warms up, untimed
                count = 2000 if round_ == 0 else events
                os.kill(worker.pid, signal.SIGSTOP)
                acks = [
                    await js.publish_async(
                        topics[n % SOURCES],
                        orjson.dumps({"sent": 0, "n": target + n}),
                        headers=HEADERS,
                    )
                    for n in range(count)
                ]
                await asyncio.gather(*acks)
                target += count
                done.clear()
                worker_cpu, server_cpu = cpu_seconds(worker.pid), cpu_seconds(server.pid)
                started = time.perf_counter()
                os.kill(worker.pid, signal.SIGCONT)
                async with asyncio.timeout(300):
                    await done.wait()
                elapsed = time.perf_counter() - started
                if round_:
                    worker_us = (cpu_seconds(worker.pid) - worker_cpu) / count * 1e6
                    server_us = (cpu_seconds(server.pid) - server_cpu) / count * 1e6
                    print(
                        f"{count / elapsed:,.0f} events/s; CPU per event: worker"
                        f" {worker_us:.1f} us, nats-server {server_us:.1f} us",
                        flush=True,
                    )
        finally:
            await client.aclose()
            worker.stop()
            for process in (gateway, control):
                process.terminate()
                process.wait(10)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=40_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    asyncio.run(main(args.events, args.rounds))
