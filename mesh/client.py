"""Calling agents from any Python process: `MeshClient`."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
import uuid
from collections.abc import Mapping
from types import TracebackType
from typing import Any, TypeVar, overload

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.errors import MaxPayloadError, NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.api import PubAck
from nats.js.errors import NoStreamResponseError, NotFoundError
from pydantic import BaseModel

from mesh import metrics
from mesh._connect import connect
from mesh._trace import TraceContext, outgoing
from mesh._wire import (
    AUTHORIZATION,
    CONTENT_TYPE,
    MSG_ID,
    MSG_TYPE,
    REQUEST_ID,
    SENDER,
    TIMEOUT_MS,
    TRACEPARENT,
    current_deadline,
    error_from_reply,
    new_request_id,
)
from mesh.codec import JSON_CODEC, Codec, codec_for, decode, decode_plain, encode
from mesh.config import ConnectConfig
from mesh.errors import (
    DeadlineExceededError,
    MeshConnectionError,
    MeshError,
    NoWorkerAvailableError,
    PayloadTooLargeError,
)
from mesh.ids import AgentId, TopicId
from mesh.subjects import Subjects

M = TypeVar("M", bound=BaseModel)

#: How much longer than the deadline the client waits, to receive the gateway's own 504.
REPLY_GRACE = 0.5
#: How much longer than its handler's deadline a call made from the handler may wait.
ENCLOSED_GRACE = 0.05
#: Seconds one JetStream publish attempt waits for its acknowledgement before a retry.
PUBLISH_ATTEMPT = 1.0
#: Pause between publish attempts (a stream leader election takes seconds).
PUBLISH_RETRY_PAUSE = 0.2


def _remote(error: MeshError) -> MeshError:
    error.remote = True
    return error


class MeshClient:
    """Sends requests to agents through the gateway (``mesh.rpc.<type>.<key>``).

    Args:
        nc: A connected NATS client. `MeshClient.connect` makes one the client owns.
        subjects: The mesh's names.
        codec: Encoding of requests (and so of replies).
        default_timeout: Deadline of a call that names none.
        authorization: The ``Authorization`` header for calls through a gateway that
            checks credentials: ``ApiKey <id>.<secret>`` or ``Bearer <JWT>``.
    """

    def __init__(
        self,
        nc: NATS,
        *,
        subjects: Subjects | None = None,
        codec: Codec = JSON_CODEC,
        default_timeout: float = 30.0,
        authorization: str | None = None,
    ) -> None:
        self._nc = nc
        self._subjects = subjects or Subjects()
        self._codec = codec
        self._default_timeout = default_timeout
        self._authorization = authorization
        self._owns_connection = False

    @classmethod
    async def connect(
        cls,
        config: ConnectConfig | None = None,
        *,
        subjects: Subjects | None = None,
        codec: Codec = JSON_CODEC,
        default_timeout: float = 30.0,
        name: str = "mesh-client",
        authorization: str | None = None,
    ) -> MeshClient:
        """Connect to NATS and return a client that closes the connection on `aclose`.

        Without arguments it follows ``MESH_NATS_URL`` (and credentials), ``MESH_PREFIX``
        and ``MESH_AUTHORIZATION`` (the gateway credentials).
        """
        nc = await connect(config or ConnectConfig.from_env(), name=name, reconnect=False)
        client = cls(
            nc,
            subjects=subjects or Subjects.from_env(),
            codec=codec,
            default_timeout=default_timeout,
            authorization=authorization or os.environ.get("MESH_AUTHORIZATION") or None,
        )
        client._owns_connection = True
        return client

    @property
    def nc(self) -> NATS:
        return self._nc

    @overload
    async def call(
        self,
        target: AgentId,
        message: BaseModel | Mapping[str, Any] | None,
        *,
        response_type: type[M],
        message_type: str | None = ...,
        timeout: float | None = ...,
        sender: AgentId | None = ...,
        headers: Mapping[str, str] | None = ...,
    ) -> M: ...

    @overload
    async def call(
        self,
        target: AgentId,
        message: BaseModel | Mapping[str, Any] | None,
        *,
        response_type: None = ...,
        message_type: str | None = ...,
        timeout: float | None = ...,
        sender: AgentId | None = ...,
        headers: Mapping[str, str] | None = ...,
    ) -> Any: ...

    async def call(
        self,
        target: AgentId,
        message: BaseModel | Mapping[str, Any] | None,
        *,
        response_type: type[Any] | None = None,
        message_type: str | None = None,
        timeout: float | None = None,
        sender: AgentId | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> Any:
        """Send `message` to `target` and return its reply.

        Args:
            target: The agent.
            message: A pydantic model (its class name is the message type) or plain data.
            response_type: Validate the reply as this model; plain data when ``None``.
            message_type: The ``Mesh-Msg-Type``; defaults to the model's class name.
            timeout: Seconds to wait for the reply.
            sender: The sending agent, for ``Mesh-Sender``.
            headers: Extra headers (``Authorization``, ``traceparent``...).

        Raises:
            MeshError: The subclass matching the error code of a failed reply.
        """
        request_headers = self._message_headers(message, message_type, sender, headers)
        reply = await self.send_raw(
            target, encode(message, self._codec), headers=request_headers, timeout=timeout
        )
        codec = codec_for((reply.headers or {}).get(CONTENT_TYPE) or self._codec.content_type)
        if response_type is not None and issubclass(response_type, BaseModel):
            return decode(reply.data, response_type, codec)
        return decode_plain(reply.data, codec)

    def _message_headers(
        self,
        message: object,
        message_type: str | None,
        sender: AgentId | None,
        headers: Mapping[str, str] | None,
    ) -> dict[str, str]:
        """Content type, message type (the model's class name by default) and sender."""
        result = dict(headers or {})
        result[CONTENT_TYPE] = self._codec.content_type
        name = message_type or (type(message).__name__ if isinstance(message, BaseModel) else None)
        if name:
            result[MSG_TYPE] = name
        if sender is not None:
            result[SENDER] = str(sender)
        return result

    async def send_raw(
        self,
        target: AgentId,
        data: bytes,
        *,
        headers: Mapping[str, str],
        timeout: float | None = None,
    ) -> Msg:
        """Send an already encoded body with its headers; return the successful reply.

        Raises:
            MeshError: The subclass matching the error code of a failed reply.
        """
        deadline = self._default_timeout if timeout is None else timeout
        enclosing = current_deadline.get()
        if enclosing is not None:
            # Sent from inside a handler: nobody waits for it longer than for the handler.
            # A hair longer, so that the handler's own deadline cancels it first and the
            # handler sees CancelledError, not this call's 504.
            if enclosing.remaining() <= 0:
                raise _remote(DeadlineExceededError(f"no time left to call {target}"))
            deadline = min(deadline, enclosing.remaining() + ENCLOSED_GRACE)
        request_headers = dict(headers)
        request_headers.setdefault(REQUEST_ID, new_request_id())
        if self._authorization is not None:
            request_headers.setdefault(AUTHORIZATION, self._authorization)
        if TRACEPARENT not in request_headers:
            traceparent = outgoing()  # sent from a handler: the same trace
            if traceparent is not None:
                request_headers[TRACEPARENT] = traceparent
        request_headers[TIMEOUT_MS] = str(max(1, int(deadline * 1000)))
        try:
            reply = await self._nc.request(
                self._subjects.rpc(target),
                data,
                timeout=deadline + REPLY_GRACE,
                headers=request_headers,
            )
        except asyncio.CancelledError:
            # The caller gave up: tell the worker running it to stop too.
            with contextlib.suppress(Exception):
                await self._nc.publish(
                    self._subjects.cancel(target),
                    headers={REQUEST_ID: request_headers[REQUEST_ID]},
                )
            raise
        except NoRespondersError:
            raise _remote(
                NoWorkerAvailableError(
                    f"no gateway is serving {self._subjects.rpc_all}",
                    request_id=request_headers[REQUEST_ID],
                )
            ) from None
        except (TimeoutError, NatsTimeoutError):
            raise _remote(
                DeadlineExceededError(
                    f"no reply from {target} within {deadline:g}s",
                    request_id=request_headers[REQUEST_ID],
                )
            ) from None
        except Exception as exc:
            raise _remote(MeshConnectionError(f"request to {target} failed: {exc}")) from exc
        error = error_from_reply(reply.data, reply.headers)
        if error is not None:
            raise error
        return reply

    async def publish(
        self,
        topic: TopicId,
        message: BaseModel | Mapping[str, Any] | None,
        *,
        message_type: str | None = None,
        message_id: str | None = None,
        sender: AgentId | None = None,
        headers: Mapping[str, str] | None = None,
        timeout: float = 5.0,
    ) -> PubAck:
        """Publish an event on `topic`; return once JetStream has stored it.

        Args:
            topic: Where it is published; subscribers get it as ``AgentId(type, source)``.
            message: A pydantic model (its class name is the message type) or plain data.
            message_type: The ``Mesh-Msg-Type``; defaults to the model's class name.
            message_id: ``Nats-Msg-Id``: a second publish with the same id is dropped.
            sender: The publishing agent, for ``Mesh-Sender``.
            headers: Extra headers (``traceparent``...).
            timeout: Seconds to wait for the stream's acknowledgement, retrying (with the
                same ``Nats-Msg-Id``, so it is stored once) across a leader change.

        Raises:
            NoWorkerAvailableError: No stream stores events (no router has started).
            DeadlineExceededError: No acknowledgement in time.
        """
        event_headers = self._message_headers(message, message_type, sender, headers)
        if message_id is not None:
            event_headers[MSG_ID] = message_id
        return await self.publish_raw(
            topic, encode(message, self._codec), headers=event_headers, timeout=timeout
        )

    async def publish_raw(
        self,
        topic: TopicId,
        data: bytes,
        *,
        headers: Mapping[str, str],
        timeout: float = 5.0,
    ) -> PubAck:
        """Publish an already encoded event with its headers (as `publish` does).

        A ``Nats-Msg-Id`` is added when `headers` has none, so that a retry after a lost
        acknowledgement is stored once.
        """
        event_headers = dict(headers)
        event_headers.setdefault(MSG_ID, uuid.uuid4().hex)
        if TRACEPARENT not in event_headers:
            event_headers[TRACEPARENT] = outgoing() or TraceContext.new().header()
        subject = self._subjects.events(topic)
        deadline = time.monotonic() + timeout
        while True:
            attempt = max(0.05, min(PUBLISH_ATTEMPT, deadline - time.monotonic()))
            try:
                ack = await self._nc.jetstream().publish(
                    subject, data, timeout=attempt, headers=event_headers
                )
                metrics.EVENTS_PUBLISHED.inc()
                return ack
            except (NoRespondersError, NoStreamResponseError):
                if not await self._events_stream_exists():
                    raise _remote(
                        NoWorkerAvailableError(f"no stream stores {self._subjects.events_all}")
                    ) from None
                why = "no stream leader answered"  # a leader change: try again
            except (TimeoutError, NatsTimeoutError):
                why = "no acknowledgement"
            except MaxPayloadError as exc:
                raise PayloadTooLargeError(
                    f"the event is over the server's payload limit: {exc}"
                ) from exc
            except Exception as exc:
                raise _remote(MeshConnectionError(f"publishing on {topic} failed: {exc}")) from exc
            if time.monotonic() >= deadline:
                raise _remote(
                    DeadlineExceededError(f"{why} for {topic} within {timeout:g}s")
                ) from None
            await asyncio.sleep(min(PUBLISH_RETRY_PAUSE, max(0.0, deadline - time.monotonic())))

    async def _events_stream_exists(self) -> bool:
        """False only when JetStream says the events stream does not exist."""
        try:
            await self._nc.jetstream(timeout=1.0).stream_info(self._subjects.stream("events"))
        except NotFoundError:
            return False
        except Exception:
            return True  # no answer (a leader election): assume it is there
        return True

    async def aclose(self) -> None:
        """Close the connection if this client opened it. Idempotent."""
        if self._owns_connection and not self._nc.is_closed:
            await self._nc.drain()

    async def __aenter__(self) -> MeshClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()
