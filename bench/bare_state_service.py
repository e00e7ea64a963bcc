"""The floor under the state service: a bare nats-py service doing one KV CAS per request.

    python bench/bare_state_service.py [--mesh-connections]

32 writers send "key revision" requests to a process that does nothing but
``kv.update(key, value, last=revision)`` and answers the new revision, next to the
same 32 writers calling ``kv.update`` directly. With ``--mesh-connections`` both
sides use mesh's connections (`mesh._connect`) and its KV compare-and-set, as the
state service and ``mesh bench`` do. What the state service costs beyond
this is its own (versions, checksums, policies); the rest is what one more Python
process between a writer and KV costs on this machine.
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable

import nats
import uvloop
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js.client import JetStreamContext

from mesh._connect import connect
from mesh._connection import subscribe_calling
from mesh._kv import compare_and_set
from mesh.config import ConnectConfig
from mesh.server import NatsServer

VALUE = b'{"count": 1, "note": "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"}'
WRITERS = 32
PER_WRITER = 250
TASKS: set[asyncio.Task[None]] = set()


async def _connect(url: str, name: str, mesh_connections: bool) -> NATS:
    if mesh_connections:
        return await connect(ConnectConfig(url=url), name=name)
    return await nats.connect(url, name=name)


Update = Callable[[str, int], Awaitable[int]]


async def _updater(js: JetStreamContext, mesh_connections: bool) -> Update:
    """``update(key, last)``: the compare-and-set of VALUE on the bucket."""
    if mesh_connections:
        return lambda key, last: compare_and_set(js, "bare", key, VALUE, last)
    kv = await js.key_value("bare")
    return lambda key, last: kv.update(key, VALUE, last=last)


async def service(url: str, mesh_connections: bool) -> None:
    nc = await _connect(url, "bare-state-service", mesh_connections)
    js = nc.jetstream()
    await js.create_key_value(bucket="bare", direct=True)
    update = await _updater(js, mesh_connections)

    async def handle(msg: Msg) -> None:
        key, revision = msg.data.split(b" ")
        new = await update(key.decode(), int(revision))
        await msg.respond(str(new).encode())

    def receive(msg: Msg) -> None:
        task = asyncio.create_task(handle(msg))
        TASKS.add(task)
        task.add_done_callback(TASKS.discard)

    await subscribe_calling(nc, "bare.put", receive)  # as mesh's services take requests
    await nc.flush()
    print("ready", flush=True)
    await asyncio.Event().wait()


async def measure(mesh_connections: bool) -> None:
    with NatsServer() as server:
        command = [sys.executable, __file__, "--serve", server.url]
        if mesh_connections:
            command.append("--mesh-connections")
        process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)  # noqa: ASYNC220
        try:
            assert process.stdout is not None
            process.stdout.readline()
            nc = await _connect(server.url, "bare-state-writers", mesh_connections)
            kv = await nc.jetstream().key_value("bare")
            update = await _updater(nc.jetstream(), mesh_connections)

            async def through_service(w: int) -> None:
                revision = await kv.put(f"s{w}", VALUE)
                for _ in range(PER_WRITER):
                    reply = await nc.request("bare.put", f"s{w} {revision}".encode(), timeout=5)
                    revision = int(reply.data)

            async def direct(w: int) -> None:
                revision = await kv.put(f"d{w}", VALUE)
                for _ in range(PER_WRITER):
                    revision = await update(f"d{w}", revision)

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
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--serve", metavar="URL", help=argparse.SUPPRESS)
    parser.add_argument("--mesh-connections", action="store_true")
    args = parser.parse_args()
    if args.serve:
        uvloop.run(service(args.serve, args.mesh_connections))
    else:
        uvloop.run(measure(args.mesh_connections))
