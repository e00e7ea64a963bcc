"""The ``mesh`` command line against a real server and services."""

from __future__ import annotations

import asyncio
import os
import sys

import orjson
from nats.aio.client import Client as NATS

from mesh.handlers.gateway import Gateway
from mesh.subjects import Subjects
from mesh.testing import eventually
from tests.conftest import REPO
from tests.helpers import live_worker_ids


async def _mesh(nats_url: str, subjects: Subjects, *args: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "mesh.cli",
        "--nats",
        nats_url,
        "--prefix",
        subjects.prefix,
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "200"},
    )
    async with asyncio.timeout(30):
        out, err = await process.communicate()
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_call_workers_and_agents_commands(
    nats_url: str, nc: NATS, subjects: Subjects, gateway: Gateway, spawn_worker: type
) -> None:
    spawn_worker("workers.echo:Echo", "workers.counter:Counter", worker_id="cli-worker")
    await eventually(lambda: live_worker_ids(nc, subjects, "echo"), timeout=15)
    await eventually(lambda: gateway.directory.live_workers("echo"), timeout=5)

    code, out, _ = await _mesh(nats_url, subjects, "call", "echo/bob", '{"text": "hi"}')
    assert code == 0
    assert orjson.loads(out) == {"text": "hi", "agent": "echo/bob", "worker": "cli-worker"}

    code, out, _ = await _mesh(
        nats_url, subjects, "call", "counter/c", '{"by": 3}', "--type", "Increment", "--msgpack"
    )
    assert code == 0
    assert orjson.loads(out)["value"] == 3

    code, out, _ = await _mesh(nats_url, subjects, "workers")
    assert code == 0
    assert "cli-worker" in out and "healthy" in out

    code, out, _ = await _mesh(nats_url, subjects, "agents")
    assert code == 0
    assert "counter" in out and "GetCount, Increment" in out


async def test_call_prints_error_code_and_exits_1(
    nats_url: str, subjects: Subjects, gateway: Gateway
) -> None:
    code, out, err = await _mesh(nats_url, subjects, "call", "ghost/x", "{}")
    assert code == 1
    assert out == ""
    assert err.startswith("error 404 AgentTypeNotFound:")

    code, _, err = await _mesh(nats_url, subjects, "call", "no-slash", "{}")
    assert (code, err.split(":")[0]) == (1, "error 400 InvalidId")

    code, _, err = await _mesh(nats_url, subjects, "call", "echo/x", "{not json")
    assert (code, err.split(":")[0]) == (1, "error 400 BadRequest")


async def test_worker_command_refuses_a_bad_agent_spec(nats_url: str, subjects: Subjects) -> None:
    code, _, err = await _mesh(nats_url, subjects, "worker", "workers.echo")
    assert code == 1
    assert "MODULE:Class" in err
    code, _, err = await _mesh(nats_url, subjects, "worker", "workers.echo:Ping")
    assert code == 1
    assert "not an Agent subclass" in err
