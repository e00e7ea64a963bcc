"""deploy/cluster: a 3-node NATS cluster from the shipped configs, and mesh on it end to
end (requests, events, state), with every bucket and stream kept three times."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import nats
import pytest
from nats.aio.client import Client as NATS

from mesh import AgentId, MeshClient, TopicId
from mesh.cluster import NatsCluster
from mesh.config import EventsConfig
from mesh.handlers.gateway import Gateway
from mesh.handlers.monitor import Monitor
from mesh.handlers.registry import Registry
from mesh.handlers.router import Router
from mesh.handlers.state import StateService
from mesh.state import StateClient
from mesh.subjects import Subjects
from mesh.testing import WorkerProcess, eventually
from tests.conftest import REPO

CONFIGS = [REPO / "deploy" / "cluster" / f"node-{n}.conf" for n in (1, 2, 3)]


@pytest.fixture
async def cluster(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[NatsCluster]:
    monkeypatch.setenv("MESH_REPLICAS", "3")
    nodes = NatsCluster(3, config_files=CONFIGS)
    await asyncio.to_thread(nodes.start)
    try:
        yield nodes
    finally:
        await asyncio.to_thread(nodes.stop)


async def _jetstream_ready(nc: NATS) -> bool:
    info = await nc.jetstream().account_info()
    return info is not None


async def test_mesh_runs_end_to_end_on_the_shipped_cluster_configs(cluster: NatsCluster) -> None:
    assert {node.output.count("mesh-") > 0 for node in cluster.nodes} == {True}
    nc = await nats.connect(servers=cluster.urls.split(","), max_reconnect_attempts=-1)
    subjects = Subjects("clustered")
    await eventually(lambda: _jetstream_ready(nc), timeout=30, message="JetStream meta leader")
    config = EventsConfig(retry_delay=0.1, handler_timeout=5.0, ack_wait=10.0)
    async with (
        Registry(nc, subjects),
        StateService(nc, subjects),
        Gateway(nc, subjects) as gateway,
        Router(nc, subjects, config) as router,
        Monitor(nc, subjects) as monitor,
    ):
        worker = WorkerProcess(
            cluster.urls,
            ["workers.counter:Counter", "workers.orders:Billing"],
            worker_id="on-cluster",
            heartbeat_interval=0.3,
            prefix=subjects.prefix,
            env={"PYTHONPATH": str(REPO), "MESH_REPLICAS": "3"},
        ).start()
        try:
            await eventually(lambda: gateway.directory.live_workers("billing"), timeout=20)
            client = MeshClient(nc, subjects=subjects)
            counter = AgentId("counter", "c")
            for _ in range(3):
                await client.call(counter, {"by": 1}, message_type="Increment")
            await eventually(
                lambda: (d := router.consumer("billing")) is not None and d.subscriptions,
                timeout=20,
                message="billing subscribed",
            )
            await client.publish(
                TopicId("orders.created", "shop"),
                {"order_id": "A-1", "amount": 2},
                message_type="OrderEvent",
            )
            ledger = AgentId("billing", "shop")
            await eventually(
                lambda: _entries(client, ledger), timeout=20, message="the event handled"
            )
            saved = await StateClient(nc, subjects).get(counter)
            assert saved.state == {"value": 3}
            js = nc.jetstream()
            for stream in ("KV_clustered-state", "KV_clustered-placement", "CLUSTERED_EVENTS"):
                info = await js.stream_info(stream)
                assert info.config.num_replicas == 3, stream
                assert info.cluster is not None and len(info.cluster.replicas or []) == 2

            # One node down: a quorum of two keeps everything working.
            await asyncio.to_thread(cluster.nodes[2].kill)

            async def counted() -> bool:
                reply = await client.call(counter, {"by": 1}, message_type="Increment", timeout=3)
                return bool(reply["value"] >= 4)

            await eventually(counted, timeout=30, message="requests with a node down")

            async def node_missing() -> bool:
                report = await monitor.health()
                return report.components["jetstream"].status == "degraded"

            # Health tells the truth: the replicas on the dead node are reported.
            await eventually(node_missing, timeout=15, message="health degraded")
        finally:
            await worker.aclose()
    await nc.close()


async def _entries(client: MeshClient, ledger: AgentId) -> bool:
    reply = await client.call(ledger, {}, message_type="GetLedger", timeout=3)
    return bool(reply["entries"])
