"""Delivering one agent type's events from JetStream to its agents.

One durable pull consumer per subscribing agent type reads ``MESH_EVENTS`` through
the narrowest filters that cover the type's subscriptions. Each event is delivered
once per agent type, however many of its subscriptions match, to
``AgentId(agent_type, source)`` through the gateway (so it reaches the agent's one
placed activation), and acknowledged only after the handler succeeded: at least once.

Events of one source go through one lane, one at a time, in stream order; different
sources run concurrently. A failed delivery is retried after a growing delay (a nak
with delay, at most a minute), which lets later events of that source pass it. When
the handler failed (500, 403, 409...), after the configured number of deliveries the
event goes to ``mesh.dlq.<agent_type>`` with the error and its original headers, and
is acknowledged; a malformed event (400, 413) goes there at once; and when the way
there failed (503 no worker, 504, 429, 404 type not registered yet) it is retried
until it gets through, however long the outage.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from mesh import metrics
from mesh._consume import PullConsumer
from mesh._wire import (
    CONTENT_TYPE,
    MSG_ID,
    MSG_TYPE,
    REQUEST_ID,
    SENDER,
    TOPIC,
    TRACEPARENT,
    TRACESTATE,
)
from mesh.client import MeshClient
from mesh.config import EventsConfig
from mesh.errors import ErrorCode, InvalidIdError, MeshError
from mesh.ids import AgentId, TopicId
from mesh.subjects import Subjects, escape_token
from mesh.subscriptions import Subscription

logger = logging.getLogger(__name__)

ERROR = "Mesh-Error"
SUBJECT = "Mesh-Subject"
ERROR_CODE = "Mesh-Error-Code"
DELIVERIES = "Mesh-Deliveries"
#: Failures that no retry can fix: dead-lettered at once.
PERMANENT = frozenset({ErrorCode.BAD_REQUEST, ErrorCode.PAYLOAD_TOO_LARGE})
#: Failures of the way there, not of the handler (no worker now, no answer in time, a
#: JetStream election, limits): retried without counting towards the dead letter.
TRANSIENT = frozenset(
    {
        ErrorCode.UNAVAILABLE,
        ErrorCode.DEADLINE_EXCEEDED,
        ErrorCode.RATE_LIMITED,
        ErrorCode.NOT_FOUND,
    }
)
#: Headers of an event that travel with its delivery.
EVENT_HEADERS = (CONTENT_TYPE, MSG_ID, MSG_TYPE, SENDER, TRACEPARENT, TRACESTATE)


Send = Callable[[AgentId, bytes, dict[str, str], float], Awaitable[object]]
"""``send(agent_id, body, headers, timeout)``: deliver one event, raising `MeshError`."""


def send_through(client: MeshClient) -> Send:
    """Deliver through the gateway, as any client would."""

    async def send(
        agent_id: AgentId, data: bytes, headers: dict[str, str], timeout: float
    ) -> object:
        return await client.send_raw(agent_id, data, headers=headers, timeout=timeout)

    return send


@dataclass(slots=True)
class SubscriptionStats:
    """How a subscription has fared, as this dispatcher saw it."""

    matches: int = 0
    successes: int = 0
    handling_seconds: float = 0.0
    last_matched: datetime | None = None

    @property
    def average_handling_time(self) -> float | None:
        return self.handling_seconds / self.successes if self.successes else None


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


@dataclass(slots=True)
class _Lane:
    queue: asyncio.Queue[Msg] = field(default_factory=asyncio.Queue)
    task: asyncio.Task[None] | None = None


class EventDispatcher:
    """Delivers the events one agent type subscribed to.

    Args:
        nc: The connection.
        send: Sends each event to its agent and raises `MeshError` if the handler failed.
        subjects: The mesh's names.
        agent_type: Whose events.
        config: Retries, timeouts, batch sizes.
    """

    def __init__(
        self,
        nc: NATS,
        send: Send,
        subjects: Subjects,
        agent_type: str,
        config: EventsConfig,
    ) -> None:
        self._nc = nc
        self._js = nc.jetstream()
        self._send = send
        self._subjects = subjects
        self.agent_type = agent_type
        self._config = config
        self.durable = f"{subjects.prefix}-deliver-{escape_token(agent_type)}"
        self.subscriptions: list[Subscription] = []
        self.stats: dict[str, SubscriptionStats] = {}
        self._filters: list[str] = []
        self._lanes: dict[str, _Lane] = {}
        self._consumer: PullConsumer | None = None
        self._recreating: asyncio.Task[None] | None = None
        self._keepalive: asyncio.Task[None] | None = None
        # Events fetched and not yet settled, by stream sequence: a redelivery of one of
        # them (ack_wait passed while it queued) is dropped rather than handled twice.
        self._held: dict[int, Msg] = {}

    async def update(self, subscriptions: Sequence[Subscription]) -> None:
        """Deliver for these subscriptions from now on (starting or narrowing as needed).

        They show in `subscriptions` once the consumer's filters cover them: an event
        published after that is delivered.
        """
        filters = covering_filters([s.subject_filter(self._subjects) for s in subscriptions])
        if filters != self._filters:
            await self._js.add_consumer(
                self._subjects.stream("events"),
                ConsumerConfig(
                    durable_name=self.durable,
                    description=f"events for agent type {self.agent_type}",
                    ack_policy=AckPolicy.EXPLICIT,
                    deliver_policy=DeliverPolicy.NEW,
                    filter_subjects=filters,
                    ack_wait=self._config.ack_wait,
                    max_ack_pending=self._config.max_ack_pending,
                ),
            )
            await self._leader_elected()
            self._filters = filters  # only once the server has them: a failure is retried
        self.subscriptions = list(subscriptions)
        for sub in self.subscriptions:
            self.stats.setdefault(sub.id, SubscriptionStats())
        if self._consumer is None:
            self._consumer = PullConsumer(
                self._nc,
                self._subjects.stream("events"),
                self.durable,
                self._enqueue,
                self._room,
                self._consumer_gone,
                batch=self._config.batch,
            )
            self._consumer.start()
            self._keepalive = asyncio.create_task(
                self._keep_held_alive(), name=f"events-keepalive:{self.agent_type}"
            )

    async def _leader_elected(self, timeout: float = 5.0) -> None:
        """In a cluster, wait until the consumer has a leader: a consumer that delivers
        new events only starts counting from there."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = await self._js.consumer_info(self._subjects.stream("events"), self.durable)
            if info.cluster is None or info.cluster.leader:
                return
            await asyncio.sleep(0.05)

    def _room(self) -> int:
        return self._config.max_held - len(self._held)

    def _consumer_gone(self) -> None:
        """Deleted behind our back, or a new server: create it again (tried until it works)."""
        self._filters = []
        if self._recreating is None or self._recreating.done():
            self._recreating = asyncio.create_task(self._recreate())

    async def _recreate(self) -> None:
        while self._consumer is not None:
            try:
                await self.update(self.subscriptions)
                return
            except Exception as exc:
                logger.warning("re-creating the consumer for %s failed: %s", self.agent_type, exc)
                await asyncio.sleep(1.0)

    async def _keep_held_alive(self) -> None:
        """Tell the server that fetched events still waiting in a lane are being worked on."""
        while True:
            await asyncio.sleep(self._config.ack_wait / 3)
            for msg in list(self._held.values()):
                with contextlib.suppress(Exception):
                    await msg.in_progress()

    def _settled(self, msg: Msg) -> None:
        self._held.pop(msg.metadata.sequence.stream, None)
        if self._consumer is not None:
            self._consumer.wake()

    def _enqueue(self, msg: Msg) -> None:
        sequence = msg.metadata.sequence.stream
        if sequence in self._held:
            return  # a redelivery of an event still queued or in delivery here
        self._held[sequence] = msg
        source = msg.subject.rsplit(".", 1)[-1]
        lane = self._lanes.get(source)
        if lane is None:
            lane = self._lanes[source] = _Lane()
        lane.queue.put_nowait(msg)
        if lane.task is None:
            lane.task = asyncio.create_task(self._drive(source, lane))

    async def _drive(self, source: str, lane: _Lane) -> None:
        try:
            while not lane.queue.empty():
                msg = lane.queue.get_nowait()
                try:
                    await self._deliver(msg)
                except asyncio.CancelledError:
                    raise
                except Exception:
                    # The event stays unacknowledged and comes back after ack_wait.
                    logger.exception("delivering an event for %s failed", self.agent_type)
                finally:
                    self._settled(msg)
        finally:
            lane.task = None
            if lane.queue.empty() or self._consumer is None:
                self._lanes.pop(source, None)
            else:  # something arrived as we finished
                lane.task = asyncio.create_task(self._drive(source, lane))

    def _matching(self, topic: TopicId, now: datetime) -> list[Subscription]:
        return [s for s in self.subscriptions if s.matches(topic) and not s.is_expired(now)]

    async def _deliver(self, msg: Msg) -> None:
        try:
            topic = self._subjects.parse_events(msg.subject)
        except InvalidIdError as exc:
            await self._dead_letter(msg, exc)
            return
        now = datetime.now(UTC)
        matching = self._matching(topic, now)
        if not matching:
            await msg.ack()  # no subscription (any more) wants it
            return
        for sub in matching:
            stats = self.stats.setdefault(sub.id, SubscriptionStats())
            stats.matches += 1
            stats.last_matched = now
        headers = {
            name: value for name, value in (msg.headers or {}).items() if name in EVENT_HEADERS
        }
        headers[TOPIC] = str(topic)
        headers[REQUEST_ID] = f"event-{msg.metadata.sequence.stream}"
        started = time.monotonic()
        try:
            await self._send(
                AgentId(self.agent_type, topic.source),
                msg.data,
                headers,
                self._config.handler_timeout,
            )
        except MeshError as exc:
            deliveries = msg.metadata.num_delivered
            if exc.code in PERMANENT or (
                exc.code not in TRANSIENT and deliveries >= self._config.max_deliveries
            ):
                await self._dead_letter(msg, exc)
            else:
                metrics.EVENTS_RETRIED.labels(self.agent_type).inc()
                delay = self._retry_delay(deliveries)
                logger.info(
                    "event %s for %s failed (%s); retry %d in %.1fs",
                    msg.metadata.sequence.stream,
                    self.agent_type,
                    exc,
                    deliveries,
                    delay,
                )
                await msg.nak(delay=delay)
            return
        elapsed = time.monotonic() - started
        await msg.ack()
        metrics.EVENTS_DELIVERED.labels(self.agent_type).inc()
        for sub in matching:
            stats = self.stats[sub.id]
            stats.successes += 1
            stats.handling_seconds += elapsed

    def _retry_delay(self, deliveries: int) -> float:
        return float(min(self._config.retry_delay * 2 ** max(0, deliveries - 1), 60.0))

    async def _dead_letter(self, msg: Msg, error: MeshError) -> None:
        # Only the event's own headers: JetStream's (Nats-Expected-*, Nats-TTL...) would
        # make the dead-letter publish itself fail.
        headers = {
            name: value
            for name, value in (msg.headers or {}).items()
            if not name.lower().startswith("nats-")
        }
        headers[ERROR] = error.message[:1024].replace("\n", " ")
        headers[ERROR_CODE] = str(int(error.code))
        headers[SUBJECT] = msg.subject
        headers[DELIVERIES] = str(msg.metadata.num_delivered)
        try:
            await self._js.publish(self._subjects.dlq(self.agent_type), msg.data, headers=headers)
        except Exception as exc:
            logger.error("could not dead-letter an event for %s: %s", self.agent_type, exc)
            await msg.nak(delay=self._retry_delay(msg.metadata.num_delivered))
            return
        metrics.EVENTS_DEAD_LETTERED.labels(self.agent_type).inc()
        logger.warning("event on %s for %s dead-lettered: %s", msg.subject, self.agent_type, error)
        await msg.term()

    async def stop(self, grace: float = 5.0, *, delete: bool = False) -> None:
        """Stop fetching, let deliveries under way finish for `grace` seconds, and hand
        back what is still queued (nak), so that it comes back at once and in order.
        With `delete`, remove the consumer too.
        """
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            await consumer.stop()
        background = [t for t in (self._keepalive, self._recreating) if t is not None]
        self._keepalive = self._recreating = None
        for task in background:
            task.cancel()
        await asyncio.gather(*background, return_exceptions=True)
        queued = [msg for lane in self._lanes.values() for msg in _drain(lane.queue)]
        for msg in sorted(queued, key=lambda m: m.metadata.sequence.stream):
            with contextlib.suppress(Exception):
                await msg.nak()
            self._settled(msg)
        running = [lane.task for lane in self._lanes.values() if lane.task is not None]
        if running:
            _, late = await asyncio.wait(running, timeout=grace)
            for task in late:
                task.cancel()
            await asyncio.gather(*running, return_exceptions=True)
        self._lanes.clear()
        if delete:
            with contextlib.suppress(Exception):
                await self._js.delete_consumer(self._subjects.stream("events"), self.durable)
            self._filters = []


def _drain(queue: asyncio.Queue[Msg]) -> list[Msg]:
    items = []
    while not queue.empty():
        items.append(queue.get_nowait())
    return items
