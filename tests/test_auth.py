"""Credentials, permissions and rate limits at the gateway."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import jwt
import nats
import orjson
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from nats.aio.client import Client as NATS

from mesh import AgentId, MeshClient
from mesh.clients import ClientRegistry
from mesh.config import AuthConfig
from mesh.errors import ForbiddenError, RateLimitedError, UnauthorizedError
from mesh.handlers.gateway import Gateway
from mesh.subjects import Subjects
from mesh.testing import eventually
from tests.helpers import assert_error

SECRET = "test-shared-secret-of-enough-length-0123456789"
AUTH = AuthConfig(
    enabled=True,
    jwt_secret=SECRET,
    jwt_issuer="mesh-tests",
    jwt_audience="mesh",
    default_rate=1000,
    default_burst=1000,
    share_interval=0.1,
)
WHO = AgentId("whoami", "k")


@pytest.fixture
async def secured(
    nc: NATS, subjects: Subjects, registry: object, spawn_worker: type
) -> AsyncIterator[Gateway]:
    async with Gateway(nc, subjects, auth=AUTH) as gateway:
        spawn_worker("tests.agents:Whoami", "workers.echo:Echo", worker_id="auth-w")
        await eventually(lambda: gateway.directory.live_workers("echo"), timeout=15)
        yield gateway


@pytest.fixture
def clients(nc: NATS, subjects: Subjects) -> ClientRegistry:
    return ClientRegistry(nc.jetstream(), subjects)


async def _call(
    nc: NATS, subjects: Subjects, authorization: str | None, agent: AgentId = WHO
) -> Any:
    headers = {"Mesh-Msg-Type": "WhoAmI" if agent.type == "whoami" else "Ping"}
    if authorization is not None:
        headers["Authorization"] = authorization
    body = b"{}" if agent.type == "whoami" else b'{"text": "hi"}'
    return await nc.request(subjects.rpc(agent), body, timeout=5, headers=headers)


def _token(**claims: Any) -> str:
    now = int(time.time())
    payload = {"sub": "svc", "iss": "mesh-tests", "aud": "mesh", "exp": now + 60, **claims}
    return jwt.encode(payload, SECRET, algorithm="HS256")


async def test_missing_or_bad_credentials_get_401(
    nc: NATS, subjects: Subjects, secured: Gateway, clients: ClientRegistry
) -> None:
    key = await clients.add("shop")
    client_id, secret = key.split(".", 1)
    for authorization in (
        None,
        "",
        "ApiKey",
        "ApiKey not-a-key",
        f"ApiKey {client_id}.wrong-{secret}",
        f"ApiKey nobody.{secret}",
        f"Basic {key}",
        "Bearer not.a.jwt",
    ):
        reply = await _call(nc, subjects, authorization)
        assert_error(reply, 401, "Unauthorized")


async def test_a_key_calls_what_it_may_and_the_worker_never_sees_it(
    nc: NATS, subjects: Subjects, secured: Gateway, clients: ClientRegistry
) -> None:
    key = await clients.add("shop", agent_types=["whoami"])
    await eventually(lambda: _succeeds(_call(nc, subjects, f"ApiKey {key}")), timeout=5)
    reply = await _call(nc, subjects, f"ApiKey {key}")
    assert orjson.loads(reply.data) == {"client": "shop", "saw_authorization": False}
    reply = await _call(nc, subjects, f"ApiKey {key}", AgentId("echo", "e"))
    assert_error(reply, 403, "Forbidden")


async def _succeeds(request: Any) -> bool:
    reply = await request
    return "Nats-Service-Error-Code" not in (reply.headers or {})


async def test_a_revoked_key_is_refused_without_a_restart(
    nc: NATS, subjects: Subjects, secured: Gateway, clients: ClientRegistry
) -> None:
    key = await clients.add("temp")
    await eventually(lambda: _succeeds(_call(nc, subjects, f"ApiKey {key}")), timeout=5)
    assert await clients.revoke("temp")
    revoked_at = time.monotonic()

    async def refused() -> bool:
        reply = await _call(nc, subjects, f"ApiKey {key}")
        return (reply.headers or {}).get("Nats-Service-Error-Code") == "401"

    await eventually(refused, timeout=5, interval=0.01)
    assert time.monotonic() - revoked_at < 2
    assert [c.id for c in await clients.list()] == []


async def test_bearer_tokens_are_checked(nc: NATS, subjects: Subjects, secured: Gateway) -> None:
    reply = await _call(nc, subjects, f"Bearer {_token(agent_types=['whoami'])}")
    assert orjson.loads(reply.data) == {"client": "svc", "saw_authorization": False}
    now = int(time.time())
    refused = {
        "expired": _token(exp=now - 10, agent_types=["*"]),
        "not valid yet": _token(nbf=now + 600, agent_types=["*"]),
        "another audience": _token(aud="elsewhere", agent_types=["*"]),
        "another issuer": _token(iss="someone", agent_types=["*"]),
        "signature": jwt.encode(
            {"sub": "svc", "iss": "mesh-tests", "aud": "mesh", "exp": now + 60},
            "another-secret-of-enough-length-0123456789",
            algorithm="HS256",
        ),
    }
    for why, token in refused.items():
        reply = await _call(nc, subjects, f"Bearer {token}")
        error = assert_error(reply, 401, "Unauthorized")
        assert why in error["message"], error
    no_subject = jwt.encode({"exp": now + 60, "iss": "mesh-tests", "aud": "mesh"}, SECRET)
    assert_error(await _call(nc, subjects, f"Bearer {no_subject}"), 401)
    # Valid, but granted nothing: 403.
    assert_error(await _call(nc, subjects, f"Bearer {_token()}"), 403, "Forbidden")


def _pem(key: Any) -> bytes:
    return key.public_key().public_bytes(  # type: ignore[no-any-return]
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


async def test_rs256_public_key_and_es256_jwks(
    nc: NATS, subjects: Subjects, registry: object, spawn_worker: type, tmp_path: Path
) -> None:
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ec_key = ec.generate_private_key(ec.SECP256R1())
    (tmp_path / "rsa.pem").write_bytes(_pem(rsa_key))
    jwk = orjson.loads(jwt.algorithms.ECAlgorithm.to_jwk(ec_key.public_key()))
    jwk.update({"kid": "ec-1", "alg": "ES256", "use": "sig"})
    (tmp_path / "jwks.json").write_bytes(orjson.dumps({"keys": [jwk]}))
    now = int(time.time())
    claims = {"sub": "svc", "exp": now + 60, "agent_types": ["whoami"]}
    rs_token = jwt.encode(claims, rsa_key, algorithm="RS256")
    es_token = jwt.encode(claims, ec_key, algorithm="ES256", headers={"kid": "ec-1"})
    other_ec = ec.generate_private_key(ec.SECP256R1())
    forged = jwt.encode(claims, other_ec, algorithm="ES256", headers={"kid": "ec-1"})
    spawn_worker("tests.agents:Whoami", worker_id="auth-k")
    for config, good in (
        (AuthConfig(enabled=True, jwt_public_key_file=str(tmp_path / "rsa.pem")), rs_token),
        (AuthConfig(enabled=True, jwks_file=str(tmp_path / "jwks.json")), es_token),
    ):
        async with Gateway(nc, subjects, auth=config) as gateway:
            await eventually(lambda g=gateway: g.directory.live_workers("whoami"), timeout=15)
            reply = await _call(nc, subjects, f"Bearer {good}")
            assert orjson.loads(reply.data)["client"] == "svc"
            assert_error(await _call(nc, subjects, f"Bearer {forged}"), 401)
            assert_error(await _call(nc, subjects, f"Bearer {_token()}"), 401)  # HS256: no key


async def test_over_the_rate_gets_429_with_retry_after(
    nc: NATS, subjects: Subjects, secured: Gateway, clients: ClientRegistry
) -> None:
    key = await clients.add("eager", agent_types=["whoami"], rate=2, burst=3)
    client = MeshClient(nc, subjects=subjects)
    await eventually(lambda: _succeeds(_call(nc, subjects, f"ApiKey {key}")), timeout=5)
    limited = None
    for _ in range(10):
        reply = await _call(nc, subjects, f"ApiKey {key}")
        if (reply.headers or {}).get("Nats-Service-Error-Code") == "429":
            limited = reply
            break
    assert limited is not None, "never limited"
    assert_error(limited, 429, "RateLimited")
    assert limited.headers is not None and int(limited.headers["Retry-After-Ms"]) > 0
    del client


async def test_three_gateways_hold_a_clients_rate_together(
    nats_url: str,
    nc: NATS,
    subjects: Subjects,
    registry: object,
    spawn_worker: type,
    clients: ClientRegistry,
) -> None:
    rate, burst, seconds = 30.0, 5, 10.0
    key = await clients.add("steady", agent_types=["whoami"], rate=rate, burst=burst)
    connections = [await nats.connect(nats_url) for _ in range(3)]
    gateways = [Gateway(c, subjects, auth=AUTH) for c in connections]
    try:
        for gateway in gateways:
            await gateway.start()
        spawn_worker("tests.agents:Whoami", worker_id="rate-w")
        await eventually(
            lambda: all(g.directory.live_workers("whoami") for g in gateways), timeout=15
        )
        await eventually(lambda: _succeeds(_call(nc, subjects, f"ApiKey {key}")), timeout=5)
        await asyncio.sleep(burst / rate)  # let the bucket the probe used fill again
        admitted = limited = 0
        stop = time.monotonic() + seconds

        async def hammer() -> None:
            nonlocal admitted, limited
            while time.monotonic() < stop:
                reply = await _call(nc, subjects, f"ApiKey {key}")
                code = (reply.headers or {}).get("Nats-Service-Error-Code")
                if code is None:
                    admitted += 1
                else:
                    assert code == "429", reply.headers
                    limited += 1

        await asyncio.gather(*(hammer() for _ in range(6)))
        allowed = rate * seconds + burst
        assert limited > admitted  # the limit was reached throughout
        assert 0.8 * allowed <= admitted <= 1.2 * allowed, (admitted, allowed)
    finally:
        for gateway in gateways:
            await gateway.shutdown()
        for c in connections:
            await c.close()


async def test_the_client_sends_credentials_and_raises_typed_errors(
    nc: NATS, subjects: Subjects, secured: Gateway, clients: ClientRegistry
) -> None:
    with pytest.raises(UnauthorizedError):
        await MeshClient(nc, subjects=subjects).call(WHO, {}, message_type="WhoAmI")
    key = await clients.add("typed", agent_types=["whoami"], rate=1, burst=1)
    client = MeshClient(nc, subjects=subjects, authorization=f"ApiKey {key}")
    reply = await eventually(lambda: client.call(WHO, {}, message_type="WhoAmI"), timeout=5)
    assert reply["client"] == "typed"
    with pytest.raises(ForbiddenError):
        await client.call(AgentId("echo", "e"), {"text": "x"})
    with pytest.raises(RateLimitedError) as caught:
        await client.call(WHO, {}, message_type="WhoAmI")
    assert caught.value.retry_after is not None and 0 < caught.value.retry_after <= 1.0


async def test_no_secret_or_token_reaches_any_log(
    nc: NATS,
    subjects: Subjects,
    registry: object,
    spawn_worker: type,
    clients: ClientRegistry,
    caplog: pytest.LogCaptureFixture,
    tmp_path: Path,
) -> None:
    caplog.set_level(logging.DEBUG)
    worker_log = tmp_path / "worker.log"
    key = await clients.add("logged", agent_types=["whoami", "sulker"], rate=5, burst=2)
    secret = key.split(".", 1)[1]
    token = _token(agent_types=["whoami"])
    expired = _token(exp=int(time.time()) - 10, agent_types=["whoami"])
    async with Gateway(nc, subjects, auth=AUTH) as gateway:
        spawn_worker(
            "tests.agents:Whoami", "tests.agents:Sulker", worker_id="logs-w",
            log_path=str(worker_log), log_level="DEBUG",
        )  # fmt: skip
        await eventually(lambda: gateway.directory.live_workers("whoami"), timeout=15)
        await eventually(lambda: _succeeds(_call(nc, subjects, f"ApiKey {key}")), timeout=5)
        for authorization in (
            *[f"ApiKey {key}"] * 6,  # some over the rate
            f"ApiKey logged.wrong{secret}",
            f"ApiKey{key}",
            f"Bearer {token}",
            f"Bearer {expired}",
            f"Bearer {token}x",
        ):
            await _call(nc, subjects, authorization)
            await _call(nc, subjects, authorization, AgentId("sulker", "s"))
    logs = caplog.text + worker_log.read_text()
    assert "logs-w" in logs  # the worker did log
    for sensitive in (secret, token, expired, token.split(".")[2]):
        assert sensitive not in logs
