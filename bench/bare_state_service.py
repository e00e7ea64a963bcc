"""The floor under the state service: a bare nats-py service doing one KV CAS per request.

    python bench/bare_state_service.py

32 writers send "key revision" requests to a process that does nothing but
``kv.update(key, value, last=revision)`` and answers the new revision, next to the
same 32 writers calling ``kv.update`` directly. What the state service costs beyond
this is its own (versions, checksums, policies); the rest is what one more Python
process between a writer and KV costs on this machine.
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

VALUE = b'{"count": 1, "note": "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"}'
WRITERS = 32
PER_WRITER = 250
TASKS: set[asyncio.Task[None]] = set()


async def service(url: str) -> None:
    nc = await nats.connect(url, name="bare-state-service")
    kv = await nc.jetstream().create_key_value(bucket="bare", direct=True)

    async def handle(msg: Msg) -> None:
        key, revision = msg.data.split(b" ")
        new = await kv.update(key.decode(), VALUE, last=int(revision))
        await msg.respond(str(new).encode())

    async def receive(msg: Msg) -> None:
        task = asyncio.create_task(handle(msg))
        TASKS.add(task)
        task.add_done_callback(TASKS.discard)

    await nc.subscribe("bare.put", cb=receive)
    await nc.flush()
    print("ready", flush=True)
    await asyncio.Event().wait()


async def measure() -> None:
    with NatsServer() as server:
        process = subprocess.Popen(  # noqa: ASYNC220 - starting it does not block
            [sys.executable, __file__, server.url], stdout=subprocess.PIPE, text=True
        )
        try:
            assert process.stdout is not None
            process.stdout.readline()
            nc = await nats.connect(server.url)
            kv = await nc.jetstream().key_value("bare")

            async def through_service(w: int) -> None:
                revision = await kv.put(f"s{w}", VALUE)
                for _ in range(PER_WRITER):
                    reply = await nc.request("bare.put", f"s{w} {revision}".encode(), timeout=5)
                    revision = int(reply.data)

            async def direct(w: int) -> None:
                revision = await kv.put(f"d{w}", VALUE)
                for _ in range(PER_WRITER):
                    revision = await kv.update(f"d{w}", VALUE, last=revision)

            rates = {}
            for name, writer in (("direct", direct), ("bare service", through_service)):
                started = time.perf_counter()
                await asyncio.gather(*(writer(w) for w in range(WRITERS)))
                rates[name] = WRITERS * PER_WRITER / (time.perf_counter() - started)
            await nc.close()
        finally:
            process.kill()
            process.wait()
    print(
        f"KV CAS, {WRITERS} writers: direct {rates['direct']:,.0f}/s, through a bare"
        f" service {rates['bare service']:,.0f}/s"
        f" ({rates['bare service'] / rates['direct']:.2f}x)"
    )


if __name__ == "__main__":
    if len(sys.argv) > 1:
        uvloop.run(service(sys.argv[1]))
    else:
        uvloop.run(measure())
