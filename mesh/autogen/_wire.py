"""AutoGen messages on mesh's wire.

A message is serialized by AutoGen's `SerializationRegistry`, as AutoGen's own
runtimes do; its type name travels in ``Mesh-Msg-Type`` and its encoding (JSON, or
protobuf for protobuf messages) in ``Content-Type``. A reply without ``Mesh-Msg-Type``
is ``None``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from autogen_core import (
    JSON_DATA_CONTENT_TYPE,
    PROTOBUF_DATA_CONTENT_TYPE,
    MessageSerializer,
    try_get_known_serializers_for_type,
)
from autogen_core._serialization import SerializationRegistry

from mesh._wire import CONTENT_TYPE, MSG_TYPE
from mesh.autogen._polymorphic import polymorphic
from mesh.errors import DecodeError, UnknownMessageTypeError

#: Reserved message types: an agent's state, read and written in its own mailbox.
SAVE_STATE = "mesh.autogen.SaveState"
LOAD_STATE = "mesh.autogen.LoadState"

_ENCODINGS = (JSON_DATA_CONTENT_TYPE, PROTOBUF_DATA_CONTENT_TYPE)


class AutogenCodec:
    """Encodes and decodes AutoGen messages with a runtime's serializers.

    Args:
        registry: The runtime's serializers.
        preferred: The encoding used when a type has serializers for several.
    """

    def __init__(self, registry: SerializationRegistry, preferred: str) -> None:
        if preferred not in _ENCODINGS:
            raise ValueError(f"payload format must be one of {_ENCODINGS}, not {preferred!r}")
        self.registry = registry
        self._preferred = preferred

    def add(self, serializers: MessageSerializer[Any] | Sequence[MessageSerializer[Any]]) -> None:
        """Use these serializers (pydantic ones read nested AgentChat messages back as
        their own classes: `PolymorphicJsonSerializer`)."""
        if not isinstance(serializers, Sequence):
            serializers = [serializers]
        self.registry.add_serializer([polymorphic(s) for s in serializers])

    def encode(self, message: Any) -> tuple[bytes, dict[str, str]]:
        """The body and headers of `message`; ``None`` is an empty body with no type.

        Raises:
            ValueError: No serializer knows the message's type.
        """
        if message is None:
            return b"", {CONTENT_TYPE: self._preferred}
        type_name = self.registry.type_name(message)
        content_type = self._encoding(type_name)
        if content_type is None:
            # Replies and published types need no registration when AutoGen can
            # serialize them by their class (dataclasses, pydantic, protobuf).
            self.add(try_get_known_serializers_for_type(type(message)))
            content_type = self._encoding(type_name)
        if content_type is None:
            raise ValueError(
                f"no serializer for message type {type_name!r}: add one with"
                " runtime.add_message_serializer(...)"
            )
        data = self.registry.serialize(message, type_name=type_name, data_content_type=content_type)
        return data, {CONTENT_TYPE: content_type, MSG_TYPE: type_name}

    def decode(self, data: bytes, headers: dict[str, str]) -> Any:
        """The message `data` and `headers` carry.

        Raises:
            UnknownMessageTypeError: No serializer here knows its type (400).
            DecodeError: It does not decode as its type (400).
        """
        type_name = headers.get(MSG_TYPE)
        if not type_name:
            return None
        content_type = (headers.get(CONTENT_TYPE) or JSON_DATA_CONTENT_TYPE).split(";")[0].strip()
        if not self.registry.is_registered(type_name, content_type):
            raise UnknownMessageTypeError(
                f"no serializer here for message type {type_name!r} as {content_type}"
            )
        try:
            return self.registry.deserialize(
                data, type_name=type_name, data_content_type=content_type
            )
        except Exception as exc:
            raise DecodeError(f"{type_name} does not decode: {exc}") from exc

    def _encoding(self, type_name: str) -> str | None:
        if self.registry.is_registered(type_name, self._preferred):
            return self._preferred
        for content_type in _ENCODINGS:
            if self.registry.is_registered(type_name, content_type):
                return content_type
        return None
