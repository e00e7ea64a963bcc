"""Events on JetStream: subscriptions, at-least-once delivery, order per source, DLQ."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator

import orjson
import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from mesh import AgentId, InvalidIdError, MeshClient, PayloadTooLargeError, TopicId
from mesh._control import control_request
from mesh.config import EventsConfig
from mesh.handlers.gateway import Gateway
from mesh.handlers.router import (
    ListReply,
    ListRequest,
    RemovedReply,
    Router,
    SubscribeRequest,
    UnsubscribeRequest,
)
from mesh.subjects import Subjects
from mesh.subscriptions import Subscription
from mesh.testing import eventually
from tests.agents import HANDLED_SUBJECT
from tests.helpers import assert_error

AGENTS = (
    "tests.agents:Ledger",
    "tests.agents:Auditor",
    "tests.agents:Greeter",
    "tests.agents:Fragile",
)


@pytest.fixture
async def router(nc: NATS, subjects: Subjects, gateway: Gateway) -> AsyncIterator[Router]:
    config = EventsConfig(max_deliveries=3, retry_delay=0.05, handler_timeout=3.0, ack_wait=5.0)
    async with Router(nc, subjects, config) as service:
        yield service


@pytest.fixture
async def handled(nc: NATS) -> AsyncIterator[Counter[str]]:
    """``type/key/n`` of every handled event, as the agents announce them."""
    seen: Counter[str] = Counter()

    async def note(msg: Msg) -> None:
        seen[msg.data.decode()] += 1

    sub = await nc.subscribe(HANDLED_SUBJECT, cb=note)
    yield seen
    await sub.unsubscribe()


async def _ready(router: Router, gateway: Gateway, workers: int) -> None:
    for agent_type, count in (("ledger", 2), ("auditor", 1), ("greeter", 1), ("fragile", 1)):
        await eventually(
            lambda t=agent_type, c=count: (
                (d := router.consumer(t)) is not None and len(d.subscriptions) == c
            ),
            timeout=15,
            message=f"{agent_type} subscriptions",
        )
        await eventually(
            lambda t=agent_type: len(gateway.directory.live_workers(t)) == workers, timeout=15
        )


@pytest.fixture
async def client(
    nc: NATS, subjects: Subjects, gateway: Gateway, router: Router, spawn_worker: type
) -> MeshClient:
    """One worker hosting every event agent, its subscriptions in place; a client."""
    spawn_worker(*AGENTS, worker_id="events")
    await _ready(router, gateway, 1)
    return MeshClient(nc, subjects=subjects)


async def _log(client: MeshClient, agent_type: str, key: str) -> dict[str, object]:
    reply = await client.call(AgentId(agent_type, key), {}, message_type="GetLog")
    assert isinstance(reply, dict)
    return reply


async def test_type_prefix_and_default_subscriptions_reach_the_right_agents(
    nc: NATS,
    subjects: Subjects,
    router: Router,
    handled: Counter[str],
    client: MeshClient,
) -> None:
    await client.publish(TopicId("orders.created", "shop-1"), {"n": 1}, message_type="OrderEvent")
    await client.publish(TopicId("ordinal", "shop 2"), {"n": 2}, message_type="OrderEvent")
    await client.publish(TopicId("default", "visitor"), {"n": 3}, message_type="OrderEvent")
    await client.publish(TopicId("orders", "shop-1"), {"n": 4}, message_type="OrderEvent")
    expected = {
        "ledger/shop-1/1",
        "auditor/shop-1/1",
        "auditor/shop 2/2",
        "greeter/visitor/3",
        "auditor/shop-1/4",
    }
    await eventually(lambda: set(handled) >= expected, timeout=10)
    # "orders.created" matches both of the ledger's subscriptions: handled once.
    assert handled["ledger/shop-1/1"] == 1
    # "orders" is not "orders.created" and does not start with "orders.".
    assert "ledger/shop-1/4" not in handled
    log = await _log(client, "ledger", "shop-1")
    assert log["seen"] == [1]
    assert log["topics"] == ["orders.created/shop-1"]
    assert (await _log(client, "greeter", "visitor"))["seen"] == [3]


async def test_events_from_one_source_arrive_in_order_across_two_workers(
    nc: NATS,
    subjects: Subjects,
    gateway: Gateway,
    router: Router,
    spawn_worker: type,
    handled: Counter[str],
) -> None:
    spawn_worker(*AGENTS, worker_id="ev-a")
    spawn_worker(*AGENTS, worker_id="ev-b")
    await _ready(router, gateway, 2)
    client = MeshClient(nc, subjects=subjects)
    sources = [f"src-{i}" for i in range(10)]
    await asyncio.gather(
        *(
            client.publish(
                TopicId("orders.created", sources[n % 10]), {"n": n}, message_type="OrderEvent"
            )
            for n in range(1000)
        )
    )
    await eventually(lambda: sum(1 for k in handled if k.startswith("ledger/")) == 1000, timeout=60)
    workers = set()
    for i, source in enumerate(sources):
        log = await _log(client, "ledger", source)
        assert log["seen"] == [n for n in range(1000) if n % 10 == i], source
        workers.add(log["worker"])
    assert workers == {"ev-a", "ev-b"}
    assert all(count == 1 for key, count in handled.items() if key.startswith("ledger/"))


async def _standby_pulling(nc: NATS, subjects: Subjects, agent_type: str) -> bool:
    """Whether more than one worker's pull requests wait on the type's consumer."""
    info = await nc.jetstream().consumer_info(
        subjects.stream("events"), f"{subjects.prefix}-deliver-{agent_type}"
    )
    return info.num_waiting >= 2


async def test_killed_worker_loses_no_acknowledged_event(
    nc: NATS,
    subjects: Subjects,
    gateway: Gateway,
    router: Router,
    spawn_worker: type,
    handled: Counter[str],
) -> None:
    # The victim starts alone, so the server pins the ledger's events to it; the
    # survivor then waits as a standby and must take over when the victim dies.
    victim = spawn_worker(*AGENTS, worker_id="victim")
    await _ready(router, gateway, 1)
    client = MeshClient(nc, subjects=subjects)
    published = 0

    async def publish(count: int) -> None:
        nonlocal published
        for _ in range(count):
            await client.publish(
                TopicId("orders.created", f"k{published % 20}"),
                {"n": published},
                message_type="OrderEvent",
            )
            published += 1

    await publish(300)
    await eventually(lambda: sum(1 for k in handled if k.startswith("ledger/")) >= 100, timeout=20)
    spawn_worker(*AGENTS, worker_id="survivor")
    await eventually(lambda: len(gateway.directory.live_workers("ledger")) == 2, timeout=15)
    await eventually(lambda: _standby_pulling(nc, subjects, "ledger"), timeout=15)
    victim.kill()
    await publish(300)
    expected = {f"ledger/k{n % 20}/{n}" for n in range(600)}
    await eventually(lambda: expected <= set(handled), timeout=60, message="every event handled")


async def test_a_worker_that_stops_hands_its_events_over_at_once(
    nc: NATS,
    subjects: Subjects,
    gateway: Gateway,
    spawn_worker: type,
    handled: Counter[str],
) -> None:
    # A pin timeout far longer than the test: only the stopping worker's unpin can
    # move the events to the other worker in time.
    config = EventsConfig(pin_timeout=120.0, handler_timeout=3.0, ack_wait=5.0)
    async with Router(nc, subjects, config) as router:
        first = spawn_worker("tests.agents:Ledger", worker_id="first")
        await eventually(
            lambda: (c := router.consumer("ledger")) is not None and len(c.subscriptions) == 2,
            timeout=15,
        )
        client = MeshClient(nc, subjects=subjects)
        await client.publish(TopicId("orders.created", "a"), {"n": 1}, message_type="OrderEvent")
        await eventually(lambda: "ledger/a/1" in handled, timeout=15)
        spawn_worker("tests.agents:Ledger", worker_id="second")
        await eventually(lambda: _standby_pulling(nc, subjects, "ledger"), timeout=15)
        first.terminate()  # SIGTERM: drains, gives the pin up
        assert await first.wait(timeout=20) == 0
        await client.publish(TopicId("orders.created", "b"), {"n": 2}, message_type="OrderEvent")
        await eventually(lambda: "ledger/b/2" in handled, timeout=15, message="taken over")
        log = await _log(client, "ledger", "b")
        assert log["worker"] == "second"


async def test_event_whose_handler_keeps_failing_goes_to_the_dlq(
    nc: NATS,
    subjects: Subjects,
    router: Router,
    client: MeshClient,
) -> None:
    js = nc.jetstream()
    dlq = await js.subscribe(subjects.dlq("fragile"), stream=subjects.stream("dlq"))
    await client.publish(
        TopicId("poison", "p1"),
        {"n": 7},
        message_type="OrderEvent",
        headers={"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"},
    )
    dead = await dlq.next_msg(timeout=10)
    assert orjson.loads(dead.data) == {"n": 7}
    assert dead.headers is not None
    assert dead.headers["Mesh-Error-Code"] == "500"
    assert "cannot digest order 7" in dead.headers["Mesh-Error"]
    assert dead.headers["Mesh-Deliveries"] == "3"
    assert dead.headers["Mesh-Subject"] == f"{subjects.prefix}.events.poison.p1"
    assert dead.headers["traceparent"].startswith("00-0af7651916cd")
    assert dead.headers["Mesh-Msg-Type"] == "OrderEvent"
    await dlq.unsubscribe()


async def test_a_malformed_event_is_dead_lettered_at_once(
    nc: NATS,
    subjects: Subjects,
    router: Router,
    client: MeshClient,
) -> None:
    js = nc.jetstream()
    dlq = await js.subscribe(subjects.dlq("fragile"), stream=subjects.stream("dlq"))
    await client.publish(TopicId("poison", "p2"), {"n": "not a number"}, message_type="OrderEvent")
    dead = await dlq.next_msg(timeout=10)
    assert dead.headers is not None
    assert dead.headers["Mesh-Error-Code"] == "400"
    assert dead.headers["Mesh-Deliveries"] == "1"  # no retry can fix it
    await dlq.unsubscribe()


async def test_dynamic_subscription_stops_delivering_after_its_ttl(
    nc: NATS,
    subjects: Subjects,
    router: Router,
    handled: Counter[str],
    client: MeshClient,
) -> None:
    reply = await control_request(
        nc,
        subjects.service("router", "subscribe"),
        SubscribeRequest(kind="type", topic="flash.sale", agent_type="ledger", ttl=3.0),
        Subscription,
        timeout=2,
    )
    assert reply is not None and reply.expires_at is not None
    await eventually(lambda: len(router.consumer("ledger").subscriptions) == 3, timeout=5)  # type: ignore[union-attr]
    await client.publish(TopicId("flash.sale", "s"), {"n": 1}, message_type="OrderEvent")
    await eventually(lambda: "ledger/s/1" in handled, timeout=5)
    await eventually(lambda: len(router.consumer("ledger").subscriptions) == 2, timeout=10)  # type: ignore[union-attr]
    await client.publish(TopicId("flash.sale", "s"), {"n": 2}, message_type="OrderEvent")
    await client.publish(TopicId("orders.created", "s"), {"n": 3}, message_type="OrderEvent")
    await eventually(lambda: "ledger/s/3" in handled, timeout=5)
    assert "ledger/s/2" not in handled


async def test_duplicate_message_id_is_handled_once(
    nc: NATS,
    subjects: Subjects,
    router: Router,
    handled: Counter[str],
    client: MeshClient,
) -> None:
    topic = TopicId("orders.created", "dup")
    first = await client.publish(topic, {"n": 1}, message_type="OrderEvent", message_id="order-1")
    again = await client.publish(topic, {"n": 1}, message_type="OrderEvent", message_id="order-1")
    assert (first.duplicate, again.duplicate) == (None, True) or not first.duplicate
    assert again.duplicate
    await client.publish(topic, {"n": 2}, message_type="OrderEvent", message_id="order-2")
    await eventually(lambda: "ledger/dup/2" in handled, timeout=10)
    assert handled["ledger/dup/1"] == 1
    assert (await _log(client, "ledger", "dup"))["seen"] == [1, 2]


async def test_bad_topics_and_subscriptions_get_400(
    nc: NATS, subjects: Subjects, router: Router
) -> None:
    with pytest.raises(InvalidIdError) as raised:
        TopicId("orders..created", "s")
    assert raised.value.code == 400
    with pytest.raises(InvalidIdError):
        TopicId("orders", "")
    for body in (
        {"kind": "type", "topic": "a..b", "agent_type": "ledger"},
        {"kind": "prefix", "topic": "a b", "agent_type": "ledger"},
        {"kind": "type", "topic": "ok", "agent_type": "no/slash"},
    ):
        reply = await nc.request(
            subjects.service("router", "subscribe"), orjson.dumps(body), timeout=2
        )
        assert_error(reply, 400, "InvalidId")
    reply = await nc.request(
        subjects.service("router", "subscribe"),
        orjson.dumps({"kind": "sometimes", "topic": "x", "agent_type": "ledger"}),
        timeout=2,
    )
    assert_error(reply, 400, "InvalidPayload")
    reply = await nc.request(
        subjects.service("router", "subscribe"),
        orjson.dumps({"kind": "type", "topic": "x", "agent_type": "ledger", "ttl": -1}),
        timeout=2,
    )
    assert_error(reply, 400, "InvalidPayload")


async def test_agent_publishes_from_its_handler_as_the_sender(
    nc: NATS,
    subjects: Subjects,
    gateway: Gateway,
    router: Router,
    spawn_worker: type,
    handled: Counter[str],
) -> None:
    spawn_worker(*AGENTS, "tests.agents:Announcer", worker_id="events")
    await _ready(router, gateway, 1)
    stored = await nc.jetstream().subscribe(
        f"{subjects.prefix}.events.orders.created.*", stream=subjects.stream("events")
    )
    client = MeshClient(nc, subjects=subjects)
    await client.call(AgentId("announcer", "shop-9"), {"order": 42})
    event = await stored.next_msg(timeout=5)
    assert event.headers is not None
    assert event.headers["Mesh-Sender"] == "announcer/shop-9"
    assert event.headers["Mesh-Msg-Type"] == "OrderEvent"
    await eventually(lambda: "ledger/shop-9/42" in handled, timeout=10)
    await stored.unsubscribe()


async def test_removing_a_subscription_stops_delivery_and_unmatched_ones_are_reported(
    nc: NATS,
    subjects: Subjects,
    router: Router,
    handled: Counter[str],
    client: MeshClient,
) -> None:
    await client.publish(TopicId("default", "g"), {"n": 1}, message_type="OrderEvent")
    await eventually(lambda: "greeter/g/1" in handled, timeout=10)

    async def listed(request: ListRequest) -> ListReply:
        reply = await control_request(
            nc, subjects.service("router", "subscriptions"), request, ListReply, timeout=2
        )
        assert reply is not None
        return reply

    async def greeting_reported() -> bool:
        # The worker reports its statistics to the router every second.
        [greeting] = (await listed(ListRequest(agent_type="greeter"))).subscriptions
        return (greeting.matches, greeting.successes) == (1, 1)

    # Reports the router cannot read are dropped; they change no one's figures.
    stats_subject = subjects.service("router", "delivery_stats")
    for bad in (b"not json", b'{"worker": "w"}', b'{"worker": "w", "agent_type": "greeter",'
                b' "stats": {"x": [1]}}'):  # fmt: skip
        await nc.publish(stats_subject, bad)
    await eventually(greeting_reported, timeout=10, message="the greeter's statistics")
    [greeting] = (await listed(ListRequest(agent_type="greeter"))).subscriptions
    assert greeting.average_handling_time is not None and greeting.last_matched is not None
    never = {
        (r.subscription.agent_type, r.subscription.topic)
        for r in (await listed(ListRequest(never_matched=True))).subscriptions
    }
    assert ("greeter", "default") not in never
    assert ("fragile", "poison") in never

    removed = await control_request(
        nc,
        subjects.service("router", "unsubscribe"),
        UnsubscribeRequest(id=greeting.subscription.id),
        RemovedReply,
        timeout=2,
    )
    assert removed is not None and removed.removed
    await eventually(lambda: router.consumer("greeter") is None, timeout=5)
    await client.publish(TopicId("default", "g"), {"n": 2}, message_type="OrderEvent")
    await client.publish(TopicId("orders.created", "g"), {"n": 3}, message_type="OrderEvent")
    await eventually(lambda: "ledger/g/3" in handled, timeout=10)
    assert "greeter/g/2" not in handled


async def test_dead_letter_keeps_event_headers_but_not_jetstream_ones(
    nc: NATS,
    subjects: Subjects,
    router: Router,
    client: MeshClient,
) -> None:
    js = nc.jetstream()
    dlq = await js.subscribe(subjects.dlq("fragile"), stream=subjects.stream("dlq"))
    # A publisher that pins the stream: that header must not follow the event to the DLQ.
    await client.publish(
        TopicId("poison", "p2"),
        {"n": 8},
        message_type="OrderEvent",
        message_id="poison-8",
        headers={"Nats-Expected-Stream": subjects.stream("events")},
    )
    dead = await dlq.next_msg(timeout=10)
    assert dead.headers is not None
    assert not any(name.lower().startswith("nats-") for name in dead.headers)
    assert dead.headers["Mesh-Error-Code"] == "500"
    await dlq.unsubscribe()


async def test_router_endpoints_refuse_bad_values_with_400(
    nc: NATS, subjects: Subjects, router: Router
) -> None:
    subscribe = subjects.service("router", "subscribe")
    for ttl in (b"NaN", b"Infinity", b"1e400", b"1e12", b"0", b"-1"):
        body = b'{"kind": "type", "topic": "x", "agent_type": "ledger", "ttl": ' + ttl + b"}"
        assert_error(await nc.request(subscribe, body, timeout=2), 400)
    route = subjects.service("router", "route")
    assert_error(await nc.request(route, b'{"text": "x", "sender": ""}', timeout=2), 400)
    feedback = subjects.service("router", "feedback")
    body = b'{"decision_id": "nope", "success": true, "correct_target": "a/b"}'
    assert_error(await nc.request(feedback, body, timeout=2), 400, "InvalidId")
    unsubscribe = subjects.service("router", "unsubscribe")
    assert_error(await nc.request(unsubscribe, b'{"id": "bad id"}', timeout=2), 400)


async def test_publishing_an_event_over_the_payload_limit_is_a_413(
    nc: NATS, subjects: Subjects, router: Router
) -> None:
    client = MeshClient(nc, subjects=subjects)
    with pytest.raises(PayloadTooLargeError):
        await client.publish(TopicId("orders.created", "big"), {"blob": "x" * 2_000_000})


async def test_a_failed_consumer_update_is_tried_again(
    nc: NATS, subjects: Subjects, gateway: Gateway
) -> None:
    from mesh._event_consumer import ConsumerSetupError, EventConsumer
    from mesh._streams import ensure_event_streams

    consumer = EventConsumer(nc, subjects, "ledger", EventsConfig())
    subscription = Subscription(kind="type", topic="orders.created", agent_type="ledger")
    with pytest.raises(ConsumerSetupError, match="stream not found"):  # the server refuses it
        await consumer.update([subscription])
    assert consumer.subscriptions == []
    await ensure_event_streams(nc.jetstream(), subjects, retention=60)
    await consumer.update([subscription])
    info = await nc.jetstream().consumer_info(subjects.stream("events"), consumer.durable)
    assert info.config.filter_subjects == [f"{subjects.prefix}.events.orders.created.*"]
    assert consumer.subscriptions == [subscription]
    await consumer.delete()


async def test_backlog_longer_than_ack_wait_is_neither_duplicated_nor_reordered(
    nc: NATS, subjects: Subjects, gateway: Gateway, spawn_worker: type, handled: Counter[str]
) -> None:
    # 12 events x 0.3 s, one source: well past ack_wait; the handler timeout leaves room
    # for a loaded machine.
    config = EventsConfig(ack_wait=2.5, handler_timeout=2.0, retry_delay=0.05)
    async with Router(nc, subjects, config) as router:
        spawn_worker("tests.agents:SlowLedger", worker_id="slow")
        # Subscriptions show once the consumer covers them: events published before
        # that would not be delivered (the consumer starts at new events).
        await eventually(
            lambda: (d := router.consumer("slow-ledger")) is not None and d.subscriptions,
            timeout=15,
        )
        await eventually(lambda: gateway.directory.live_workers("slow-ledger"), timeout=15)
        client = MeshClient(nc, subjects=subjects)
        for n in range(12):
            await client.publish(TopicId("slow.orders", "one"), {"n": n}, message_type="OrderEvent")
        await eventually(lambda: len(handled) == 12, timeout=20)
        log = await _log(client, "slow-ledger", "one")
        assert log["seen"] == list(range(12))
        assert set(handled.values()) == {1}


async def test_a_consumer_deleted_behind_the_routers_back_is_recreated(
    nc: NATS, subjects: Subjects, router: Router, handled: Counter[str], client: MeshClient
) -> None:
    consumer = router.consumer("ledger")
    assert consumer is not None
    js = nc.jetstream()
    await js.delete_consumer(subjects.stream("events"), consumer.durable)

    async def recreated() -> bool:
        info = await js.consumer_info(subjects.stream("events"), consumer.durable)
        return info.num_waiting > 0  # and the worker's pull requests wait on it again

    await eventually(recreated, timeout=15, message="the consumer re-created and pulled")
    await client.publish(TopicId("orders.created", "after"), {"n": 7}, message_type="OrderEvent")
    await eventually(lambda: handled["ledger/after/7"] == 1, timeout=10)
