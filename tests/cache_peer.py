"""A second process holding a near cache: ``python -m tests.cache_peer URL PREFIX NS``.

Reads ``get KEY`` lines on stdin and answers each with ``<value or -> <hits>
<invalidations>``; prints ``ready`` once watching.
"""

from __future__ import annotations

import asyncio
import sys

import nats

from mesh.cache import Cache
from mesh.subjects import Subjects


async def main(url: str, prefix: str, namespace: str) -> None:
    nc = await nats.connect(url, name="cache-peer")
    async with Cache(nc, namespace, Subjects(prefix), near_max_age=600) as cache:
        print("ready", flush=True)
        while line := await asyncio.to_thread(sys.stdin.readline):
            _, key = line.split()
            value = await cache.get(key)
            shown = value.decode() if value is not None else "-"
            print(shown, cache.stats.hits, cache.stats.invalidations, flush=True)
    await nc.close()


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:4]))
