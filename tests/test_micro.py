"""Every service and worker is a NATS micro service: PING, INFO and STATS find it."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest
from nats.aio.client import Client as NATS

from mesh import AgentId, AgentTypeNotFoundError, MeshClient
from mesh.handlers.gateway import Gateway
from mesh.subjects import Subjects
from mesh.testing import eventually
from tests.helpers import live_worker_ids


async def _discover(nc: NATS, subject: str, expected: int) -> list[dict[str, Any]]:
    """Publish a discovery request and collect replies until `expected` arrive."""
    inbox = nc.new_inbox()
    replies: list[dict[str, Any]] = []
    sub = await nc.subscribe(inbox)
    try:
        await nc.publish(subject, b"", reply=inbox)
        async with asyncio.timeout(3):
            while len(replies) < expected:
                msg = await sub.next_msg(timeout=3)
                replies.append(orjson.loads(msg.data))
    finally:
        await sub.unsubscribe()
    return replies


async def test_services_and_workers_answer_discovery(
    nc: NATS, subjects: Subjects, gateway: Gateway, spawn_worker: type
) -> None:
    spawn_worker("workers.echo:Echo", worker_id="discoverable")
    await eventually(lambda: live_worker_ids(nc, subjects, "echo"), timeout=15)
    await eventually(lambda: gateway.directory.live_workers("echo"), timeout=5)
    client = MeshClient(nc, subjects=subjects)
    for i in range(3):
        await client.call(AgentId("echo", f"k{i}"), {"text": "x"})

    names = {name: subjects.micro_name(name) for name in ("registry", "gateway", "worker")}
    for name in names.values():
        [ping] = await _discover(nc, f"$SRV.PING.{name}", 1)
        assert ping["type"] == "io.nats.micro.v1.ping_response"
        assert ping["name"] == name

    [info] = await _discover(nc, f"$SRV.INFO.{names['registry']}", 1)
    assert {e["name"] for e in info["endpoints"]} == {
        "register",
        "heartbeat",
        "deregister",
        "lookup",
        "workers",
        "types",
    }
    assert {e["queue_group"] for e in info["endpoints"]} == {subjects.queue_group("registry")}

    [worker_info] = await _discover(nc, f"$SRV.INFO.{names['worker']}", 1)
    assert worker_info["metadata"]["worker_id"] == "discoverable"
    assert f"{subjects.prefix}.worker.discoverable.rpc.>" in {
        e["subject"] for e in worker_info["endpoints"]
    }

    [stats] = await _discover(nc, f"$SRV.STATS.{names['gateway']}", 1)
    [rpc] = [e for e in stats["endpoints"] if e["name"] == "rpc"]
    assert rpc["subject"] == f"{subjects.prefix}.rpc.>"
    assert rpc["num_requests"] == 3
    assert rpc["num_errors"] == 0
    assert rpc["processing_time"] > 0


async def test_error_replies_count_as_endpoint_errors(
    nc: NATS, subjects: Subjects, gateway: Gateway
) -> None:
    client = MeshClient(nc, subjects=subjects)
    with pytest.raises(AgentTypeNotFoundError):
        await client.call(AgentId("ghost", "k"), {})
    [stats] = await _discover(nc, f"$SRV.STATS.{subjects.micro_name('gateway')}", 1)
    [rpc] = stats["endpoints"]
    assert (rpc["num_requests"], rpc["num_errors"]) == (1, 1)
    assert "AgentTypeNotFound" in rpc["last_error"]
