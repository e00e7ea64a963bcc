"""mesh's error replies as the exceptions AutoGen code expects."""

from __future__ import annotations

from autogen_core.exceptions import CantHandleException, UndeliverableException

from mesh.errors import AgentTypeNotFoundError, HandlerError, MeshError, UnknownMessageTypeError


class AgentHandlerError(Exception):
    """The recipient's handler raised, in whichever process it ran.

    ``str()`` is ``"<ExceptionType>: <message>"``, as the handler raised it.

    Attributes:
        exception_type: The name of the exception's class (``ValueError``...).
        detail: Its message.
        request_id: The request's ``Mesh-Request-Id``, to find it in the worker's log.
    """

    def __init__(self, message: str, request_id: str | None = None) -> None:
        super().__init__(message)
        name, sep, detail = message.partition(": ")
        self.exception_type = name if sep and name.isidentifier() else "Exception"
        self.detail = detail if sep else message
        self.request_id = request_id


def autogen_error(error: MeshError) -> Exception:
    """The exception `send_message` raises for a failed request.

    Unknown agent types are `UndeliverableException`, message types the recipient has
    no handler for are `CantHandleException`, a raising handler is `AgentHandlerError`;
    anything else (503, 504, 429...) is the `MeshError` itself.
    """
    if isinstance(error, AgentTypeNotFoundError):
        return UndeliverableException(error.message)
    if isinstance(error, UnknownMessageTypeError) or error.wire_type == "UnknownMessageType":
        return CantHandleException(error.message)
    if isinstance(error, HandlerError) or error.wire_type == "HandlerFailed":
        return AgentHandlerError(error.message, error.request_id)
    return error
