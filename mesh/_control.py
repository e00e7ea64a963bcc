"""Helpers for control-plane endpoints: typed request bodies in, typed replies out."""

from __future__ import annotations

from typing import TypeVar

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.errors import MaxPayloadError, NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError
from pydantic import BaseModel

from mesh._micro import Reply
from mesh._wire import CONTENT_TYPE, REQUEST_ID, error_from_reply, reply_codec, request_codec
from mesh.codec import JSON, decode, encode
from mesh.errors import DeadlineExceededError, NoWorkerAvailableError, PayloadTooLargeError

M = TypeVar("M", bound=BaseModel)


class NoResponderError(NoWorkerAvailableError):
    """Nobody subscribes the subject: NATS answered "no responders" (503)."""


def read_request(msg: Msg, model: type[M]) -> M:
    """The request body as `model`; `DecodeError` (400) when it does not fit."""
    return decode(msg.data, model, request_codec(msg.headers))


def model_reply(msg: Msg, value: BaseModel | None) -> Reply:
    """A reply in the request's content type, echoing its request id."""
    codec = reply_codec(msg.headers)
    headers = {CONTENT_TYPE: codec.content_type}
    request_id = (msg.headers or {}).get(REQUEST_ID)
    if request_id:
        headers[REQUEST_ID] = request_id
    return encode(value, codec), headers


async def control_request(
    nc: NATS,
    subject: str,
    body: BaseModel | None,
    reply_type: type[M] | None,
    *,
    timeout: float,
) -> M | None:
    """Request a control-plane endpoint with a JSON body and return its typed reply.

    Raises:
        MeshError: The endpoint answered with an error (its code's subclass).
        NoWorkerAvailableError: Nobody serves `subject`.
        PayloadTooLargeError: The body is over the connection's message limit.
        DeadlineExceededError: No answer within `timeout`.
    """
    data = await json_request(nc, subject, encode(body), timeout=timeout)
    if reply_type is None:
        return None
    return decode(data, reply_type)


async def json_request(nc: NATS, subject: str, payload: bytes, *, timeout: float) -> bytes:
    """Request `subject` with a JSON `payload`; the body of its successful reply.

    Raises:
        As `control_request`; `NoResponderError` when nobody serves `subject`.
    """
    try:
        reply = await nc.request(subject, payload, timeout=timeout, headers={CONTENT_TYPE: JSON})
    except NoRespondersError:
        raise NoResponderError(f"no service answers on {subject}") from None
    except MaxPayloadError as exc:
        raise PayloadTooLargeError(f"the request to {subject} is too large: {exc}") from None
    except (TimeoutError, NatsTimeoutError):
        raise DeadlineExceededError(f"no answer on {subject} within {timeout:g}s") from None
    error = error_from_reply(reply.data, reply.headers)
    if error is not None:
        raise error
    return reply.data
