"""A NATS server restart: services re-watch KV at once instead of stalling."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from mesh import AgentId, MeshClient
from mesh._connect import connect
from mesh.config import ConnectConfig
from mesh.handlers.gateway import Gateway
from mesh.handlers.registry import Registry
from mesh.server import NatsServer
from mesh.subjects import Subjects
from mesh.testing import WorkerProcess, eventually
from tests.conftest import REPO


async def test_services_see_workers_again_soon_after_a_server_restart(tmp_path: Path) -> None:
    server = NatsServer(store_dir=tmp_path)
    await asyncio.to_thread(server.start)
    port = server.port
    subjects = Subjects("restart")
    config = ConnectConfig(url=server.url)
    nc = await connect(config, name="services")
    registry, gateway = Registry(nc, subjects), Gateway(nc, subjects)
    workers: list[WorkerProcess] = []

    def spawn(worker_id: str) -> None:
        workers.append(
            WorkerProcess(
                server.url,
                ["workers.echo:Echo"],
                worker_id=worker_id,
                heartbeat_interval=0.3,
                prefix=subjects.prefix,
                env={"PYTHONPATH": str(REPO)},
            ).start()
        )

    try:
        await registry.start()
        await gateway.start()
        spawn("before")
        await eventually(lambda: gateway.directory.live_workers("echo"), timeout=15)

        await asyncio.to_thread(lambda: server.stop(keep_store=True))
        server = NatsServer(port=port, store_dir=tmp_path)
        await asyncio.to_thread(server.start)
        restarted_at = time.monotonic()
        spawn("after")

        def both_live() -> bool:
            return {w.id for w in gateway.directory.live_workers("echo")} == {"before", "after"}

        # Without re-watching, the directory stays stale for about 15 s after a restart.
        await eventually(both_live, timeout=12)
        assert time.monotonic() - restarted_at < 12
        client = MeshClient(nc, subjects=subjects)
        replies = {
            (await client.call(AgentId("echo", f"k{i}"), {"text": "x"}))["worker"] for i in range(8)
        }
        assert replies == {"before", "after"}
    finally:
        for worker in workers:
            worker.terminate()
        for worker in workers:
            await worker.aclose()
        await gateway.shutdown()
        await registry.shutdown()
        await nc.drain()
        await asyncio.to_thread(server.stop)
