"""Pydantic messages whose fields hold AgentChat messages, across processes.

AgentChat's group chat events (``GroupChatStart``, ``GroupChatAgentResponse``...)
have fields typed with the abstract ``BaseChatMessage``; AutoGen's pydantic
serializer writes the concrete message but cannot read it back, which is why
AgentChat teams do not run on a serializing runtime. Every AgentChat message names
its class in its ``type`` field, so this serializer reads such objects back as
that class.
"""

from __future__ import annotations

import inspect
from typing import Any

import orjson
from autogen_core import MessageSerializer
from autogen_core._serialization import PydanticJsonMessageSerializer


class PolymorphicJsonSerializer(PydanticJsonMessageSerializer[Any]):
    """AutoGen's pydantic JSON serializer; nested AgentChat messages keep their class."""

    def deserialize(self, payload: bytes) -> Any:
        classes = _message_classes()
        if not classes:
            return super().deserialize(payload)
        return self.cls.model_validate(_revive(orjson.loads(payload), classes))


def polymorphic(serializer: MessageSerializer[Any]) -> MessageSerializer[Any]:
    """`serializer`, or its polymorphic stand-in for AutoGen's pydantic serializer."""
    if type(serializer) is PydanticJsonMessageSerializer:
        return PolymorphicJsonSerializer(serializer.cls)
    return serializer


def _message_classes() -> dict[str, type[Any]]:
    """Every concrete AgentChat message class imported so far, by class name."""
    try:
        from autogen_agentchat.messages import BaseAgentEvent, BaseChatMessage
    except ImportError:
        return {}
    found: dict[str, type[Any]] = {}
    pending: list[type[Any]] = [BaseChatMessage, BaseAgentEvent]
    while pending:
        cls = pending.pop()
        pending.extend(cls.__subclasses__())
        if not inspect.isabstract(cls):
            found.setdefault(cls.__name__, cls)
    return found


def _revive(value: Any, classes: dict[str, type[Any]]) -> Any:
    if isinstance(value, dict):
        kind = value.get("type")
        if isinstance(kind, str) and kind in classes:
            return classes[kind].model_validate(value)
        return {key: _revive(item, classes) for key, item in value.items()}
    if isinstance(value, list):
        return [_revive(item, classes) for item in value]
    return value
