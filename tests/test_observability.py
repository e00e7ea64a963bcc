"""Discovery, traces across hops, and Prometheus metrics, from real processes."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
import urllib.request
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest
from nats.aio.client import Client as NATS

from mesh import AgentId, MeshClient, TopicId
from mesh._trace import TraceContext
from mesh.subjects import Subjects
from mesh.testing import WorkerProcess, eventually
from tests.conftest import REPO


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Running:
    services_log: Path
    worker_log: Path
    services_metrics: int
    worker_metrics: int


@pytest.fixture
async def running(nats_url: str, subjects: Subjects, tmp_path: Path) -> AsyncIterator[Running]:
    """`mesh serve` (every service) and a worker, each logging JSON at debug level and
    serving /metrics."""
    run = Running(tmp_path / "services.log", tmp_path / "worker.log", _free_port(), _free_port())
    with run.services_log.open("wb") as log:
        services = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "mesh.cli", "--nats", nats_url, "--prefix", subjects.prefix,
            "--log-level", "debug", "--log-format", "json",
            "--metrics-port", str(run.services_metrics),
            "serve", "registry", "state", "gateway", "router",
            stdout=log, stderr=log, env={**os.environ, "PYTHONPATH": str(REPO)},
        )  # fmt: skip
    worker = WorkerProcess(
        nats_url,
        ["workers.echo:Echo", "workers.counter:Counter", "tests.agents:Relay"],
        worker_id="observed",
        heartbeat_interval=0.3,
        prefix=subjects.prefix,
        log_path=str(run.worker_log),
        log_level="debug",
        env={"PYTHONPATH": str(REPO), "MESH_METRICS_PORT": str(run.worker_metrics)},
    ).start()
    try:
        yield run
    finally:
        await worker.aclose()
        services.send_signal(signal.SIGTERM)
        async with asyncio.timeout(15):
            await services.wait()


def _lines(path: Path) -> list[dict[str, Any]]:
    lines = []
    for raw in path.read_text().splitlines():
        if raw.startswith("{"):
            lines.append(orjson.loads(raw))
    return lines


async def _discover(nc: NATS, subject: str) -> list[dict[str, Any]]:
    inbox = nc.new_inbox()
    replies: list[dict[str, Any]] = []

    async def collect(msg: Any) -> None:
        replies.append(orjson.loads(msg.data))

    sub = await nc.subscribe(inbox, cb=collect)
    await nc.publish(subject, b"", reply=inbox)
    await asyncio.sleep(0.5)  # discovery is "whoever answers within a window"
    await sub.unsubscribe()
    return replies


async def _scrape(port: int) -> str:
    def get() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            return str(response.read().decode())

    return await asyncio.to_thread(get)


def _sample(text: str, name: str, **labels: str) -> float:
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        metric, _, value = line.rpartition(" ")
        if metric == (f"{name}{{{wanted}}}" if labels else name):
            return float(value)
    raise AssertionError(f"no sample {name}{labels} in /metrics")


async def test_srv_ping_finds_every_service_and_worker(
    nc: NATS, subjects: Subjects, running: Running
) -> None:
    client = MeshClient(nc, subjects=subjects)
    await eventually(lambda: client.call(AgentId("echo", "a"), {"text": "hi"}), timeout=20)
    expected = {f"{subjects.prefix}-{n}" for n in ("registry", "state", "gateway", "router")}
    expected.add(f"{subjects.prefix}-worker")

    async def all_found() -> bool:
        names = {reply["name"] for reply in await _discover(nc, "$SRV.PING")}
        return expected <= names

    await eventually(all_found, timeout=10)
    stats = await _discover(nc, f"$SRV.STATS.{subjects.prefix}-gateway")
    rpc = next(e for e in stats[0]["endpoints"] if e["name"] == "rpc")
    assert rpc["num_requests"] >= 1


async def test_a_trace_id_ties_gateway_worker_and_nested_calls_together(
    nc: NATS, subjects: Subjects, running: Running
) -> None:
    client = MeshClient(nc, subjects=subjects)
    await eventually(lambda: client.call(AgentId("echo", "warm"), {"text": "hi"}), timeout=20)
    caller = TraceContext.new()
    reply = await nc.request(
        subjects.rpc(AgentId("relay", "r1")),
        b'{"agent_type": "echo", "key": "nested", "text": "hi"}',
        timeout=10,
        headers={"traceparent": caller.header(), "Mesh-Msg-Type": "Forward"},
    )
    assert "Nats-Service-Error-Code" not in (reply.headers or {}), reply.data
    returned = TraceContext.parse((reply.headers or {}).get("traceparent"))
    assert returned is not None and returned.trace_id == caller.trace_id
    assert returned.span_id != caller.span_id  # a span of mesh's own

    def traced(path: Path) -> list[dict[str, Any]]:
        return [line for line in _lines(path) if line.get("trace_id") == caller.trace_id]

    def logged() -> bool:
        worker_agents = {line.get("agent_id") for line in traced(running.worker_log)}
        return (
            len(traced(running.services_log)) >= 2 and {"relay/r1", "echo/nested"} <= worker_agents
        )

    # The gateway logged the outer request and the relay's nested one; the worker
    # logged both handlers, all under the caller's trace id.
    await eventually(logged, timeout=5)
    line = traced(running.worker_log)[0]
    assert {"time", "level", "service", "logger", "message", "request_id"} <= set(line)
    assert line["service"] == "worker"


async def test_a_request_without_a_trace_gets_one(
    nc: NATS, subjects: Subjects, running: Running
) -> None:
    client = MeshClient(nc, subjects=subjects)
    await eventually(lambda: client.call(AgentId("echo", "warm"), {"text": "hi"}), timeout=20)
    reply = await nc.request(subjects.rpc(AgentId("echo", "x")), b'{"text": "x"}', timeout=5)
    assert TraceContext.parse((reply.headers or {}).get("traceparent")) is not None


async def test_metrics_after_traffic(nc: NATS, subjects: Subjects, running: Running) -> None:
    client = MeshClient(nc, subjects=subjects)
    await eventually(lambda: client.call(AgentId("echo", "warm"), {"text": "hi"}), timeout=20)
    for n in range(20):
        await client.call(AgentId("echo", f"m{n % 4}"), {"text": "hi"})
    for _ in range(3):
        await client.call(AgentId("counter", "c"), {"by": 1}, message_type="Increment")
    with pytest.raises(Exception):  # noqa: B017 - a 400, counted as such
        await client.call(AgentId("echo", "bad"), {"text": 5})
    await client.publish(TopicId("orders.created", "s"), {"n": 1})
    gateway = await _scrape(running.services_metrics)
    assert _sample(gateway, "mesh_gateway_requests_total", agent_type="echo", code="200") >= 21
    assert _sample(gateway, "mesh_gateway_requests_total", agent_type="echo", code="400") == 1
    count = _sample(gateway, "mesh_gateway_request_duration_seconds_count", agent_type="echo")
    total = _sample(gateway, "mesh_gateway_request_duration_seconds_sum", agent_type="echo")
    assert count >= 22 and 0 < total / count < 1.0  # seconds per request: plausible
    assert _sample(gateway, "mesh_live_workers", agent_type="echo") == 1
    assert _sample(gateway, "mesh_gateway_requests_in_flight") == 0
    worker = await _scrape(running.worker_metrics)
    assert _sample(worker, "mesh_worker_requests_total", agent_type="counter", code="200") == 3
    assert _sample(worker, "mesh_handler_duration_seconds_count", agent_type="echo") >= 21
    assert _sample(worker, "mesh_activations", agent_type="echo") >= 4
    assert "mesh_events_published_total" in worker and "mesh_state_conflicts_total" in worker
