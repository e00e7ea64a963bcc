"""Subscriptions, as in AutoGen: which agents receive an event published on a topic.

- `TypeSubscription(topic_type, agent_type)`: an event on ``TopicId(t, s)`` with
  ``t == topic_type`` goes to ``AgentId(agent_type, s)``.
- `TypePrefixSubscription(prefix, agent_type)`: the same for every ``t`` that starts
  with ``prefix`` (a string prefix, not only on dot boundaries).
- `DefaultSubscription(agent_type)`: a type subscription to topic type ``default``.

Each maps to the narrowest NATS subject filter that covers it (`subject_filter`);
whatever the filter cannot express is checked exactly by `matches`. Agent classes
declare theirs with the class decorators `type_subscription`,
`type_prefix_subscription` and `default_subscription`.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from datetime import datetime
from typing import Literal, TypeVar

from pydantic import BaseModel, Field

from mesh.errors import InvalidIdError
from mesh.ids import TOPIC_TYPE_PATTERN, TopicId, validate_agent_type, validate_topic_type
from mesh.subjects import Subjects, escape_token

SubscriptionKind = Literal["type", "prefix"]
_ID_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,64}")
DEFAULT_TOPIC_TYPE = "default"

C = TypeVar("C", bound=type)


class Subscription(BaseModel):
    """One subscription, as kept in ``mesh-subscriptions`` under its id."""

    id: str = ""
    kind: SubscriptionKind
    topic: str = Field(description="the topic type, or the prefix of topic types")
    agent_type: str
    created_at: datetime | None = None
    expires_at: datetime | None = None

    def model_post_init(self, context: object) -> None:
        validate_agent_type(self.agent_type)
        if self.kind == "type":
            validate_topic_type(self.topic)
        else:
            validate_prefix(self.topic)
        if not self.id:
            self.id = self.stable_id()
        elif not _ID_PATTERN.fullmatch(self.id):
            raise InvalidIdError(f"invalid subscription id {self.id!r}")

    def stable_id(self) -> str:
        """The same id for the same subscription, so that declaring it twice is harmless."""
        digest = hashlib.sha256(f"{self.kind}\0{self.topic}\0{self.agent_type}".encode())
        return f"{self.kind}-{digest.hexdigest()[:24]}"

    def matches(self, topic: TopicId) -> bool:
        """Whether an event on `topic` is for this subscription's agent type."""
        if self.kind == "type":
            return topic.type == self.topic
        return topic.type.startswith(self.topic)

    def subject_filter(self, subjects: Subjects) -> str:
        """The narrowest subject filter that covers every matching event subject."""
        events = f"{subjects.prefix}.events"
        segments = self.topic.split(".")
        if self.kind == "type":
            return ".".join([events, *(escape_token(s) for s in segments), "*"])
        # Whole segments of the prefix narrow the filter; a partial last one cannot.
        whole = segments[:-1]
        if not whole:
            return f"{events}.>"
        return ".".join([events, *(escape_token(s) for s in whole), ">"])

    def is_expired(self, now: datetime) -> bool:
        return self.expires_at is not None and now >= self.expires_at


def validate_prefix(prefix: str) -> str:
    """A topic type prefix: topic type characters, no empty segment but a trailing one."""
    if (
        not isinstance(prefix, str)
        or not TOPIC_TYPE_PATTERN.fullmatch(prefix)
        or "" in prefix.split(".")[:-1]
    ):
        raise InvalidIdError(f"invalid topic type prefix {prefix!r}")
    return prefix


def TypeSubscription(topic_type: str, agent_type: str) -> Subscription:
    """Events on topic type `topic_type` go to ``AgentId(agent_type, source)``."""
    return Subscription(kind="type", topic=topic_type, agent_type=agent_type)


def TypePrefixSubscription(prefix: str, agent_type: str) -> Subscription:
    """Events on topic types starting with `prefix` go to ``AgentId(agent_type, source)``."""
    return Subscription(kind="prefix", topic=prefix, agent_type=agent_type)


def DefaultSubscription(agent_type: str) -> Subscription:
    """Events on topic type ``default`` go to ``AgentId(agent_type, source)``."""
    return TypeSubscription(DEFAULT_TOPIC_TYPE, agent_type)


_DECLARED = "__mesh_subscriptions__"


def _declare(kind: SubscriptionKind, topic: str) -> Callable[[C], C]:
    def decorate(cls: C) -> C:
        own = cls.__dict__.get(_DECLARED, ())  # this class's own, not inherited
        setattr(cls, _DECLARED, (*own, (kind, topic)))
        return cls

    return decorate


def type_subscription(topic_type: str) -> Callable[[C], C]:
    """Class decorator: the agent type receives events on `topic_type`."""
    validate_topic_type(topic_type)
    return _declare("type", topic_type)


def type_prefix_subscription(prefix: str) -> Callable[[C], C]:
    """Class decorator: the agent type receives events on topic types starting `prefix`."""
    validate_prefix(prefix)
    return _declare("prefix", prefix)


def default_subscription(cls: C) -> C:
    """Class decorator: the agent type receives events on topic type ``default``."""
    return _declare("type", DEFAULT_TOPIC_TYPE)(cls)


def declared_subscriptions(cls: type, agent_type: str) -> list[Subscription]:
    """The subscriptions an agent class declared with the decorators."""
    found: dict[tuple[str, str], None] = {}
    for klass in reversed(cls.__mro__):  # every base's declarations, each once
        for declaration in klass.__dict__.get(_DECLARED, ()):
            found[declaration] = None
    return [Subscription(kind=kind, topic=topic, agent_type=agent_type) for kind, topic in found]
