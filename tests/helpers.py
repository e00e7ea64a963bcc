"""Assertions shared by the integration tests."""

from __future__ import annotations

from typing import Any

import msgpack
import orjson
from nats.aio.msg import Msg

from mesh._control import control_request
from mesh.records import LookupReply, LookupRequest
from mesh.subjects import Subjects


def error_of(reply: Msg) -> dict[str, Any]:
    """The protocol error a reply carries, checked for shape: headers and body agree."""
    headers = reply.headers or {}
    assert "Nats-Service-Error-Code" in headers, f"not an error reply: {headers} {reply.data!r}"
    if headers.get("Content-Type") == "application/msgpack":
        body = msgpack.unpackb(reply.data)
    else:
        body = orjson.loads(reply.data)
    error = body["error"]
    extra = {"current_version"} if error.get("code") == 409 else set()
    assert set(error) - extra == {"code", "type", "message", "request_id"}
    assert str(error["code"]) == headers["Nats-Service-Error-Code"]
    assert headers["Nats-Service-Error"]
    assert error["message"]
    return error


def assert_error(reply: Msg, code: int, error_type: str | None = None) -> dict[str, Any]:
    error = error_of(reply)
    assert error["code"] == code, error
    if error_type is not None:
        assert error["type"] == error_type, error
    return error


async def live_worker_ids(nc: Any, subjects: Subjects, agent_type: str) -> set[str]:
    """Live workers of `agent_type` as the registry's lookup endpoint reports them."""
    reply = await control_request(
        nc,
        subjects.service("registry", "lookup"),
        LookupRequest(agent_type=agent_type),
        LookupReply,
        timeout=2.0,
    )
    assert reply is not None
    return {worker.id for worker in reply.workers}
