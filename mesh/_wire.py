"""Header names, deadlines and error replies as docs/protocol.md defines them."""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping
from contextvars import ContextVar
from typing import Any, Final

from mesh.codec import JSON_CODEC, Codec, UnsupportedContentTypeError, codec_for, decode_plain
from mesh.errors import (
    BadRequestError,
    ConflictError,
    DecodeError,
    MeshError,
    RateLimitedError,
    error_class,
)

CONTENT_TYPE: Final = "Content-Type"
MSG_TYPE: Final = "Mesh-Msg-Type"
SENDER: Final = "Mesh-Sender"
TOPIC: Final = "Mesh-Topic"
REQUEST_ID: Final = "Mesh-Request-Id"
TIMEOUT_MS: Final = "Mesh-Timeout-Ms"
AUTHORIZATION: Final = "Authorization"
TRACEPARENT: Final = "traceparent"
TRACESTATE: Final = "tracestate"
RETRY_AFTER_MS: Final = "Retry-After-Ms"
#: The placement revision the gateway forwarded under: the activation's epoch.
EPOCH: Final = "Mesh-Placement-Epoch"
#: The authenticated client a request came from, set by the gateway (never by callers).
CLIENT: Final = "Mesh-Client"
SERVICE_ERROR_CODE: Final = "Nats-Service-Error-Code"
SERVICE_ERROR: Final = "Nats-Service-Error"
MSG_ID: Final = "Nats-Msg-Id"

#: Headers a hop passes on unchanged to the next one.
FORWARDED_HEADERS: Final[tuple[str, ...]] = (
    CONTENT_TYPE,
    MSG_TYPE,
    SENDER,
    TOPIC,
    REQUEST_ID,
    TRACEPARENT,
    TRACESTATE,
)


def new_request_id() -> str:
    """A fresh request id."""
    return uuid.uuid4().hex


def request_codec(headers: Mapping[str, str] | None) -> Codec:
    """The codec a request asked for (JSON when it named none)."""
    return codec_for((headers or {}).get(CONTENT_TYPE))


def reply_codec(headers: Mapping[str, str] | None) -> Codec:
    """The codec for a reply to a request: the request's own, or JSON if it was unusable."""
    try:
        return request_codec(headers)
    except UnsupportedContentTypeError:
        return JSON_CODEC


def parse_timeout(headers: Mapping[str, str] | None, default: float, maximum: float) -> float:
    """The request's deadline in seconds from ``Mesh-Timeout-Ms``, capped at `maximum`.

    Raises:
        BadRequestError: The header is not a positive whole number of milliseconds.
    """
    raw = (headers or {}).get(TIMEOUT_MS)
    if raw is None or raw == "":
        return min(default, maximum)
    digits = raw[1:] if raw.startswith("-") else raw
    if not (digits.isascii() and digits.isdigit()):
        raise BadRequestError(f"{TIMEOUT_MS} must be whole milliseconds, not {raw!r}")
    millis = int(raw)
    if millis <= 0:
        raise BadRequestError(f"{TIMEOUT_MS} must be positive, not {millis}")
    return min(millis / 1000.0, maximum)


#: The deadline of the request being handled in this task, so that what the handler
#: sends on its behalf gives up no later than its caller does.
current_deadline: ContextVar[Deadline | None] = ContextVar("mesh_current_deadline", default=None)


class Deadline:
    """A point in (monotonic) time after which nobody waits for the reply."""

    __slots__ = ("_at",)

    def __init__(self, seconds: float) -> None:
        self._at = time.monotonic() + seconds

    def remaining(self) -> float:
        """Seconds left, never negative."""
        return max(0.0, self._at - time.monotonic())

    def expired(self) -> bool:
        return self.remaining() <= 0.0

    def header_value(self) -> str:
        """The remaining time as a ``Mesh-Timeout-Ms`` value (at least 1)."""
        return str(max(1, int(self.remaining() * 1000)))


def error_body(error: MeshError) -> dict[str, Any]:
    """The protocol's error body for `error`."""
    detail: dict[str, Any] = {
        "code": int(error.code),
        "type": error.wire_type,
        "message": error.message,
        "request_id": error.request_id,
    }
    if isinstance(error, ConflictError) and error.current_version is not None:
        detail["current_version"] = error.current_version
    return {"error": detail}


def error_reply(
    error: MeshError, request_headers: Mapping[str, str] | None
) -> tuple[bytes, dict[str, str]]:
    """Body and headers of an error reply, in the request's content type."""
    codec = reply_codec(request_headers)
    headers = {
        CONTENT_TYPE: codec.content_type,
        SERVICE_ERROR_CODE: str(int(error.code)),
        SERVICE_ERROR: error.message[:1024].replace("\r", " ").replace("\n", " "),
    }
    if error.request_id:
        headers[REQUEST_ID] = error.request_id
    if isinstance(error, RateLimitedError) and error.retry_after is not None:
        headers[RETRY_AFTER_MS] = str(max(0, int(error.retry_after * 1000)))
    return codec.dumps(error_body(error)), headers


def error_from_reply(data: bytes, headers: Mapping[str, str] | None) -> MeshError | None:
    """The error a reply carries, or ``None`` for a successful reply."""
    headers = headers or {}
    raw_code = headers.get(SERVICE_ERROR_CODE)
    if raw_code is None:
        return None
    try:
        code = int(raw_code)
    except ValueError:
        code = 500
    try:
        body = decode_plain(data, reply_codec(headers))
    except DecodeError:
        body = None
    detail = body.get("error") if isinstance(body, dict) else None
    retry_ms = headers.get(RETRY_AFTER_MS)
    retry_after = (
        int(retry_ms) / 1000.0 if retry_ms and retry_ms.isascii() and retry_ms.isdigit() else None
    )
    return _error(
        code,
        detail if isinstance(detail, dict) else {},
        message=headers.get(SERVICE_ERROR, ""),
        request_id=headers.get(REQUEST_ID),
        retry_after=retry_after,
    )


def error_from_body(body: Any) -> MeshError | None:
    """The error in an error body (`error_body`'s form, e.g. one result of a batch), or
    ``None`` when `body` is not one."""
    detail = body.get("error") if isinstance(body, dict) else None
    if not isinstance(detail, dict):
        return None
    code = detail.get("code")
    return _error(code if isinstance(code, int) else 500, detail)


def _error(
    code: int,
    detail: Mapping[str, Any],
    *,
    message: str = "",
    request_id: str | None = None,
    retry_after: float | None = None,
) -> MeshError:
    """The typed error for `code` and an error body's `detail` (which wins over the
    headers' `message` and `request_id`)."""
    message = str(detail.get("message") or message)
    wire_type = detail.get("type")
    request_id = detail.get("request_id") or request_id
    current_version = detail.get("current_version")
    cls = error_class(code, wire_type if isinstance(wire_type, str) else None)
    error: MeshError
    if cls is RateLimitedError:
        error = RateLimitedError(message, retry_after=retry_after, request_id=request_id)
    elif cls is ConflictError:
        error = ConflictError(
            message,
            current_version=current_version if isinstance(current_version, int) else None,
            request_id=request_id,
        )
    else:
        error = cls(message, request_id=request_id)
    error.remote = True
    return error
