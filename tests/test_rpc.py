"""Requests through the gateway to a worker in another process, and every error reply."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import msgpack
import nats
import orjson
import pytest
from nats.aio.client import Client as NATS

from mesh import (
    AgentId,
    AgentTypeNotFoundError,
    DeadlineExceededError,
    HandlerError,
    MeshClient,
    NoWorkerAvailableError,
    UnknownMessageTypeError,
)
from mesh.codec import MSGPACK_CODEC
from mesh.config import GatewayConfig, RegistryConfig
from mesh.handlers.gateway import Gateway
from mesh.handlers.registry import Registry
from mesh.handlers.state import StateService
from mesh.subjects import Subjects
from mesh.testing import WorkerProcess, eventually
from tests.agents import Woke
from tests.conftest import HEARTBEAT, REPO
from tests.helpers import assert_error, live_worker_ids
from workers.counter import Count, Increment
from workers.echo import Ping, Pong

AGENTS = (
    "workers.echo:Echo",
    "workers.counter:Counter",
    "tests.agents:Sleeper",
    "tests.agents:Sulker",
    "tests.agents:Relay",
)
MAX_PAYLOAD = 64 * 1024


@dataclass
class Mesh:
    subjects: Subjects
    nc: NATS
    client: MeshClient
    worker_id: str

    async def request(
        self, subject: str, data: bytes, headers: dict[str, str] | None = None, timeout: float = 5
    ) -> nats.aio.msg.Msg:
        return await self.nc.request(subject, data, headers=headers, timeout=timeout)

    def rpc(self, agent_type: str, key: str) -> str:
        return self.subjects.rpc(AgentId(agent_type, key))


@pytest.fixture(scope="module")
async def mesh(nats_url: str) -> AsyncIterator[Mesh]:
    """One mesh (prefix, services, one worker process) shared by this module's tests."""
    subjects = Subjects(f"rpc{uuid.uuid4().hex[:8]}")
    nc = await nats.connect(nats_url, name="test-rpc")
    worker_id = "rpc-worker"
    process = WorkerProcess(
        nats_url,
        AGENTS,
        worker_id=worker_id,
        heartbeat_interval=HEARTBEAT,
        prefix=subjects.prefix,
        env={"PYTHONPATH": str(REPO)},
    ).start()
    try:
        async with (
            Registry(nc, subjects, RegistryConfig()),
            StateService(nc, subjects),
            Gateway(nc, subjects, GatewayConfig(default_timeout=10, max_payload=MAX_PAYLOAD)) as gw,
        ):
            await eventually(lambda: gw.directory.live_workers("echo"), timeout=15)
            try:
                yield Mesh(subjects, nc, MeshClient(nc, subjects=subjects), worker_id)
            finally:
                await process.aclose()  # while the registry still takes its goodbye
    finally:
        await process.aclose()
        await nc.drain()


async def test_json_request_reaches_agent_in_worker_process(mesh: Mesh) -> None:
    reply = await mesh.request(mesh.rpc("echo", "alice"), b'{"text": "hi"}')
    assert reply.headers is not None
    assert reply.headers["Content-Type"] == "application/json"
    assert orjson.loads(reply.data) == {"text": "hi", "agent": "echo/alice", "worker": "rpc-worker"}


async def test_msgpack_request_gets_msgpack_reply(mesh: Mesh) -> None:
    reply = await mesh.request(
        mesh.rpc("counter", "mp"),
        msgpack.packb({"by": 5}),
        headers={"Content-Type": "application/msgpack", "Mesh-Msg-Type": "Increment"},
    )
    assert reply.headers is not None
    assert reply.headers["Content-Type"] == "application/msgpack"
    assert msgpack.unpackb(reply.data) == {"key": "mp", "value": 5, "worker": "rpc-worker"}


async def test_client_returns_typed_replies_in_both_encodings(mesh: Mesh) -> None:
    pong = await mesh.client.call(AgentId("echo", "ünï cødé/é"), Ping(text="x"), response_type=Pong)
    assert pong == Pong(text="x", agent="echo/ünï cødé/é", worker="rpc-worker")
    packed = MeshClient(mesh.nc, subjects=mesh.subjects, codec=MSGPACK_CODEC)
    count = await packed.call(AgentId("counter", "typed"), Increment(by=2), response_type=Count)
    assert count == Count(key="typed", value=2, worker="rpc-worker")


async def test_request_id_is_echoed_or_assigned(mesh: Mesh) -> None:
    reply = await mesh.request(
        mesh.rpc("echo", "rid"), b'{"text": "x"}', headers={"Mesh-Request-Id": "req-42"}
    )
    assert reply.headers is not None and reply.headers["Mesh-Request-Id"] == "req-42"
    reply = await mesh.request(mesh.rpc("nobody", "rid"), b"{}")
    assert_error(reply, 404)["request_id"]


@pytest.mark.parametrize(
    "tail",
    [
        "echo.a=zz",  # bad escape
        "echo.a=41",  # needless escape of a safe byte
        "echo.a.b",  # three tokens
        "bad=2Ftype.k",  # '/' is not allowed in an agent type
        "echo.line=0Abreak",  # a control character in the key
    ],
)
async def test_invalid_agent_id_gets_400(mesh: Mesh, tail: str) -> None:
    reply = await mesh.request(f"{mesh.subjects.prefix}.rpc.{tail}", b"{}")
    assert_error(reply, 400, "InvalidId")


async def test_malformed_json_gets_400(mesh: Mesh) -> None:
    reply = await mesh.request(mesh.rpc("echo", "a"), b"{not json")
    assert "invalid JSON" in assert_error(reply, 400, "InvalidPayload")["message"]


async def test_payload_that_does_not_fit_the_model_gets_400(mesh: Mesh) -> None:
    reply = await mesh.request(
        mesh.rpc("counter", "a"), b'{"by": 0}', headers={"Mesh-Msg-Type": "Increment"}
    )
    assert "by" in assert_error(reply, 400, "InvalidPayload")["message"]


async def test_malformed_msgpack_gets_400_in_msgpack(mesh: Mesh) -> None:
    reply = await mesh.request(
        mesh.rpc("echo", "a"), b"\xc1\xc1", headers={"Content-Type": "application/msgpack"}
    )
    assert reply.headers is not None and reply.headers["Content-Type"] == "application/msgpack"
    assert_error(reply, 400, "InvalidPayload")


async def test_unknown_message_type_gets_400(mesh: Mesh) -> None:
    reply = await mesh.request(
        mesh.rpc("counter", "a"), b"{}", headers={"Mesh-Msg-Type": "Decrement"}
    )
    assert "Decrement" in assert_error(reply, 400, "UnknownMessageType")["message"]
    with pytest.raises(UnknownMessageTypeError):
        await mesh.client.call(AgentId("counter", "a"), {}, message_type="Decrement")


async def test_missing_message_type_with_several_handlers_gets_400(mesh: Mesh) -> None:
    reply = await mesh.request(mesh.rpc("counter", "a"), b"{}")
    assert_error(reply, 400, "UnknownMessageType")


async def test_unsupported_content_type_gets_400(mesh: Mesh) -> None:
    reply = await mesh.request(mesh.rpc("echo", "a"), b"hi", headers={"Content-Type": "text/plain"})
    assert_error(reply, 400, "UnsupportedContentType")


@pytest.mark.parametrize("content_type", ["application/x-protobuf", "application/octet-stream"])
async def test_opaque_content_passes_the_gateway_but_a_typed_agent_refuses_it(
    mesh: Mesh, content_type: str
) -> None:
    # The gateway forwards it (agent types that decode their own may take it); echo's
    # handlers are typed, so its worker refuses it, in JSON.
    reply = await mesh.request(
        mesh.rpc("echo", "a"), b"\x0a\x02hi", headers={"Content-Type": content_type}
    )
    assert "Content-Type" in assert_error(reply, 400, "UnsupportedContentType")["message"]


@pytest.mark.parametrize("value", ["soon", "0", "-3"])
async def test_bad_timeout_header_gets_400(mesh: Mesh, value: str) -> None:
    reply = await mesh.request(
        mesh.rpc("echo", "a"), b'{"text": "x"}', headers={"Mesh-Timeout-Ms": value}
    )
    assert "Mesh-Timeout-Ms" in assert_error(reply, 400, "BadRequest")["message"]


async def test_unknown_agent_type_gets_404(mesh: Mesh) -> None:
    reply = await mesh.request(mesh.rpc("weather", "paris"), b"{}")
    assert "weather" in assert_error(reply, 404, "AgentTypeNotFound")["message"]
    with pytest.raises(AgentTypeNotFoundError):
        await mesh.client.call(AgentId("weather", "paris"), {})


async def test_payload_over_the_limit_gets_413(mesh: Mesh) -> None:
    big = orjson.dumps({"text": "x" * (MAX_PAYLOAD + 1)})
    reply = await mesh.request(mesh.rpc("echo", "a"), big)
    assert_error(reply, 413, "PayloadTooLarge")


async def test_handler_that_raises_gets_500_without_traceback(mesh: Mesh) -> None:
    reply = await mesh.request(
        mesh.rpc("sleeper", "a"), b'{"reason": "disk on fire"}', headers={"Mesh-Msg-Type": "Boom"}
    )
    error = assert_error(reply, 500, "HandlerFailed")
    assert "RuntimeError: disk on fire" in error["message"]
    assert "Traceback" not in reply.data.decode()
    with pytest.raises(HandlerError, match="disk on fire"):
        await mesh.client.call(
            AgentId("sleeper", "a"), {"reason": "disk on fire"}, message_type="Boom"
        )


async def test_reply_that_misses_the_deadline_gets_504_on_time(mesh: Mesh) -> None:
    started = time.monotonic()
    reply = await mesh.request(
        mesh.rpc("sleeper", "slow"),
        b'{"seconds": 3}',
        headers={"Mesh-Msg-Type": "Nap", "Mesh-Timeout-Ms": "300"},
    )
    assert_error(reply, 504, "DeadlineExceeded")
    assert time.monotonic() - started < 2.0
    with pytest.raises(DeadlineExceededError):
        await mesh.client.call(
            AgentId("sleeper", "slow2"), {"seconds": 3}, message_type="Nap", timeout=0.3
        )


async def test_agent_calling_another_agent_gets_its_reply(mesh: Mesh) -> None:
    reply = await mesh.client.call(
        AgentId("relay", "r"), {"agent_type": "echo", "key": "far", "text": "hop"}
    )
    assert reply == {
        "relayed_by": "relay/r",
        "reply": {"text": "hop", "agent": "echo/far", "worker": "rpc-worker"},
    }


async def test_failed_nested_call_is_the_handlers_500_with_the_outer_request_id(
    mesh: Mesh,
) -> None:
    reply = await mesh.request(
        mesh.rpc("relay", "r"),
        b'{"agent_type": "ghost", "key": "k", "text": "x"}',
        headers={"Mesh-Request-Id": "outer-1"},
    )
    error = assert_error(reply, 500, "HandlerFailed")
    assert "AgentTypeNotFound" in error["message"]
    assert error["request_id"] == "outer-1"
    assert reply.headers is not None and reply.headers["Mesh-Request-Id"] == "outer-1"


async def test_error_a_handler_raises_on_purpose_keeps_its_code(mesh: Mesh) -> None:
    reply = await mesh.request(mesh.rpc("sulker", "s"), b"{}", headers={"Mesh-Msg-Type": "Refuse"})
    assert assert_error(reply, 403, "Forbidden")["message"] == "sulker talks to nobody"


async def test_handlers_own_timeout_is_a_500_not_the_callers_504(mesh: Mesh) -> None:
    reply = await mesh.request(
        mesh.rpc("sulker", "s"), b"{}", headers={"Mesh-Msg-Type": "Impatient"}
    )
    assert "TimeoutError" in assert_error(reply, 500, "HandlerFailed")["message"]


async def test_known_type_without_live_worker_gets_503(
    nc: NATS, subjects: Subjects, registry: Registry, gateway: Gateway, spawn_worker: type
) -> None:
    worker = spawn_worker("tests.agents:Sleeper", worker_id="doomed")
    await eventually(lambda: gateway.directory.live_workers("sleeper"), timeout=15)
    client = MeshClient(nc, subjects=subjects)
    woke = await client.call(AgentId("sleeper", "k"), {"seconds": 0}, message_type="Nap")
    assert woke == Woke(tag="", worker="doomed", key="k").model_dump()
    worker.kill()
    await worker.wait()
    reply = await nc.request(
        subjects.rpc(AgentId("sleeper", "k")), b'{"seconds": 0}', headers={"Mesh-Msg-Type": "Nap"}
    )
    assert_error(reply, 503, "Unavailable")
    with pytest.raises(NoWorkerAvailableError):
        await client.call(AgentId("sleeper", "k"), {"seconds": 0}, message_type="Nap")

    async def registry_dropped_it() -> bool:
        return await live_worker_ids(nc, subjects, "sleeper") == set()

    await eventually(registry_dropped_it, timeout=3 * HEARTBEAT + 1)
