"""The ``mesh`` command line against a real server and services."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import nats
import orjson
import pytest
from nats.aio.client import Client as NATS

from mesh import AgentId, AgentTypeNotFoundError, MeshClient
from mesh.handlers.gateway import Gateway
from mesh.handlers.state import StateService
from mesh.subjects import Subjects
from mesh.testing import eventually
from tests.conftest import REPO
from tests.helpers import live_worker_ids


async def _start(
    module: str, nats_url: str, subjects: Subjects, *args: str, pipe: bool = False
) -> asyncio.subprocess.Process:
    """``python -m <module> --nats URL --prefix P <args>``, as a user would type it."""
    output = asyncio.subprocess.PIPE if pipe else None
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        module,
        "--nats",
        nats_url,
        "--prefix",
        subjects.prefix,
        *args,
        stdout=output,
        stderr=output,
        env={**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "200"},
    )


async def _mesh(nats_url: str, subjects: Subjects, *args: str) -> tuple[int, str, str]:
    process = await _start("mesh.cli", nats_url, subjects, *args, pipe=True)
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
    code, _, err = await _mesh(nats_url, subjects, "worker")
    assert code == 1
    assert "which agents?" in err
    code, _, err = await _mesh(nats_url, subjects, "worker", "--autogen", "tests.nowhere")
    assert code == 1
    assert "MODULE:function" in err
    code, _, err = await _mesh(
        nats_url,
        subjects,
        "worker",
        "workers.echo:Echo",
        "--autogen",
        "tests.autogen_agents:register",
    )
    assert code == 1
    assert "not both" in err


async def test_example_worker_module_runs_and_stops_on_sigterm(
    nats_url: str, nc: NATS, subjects: Subjects, gateway: Gateway
) -> None:
    process = await _start(
        "workers.echo",
        nats_url,
        subjects,
        "--worker-id",
        "module-worker",
        "--heartbeat-interval",
        "0.3",
    )
    try:
        await eventually(lambda: live_worker_ids(nc, subjects, "echo"), timeout=15)
        await eventually(lambda: gateway.directory.live_workers("echo"), timeout=5)
        client = MeshClient(nc, subjects=subjects)
        reply = await client.call(AgentId("echo", "m"), {"text": "hi"})
        assert reply["worker"] == "module-worker"
    finally:
        process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(15):
            assert await process.wait() == 0


async def test_serve_runs_services_in_their_own_process(
    nats_url: str, nc: NATS, subjects: Subjects, spawn_worker: type
) -> None:
    services = await _start("mesh.cli", nats_url, subjects, "serve", "registry", "state", "gateway")
    try:
        spawn_worker("workers.counter:Counter", worker_id="served")
        client = MeshClient(nc, subjects=subjects)

        async def counted() -> dict[str, object]:
            return await client.call(AgentId("counter", "s"), {}, message_type="GetCount")

        reply = await eventually(counted, timeout=20)
        assert reply == {"key": "s", "value": 0, "worker": "served"}
    finally:
        services.send_signal(signal.SIGTERM)
        async with asyncio.timeout(15):
            assert await services.wait() == 0


async def test_up_embeds_nats_and_stops_cleanly(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "MESH_NATS_URL"}
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "mesh.cli",
        "up",
        "--data-dir",
        str(tmp_path),
        stdout=asyncio.subprocess.PIPE,
        env=env,
    )
    assert process.stdout is not None
    try:
        async with asyncio.timeout(20):
            line = (await process.stdout.readline()).decode()
        assert line.startswith("mesh is up on nats://127.0.0.1:")
        url = line.split()[4]
        async with MeshClient(await nats.connect(url)) as client:
            client._owns_connection = True
            with pytest.raises(AgentTypeNotFoundError):
                await client.call(AgentId("echo", "x"), {"text": "hi"})
        assert (tmp_path / "jetstream").is_dir()
    finally:
        process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(15):
            assert await process.wait() == 0


async def test_publish_subscriptions_and_routes_commands(
    nats_url: str, nc: NATS, subjects: Subjects, gateway: Gateway
) -> None:
    from mesh.handlers.router import Router

    async with Router(nc, subjects):
        code, out, err = await _mesh(
            nats_url, subjects, "publish", "orders.created/shop-1", '{"n": 1}', "--msg-id", "o-1"
        )
        assert (code, err) == (0, "")
        assert out.startswith(f"stored as {subjects.stream('events')} #1")
        code, out, _ = await _mesh(
            nats_url, subjects, "publish", "orders.created/shop-1", '{"n": 1}', "--msg-id", "o-1"
        )
        assert "duplicate, dropped" in out

        code, _, err = await _mesh(nats_url, subjects, "publish", "orders..created/s", "{}")
        assert (code, err.split(":")[0]) == (1, "error 400 InvalidId")

        code, out, _ = await _mesh(nats_url, subjects, "subscriptions")
        assert code == 0 and "0 subscriptions" in out

        sample = str(REPO / "mesh" / "samples" / "routes.json")
        code, out, _ = await _mesh(nats_url, subjects, "routes", "load", sample)
        assert (code, out.strip()) == (0, "loaded 4 rules")
        code, out, _ = await _mesh(nats_url, subjects, "routes", "list")
        assert [line.split()[0] for line in out.splitlines()] == [
            "calculation",
            "code",
            "translation",
            "weather",
        ]
        code, out, _ = await _mesh(nats_url, subjects, "routes", "route", "明天北京的天气怎么样")
        decision = orjson.loads(out)
        assert (decision["target"], decision["strategy"]) == ("weather", "rule")
        code, out, _ = await _mesh(nats_url, subjects, "routes", "remove", "weather")
        assert out.strip() == "removed"
        code, out, _ = await _mesh(nats_url, subjects, "routes", "remove", "weather")
        assert out.strip() == "no such rule"

        code, _, err = await _mesh(nats_url, subjects, "routes", "load", "/nonexistent.json")
        assert (code, err.split(":")[0]) == (1, "error 400 BadRequest")
        assert "cannot read /nonexistent.json" in err
        bad = REPO / "pyproject.toml"
        code, _, err = await _mesh(nats_url, subjects, "routes", "load", str(bad))
        assert (code, err.split(":")[0]) == (1, "error 400 BadRequest")


async def test_state_commands_put_get_history_and_delete(
    nats_url: str, subjects: Subjects, state_service: StateService
) -> None:
    code, out, _ = await _mesh(nats_url, subjects, "state", "put", "counter/x", '{"value": 1}')
    assert (code, out.strip()) == (0, "saved counter/x as version 1")
    await _mesh(nats_url, subjects, "state", "put", "counter/x", '{"value": 2}')
    code, out, err = await _mesh(
        nats_url, subjects, "state", "put", "counter/x", '{"value": 9}', "--expected-version", "1"
    )
    assert code == 1 and err.startswith("error 409 StateConflict:")
    code, out, _ = await _mesh(nats_url, subjects, "state", "get", "counter/x")
    record = orjson.loads(out)
    assert (code, record["version"], record["state"]) == (0, 2, {"value": 2})
    code, out, _ = await _mesh(nats_url, subjects, "state", "get", "counter/x", "--version", "1")
    assert orjson.loads(out)["state"] == {"value": 1}
    code, out, _ = await _mesh(nats_url, subjects, "state", "history", "counter/x")
    assert [line.split()[0] for line in out.splitlines()] == ["v1", "v2"]
    code, out, err = await _mesh(nats_url, subjects, "state", "put", "counter/x", "[1]")
    assert code == 1 and err.startswith("error 400 InvalidPayload:")
    code, out, _ = await _mesh(nats_url, subjects, "state", "delete", "counter/x")
    assert out.strip() == "deleted the state of counter/x"
    code, out, err = await _mesh(nats_url, subjects, "state", "get", "counter/x")
    assert code == 1 and err.startswith("error 404 StateNotFound:")


async def test_clients_commands_add_list_and_revoke(nats_url: str, subjects: Subjects) -> None:
    code, out, err = await _mesh(
        nats_url,
        subjects,
        "clients",
        "add",
        "shop",
        "--agent-types",
        "billing,orders-*",
        "--rate",
        "5",
    )
    assert code == 0 and "shown once" in err
    header, key = out.strip().split(" ApiKey ")
    assert header == "Authorization:" and key.startswith("shop.") and len(key) > 40
    code, out, err = await _mesh(nats_url, subjects, "clients", "add", "shop")
    assert code == 1 and err.startswith("error 400 BadRequest: client 'shop' exists")
    code, out, _ = await _mesh(nats_url, subjects, "clients", "list")
    assert out.split()[:3] == ["shop", "billing,orders-*", "5/s"]
    assert key.split(".", 1)[1] not in out
    code, out, _ = await _mesh(nats_url, subjects, "clients", "revoke", "shop")
    assert out.strip() == "revoked shop"
    code, out, _ = await _mesh(nats_url, subjects, "clients", "list")
    assert out.strip() == ""


async def test_status_and_alerts_commands(
    nats_url: str, nc: NATS, subjects: Subjects, gateway: Gateway, state_service: StateService
) -> None:
    from mesh.handlers.monitor import Monitor

    async with Monitor(nc, subjects):
        code, out, _ = await _mesh(nats_url, subjects, "status")
        assert code == 1  # no router: degraded
        assert "mesh is degraded" in out and "router" in out and "0 live workers" in out
        code, out, _ = await _mesh(
            nats_url, subjects, "alerts", "silence", "no_live_workers", "--for", "30m"
        )
        assert code == 0 and out.startswith("no_live_workers silenced until ")
        code, out, _ = await _mesh(nats_url, subjects, "alerts")
        assert "no_live_workers (silence)" in out
        code, out, err = await _mesh(nats_url, subjects, "alerts", "silence", "x", "--for", "soon")
        assert code == 1 and "not a duration" in err
        code, out, _ = await _mesh(nats_url, subjects, "alerts", "unsilence", "no_live_workers")
        assert out.strip() == "unsilenced"
