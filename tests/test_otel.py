"""With OpenTelemetry configured, each hop is a span in the caller's trace, and the span
ids mesh passes on are those spans'."""

from __future__ import annotations

import asyncio
import sys

import orjson

from mesh._trace import TraceContext
from mesh.subjects import Subjects
from tests.conftest import REPO


async def test_gateway_and_worker_hops_are_exported_as_spans_of_the_callers_trace(
    nats_url: str, subjects: Subjects
) -> None:
    caller = TraceContext.new()
    probe = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.otel_probe", nats_url, subjects.prefix, caller.header(),
        stdout=asyncio.subprocess.PIPE, cwd=REPO,
    )  # fmt: skip
    async with asyncio.timeout(30):
        out, _ = await probe.communicate()
    assert probe.returncode == 0
    lines = [orjson.loads(line) for line in out.splitlines() if line.startswith(b"{")]
    reply = TraceContext.parse(lines[0]["reply_traceparent"])
    spans = {span["name"]: span for span in lines[1:]}
    gateway, worker = spans["mesh gateway forward"], spans["mesh handle echo"]
    assert gateway["trace_id"] == worker["trace_id"] == caller.trace_id
    assert gateway["parent"] == caller.span_id  # the caller's span
    assert worker["parent"] == gateway["span_id"]  # what the gateway passed on
    assert gateway["kind"] == worker["kind"] == "SERVER"
    assert reply is not None and reply.span_id == worker["span_id"]
