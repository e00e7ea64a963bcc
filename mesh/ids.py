"""Agent and topic identities, validated as docs/protocol.md ("Names") says."""

from __future__ import annotations

import re
from dataclasses import dataclass

from mesh.errors import InvalidIdError

AGENT_TYPE_PATTERN = re.compile(r"[A-Za-z0-9_.\-]{1,64}")
TOPIC_TYPE_PATTERN = re.compile(r"[A-Za-z0-9_.:=\-]{1,128}")
MAX_KEY_LENGTH = 128


def validate_agent_type(agent_type: str) -> str:
    """Return `agent_type` if it is 1-64 chars of ``[A-Za-z0-9_.-]``, else raise."""
    if not isinstance(agent_type, str) or not AGENT_TYPE_PATTERN.fullmatch(agent_type):
        raise InvalidIdError(
            f"invalid agent type {agent_type!r}: use 1-64 characters of A-Z a-z 0-9 _ . -"
        )
    return agent_type


def validate_key(key: str, *, what: str = "agent key") -> str:
    """Return `key` if it is 1-128 printable characters, else raise."""
    if not isinstance(key, str) or not 1 <= len(key) <= MAX_KEY_LENGTH:
        raise InvalidIdError(f"invalid {what} {key!r}: use 1-{MAX_KEY_LENGTH} characters")
    if not key.isprintable():
        raise InvalidIdError(f"invalid {what} {key!r}: control and separator characters")
    return key


def validate_topic_type(topic_type: str) -> str:
    """Return `topic_type` if valid: 1-128 chars of ``[A-Za-z0-9_.:=-]``, no empty segment."""
    if (
        not isinstance(topic_type, str)
        or not TOPIC_TYPE_PATTERN.fullmatch(topic_type)
        or "" in topic_type.split(".")
    ):
        raise InvalidIdError(
            f"invalid topic type {topic_type!r}: use 1-128 characters of A-Z a-z 0-9 _ . : = -"
            " with no empty dot-separated segment"
        )
    return topic_type


@dataclass(frozen=True, slots=True)
class AgentId:
    """The identity of one agent: its type and its key, written ``type/key``.

    Raises:
        InvalidIdError: The type or key breaks the naming rules.
    """

    type: str
    key: str

    def __post_init__(self) -> None:
        validate_agent_type(self.type)
        validate_key(self.key)

    @classmethod
    def parse(cls, text: str) -> AgentId:
        """Parse ``type/key``; the key may itself contain ``/``."""
        agent_type, sep, key = text.partition("/")
        if not sep:
            raise InvalidIdError(f"invalid agent id {text!r}: expected 'type/key'")
        return cls(agent_type, key)

    def __str__(self) -> str:
        return f"{self.type}/{self.key}"


@dataclass(frozen=True, slots=True)
class TopicId:
    """The identity of a topic: a dotted type and a source, written ``type/source``.

    Raises:
        InvalidIdError: The type or source breaks the naming rules.
    """

    type: str
    source: str

    def __post_init__(self) -> None:
        validate_topic_type(self.type)
        validate_key(self.source, what="topic source")

    @classmethod
    def parse(cls, text: str) -> TopicId:
        """Parse ``type/source``; the source may itself contain ``/``."""
        topic_type, sep, source = text.partition("/")
        if not sep:
            raise InvalidIdError(f"invalid topic id {text!r}: expected 'type/source'")
        return cls(topic_type, source)

    def __str__(self) -> str:
        return f"{self.type}/{self.source}"
