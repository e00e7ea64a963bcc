"""The durable consumer through which an agent type's workers read its events.

The router keeps one per subscribing agent type, ``<prefix>-deliver-<type>`` on
``MESH_EVENTS``:

- filtered by the narrowest subjects that cover the type's subscriptions;
- with the ``pinned_client`` priority policy, so that one of the type's workers at a
  time reads it: events of one source then reach their agent in stream order however
  many workers there are, and a standby takes over when the reader stops pulling;
- carrying, in its metadata, the subscriptions its filters were made from and the
  delivery settings (tries, retry delay, handler deadline), so that workers match
  exactly what the filters admit and all follow the router's settings.

The JetStream API is used directly: nats-py's consumer config knows no priority groups.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import orjson
from nats.aio.client import Client as NATS
from pydantic import TypeAdapter

from mesh._consume import consumer_api
from mesh.config import EventsConfig
from mesh.subjects import Subjects, escape_token
from mesh.subscriptions import Subscription

logger = logging.getLogger(__name__)

#: The one priority group of every delivery consumer.
PRIORITY_GROUP = "mesh"
SUBSCRIPTIONS_KEY = "mesh_subscriptions"
SETTINGS_KEY = "mesh_delivery"
_NOT_FOUND = 10014  # JetStream's error code for "consumer not found"
_SUBSCRIPTIONS = TypeAdapter(list[Subscription])


class ConsumerSetupError(Exception):
    """JetStream refused to create, update or describe a delivery consumer."""


def durable_name(subjects: Subjects, agent_type: str) -> str:
    return f"{subjects.prefix}-deliver-{escape_token(agent_type)}"


@dataclass(frozen=True, slots=True)
class DeliverySettings:
    """How the workers deliver: tries before the dead letter, the first retry's delay
    (doubling after), one delivery's deadline, and the pin's timeout (a worker pulls
    more often than that)."""

    max_deliveries: int
    retry_delay: float
    handler_timeout: float
    pin_timeout: float

    @classmethod
    def of(cls, config: EventsConfig) -> DeliverySettings:
        return cls(
            config.max_deliveries, config.retry_delay, config.handler_timeout, config.pin_timeout
        )


@dataclass(frozen=True, slots=True)
class ConsumerView:
    """What a delivery consumer admits, as read from the server at `read_at`
    (`time.monotonic`)."""

    subscriptions: list[Subscription]
    settings: DeliverySettings
    read_at: float


async def _api(nc: NATS, subject: str, body: bytes, timeout: float) -> dict[str, object]:
    reply = await nc.request(subject, body, timeout=timeout)
    answer: dict[str, object] = orjson.loads(reply.data)
    return answer


def _error(answer: dict[str, object]) -> dict[str, object] | None:
    error = answer.get("error")
    return error if isinstance(error, dict) else None


async def _info(nc: NATS, stream: str, durable: str, timeout: float) -> dict[str, object] | None:
    """The consumer's info; None when it (or its stream) does not exist."""
    answer = await _api(nc, consumer_api("INFO", stream, durable), b"", timeout)
    error = _error(answer)
    if error is None:
        return answer
    if error.get("err_code") == _NOT_FOUND or error.get("code") == 404:
        return None
    raise ConsumerSetupError(str(error.get("description", error)))


async def read_consumer(
    nc: NATS, subjects: Subjects, agent_type: str, timeout: float = 5.0
) -> ConsumerView | None:
    """The subscriptions and settings a type's delivery consumer carries; None when
    there is no such consumer (nobody subscribed the type)."""
    asked_at = time.monotonic()
    answer = await _info(nc, subjects.stream("events"), durable_name(subjects, agent_type), timeout)
    if answer is None:
        return None
    config = answer.get("config")
    metadata = config.get("metadata") if isinstance(config, dict) else None
    if not isinstance(metadata, dict) or SUBSCRIPTIONS_KEY not in metadata:
        return None  # not one of ours (or from before priority groups): not to be read
    settings = orjson.loads(metadata.get(SETTINGS_KEY, "{}"))
    default = DeliverySettings.of(EventsConfig())
    return ConsumerView(
        _SUBSCRIPTIONS.validate_json(metadata[SUBSCRIPTIONS_KEY]),
        DeliverySettings(
            int(settings.get("max_deliveries", default.max_deliveries)),
            float(settings.get("retry_delay", default.retry_delay)),
            float(settings.get("handler_timeout", default.handler_timeout)),
            float(settings.get("pin_timeout", default.pin_timeout)),
        ),
        asked_at,
    )


def covering_filters(filters: Sequence[str]) -> list[str]:
    """The filters without those another one covers (JetStream refuses overlaps)."""
    unique = sorted(set(filters))
    return [f for f in unique if not any(g != f and _covers(g, f) for g in unique)]


def _covers(wide: str, narrow: str) -> bool:
    wide_tokens, narrow_tokens = wide.split("."), narrow.split(".")
    for i, token in enumerate(wide_tokens):
        if token == ">":
            return len(narrow_tokens) > i
        if i >= len(narrow_tokens):
            return False
        if token != "*" and token != narrow_tokens[i]:
            return False
        if token == "*" and narrow_tokens[i] == ">":
            return False
    return len(wide_tokens) == len(narrow_tokens)


class EventConsumer:
    """The router's hold on one agent type's delivery consumer.

    Args:
        nc: The connection.
        subjects: The mesh's names.
        agent_type: Whose events.
        config: Acknowledgement wait, pending limits, the pin's timeout, and the
            delivery settings handed to workers.
    """

    def __init__(self, nc: NATS, subjects: Subjects, agent_type: str, config: EventsConfig):
        self._nc = nc
        self._subjects = subjects
        self._stream = subjects.stream("events")
        self.agent_type = agent_type
        self._config = config
        self.durable = durable_name(subjects, agent_type)
        #: The subscriptions the consumer's filters were last made from, once the
        #: server has them: an event published after that reaches the type.
        self.subscriptions: list[Subscription] = []
        self._applied: dict[str, object] | None = None

    def _wanted(self, subscriptions: Sequence[Subscription]) -> dict[str, object]:
        config = self._config
        filters = covering_filters([s.subject_filter(self._subjects) for s in subscriptions])
        ordered = sorted(subscriptions, key=lambda s: s.id)
        return {
            "durable_name": self.durable,
            "description": f"events for agent type {self.agent_type}",
            "ack_policy": "explicit",
            "deliver_policy": "new",
            "filter_subjects": filters,
            "ack_wait": int(config.ack_wait * 1e9),
            "max_ack_pending": config.max_ack_pending,
            "priority_groups": [PRIORITY_GROUP],
            "priority_policy": "pinned_client",
            "priority_timeout": int(config.pin_timeout * 1e9),
            "metadata": {
                SUBSCRIPTIONS_KEY: _SUBSCRIPTIONS.dump_json(ordered).decode(),
                SETTINGS_KEY: orjson.dumps(DeliverySettings.of(config)).decode(),
            },
        }

    async def update(self, subscriptions: Sequence[Subscription]) -> bool:
        """Make the consumer admit these subscriptions' events (creating it if absent);
        whether that changed anything on the server."""
        wanted = self._wanted(subscriptions)
        changed = wanted != self._applied
        if changed:
            await self._apply(wanted)
            await self._leader_elected()
            self._applied = wanted  # only once the server has it: a failure is retried
        self.subscriptions = list(subscriptions)
        return changed

    async def _create(self, config: dict[str, object]) -> dict[str, object] | None:
        """Create or update the consumer; JetStream's error, if it refused."""
        body = orjson.dumps({"stream_name": self._stream, "config": config})
        answer = await _api(self._nc, self._api("CREATE"), body, 5.0)
        return _error(answer)

    async def _apply(self, config: dict[str, object]) -> None:
        error = await self._create(config)
        if error is None:
            return
        description = str(error.get("description", ""))
        if "priority" not in description.lower():
            raise ConsumerSetupError(f"consumer {self.durable}: {description}")
        # Made by a mesh from before priority groups, which cannot be changed into one
        # with them: replace it, starting where it had got to.
        start = await self._resume_point()
        logger.warning("replacing delivery consumer %s (%s)", self.durable, description)
        await self.delete()
        if start is not None:
            config = {**config, "deliver_policy": "by_start_sequence", "opt_start_seq": start}
        error = await self._create(config)
        if error is not None:
            raise ConsumerSetupError(f"consumer {self.durable}: {error.get('description')}")

    def _api(self, op: str) -> str:
        return consumer_api(op, self._stream, self.durable)

    async def _resume_point(self) -> int | None:
        answer = await _info(self._nc, self._stream, self.durable, 5.0)
        floor = answer.get("ack_floor") if answer is not None else None
        if isinstance(floor, dict) and isinstance(floor.get("stream_seq"), int):
            return int(floor["stream_seq"]) + 1
        return None

    async def _leader_elected(self, timeout: float = 5.0) -> None:
        """In a cluster, wait until the consumer has a leader: a consumer that delivers
        new events only starts counting from there."""
        deadline = time.monotonic() + timeout
        subject = self._api("INFO")
        while time.monotonic() < deadline:
            answer = await _api(self._nc, subject, b"", 5.0)
            cluster = answer.get("cluster")
            if _error(answer) is None and (not isinstance(cluster, dict) or cluster.get("leader")):
                return
            await asyncio.sleep(0.05)

    async def exists(self) -> bool:
        """Whether the server still has the consumer (it may be deleted behind our back)."""
        return await _info(self._nc, self._stream, self.durable, 5.0) is not None

    def forget(self) -> None:
        """The consumer is gone: the next `update` creates it again."""
        self._applied = None

    async def delete(self) -> None:
        await _api(self._nc, self._api("DELETE"), b"", 5.0)
        self._applied = None
