"""Delivering one agent type's events on the workers that host it.

The router keeps a durable consumer per subscribing agent type (`mesh._event_consumer`);
every worker of the type pulls from it in its priority group, and the server delivers
to one of them at a time (the pinned one). That worker delivers each event once,
however many of the type's subscriptions match it, to ``AgentId(agent_type, source)``
on its placed activation: here when the agent is placed here (most events, and all of
them with one worker), else to the worker it is placed on. It acknowledges an event
only after the handler succeeded: at least once.

Events of one source go through one lane, one at a time, in stream order; different
sources run concurrently. A failed delivery is retried after a growing delay (a nak
with delay, at most a minute), which lets later events of that source pass it. When
the handler failed (500, 403, 409...), after the configured number of deliveries the
event goes to ``mesh.dlq.<agent_type>`` with the error and its original headers, and
is acknowledged; a malformed event (400, 413) goes there at once; and when the way
there failed (503 no worker, 504, 429, 404 type not registered yet) it is retried
until it gets through, however long the outage.

Which subscriptions an event matches is decided against the subscriptions the
consumer's metadata lists. An event none of them matches is dropped only when that
list was read after the event arrived; otherwise it waits for a fresh read, so a
subscription just added never loses its first events to a stale list.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

import orjson
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from mesh import metrics
from mesh._consume import PullConsumer, ack, delivery_of
from mesh._event_consumer import (
    PRIORITY_GROUP,
    ConsumerView,
    DeliverySettings,
    durable_name,
    read_consumer,
)
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
from mesh.config import EventsConfig
from mesh.errors import ErrorCode, InvalidIdError, MeshError
from mesh.ids import AgentId, TopicId
from mesh.subjects import Subjects
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
#: Seconds between looks for a consumer that does not exist (yet).
ABSENT_POLL = 1.0
#: Seconds between reads of the consumer's subscriptions while it delivers.
REFRESH_EVERY = 5.0
#: The least seconds between two reads for events no listed subscription matched.
MISS_REFRESH_GAP = 0.2
#: Topic types whose matching subscriptions are remembered, at most.
MATCH_CACHE_SIZE = 10_000
#: Seconds between reports of the subscriptions' statistics to the router.
STATS_EVERY = 1.0


Send = Callable[[AgentId, bytes, dict[str, str], float], Awaitable[object]]
"""``send(agent_id, body, headers, timeout)``: deliver one event, raising `MeshError`."""


@dataclass(slots=True)
class SubscriptionStats:
    """How a subscription has fared, as one worker saw it."""

    matches: int = 0
    successes: int = 0
    handling_seconds: float = 0.0
    last_matched: datetime | None = None

    @property
    def average_handling_time(self) -> float | None:
        return self.handling_seconds / self.successes if self.successes else None

    def add(self, other: SubscriptionStats) -> None:
        self.matches += other.matches
        self.successes += other.successes
        self.handling_seconds += other.handling_seconds
        if other.last_matched is not None and (
            self.last_matched is None or other.last_matched > self.last_matched
        ):
            self.last_matched = other.last_matched


def stats_report(worker_id: str, agent_type: str, stats: dict[str, SubscriptionStats]) -> bytes:
    """Body of ``mesh.router.delivery_stats``: one worker's totals for one type."""
    return orjson.dumps(
        {
            "worker": worker_id,
            "agent_type": agent_type,
            "stats": {
                sub_id: [s.matches, s.successes, s.handling_seconds, s.last_matched]
                for sub_id, s in stats.items()
            },
        }
    )


def read_stats_report(data: bytes) -> tuple[str, str, dict[str, SubscriptionStats]]:
    """(worker, agent type, totals by subscription id) of a report; ValueError if bad."""
    try:
        report = orjson.loads(data)
        stats = {
            str(sub_id): SubscriptionStats(
                int(matches),
                int(successes),
                float(seconds),
                datetime.fromisoformat(last) if last else None,
            )
            for sub_id, (matches, successes, seconds, last) in report["stats"].items()
        }
        return str(report["worker"]), str(report["agent_type"]), stats
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ValueError(f"not a delivery statistics report: {exc}") from exc


@dataclass(frozen=True, slots=True)
class _Route:
    """Where the events of one subject go, worked out once per subject."""

    topic: TopicId
    topic_text: str  # the ``Mesh-Topic`` header
    agent_id: AgentId


@dataclass(slots=True)
class _Event:
    """A fetched event on its way to its agent."""

    msg: Msg
    sequence: int  # in the stream
    deliveries: int  # this one included
    route: _Route | InvalidIdError  # the error: its subject names no valid topic or agent
    matching: list[Subscription]


@dataclass(slots=True)
class _Lane:
    queue: deque[_Event] = field(default_factory=deque)
    task: asyncio.Task[None] | None = None


class EventDispatcher:
    """Delivers the events of one agent type whenever this worker holds its pin.

    Args:
        nc: The connection.
        send: Delivers one event to its agent (here or on its worker) and raises
            `MeshError` if the handler failed.
        subjects: The mesh's names.
        agent_type: Whose events.
        config: How many events to hold and to pull at once.
        worker_id: Named in the statistics this dispatcher reports to the router.
    """

    def __init__(
        self,
        nc: NATS,
        send: Send,
        subjects: Subjects,
        agent_type: str,
        config: EventsConfig,
        worker_id: str,
    ) -> None:
        self._nc = nc
        self._js = nc.jetstream()
        self._send = send
        self._subjects = subjects
        self.agent_type = agent_type
        self._config = config
        self._worker_id = worker_id
        self.durable = durable_name(subjects, agent_type)
        self.stats: dict[str, SubscriptionStats] = {}
        self._stats_changed = False
        self._view: ConsumerView | None = None
        # When each subscription last matched (time.time()), for the next report.
        self._last_matched: dict[str, float] = {}
        # Which subscriptions match a topic type, and whether any of them expires, under
        # the view they were matched in.
        self._matched_in: ConsumerView | None = None
        self._matched: dict[str, tuple[list[Subscription], bool]] = {}
        self._routes: dict[str, _Route | InvalidIdError] = {}
        self._lanes: dict[str, _Lane] = {}
        self._consumer: PullConsumer | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._look = asyncio.Event()
        self._last_look = 0.0
        # Events waiting for a fresher list: none of the listed subscriptions matched
        # them, or they came after the router said the list changed.
        self._unmatched: list[tuple[float, _Event]] = []
        self._stale_since: float | None = None
        self._closing = False
        # Events fetched and not yet settled, by stream sequence: a redelivery of one of
        # them (ack_wait passed while it queued) is dropped rather than handled twice.
        self._held: dict[int, Msg] = {}

    @property
    def subscriptions(self) -> list[Subscription]:
        """The type's subscriptions, as its consumer last listed them."""
        return self._view.subscriptions if self._view is not None else []

    @property
    def _settings(self) -> DeliverySettings:
        assert self._view is not None
        return self._view.settings

    def start(self) -> None:
        if not self._tasks:
            self._tasks = [
                asyncio.create_task(self._follow(), name=f"events-follow:{self.agent_type}"),
                asyncio.create_task(self._keep_held_alive(), name=f"events-held:{self.agent_type}"),
                asyncio.create_task(self._report(), name=f"events-stats:{self.agent_type}"),
            ]

    def look_again(self) -> None:
        """The router changed the consumer: events that arrive from now on wait for its
        subscriptions to be read again, which happens at once."""
        if self._stale_since is None:
            self._stale_since = time.monotonic()
        self._look.set()

    # The consumer: whether there is one, what it admits, pulling from it

    async def _follow(self) -> None:
        """Read the consumer's subscriptions now and then, and pull while it exists."""
        # The flag ends the loop even if a cancellation is lost in a timeout that
        # expired at the same moment (Python 3.11's asyncio.timeout can do that).
        while not self._closing:
            self._look.clear()
            try:
                self._last_look = time.monotonic()
                view = await read_consumer(self._nc, self._subjects, self.agent_type)
            except Exception as exc:
                # Keep what we had; look again shortly.
                logger.info("reading the consumer of %s failed: %s", self.agent_type, exc)
                await asyncio.sleep(ABSENT_POLL)
            else:
                self._view = view
                if view is None:
                    # Nobody subscribes the type (any more): what waited for a list goes
                    # back unacknowledged, in case the consumer comes back.
                    if self._consumer is not None:
                        logger.info("no consumer for %s now; pulling stops", self.agent_type)
                    await self._stop_pulling()
                    for _, event in self._unmatched:
                        self._settled(event)
                    self._unmatched = []
                    self._stale_since = None
                else:
                    self._start_pulling(view)
                    await self._recheck_unmatched(view)
            wait = ABSENT_POLL if self._view is None else REFRESH_EVERY
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await self._look.wait()
            gap = MISS_REFRESH_GAP - (time.monotonic() - self._last_look)
            if gap > 0 and self._stale_since is None:  # the router's word: read at once
                await asyncio.sleep(gap)

    def _start_pulling(self, view: ConsumerView) -> None:
        if self._consumer is not None:
            if self._consumer.running:
                return
            logger.warning("pulling events for %s had stopped; pulling again", self.agent_type)
            self._consumer = None
        expires = max(0.5, view.settings.pin_timeout / 3)
        self._consumer = PullConsumer(
            self._nc,
            self._subjects.stream("events"),
            self.durable,
            self._enqueue,
            self._room,
            self._look.set,
            batch=self._config.batch,
            expires=expires,
            heartbeat=max(0.25, min(5.0, expires / 2)),
            group=PRIORITY_GROUP,
        )
        self._consumer.start()

    async def _stop_pulling(self) -> None:
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            await consumer.stop()

    def _room(self) -> int:
        return self._config.max_held - len(self._held)

    async def _keep_held_alive(self) -> None:
        """Tell the server that fetched events still waiting in a lane are being worked on."""
        while True:
            await asyncio.sleep(self._config.ack_wait / 3)
            for msg in list(self._held.values()):
                with contextlib.suppress(Exception):
                    await msg.in_progress()

    async def _report(self) -> None:
        while True:
            await asyncio.sleep(STATS_EVERY)
            await self._publish_stats()

    async def _publish_stats(self) -> None:
        """Send the router this worker's totals, if they changed since the last time."""
        if not self._stats_changed:
            return
        self._stats_changed = False
        for sub_id, at in self._last_matched.items():
            self.stats[sub_id].last_matched = datetime.fromtimestamp(at, UTC)
        with contextlib.suppress(Exception):
            await self._nc.publish(
                self._subjects.service("router", "delivery_stats"),
                stats_report(self._worker_id, self.agent_type, self.stats),
            )

    # From the consumer into the lanes

    def _settled(self, event: _Event) -> None:
        self._held.pop(event.sequence, None)
        if self._consumer is not None:
            self._consumer.wake()

    def _matching(self, topic: TopicId, view: ConsumerView) -> list[Subscription]:
        if view is not self._matched_in or len(self._matched) > MATCH_CACHE_SIZE:
            self._matched_in, self._matched = view, {}
        known = self._matched.get(topic.type)
        if known is None:
            matching = [s for s in view.subscriptions if s.matches(topic)]
            known = self._matched[topic.type] = (
                matching,
                any(s.expires_at is not None for s in matching),
            )
        matching, expiring = known
        if expiring:
            now = datetime.now(UTC)
            return [s for s in matching if not s.is_expired(now)]
        return matching

    def _route(self, subject: str) -> _Route | InvalidIdError:
        route = self._routes.get(subject)
        if route is None:
            if len(self._routes) >= MATCH_CACHE_SIZE:
                self._routes.clear()
            try:
                topic = self._subjects.parse_events(subject)
                route = _Route(topic, str(topic), AgentId(self.agent_type, topic.source))
            except InvalidIdError as exc:
                route = InvalidIdError(exc.message)  # dead-lettered in its lane
            self._routes[subject] = route
        return route

    def _enqueue(self, msg: Msg) -> None:
        sequence, deliveries = delivery_of(msg)
        if sequence in self._held:
            return  # a redelivery of an event still queued or in delivery here
        self._held[sequence] = msg
        route = self._route(msg.subject)
        event = _Event(msg, sequence, deliveries, route, [])
        if type(route) is _Route and self._view is not None:
            if self._stale_since is None:
                event.matching = self._matching(route.topic, self._view)
            if not event.matching:
                self._unmatched.append((time.monotonic(), event))
                self._look.set()
                return
        self._to_lane(event)

    def _to_lane(self, event: _Event) -> None:
        route = event.route
        source = route.topic.source if type(route) is _Route else event.msg.subject
        lane = self._lanes.get(source)
        if lane is None:
            lane = self._lanes[source] = _Lane()
        lane.queue.append(event)
        if lane.task is None:
            lane.task = asyncio.create_task(self._drive(source, lane))

    async def _recheck_unmatched(self, view: ConsumerView) -> None:
        """Decide the events that waited for a list read after they arrived."""
        if self._stale_since is not None and view.read_at > self._stale_since:
            self._stale_since = None
        waiting = [(at, event) for at, event in self._unmatched if at > view.read_at]
        decided = [event for at, event in self._unmatched if at <= view.read_at]
        self._unmatched = waiting
        for event in decided:
            assert isinstance(event.route, _Route)
            event.matching = self._matching(event.route.topic, view)
            if event.matching:
                self._to_lane(event)
            else:  # no subscription (any more) wants it
                self._settled(event)
                with contextlib.suppress(Exception):
                    await ack(event.msg)
        if waiting:
            self._look.set()

    async def _drive(self, source: str, lane: _Lane) -> None:
        try:
            while lane.queue:
                event = lane.queue.popleft()
                try:
                    await self._deliver(event)
                except asyncio.CancelledError:
                    raise
                except Exception:
                    # The event stays unacknowledged and comes back after ack_wait.
                    logger.exception("delivering an event for %s failed", self.agent_type)
                finally:
                    self._settled(event)
        finally:
            lane.task = None
            if not lane.queue:
                self._lanes.pop(source, None)
            else:  # something arrived as we finished
                lane.task = asyncio.create_task(self._drive(source, lane))

    async def _deliver(self, event: _Event) -> None:
        msg, route, matching = event.msg, event.route, event.matching
        if not isinstance(route, _Route):
            await self._dead_letter(event, route)
            return
        now = time.time()
        for sub in matching:
            stats = self.stats.get(sub.id)
            if stats is None:
                stats = self.stats[sub.id] = SubscriptionStats()
            stats.matches += 1
            self._last_matched[sub.id] = now
        self._stats_changed = True
        received = msg.headers
        headers = (
            {name: value for name, value in received.items() if name in EVENT_HEADERS}
            if received
            else {}
        )
        headers[TOPIC] = route.topic_text
        headers[REQUEST_ID] = f"event-{event.sequence}"
        settings = self._settings
        started = time.monotonic()
        try:
            await self._send(route.agent_id, msg.data, headers, settings.handler_timeout)
        except MeshError as exc:
            deliveries = event.deliveries
            if exc.code in PERMANENT or (
                exc.code not in TRANSIENT and deliveries >= settings.max_deliveries
            ):
                await self._dead_letter(event, exc)
            else:
                metrics.EVENTS_RETRIED.labels(self.agent_type).inc()
                delay = self._retry_delay(deliveries)
                logger.info(
                    "event %s for %s failed (%s); retry %d in %.1fs",
                    event.sequence,
                    self.agent_type,
                    exc,
                    deliveries,
                    delay,
                )
                await msg.nak(delay=delay)
            return
        elapsed = time.monotonic() - started
        await ack(msg)
        metrics.HANDLED.event_delivered(self.agent_type)
        for sub in matching:
            stats = self.stats[sub.id]
            stats.successes += 1
            stats.handling_seconds += elapsed

    def _retry_delay(self, deliveries: int) -> float:
        return float(min(self._settings.retry_delay * 2 ** max(0, deliveries - 1), 60.0))

    async def _dead_letter(self, event: _Event, error: MeshError) -> None:
        msg = event.msg
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
        headers[DELIVERIES] = str(event.deliveries)
        try:
            await self._js.publish(self._subjects.dlq(self.agent_type), msg.data, headers=headers)
        except Exception as exc:
            logger.error("could not dead-letter an event for %s: %s", self.agent_type, exc)
            await msg.nak(delay=self._retry_delay(event.deliveries))
            return
        metrics.EVENTS_DEAD_LETTERED.labels(self.agent_type).inc()
        logger.warning("event on %s for %s dead-lettered: %s", msg.subject, self.agent_type, error)
        await msg.term()

    async def stop(self, grace: float = 5.0) -> None:
        """Stop pulling, let deliveries under way finish for `grace` seconds, hand back
        what is still queued (nak), so that it comes back at once and in order, and give
        up the pin, so that another worker of the type takes over at once."""
        self._closing = True
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            await consumer.stop()
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=grace)
        queued = [event for lane in self._lanes.values() for event in _drain(lane.queue)]
        queued += [event for _, event in self._unmatched]
        self._unmatched = []
        for event in sorted(queued, key=lambda e: e.sequence):
            with contextlib.suppress(Exception):
                await event.msg.nak()
            self._settled(event)
        running = [lane.task for lane in self._lanes.values() if lane.task is not None]
        if running:
            _, late = await asyncio.wait(running, timeout=grace)
            for task in late:
                task.cancel()
            await asyncio.gather(*running, return_exceptions=True)
        self._lanes.clear()
        await self._publish_stats()
        if consumer is not None:
            await consumer.unpin()


def _drain(queue: deque[_Event]) -> list[_Event]:
    items = list(queue)
    queue.clear()
    return items
