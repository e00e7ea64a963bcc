"""Errors raised by mesh, one class per protocol error code.

The tree::

    MeshError                       any error mesh raises
    ├── BadRequestError             400
    │   ├── InvalidIdError          400  an agent id, topic id or name breaks the rules
    │   ├── DecodeError             400  a payload could not be decoded or validated
    │   └── UnknownMessageTypeError 400  the agent has no handler for the message type
    ├── UnauthorizedError           401
    ├── ForbiddenError              403
    ├── AgentTypeNotFoundError      404
    ├── WorkerNotRegisteredError    404  a heartbeat from a worker the registry lost
    ├── StateNotFoundError          404  no saved state for the agent (or that version)
    ├── ConflictError               409  a state write lost to another (`current_version`)
    │   └── FencedError             409  the writer no longer owns the agent's placement
    ├── PayloadTooLargeError        413
    ├── RateLimitedError            429
    ├── HandlerError                500  the agent's handler raised
    ├── StateCorruptError           500  saved state failed its integrity check
    ├── NoWorkerAvailableError      503
    ├── DeadlineExceededError       504
    └── MeshConnectionError         no code: NATS itself could not be reached

Each class carries its `code` (an `ErrorCode`) and the `type` name that error replies
put on the wire (``{"error": {"code": 404, "type": "AgentTypeNotFound", ...}}``).
"""

from __future__ import annotations

from enum import IntEnum
from typing import ClassVar


class ErrorCode(IntEnum):
    """The protocol's error codes (docs/protocol.md, "Replies and errors")."""

    BAD_REQUEST = 400
    UNAUTHORIZED = 401
    FORBIDDEN = 403
    NOT_FOUND = 404
    CONFLICT = 409
    PAYLOAD_TOO_LARGE = 413
    RATE_LIMITED = 429
    HANDLER_FAILED = 500
    UNAVAILABLE = 503
    DEADLINE_EXCEEDED = 504


class MeshError(Exception):
    """Root of every error mesh raises.

    Attributes:
        message: What went wrong, for people.
        code: The protocol error code.
        request_id: The `Mesh-Request-Id` of the request that failed, when known.
        remote: Whether a call to another agent or service failed with it (an error
            reply, or no reply), rather than this process raising it.
    """

    code: ClassVar[ErrorCode] = ErrorCode.HANDLER_FAILED
    wire_type: ClassVar[str] = "MeshError"

    def __init__(self, message: str, *, request_id: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.request_id = request_id
        self.remote = False

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        if "wire_type" not in cls.__dict__:
            cls.wire_type = cls.__name__.removesuffix("Error")

    def __str__(self) -> str:
        return f"{int(self.code)} {self.wire_type}: {self.message}"


class BadRequestError(MeshError):
    """The request is malformed (400)."""

    code = ErrorCode.BAD_REQUEST


class InvalidIdError(BadRequestError):
    """An agent id, topic id, worker id or prefix breaks the naming rules (400)."""


class DecodeError(BadRequestError):
    """A payload could not be decoded or did not validate against its model (400).

    Attributes:
        content_type: The content type that was being decoded.
    """

    wire_type = "InvalidPayload"

    def __init__(
        self, message: str, *, content_type: str | None = None, request_id: str | None = None
    ) -> None:
        super().__init__(message, request_id=request_id)
        self.content_type = content_type


class UnknownMessageTypeError(BadRequestError):
    """The agent type has no handler for the message type (400)."""


class UnauthorizedError(MeshError):
    """Credentials are missing or invalid (401)."""

    code = ErrorCode.UNAUTHORIZED


class ForbiddenError(MeshError):
    """Credentials are valid but do not allow this call (403)."""

    code = ErrorCode.FORBIDDEN


class AgentTypeNotFoundError(MeshError):
    """No worker has registered the agent type (404)."""

    code = ErrorCode.NOT_FOUND


class WorkerNotRegisteredError(MeshError):
    """A heartbeat or deregistration named a worker the registry does not hold (404)."""

    code = ErrorCode.NOT_FOUND


class StateNotFoundError(MeshError):
    """No state is saved for the agent, or not the version asked for (404)."""

    code = ErrorCode.NOT_FOUND


class ConflictError(MeshError):
    """A state write found another version than the one it expected (409).

    Attributes:
        current_version: The version saved now (0 when there is none), when known.
    """

    code = ErrorCode.CONFLICT
    wire_type = "StateConflict"

    def __init__(
        self,
        message: str,
        *,
        current_version: int | None = None,
        request_id: str | None = None,
    ) -> None:
        super().__init__(message, request_id=request_id)
        self.current_version = current_version


class FencedError(ConflictError):
    """A worker wrote state for an agent whose placement has moved on (409): it is a
    stale owner (paused, partitioned) and its write is refused."""

    wire_type = "Fenced"


class PayloadTooLargeError(MeshError):
    """The payload is over the configured limit (413)."""

    code = ErrorCode.PAYLOAD_TOO_LARGE


class RateLimitedError(MeshError):
    """The caller is rate limited (429).

    Attributes:
        retry_after: Seconds after which a retry may succeed, when known.
    """

    code = ErrorCode.RATE_LIMITED

    def __init__(
        self, message: str, *, retry_after: float | None = None, request_id: str | None = None
    ) -> None:
        super().__init__(message, request_id=request_id)
        self.retry_after = retry_after


class HandlerError(MeshError):
    """The agent's handler raised; the traceback stays in the worker's log (500)."""

    code = ErrorCode.HANDLER_FAILED
    wire_type = "HandlerFailed"


class StateCorruptError(MeshError):
    """Saved state does not match its checksum; it is never handed out (500)."""

    code = ErrorCode.HANDLER_FAILED


class NoWorkerAvailableError(MeshError):
    """The agent type is known but no healthy worker can take the request (503)."""

    code = ErrorCode.UNAVAILABLE
    wire_type = "Unavailable"


class DeadlineExceededError(MeshError):
    """The request's deadline passed before a reply came (504)."""

    code = ErrorCode.DEADLINE_EXCEEDED


class MeshConnectionError(MeshError):
    """NATS could not be reached, or the connection was lost."""

    code = ErrorCode.UNAVAILABLE
    wire_type = "ConnectionFailed"


_BY_WIRE_TYPE: dict[str, type[MeshError]] = {}
_BY_CODE: dict[int, type[MeshError]] = {}


def _index(cls: type[MeshError]) -> None:
    _BY_WIRE_TYPE.setdefault(cls.wire_type, cls)
    # Parents before children: the class kept for a code is the most general one.
    _BY_CODE.setdefault(int(cls.code), cls)
    for sub in cls.__subclasses__():
        _index(sub)


def error_class(code: int, wire_type: str | None = None) -> type[MeshError]:
    """The error class for a reply's code and type name, most specific first."""
    if not _BY_WIRE_TYPE:
        for sub in MeshError.__subclasses__():
            _index(sub)
    if wire_type is not None and wire_type in _BY_WIRE_TYPE:
        found = _BY_WIRE_TYPE[wire_type]
        if int(found.code) == code:
            return found
    return _BY_CODE.get(code, MeshError)
