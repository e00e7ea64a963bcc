"""Random bytes, headers and ids at the gateway and the services: every request gets a
well-formed answer, the processes stay up, and no other agent's state changes."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from mesh import AgentId, MeshClient
from mesh.config import AuthConfig
from mesh.handlers.gateway import Gateway
from mesh.handlers.router import Router
from mesh.handlers.state import StateService
from mesh.state import StateClient
from mesh.subjects import Subjects
from mesh.testing import eventually
from tests.helpers import error_of

CODES = {400, 401, 403, 404, 409, 413, 429, 500, 503, 504}
FUZZ = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
SENTINEL = AgentId("counter", "sentinel")

header_names = st.sampled_from(
    ["Content-Type", "Mesh-Msg-Type", "Mesh-Timeout-Ms", "Mesh-Request-Id", "Authorization",
     "Mesh-Sender", "Mesh-Client", "traceparent", "X-Other"]
)  # fmt: skip
header_values = st.one_of(
    st.sampled_from(
        ["application/json", "application/msgpack", "text/plain", "Increment", "Ping",
         "GetCount", "0", "-5", "99999999999", "ApiKey x.y", "Bearer a.b.c", ""]
    ),
    st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=40),
)  # fmt: skip
headers = st.dictionaries(header_names, header_values, max_size=5)
bodies = st.one_of(
    st.binary(max_size=256),
    st.sampled_from([b"", b"{}", b"null", b"[]", b'{"by": "x"}', b'{"by": -1}', b'{"text": 5}',
                     b'{"by": 1e309}', b"\x80\x81", b'{"text": "hi", "delay": 0.01}']),
)  # fmt: skip
# Subject tokens NATS itself routes (no empty token, no wildcard, no dot): anything
# else never reaches the gateway.
tokens = st.one_of(
    st.sampled_from(["echo", "counter", "nobody", "=41", "=2e", "=3D", "a=2", "=E2=82", "a*b"]),
    st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126), min_size=1, max_size=12),
).filter(lambda t: "." not in t and t not in ("*", ">"))


def assert_well_formed(reply: Msg) -> None:
    headers_of = reply.headers or {}
    if "Nats-Service-Error-Code" in headers_of:
        error = error_of(reply)
        assert error["code"] in CODES, error
        assert error["message"], error


@pytest.fixture
async def fuzz_mesh(
    nc: NATS, subjects: Subjects, gateway: Gateway, state_service: StateService,
    spawn_worker: type,
) -> AsyncIterator[MeshClient]:  # fmt: skip
    spawn_worker("workers.echo:Echo", "workers.counter:Counter", worker_id="fuzz")
    await eventually(lambda: gateway.directory.live_workers("counter"), timeout=15)
    client = MeshClient(nc, subjects=subjects)
    await client.call(SENTINEL, {"by": 7}, message_type="Increment")
    yield client
    # Still up, and the sentinel untouched: one version, the value it was given.
    assert (await client.call(SENTINEL, {}, message_type="GetCount"))["value"] == 7
    saved = await StateClient(nc, subjects).get(SENTINEL)
    assert (saved.version, saved.state) == (1, {"value": 7})


@FUZZ
@given(agent_type=tokens, key=tokens, body=bodies, extra=headers)
async def test_the_gateway_answers_any_request_well_formed(
    nc: NATS, subjects: Subjects, fuzz_mesh: MeshClient, agent_type: str, key: str,
    body: bytes, extra: dict[str, str],
) -> None:  # fmt: skip
    if key == "sentinel":
        return
    subject = f"{subjects.prefix}.rpc.{agent_type}.{key}"
    extra.setdefault("Mesh-Timeout-Ms", "2000")
    reply = await nc.request(subject, body, timeout=5, headers=extra)
    assert_well_formed(reply)


@pytest.fixture
async def secured_gateway(
    nc: NATS, subjects: Subjects, registry: object, state_service: StateService
) -> AsyncIterator[Gateway]:
    async with Gateway(nc, subjects, auth=AuthConfig(enabled=True, jwt_secret="k" * 32)) as g:
        yield g


@FUZZ
@given(key=tokens, body=bodies, extra=headers)
async def test_the_secured_gateway_refuses_any_unauthenticated_request(
    nc: NATS, subjects: Subjects, secured_gateway: Gateway, key: str, body: bytes,
    extra: dict[str, str],
) -> None:  # fmt: skip
    reply = await nc.request(f"{subjects.prefix}.rpc.echo.{key}", body, timeout=5, headers=extra)
    error = error_of(reply)
    assert error["code"] in {400, 401, 413}, error  # never past the credentials


SERVICE_OPS = [
    ("registry", "register"), ("registry", "heartbeat"), ("registry", "deregister"),
    ("registry", "lookup"), ("registry", "workers"), ("registry", "types"),
    ("router", "subscribe"), ("router", "unsubscribe"), ("router", "subscriptions"),
    ("router", "route"), ("router", "feedback"), ("router", "rule_put"),
    ("router", "rule_delete"), ("router", "rules"),
    ("state", "get"), ("state", "put"), ("state", "history"), ("state", "delete"),
]  # fmt: skip


@pytest.fixture
async def services(
    nc: NATS, subjects: Subjects, registry: object, state_service: StateService
) -> AsyncIterator[Any]:
    async with Router(nc, subjects):
        store = StateClient(nc, subjects)
        await store.put(SENTINEL, {"value": 7})
        yield
        saved = await store.get(SENTINEL)
        assert (saved.version, saved.state) == (1, {"value": 7})


@FUZZ
@given(
    op=st.sampled_from(SERVICE_OPS),
    body=st.one_of(
        bodies,
        st.dictionaries(st.sampled_from(["agent_type", "key", "worker_id", "id", "kind", "topic",
                                         "text", "state", "version", "expected_version"]),
                        st.one_of(st.text(max_size=10), st.integers(), st.none(),
                                  st.just({"a": 1})), max_size=4).map(
            lambda d: json.dumps(d).encode()),  # stdlib json: any size of integer
    ),
    extra=headers,
)  # fmt: skip
async def test_the_services_answer_any_request_well_formed(
    nc: NATS, subjects: Subjects, services: Any, op: tuple[str, str], body: bytes,
    extra: dict[str, str],
) -> None:  # fmt: skip
    if b"sentinel" in body:
        return
    reply = await nc.request(subjects.service(*op), body, timeout=5, headers=extra)
    assert_well_formed(reply)
