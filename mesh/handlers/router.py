"""The router service (``mesh-router``): subscriptions, event delivery's consumers,
and routing by content.

Subscriptions live in KV ``mesh-subscriptions`` under their id; a watch keeps this
replica's copy fresh, and for every agent type that has any, an `EventConsumer` keeps
the type's durable consumer on ``MESH_EVENTS`` admitting exactly their events. The
type's workers read that consumer themselves (`mesh._dispatch`), one at a time, and
report each subscription's statistics back here. A dynamic subscription carries a
TTL: its KV entry lapses by itself, and delivery also checks its ``expires_at``.

It also routes by content (`mesh.routing.ContentRouter`): rules in KV ``mesh-routes``
(watched, compiled once per change), then what feedback taught it, then a default.

Endpoints (``mesh.router.<op>``): subscribe, unsubscribe, subscriptions; route,
feedback, rules, rule_put, rule_delete. Workers publish their delivery statistics on
``mesh.router.delivery_stats``; every replica adds them up.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections import defaultdict
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription as NatsSubscription
from nats.js.errors import InvalidKeyError, KeyNotFoundError
from nats.js.kv import KeyValue
from pydantic import BaseModel, Field, ValidationError

from mesh import __version__
from mesh._connect import on_reconnect
from mesh._control import model_reply, read_request
from mesh._dispatch import SubscriptionStats, read_stats_report
from mesh._event_consumer import EventConsumer
from mesh._kv import BucketConfig, KvMirror, MirroredEntry, ensure_bucket, put_with_ttl
from mesh._lifecycle import Lifecycle
from mesh._micro import CONTROL_MAX_PAYLOAD, MicroService, Reply
from mesh._streams import ensure_event_streams
from mesh.config import EventsConfig, RoutingConfig
from mesh.errors import BadRequestError, InvalidIdError, MeshError
from mesh.ids import AgentId, validate_agent_type
from mesh.routing import ContentRouter, RouteRule
from mesh.subjects import Subjects
from mesh.subscriptions import Subscription, SubscriptionKind

logger = logging.getLogger(__name__)

SERVICE = "router"
#: The longest a dynamic subscription may be given to live: a year.
MAX_TTL = 365 * 24 * 3600.0
#: Seconds between checks that the delivery consumers still exist.
CONSUMER_CHECK_EVERY = 5.0


class SubscribeRequest(BaseModel):
    """Body of ``mesh.router.subscribe``; `ttl` (seconds) makes it dynamic."""

    kind: SubscriptionKind
    topic: str
    agent_type: str
    ttl: float | None = Field(None, gt=0, le=MAX_TTL, allow_inf_nan=False)


class UnsubscribeRequest(BaseModel):
    id: str


class RemovedReply(BaseModel):
    removed: bool


class RouteRequest(BaseModel):
    text: str
    sender: str | None = Field(None, description="type/key of the sending agent")


class FeedbackRequest(BaseModel):
    decision_id: str
    success: bool
    correct_target: str | None = None

    def model_post_init(self, context: object) -> None:
        if self.correct_target is not None:
            validate_agent_type(self.correct_target)


class FeedbackReply(BaseModel):
    known: bool


class RuleDeleteRequest(BaseModel):
    id: str


class RulesReply(BaseModel):
    rules: list[RouteRule]


class ListRequest(BaseModel):
    agent_type: str | None = None
    never_matched: bool = False


class SubscriptionReport(BaseModel):
    subscription: Subscription
    matches: int = 0
    successes: int = 0
    average_handling_time: float | None = None
    last_matched: datetime | None = None


class ListReply(BaseModel):
    subscriptions: list[SubscriptionReport]


def routes_bucket(subjects: Subjects) -> BucketConfig:
    return BucketConfig(name=subjects.bucket("routes"), description="mesh content routing rules")


def subscriptions_bucket(subjects: Subjects) -> BucketConfig:
    return BucketConfig(
        name=subjects.subscriptions_bucket,
        description="mesh event subscriptions",
        marker_ttl=60.0,
    )


class Router(Lifecycle):
    """One replica of the router service.

    Args:
        nc: A connected NATS client; the router does not close it.
        subjects: The mesh's names.
        config: Event retention and delivery settings.
    """

    def __init__(
        self,
        nc: NATS,
        subjects: Subjects | None = None,
        config: EventsConfig | None = None,
        routing: RoutingConfig | None = None,
    ) -> None:
        self._nc = nc
        self._js = nc.jetstream()
        self._subjects = subjects or Subjects()
        self._config = config or EventsConfig()
        self._subscriptions: dict[str, Subscription] = {}
        self._consumers: dict[str, EventConsumer] = {}
        # What each worker reported, by subscription id and worker id.
        self._reported: dict[str, dict[str, SubscriptionStats]] = defaultdict(dict)
        self._stats_subscription: NatsSubscription | None = None
        # One consumer update at a time: the watch and the endpoints both make them.
        self._updating = asyncio.Lock()
        self._kv: KeyValue | None = None
        self._mirror: KvMirror | None = None
        self._changed = asyncio.Event()
        routing = routing or RoutingConfig()
        self.content_router = ContentRouter(
            routing.default_target,
            min_confidence=routing.min_confidence,
            min_similarity=routing.min_similarity,
        )
        self._routes_kv: KeyValue | None = None
        self._routes_mirror: KvMirror | None = None
        self._reconciler: asyncio.Task[None] | None = None
        self._service = MicroService(
            nc,
            name=self._subjects.micro_name(SERVICE),
            version=__version__,
            description="subscriptions and event delivery",
            max_payload=CONTROL_MAX_PAYLOAD,
        )
        self._forget_reconnect: Callable[[], None] = lambda: None
        self._started = False

    async def start(self) -> None:
        """Create the streams and bucket if absent, load subscriptions, start delivering."""
        if self._started:
            return
        await ensure_event_streams(self._js, self._subjects, self._config.retention)
        self._stats_subscription = await self._nc.subscribe(
            self._subjects.service(SERVICE, "delivery_stats"), cb=self._take_stats
        )
        self._kv = await ensure_bucket(self._js, subscriptions_bucket(self._subjects))
        self._mirror = KvMirror(self._kv, on_change=self._subscription_changed)
        await self._mirror.start()
        await self._reconcile()
        self._reconciler = asyncio.create_task(self._reconcile_on_change(), name="router-reconcile")
        self._routes_kv = await ensure_bucket(self._js, routes_bucket(self._subjects))
        self._routes_mirror = KvMirror(self._routes_kv, on_change=self._rule_changed)
        await self._routes_mirror.start()
        queue = self._subjects.queue_group(SERVICE)
        for op, handler in {
            "subscribe": self._subscribe,
            "unsubscribe": self._unsubscribe,
            "subscriptions": self._list,
            "route": self._route,
            "feedback": self._feedback,
            "rules": self._rules,
            "rule_put": self._rule_put,
            "rule_delete": self._rule_delete,
        }.items():
            await self._service.add_endpoint(
                op, subject=self._subjects.service(SERVICE, op), handler=handler, queue_group=queue
            )
        await self._service.start()
        self._forget_reconnect = on_reconnect(self._nc, self._rewatch)
        self._started = True

    async def _rewatch(self) -> None:
        for mirror in (self._mirror, self._routes_mirror):
            if mirror is not None:
                await mirror.restart()

    async def shutdown(self, grace: float = 5.0) -> None:
        """Stop serving and delivering; unacknowledged events are delivered again later."""
        if not self._started:
            return
        self._started = False
        self._forget_reconnect()
        await self._service.stop(grace)
        if self._reconciler is not None:
            self._reconciler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reconciler
        if self._stats_subscription is not None:
            with contextlib.suppress(Exception):
                await self._stats_subscription.unsubscribe()
        for mirror in (self._mirror, self._routes_mirror):
            if mirror is not None:
                await mirror.aclose()

    # Subscriptions -> dispatchers

    def _subscription_changed(self, key: str, entry: MirroredEntry | None) -> None:
        if entry is None:
            self._subscriptions.pop(key, None)
            self._reported.pop(key, None)
        else:
            try:
                self._subscriptions[key] = Subscription.model_validate_json(entry.value)
            except (ValidationError, InvalidIdError):
                logger.warning("ignoring malformed subscription %r", key)
                return
        self._changed.set()

    async def _reconcile_on_change(self) -> None:
        """Follow subscription changes at once, and check now and then that no consumer
        was deleted behind our back."""
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(CONSUMER_CHECK_EVERY):
                    await self._changed.wait()
            self._changed.clear()
            try:
                await self._check_consumers()
                await self._reconcile()
            except Exception:
                logger.exception("updating event delivery failed; retrying")
                await asyncio.sleep(1.0)
                self._changed.set()

    async def _check_consumers(self) -> None:
        async with self._updating:
            for consumer in list(self._consumers.values()):
                if consumer.subscriptions and not await consumer.exists():
                    logger.warning("consumer %s is gone; creating it again", consumer.durable)
                    consumer.forget()

    def _live_by_type(self) -> dict[str, list[Subscription]]:
        now = datetime.now(UTC)
        by_type: dict[str, list[Subscription]] = defaultdict(list)
        for sub in self._subscriptions.values():
            if not sub.is_expired(now):
                by_type[sub.agent_type].append(sub)
        return by_type

    async def _reconcile(self) -> None:
        async with self._updating:
            by_type = self._live_by_type()
            for agent_type in sorted(set(by_type) | set(self._consumers)):
                await self._update_consumer(agent_type, by_type.get(agent_type, []))

    async def _apply(self, agent_type: str) -> None:
        """Bring one type's consumer in line with its subscriptions now, so that what an
        endpoint changed is in force when it answers."""
        try:
            async with self._updating:
                await self._update_consumer(agent_type, self._live_by_type().get(agent_type, []))
        except Exception as exc:  # recorded in KV all the same: the reconciler retries
            logger.warning("updating the consumer of %s failed: %s", agent_type, exc)
            self._changed.set()

    async def _update_consumer(self, agent_type: str, subscriptions: list[Subscription]) -> None:
        consumer = self._consumers.get(agent_type)
        if not subscriptions:
            if consumer is not None:
                await consumer.delete()
                del self._consumers[agent_type]
                await self._announce(agent_type)
            return
        if consumer is None:
            consumer = self._consumers[agent_type] = EventConsumer(
                self._nc, self._subjects, agent_type, self._config
            )
        if await consumer.update(subscriptions):
            await self._announce(agent_type)

    async def _announce(self, agent_type: str) -> None:
        """Tell the type's workers to read its consumer again (they also do so now and
        then, and whenever an event matches nothing they know of)."""
        with contextlib.suppress(Exception):
            await self._nc.publish(
                self._subjects.service(SERVICE, "delivery_changed"), agent_type.encode()
            )

    def consumer(self, agent_type: str) -> EventConsumer | None:
        """The type's delivery consumer, while it has subscriptions."""
        return self._consumers.get(agent_type)

    async def _take_stats(self, msg: Msg) -> None:
        try:
            worker, _, stats = read_stats_report(msg.data)
        except ValueError as exc:
            logger.warning("ignoring delivery statistics: %s", exc)
            return
        for sub_id, totals in stats.items():
            self._reported[sub_id][worker] = totals

    def subscription_stats(self, subscription_id: str) -> SubscriptionStats | None:
        """A subscription's statistics summed over the workers that delivered for it."""
        reported = self._reported.get(subscription_id)
        if not reported:
            return None
        total = SubscriptionStats()
        for stats in reported.values():
            total.add(stats)
        return total

    # Content routing

    def _rule_changed(self, key: str, entry: MirroredEntry | None) -> None:
        if entry is None:
            self.content_router.remove_rule(key)
            return
        try:
            self.content_router.set_rule(RouteRule.model_validate_json(entry.value))
        except (ValidationError, MeshError):
            logger.warning("ignoring malformed routing rule %r", key)

    async def _route(self, msg: Msg) -> Reply:
        request = read_request(msg, RouteRequest)
        sender_type = AgentId.parse(request.sender).type if request.sender is not None else None
        return model_reply(msg, self.content_router.route(request.text, sender_type))

    async def _feedback(self, msg: Msg) -> Reply:
        request = read_request(msg, FeedbackRequest)
        known = self.content_router.feedback(
            request.decision_id, request.success, request.correct_target
        )
        return model_reply(msg, FeedbackReply(known=known))

    async def _rules(self, msg: Msg) -> Reply:
        return model_reply(msg, RulesReply(rules=self.content_router.rules))

    async def _rule_put(self, msg: Msg) -> Reply:
        rule = read_request(msg, RouteRule)
        assert self._routes_kv is not None
        await self._routes_kv.put(rule.id, rule.model_dump_json().encode())
        self.content_router.set_rule(rule)  # this replica at once; others by the watch
        return model_reply(msg, rule)

    async def _rule_delete(self, msg: Msg) -> Reply:
        request = read_request(msg, RuleDeleteRequest)
        assert self._routes_kv is not None
        try:
            await self._routes_kv.get(request.id)
        except KeyNotFoundError:
            return model_reply(msg, RemovedReply(removed=False))
        except InvalidKeyError as exc:
            raise BadRequestError(f"invalid rule id {request.id!r}") from exc
        await self._routes_kv.delete(request.id)
        self.content_router.remove_rule(request.id)
        return model_reply(msg, RemovedReply(removed=True))

    # Endpoints

    async def _subscribe(self, msg: Msg) -> Reply:
        request = read_request(msg, SubscribeRequest)
        assert self._kv is not None
        now = datetime.now(UTC)
        subscription = Subscription(
            kind=request.kind,
            topic=request.topic,
            agent_type=request.agent_type,
            created_at=now,
            expires_at=now + timedelta(seconds=request.ttl) if request.ttl else None,
        )
        if request.ttl:
            subscription.id = f"dyn-{uuid.uuid4().hex}"
            await put_with_ttl(
                self._js,
                self._subjects.subscriptions_bucket,
                subscription.id,
                subscription.model_dump_json().encode(),
                request.ttl,
            )
        else:
            await self._kv.put(subscription.id, subscription.model_dump_json().encode())
        self._subscriptions[subscription.id] = subscription
        await self._apply(subscription.agent_type)
        return model_reply(msg, subscription)

    async def _unsubscribe(self, msg: Msg) -> Reply:
        request = read_request(msg, UnsubscribeRequest)
        assert self._kv is not None
        try:
            entry = await self._kv.get(request.id)
        except KeyNotFoundError:
            return model_reply(msg, RemovedReply(removed=False))
        except InvalidKeyError as exc:
            raise BadRequestError(f"invalid subscription id {request.id!r}") from exc
        if entry.value is None:
            return model_reply(msg, RemovedReply(removed=False))
        await self._kv.delete(request.id)
        self._subscriptions.pop(request.id, None)
        try:
            agent_type = Subscription.model_validate_json(entry.value).agent_type
        except (ValidationError, InvalidIdError):
            agent_type = None  # a malformed record delivered nothing
        if agent_type is not None:
            await self._apply(agent_type)
        return model_reply(msg, RemovedReply(removed=True))

    async def _list(self, msg: Msg) -> Reply:
        request = read_request(msg, ListRequest)
        reports = []
        for sub in sorted(self._subscriptions.values(), key=lambda s: (s.agent_type, s.id)):
            if request.agent_type and sub.agent_type != request.agent_type:
                continue
            stats = self.subscription_stats(sub.id)
            if request.never_matched and stats is not None and stats.matches:
                continue
            reports.append(
                SubscriptionReport(
                    subscription=sub,
                    matches=stats.matches if stats else 0,
                    successes=stats.successes if stats else 0,
                    average_handling_time=stats.average_handling_time if stats else None,
                    last_matched=stats.last_matched if stats else None,
                )
            )
        return model_reply(msg, ListReply(subscriptions=reports))
