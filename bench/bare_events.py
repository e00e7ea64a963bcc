"""The floor under mesh's event path: bare nats-py, no mesh code at all.

    python bench/bare_events.py [--events 20000]

A publisher (this process) sends N events with JetStream ``publish_async``; one
consumer process reads them from a durable pull consumer (fetching batches of 256)
and acknowledges each, which at-least-once delivery needs, and does nothing else.
It reports publish-to-handled throughput next to raw ``publish_async`` measured in
the same run, with the consumer idle. Whatever mesh's event path costs beyond this is
mesh's own overhead (a router hop and a handler); this is what one Python consumer
with acknowledgements costs on this machine.
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import time

import nats
import uvloop
from nats.js.api import AckPolicy, ConsumerConfig

from mesh.server import NatsServer

STREAM = "BARE_EVENTS"
SUBJECTS = "bare.events.>"
PAYLOAD = b'{"order": 12345, "amount": 99.5, "currency": "EUR"}'


async def consumer(url: str, durable: str, ack: bool) -> None:
    nc = await nats.connect(url)
    js = nc.jetstream()
    subscription = await js.pull_subscribe(SUBJECTS, durable=durable, stream=STREAM)
    handled = 0
    print("ready", flush=True)
    while True:
        try:
            batch = await subscription.fetch(256, timeout=1)
        except nats.errors.TimeoutError:
            continue
        for msg in batch:
            if ack:
                await msg.ack()
            handled += 1
        await nc.publish("bare.handled", str(handled).encode())


async def publish(js: nats.js.JetStreamContext, count: int, prefix: str) -> float:
    started = time.perf_counter()
    pending = []
    for n in range(count):
        pending.append(await js.publish_async(f"bare.events.{prefix}.s{n % 100}", PAYLOAD))
        if len(pending) >= 4000:
            await asyncio.gather(*pending)
            pending.clear()
    await asyncio.gather(*pending)
    return time.perf_counter() - started


async def measure(url: str, count: int, ack: bool) -> tuple[float, float]:
    nc = await nats.connect(url)
    js = nc.jetstream(publish_async_max_pending=8000)
    await js.add_stream(name=STREAM, subjects=[SUBJECTS])
    raw_seconds = await publish(js, count, "raw")
    durable = f"bare{'ack' if ack else 'none'}"
    await js.add_consumer(
        STREAM,
        ConsumerConfig(
            durable_name=durable,
            filter_subject="bare.events.run.>",
            ack_policy=AckPolicy.EXPLICIT if ack else AckPolicy.NONE,
            max_ack_pending=20_000,
        ),
    )
    process = subprocess.Popen(  # noqa: ASYNC220 - starting it does not block
        [sys.executable, __file__, "--consume", url, durable, "ack" if ack else "none"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        await asyncio.to_thread(process.stdout.readline)
        done = asyncio.Event()
        finished = 0.0

        async def progress(msg: nats.aio.msg.Msg) -> None:
            nonlocal finished
            if int(msg.data) >= count and not done.is_set():
                finished = time.perf_counter()
                done.set()

        await nc.subscribe("bare.handled", cb=progress)
        started = time.perf_counter()
        await publish(js, count, "run")
        await asyncio.wait_for(done.wait(), timeout=120)
        return count / raw_seconds, count / (finished - started)
    finally:
        process.terminate()
        process.wait()
        await js.delete_stream(STREAM)
        await nc.close()


async def main(count: int) -> None:
    with NatsServer() as server:
        for ack in (True, False):
            raw, handled = await measure(server.url, count, ack)
            print(
                f"{'explicit ack' if ack else 'no ack      '}: raw publish_async {raw:,.0f}/s;"
                f" publish to handled {handled:,.0f}/s ({handled / raw:.2f}x raw)",
                flush=True,
            )


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--consume":
        uvloop.run(consumer(sys.argv[2], sys.argv[3], sys.argv[4] == "ack"))
    else:
        parser = argparse.ArgumentParser(description=__doc__)
        parser.add_argument("--events", type=int, default=20_000)
        uvloop.run(main(parser.parse_args().events))
