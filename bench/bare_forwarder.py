"""The floor under mesh's gateway path: a bare nats-py forwarder, no mesh code at all.

    python bench/bare_forwarder.py

It runs client -> forwarder process -> responder process with the same headers a mesh
request carries, at 1, 64 and 256 requests in flight, next to client -> responder
directly. Whatever mesh's gateway path costs beyond this is mesh's own overhead; the
rest is what an extra Python process in the request path costs on this machine.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time

import nats
import uvloop
from nats.aio.msg import Msg

from mesh.server import NatsServer

HEADERS = {
    "Content-Type": "application/json",
    "Mesh-Request-Id": "0123456789abcdef0123456789abcdef",
    "Mesh-Timeout-Ms": "10000",
    "Mesh-Msg-Type": "Echo64",
}
PAYLOAD = b"x" * 64
TASKS: set[asyncio.Task[None]] = set()


def _spawn(coro: object) -> None:
    task = asyncio.create_task(coro)  # type: ignore[arg-type]
    TASKS.add(task)
    task.add_done_callback(TASKS.discard)


async def forwarder(url: str) -> None:
    nc = await nats.connect(url)

    async def forward(msg: Msg) -> None:
        reply = await nc.request("bare.responder", msg.data, timeout=5, headers=msg.headers)
        await nc.publish(msg.reply, reply.data, headers=reply.headers)

    async def on_request(msg: Msg) -> None:
        _spawn(forward(msg))

    await nc.subscribe("bare.forwarder", cb=on_request, queue="q")
    await nc.flush()
    print("ready", flush=True)
    await asyncio.Event().wait()


async def responder(url: str) -> None:
    nc = await nats.connect(url)

    async def answer(msg: Msg) -> None:
        headers = {"Content-Type": "application/json"}
        headers["Mesh-Request-Id"] = (msg.headers or {}).get("Mesh-Request-Id", "")
        await nc.publish(msg.reply, msg.data, headers=headers)

    async def on_request(msg: Msg) -> None:
        _spawn(answer(msg))

    await nc.subscribe("bare.responder", cb=on_request)
    await nc.flush()
    print("ready", flush=True)
    await asyncio.Event().wait()


async def _rate(nc: nats.NATS, subject: str, in_flight: int, seconds: float) -> float:
    done = 0
    end = time.monotonic() + seconds

    async def loop() -> None:
        nonlocal done
        while time.monotonic() < end:
            await nc.request(subject, PAYLOAD, timeout=5, headers=HEADERS)
            done += 1

    started = time.monotonic()
    await asyncio.gather(*(loop() for _ in range(in_flight)))
    return done / (time.monotonic() - started)


async def main() -> None:
    with NatsServer() as server:
        children = [
            subprocess.Popen(  # noqa: ASYNC220 - starting them does not block
                [sys.executable, __file__, role, server.url], stdout=subprocess.PIPE, text=True
            )
            for role in ("forwarder", "responder")
        ]
        try:
            for child in children:
                assert child.stdout is not None
                child.stdout.readline()
            nc = await nats.connect(server.url)
            for subject in ("bare.responder", "bare.forwarder"):
                for in_flight in (1, 64, 256):
                    rate = await _rate(nc, subject, in_flight, seconds=3.0)
                    print(f"{subject:16} {in_flight:4} in flight: {rate:8,.0f} req/s")
            await nc.drain()
        finally:
            for child in children:
                child.terminate()
                child.wait(10)


if __name__ == "__main__":
    if len(sys.argv) > 2:
        uvloop.run({"forwarder": forwarder, "responder": responder}[sys.argv[1]](sys.argv[2]))
    else:
        uvloop.run(main())
