"""Runs a gateway and a worker in one process with an in-memory OpenTelemetry exporter,
sends one traced call, and prints the finished spans as JSON lines.

``python -m tests.otel_probe NATS_URL PREFIX TRACEPARENT``
"""

from __future__ import annotations

import asyncio
import sys

import nats
import orjson
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from mesh import AgentId, Worker, WorkerConfig
from mesh.handlers.gateway import Gateway
from mesh.handlers.registry import Registry
from mesh.subjects import Subjects
from mesh.testing import eventually
from workers.echo import Echo


async def main(url: str, prefix: str, traceparent: str) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    nc = await nats.connect(url)
    subjects = Subjects(prefix)
    config = WorkerConfig(worker_id="otel", heartbeat_interval=0.3)
    async with (
        Registry(nc, subjects),
        Gateway(nc, subjects) as gateway,
        Worker(nc, [Echo], config, subjects),
    ):
        await eventually(lambda: gateway.directory.live_workers("echo"), timeout=10)
        reply = await nc.request(
            subjects.rpc(AgentId("echo", "o")),
            b'{"text": "hi"}',
            timeout=5,
            headers={"traceparent": traceparent},
        )
        traceparent_back = (reply.headers or {}).get("traceparent")
        print(orjson.dumps({"reply_traceparent": traceparent_back}).decode())
    for span in exporter.get_finished_spans():
        context = span.get_span_context()
        print(
            orjson.dumps(
                {
                    "name": span.name,
                    "trace_id": f"{context.trace_id:032x}",
                    "span_id": f"{context.span_id:016x}",
                    "parent": f"{span.parent.span_id:016x}" if span.parent else None,
                    "kind": span.kind.name,
                }
            ).decode()
        )
    await nc.close()


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:4]))
