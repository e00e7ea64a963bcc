"""AutoGen agents on mesh: NatsAgentRuntime across runtimes and processes."""

from __future__ import annotations

import asyncio
import itertools
from collections import Counter as Tally
from collections.abc import AsyncIterator, Callable

import orjson
import pytest
from autogen_core import (
    AgentId,
    CancellationToken,
    DefaultTopicId,
    TopicId,
    TypePrefixSubscription,
    TypeSubscription,
    try_get_known_serializers_for_type,
)
from autogen_core.exceptions import CantHandleException, UndeliverableException
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from mesh import MeshClient, MeshError
from mesh import ids as mesh_ids
from mesh.autogen import AgentHandlerError, NatsAgentRuntime
from mesh.config import EventsConfig, WorkerConfig
from mesh.handlers.gateway import Gateway
from mesh.handlers.router import Router
from mesh.handlers.state import StateService
from mesh.subjects import Subjects
from mesh.testing import eventually
from tests.autogen_agents import (
    SEEN_SUBJECT,
    Add,
    Count,
    Counter,
    Echo,
    Fail,
    Nothing,
    Ping,
    Pong,
    Unhandled,
)

Runtimes = Callable[..., NatsAgentRuntime]


@pytest.fixture
async def router(
    nc: NATS, subjects: Subjects, state_service: StateService
) -> AsyncIterator[Router]:
    config = EventsConfig(max_deliveries=3, retry_delay=0.05, handler_timeout=5.0, ack_wait=10.0)
    async with Router(nc, subjects, config) as service:
        yield service


@pytest.fixture
def services(gateway: Gateway, router: Router) -> Gateway:
    """Every mesh service the runtimes need; the gateway, to watch workers come."""
    return gateway


@pytest.fixture
async def runtimes(nats_url: str, subjects: Subjects, services: Gateway) -> AsyncIterator[Runtimes]:
    made: list[NatsAgentRuntime] = []

    def make(name: str, capacity: int = 64) -> NatsAgentRuntime:
        config = WorkerConfig(
            worker_id=name, heartbeat_interval=0.3, capacity=capacity, drain_timeout=5
        )
        runtime = NatsAgentRuntime(
            nats_url, prefix=subjects.prefix, worker_config=config, timeout=10
        )
        made.append(runtime)
        return runtime

    yield make
    await asyncio.gather(*(runtime.close() for runtime in made))


@pytest.fixture
async def seen(nc: NATS) -> AsyncIterator[list[str]]:
    """What the test agents announce having handled."""
    lines: list[str] = []

    async def note(msg: Msg) -> None:
        lines.append(msg.data.decode())

    sub = await nc.subscribe(SEEN_SUBJECT, cb=note)
    yield lines
    await sub.unsubscribe()


async def _caller(runtimes: Runtimes, name: str, *reads: type) -> NatsAgentRuntime:
    """A started runtime that hosts nothing and reads replies of the `reads` types."""
    runtime = runtimes(name)
    await runtime.start()
    for message_type in reads:
        runtime.add_message_serializer(try_get_known_serializers_for_type(message_type))
    return runtime


async def _hosting(runtimes: Runtimes, gateway: Gateway, agent_type: str) -> NatsAgentRuntime:
    """Runtime "a", hosting echo and counter."""
    host = runtimes("a", capacity=2048)
    await host.start()
    await Echo.register(host, "echo", lambda: Echo("a"))
    await Counter.register(host, "counter", Counter)
    await eventually(lambda: gateway.directory.live_workers(agent_type), timeout=15)
    return host


async def test_a_message_sent_from_one_runtime_is_answered_by_an_agent_on_another(
    runtimes: Runtimes, services: Gateway
) -> None:
    await _hosting(runtimes, services, "echo")
    caller = await _caller(runtimes, "b", Pong)
    reply = await caller.send_message(Ping("hi"), AgentId("echo", "k1"))
    assert reply == Pong("hi", "echo/k1", "a")


async def test_unknown_type_none_reply_and_unhandled_type_are_answered_promptly(
    runtimes: Runtimes, services: Gateway
) -> None:
    await _hosting(runtimes, services, "echo")
    caller = await _caller(runtimes, "b")
    async with asyncio.timeout(5):  # each answered at once, not at the 10 s deadline
        with pytest.raises(UndeliverableException, match="nobody"):
            await caller.send_message(Ping("x"), AgentId("nobody", "k"))
        assert await caller.send_message(Nothing(), AgentId("echo", "k")) is None
        with pytest.raises(CantHandleException, match="Unhandled"):
            await caller.send_message(Unhandled(), AgentId("echo", "k"))


async def test_a_reply_of_a_type_the_caller_cannot_read_is_a_clear_local_error(
    runtimes: Runtimes, services: Gateway
) -> None:
    await _hosting(runtimes, services, "echo")
    caller = await _caller(runtimes, "b")  # no serializer for Pong here
    with pytest.raises(ValueError, match="add_message_serializer"):
        await caller.send_message(Ping("x"), AgentId("echo", "k"))


async def test_a_handler_raising_reaches_the_caller_with_its_message_and_type(
    runtimes: Runtimes, services: Gateway
) -> None:
    await _hosting(runtimes, services, "echo")
    caller = await _caller(runtimes, "b")
    with pytest.raises(AgentHandlerError, match="boom") as raised:
        await caller.send_message(Fail("boom"), AgentId("echo", "k"))
    assert raised.value.exception_type == "ValueError"
    assert raised.value.detail == "boom"


async def test_many_concurrent_callers_each_get_their_own_replies(
    runtimes: Runtimes, services: Gateway
) -> None:
    await _hosting(runtimes, services, "echo")
    callers = [await _caller(runtimes, name, Pong) for name in ("b", "c")]

    async def one(caller: NatsAgentRuntime, n: int) -> tuple[str, str]:
        text = f"{caller.worker_id}-{n}"
        reply = await caller.send_message(Ping(text), AgentId("echo", f"k{n % 20}"))
        return text, reply.text

    pairs = await asyncio.gather(*(one(c, n) for c in callers for n in range(500)))
    assert len(pairs) == 1000
    assert all(sent == got for sent, got in pairs)


async def test_calls_to_one_agent_never_overlap(runtimes: Runtimes, services: Gateway) -> None:
    from tests.autogen_agents import Sequential, Span

    host = runtimes("a")
    await host.start()
    await Sequential.register(host, "sequential", Sequential)
    await eventually(lambda: services.directory.live_workers("sequential"), timeout=15)
    callers = [await _caller(runtimes, name, Span) for name in ("b", "c")]
    spans = await asyncio.gather(
        *(
            c.send_message(Ping("x", delay=0.02), AgentId("sequential", "one"))
            for c in callers
            for _ in range(10)
        )
    )
    ordered = sorted((s.started, s.ended) for s in spans)
    assert all(ended <= start for (_, ended), (start, _) in itertools.pairwise(ordered))


async def test_cancelling_the_callers_token_cancels_the_remote_handler(
    runtimes: Runtimes, services: Gateway, seen: list[str]
) -> None:
    from tests.autogen_agents import Patient

    host = runtimes("a")
    await host.start()
    await Patient.register(host, "patient", Patient)
    await eventually(lambda: services.directory.live_workers("patient"), timeout=15)
    caller = await _caller(runtimes, "b", Pong)
    token = CancellationToken()
    call = asyncio.create_task(
        caller.send_message(
            Ping("wait", delay=30), AgentId("patient", "p"), cancellation_token=token
        )
    )
    await eventually(lambda: services._waiting_on.get("a"), timeout=10)
    token.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    # The handler was cancelled, and its own cancellation token says so.
    await eventually(lambda: "cancelled|wait|True" in seen, timeout=10)
    reply = await caller.send_message(Ping("next"), AgentId("patient", "p"))
    assert reply.text == "next"  # the agent's mailbox is free again


async def test_publish_reaches_type_prefix_and_default_subscribers_exactly(
    runtimes: Runtimes, services: Gateway, router: Router, seen: list[str]
) -> None:
    from tests.autogen_agents import DefaultReader, Listener, NewsReader, Note

    a, b = runtimes("a"), runtimes("b")
    await a.start()
    await b.start()
    await NewsReader.register(a, "news-reader", NewsReader)  # @type_subscription("news")
    await DefaultReader.register(b, "default-reader", DefaultReader)  # @default_subscription
    await Listener.register(b, "sports-fan", Listener)
    await b.add_subscription(TypePrefixSubscription("sports.", "sports-fan"))
    for agent_type in ("news-reader", "default-reader", "sports-fan"):
        await eventually(lambda t=agent_type: services.directory.live_workers(t), timeout=15)
    # Each type's subscriptions, plus its direct-message prefix ("<type>:").
    await _covered(router, {"news-reader": 2, "default-reader": 2, "sports-fan": 2})

    await a.publish_message(Note("n1"), TopicId("news", "src1"))
    await b.publish_message(Note("d1"), DefaultTopicId())
    await b.publish_message(Note("s1"), TopicId("sports.football", "src2"))
    await b.publish_message(Note("x1"), TopicId("weather", "src3"))  # nobody's
    expected = {
        "news-reader/src1|news/src1|n1",
        "default-reader/default|default/default|d1",
        "sports-fan/src2|sports.football/src2|s1",
    }
    await eventually(lambda: set(seen) == expected, timeout=15)
    await _quiet(seen)  # and nothing more arrives (x1 has no subscriber)
    assert sorted(seen) == sorted(expected)


async def test_removing_a_subscription_stops_delivery(
    runtimes: Runtimes, services: Gateway, router: Router, seen: list[str]
) -> None:
    from tests.autogen_agents import Listener, Note

    a = runtimes("a")
    await a.start()
    await Listener.register(a, "listener", Listener)
    subscription = TypeSubscription("alerts", "listener")
    await a.add_subscription(subscription)
    await _covered(router, {"listener": 2})
    await a.publish_message(Note("before"), TopicId("alerts", "s"))
    await eventually(lambda: "listener/s|alerts/s|before" in seen, timeout=15)
    await a.remove_subscription(subscription.id)
    with pytest.raises(LookupError):
        await a.remove_subscription(subscription.id)
    await a.publish_message(Note("after"), TopicId("alerts", "s"))
    await a.publish_message(Note("marker"), TopicId("listener:direct", "s"))  # still wanted
    await eventually(lambda: any(line.endswith("|marker") for line in seen), timeout=15)
    assert not any(line.endswith("|after") for line in seen)


async def test_an_agent_does_not_get_its_own_publication(
    runtimes: Runtimes, services: Gateway, router: Router, seen: list[str]
) -> None:
    from tests.autogen_agents import Note, Publisher

    a = runtimes("a")
    await a.start()
    await Publisher.register(a, "publisher", Publisher)
    await a.add_subscription(TypeSubscription("news", "publisher"))
    await a.add_subscription(TypeSubscription("start", "publisher"))
    await _covered(router, {"publisher": 3})
    # publisher/s1 hears "start" and publishes on news/s1: as the sender, it must not hear it.
    await a.publish_message(Note("go"), TopicId("start", "s1"))
    await eventually(lambda: "publisher/s1|start/s1|go" in seen, timeout=15)
    await a.publish_message(Note("control"), TopicId("news", "s1"))  # from no agent: heard
    await eventually(lambda: "publisher/s1|news/s1|control" in seen, timeout=15)
    assert not any(line.startswith("publisher/s1|news/s1|go") for line in seen)


async def test_a_publish_cascade_over_two_runtimes_has_exact_counts(
    runtimes: Runtimes, services: Gateway, router: Router, seen: list[str]
) -> None:
    from tests.autogen_agents import Cascade, Note

    a, b = runtimes("a"), runtimes("b")
    await a.start()
    await b.start()
    for level in range(1, 5):  # levels 1 and 3 on a, 2 and 4 on b
        host = a if level % 2 else b
        await Cascade.register(host, f"level{level}", lambda n=level: Cascade(n, 4))
        await host.add_subscription(TypeSubscription(f"level{level}", f"level{level}"))
    await _covered(router, {f"level{n}": 2 for n in range(1, 5)})
    for n in range(5):
        await a.publish_message(Note(f"m{n}"), TopicId("level1", "c"))
    await eventually(lambda: len(seen) >= 20, timeout=20)
    await _quiet(seen)  # and no more than that
    counts = Tally(line.split("|")[0] for line in seen)
    assert counts == {f"level{n}/c": 5 for n in range(1, 5)}
    assert len(seen) == len(set(seen)) == 20


async def _quiet(seen: list[str], period: float = 0.5) -> None:
    """Absence has no event to wait for: give a stray delivery `period` to show up."""
    count = len(seen)
    await asyncio.sleep(period)
    assert len(seen) == count, seen[count:]


async def _covered(router: Router, wanted: dict[str, int]) -> None:
    """Wait until the router's consumers cover each type's subscriptions: events
    published before that would not be delivered."""

    def covered() -> bool:
        return all(
            (d := router.consumer(agent_type)) is not None and len(d.subscriptions) >= count
            for agent_type, count in wanted.items()
        )

    await eventually(covered, timeout=15, message=f"subscriptions {wanted}")


async def test_a_process_hosting_the_type_dies_mid_call_and_a_new_one_takes_over(
    runtimes: Runtimes, services: Gateway, spawn_worker: type
) -> None:
    autogen = ["--autogen", "tests.autogen_agents:register"]
    first = spawn_worker(worker_id="ag-first", extra_args=autogen)
    await eventually(lambda: services.directory.live_workers("echo"), timeout=20)
    caller = await _caller(runtimes, "b", Pong)
    assert (await caller.send_message(Ping("up"), AgentId("echo", "k"))).runtime == "ag-first"

    call = asyncio.create_task(caller.send_message(Ping("doomed", delay=30), AgentId("echo", "k")))
    await eventually(lambda: services._waiting_on.get("ag-first"), timeout=10)
    started = asyncio.get_running_loop().time()
    first.kill()
    with pytest.raises(MeshError) as raised:
        await call
    assert raised.value.code == 503  # "went away", well before the 10 s timeout
    assert asyncio.get_running_loop().time() - started < 8

    spawn_worker(worker_id="ag-second", extra_args=autogen)
    await eventually(
        lambda: [w.id for w in services.directory.live_workers("echo")] == ["ag-second"],
        timeout=20,
    )
    reply = await caller.send_message(Ping("again"), AgentId("echo", "k"))
    assert reply.runtime == "ag-second"


async def test_runtime_state_saved_in_one_runtime_loads_into_a_fresh_one(
    runtimes: Runtimes, services: Gateway
) -> None:
    first = runtimes("first")
    await first.start()
    await Counter.register(first, "counter", Counter)
    await eventually(lambda: services.directory.live_workers("counter"), timeout=15)
    for key, by in (("c1", 3), ("c2", 5), ("c1", 4)):
        reply = await first.send_message(Add(by), AgentId("counter", key))
    assert reply == Count(value=7)
    saved = await first.save_state()
    assert saved == {"counter/c1": {"value": 7}, "counter/c2": {"value": 5}}
    assert await first.agent_save_state(AgentId("counter", "c2")) == {"value": 5}
    await first.close()

    fresh = runtimes("fresh")
    await fresh.start()
    await Counter.register(fresh, "counter", Counter)
    await eventually(
        lambda: [w.id for w in services.directory.live_workers("counter")] == ["fresh"],
        timeout=15,
    )
    await fresh.load_state({"counter/c1": {"value": 100}, "counter/c3": {"value": 1}})
    assert await fresh.send_message(Add(1), AgentId("counter", "c1")) == Count(value=101)
    assert await fresh.send_message(Add(1), AgentId("counter", "c3")) == Count(value=2)
    # c2 was not in what was loaded: it carries on from what mesh saved for it.
    assert await fresh.send_message(Add(1), AgentId("counter", "c2")) == Count(value=6)


async def test_an_agentchat_round_robin_team_runs_with_its_agents_on_two_runtimes(
    runtimes: Runtimes, services: Gateway, router: Router
) -> None:
    from autogen_agentchat.agents import AssistantAgent
    from autogen_agentchat.conditions import MaxMessageTermination
    from autogen_agentchat.teams import RoundRobinGroupChat
    from autogen_agentchat.teams._group_chat._chat_agent_container import ChatAgentContainer
    from autogen_ext.models.replay import ReplayChatCompletionClient

    a, b = runtimes("a"), runtimes("b")
    await a.start()
    await b.start()
    alice = AssistantAgent(
        "alice", model_client=ReplayChatCompletionClient(["Hello Bob.", "Bye Bob."])
    )
    bob = AssistantAgent("bob", model_client=ReplayChatCompletionClient(["Hi Alice.", "Bye."]))
    team = RoundRobinGroupChat(
        [alice, bob], termination_condition=MaxMessageTermination(5), runtime=a
    )
    # Bob's container is hosted by runtime b only; alice and the manager by a.
    await ChatAgentContainer.register(
        b,
        type=team._participant_topic_types[1],
        factory=team._create_participant_factory(
            team._group_topic_type, team._output_topic_type, bob, team._message_factory
        ),
    )
    original_register = ChatAgentContainer.register

    async def register_elsewhere(runtime: object, type: str, factory: object) -> object:
        if type == team._participant_topic_types[1]:
            from autogen_core import AgentType

            return AgentType(type)  # already hosted by b
        return await original_register(runtime, type=type, factory=factory)  # type: ignore[arg-type]

    ChatAgentContainer.register = register_elsewhere  # type: ignore[method-assign,assignment]
    try:
        await team._init(a)
    finally:
        ChatAgentContainer.register = original_register  # type: ignore[method-assign]
    bob_type = team._participant_topic_types[1]
    await eventually(
        lambda: [w.id for w in services.directory.live_workers(bob_type)] == ["b"], timeout=15
    )
    await _covered(router, {bob_type: 2, team._participant_topic_types[0]: 2})

    result = await asyncio.wait_for(team.run(task="Start."), timeout=60)
    spoken = [(m.source, m.to_text()) for m in result.messages]
    assert spoken == [
        ("user", "Start."),
        ("alice", "Hello Bob."),
        ("bob", "Hi Alice."),
        ("alice", "Bye Bob."),
        ("bob", "Bye."),
    ]


async def test_protobuf_messages_travel_as_protobuf(runtimes: Runtimes, services: Gateway) -> None:
    from google.protobuf.wrappers_pb2 import StringValue

    from tests.autogen_agents import ProtoEcho

    host = runtimes("a")
    await host.start()
    await ProtoEcho.register(host, "proto-echo", ProtoEcho)
    await eventually(lambda: services.directory.live_workers("proto-echo"), timeout=15)
    caller = await _caller(runtimes, "b", StringValue)
    reply = await caller.send_message(StringValue(value="quiet"), AgentId("proto-echo", "k"))
    assert reply == StringValue(value="QUIET")


async def test_the_trace_context_follows_a_message_into_nested_sends(
    runtimes: Runtimes, services: Gateway
) -> None:
    from tests.autogen_agents import Ask, TraceAsker, TraceProbe, Traces

    a, b = runtimes("a"), runtimes("b")
    await a.start()
    await b.start()
    await TraceAsker.register(a, "asker", TraceAsker)
    await TraceProbe.register(b, "probe", TraceProbe)
    for agent_type in ("asker", "probe"):
        await eventually(lambda t=agent_type: services.directory.live_workers(t), timeout=15)
    a.add_message_serializer(try_get_known_serializers_for_type(Pong))  # the probe's reply
    b.add_message_serializer(try_get_known_serializers_for_type(Traces))
    traces = await b.send_message(Ask("probe", "x"), AgentId("asker", "k"))
    outer, inner = traces.outer.split("-"), traces.inner.split("-")
    assert len(outer) == len(inner) == 4
    assert outer[1] == inner[1]  # one trace id across both hops
    assert outer[2] != inner[2]  # each hop its own span


async def test_bad_messages_to_an_autogen_agent_get_400_with_the_protocols_codes(
    nc: NATS, subjects: Subjects, runtimes: Runtimes, services: Gateway
) -> None:
    await _hosting(runtimes, services, "counter")
    client = MeshClient(nc, subjects=subjects)
    target = mesh_ids.AgentId("counter", "bad")

    async def send(message_type: str, body: bytes) -> MeshError:
        headers = {"Content-Type": "application/json", "Mesh-Msg-Type": message_type}
        with pytest.raises(MeshError) as raised:
            await client.send_raw(target, body, headers=headers, timeout=5)
        return raised.value

    unknown = await send("NoSuchType", b"{}")
    assert (unknown.code, unknown.wire_type) == (400, "UnknownMessageType")
    garbled = await send("Add", b"not json")
    assert (garbled.code, garbled.wire_type) == (400, "InvalidPayload")
    bad_state = await send("mesh.autogen.LoadState", b"[1, 2]")
    assert (bad_state.code, bad_state.wire_type) == (400, "InvalidPayload")
    # None of it reached the agent's state.
    reply = await client.send_raw(
        target, b'{"by": 1}', headers={"Content-Type": "application/json", "Mesh-Msg-Type": "Add"}
    )
    assert orjson.loads(reply.data) == {"value": 1}


async def test_several_runtimes_hosting_one_type_share_its_agents(
    runtimes: Runtimes, services: Gateway
) -> None:
    hosts = [runtimes("a"), runtimes("c")]
    for host in hosts:
        await host.start()
        await Echo.register(host, "echo", lambda h=host: Echo(str(h.worker_id)))
    await eventually(lambda: len(services.directory.live_workers("echo")) == 2, timeout=15)
    caller = await _caller(runtimes, "b", Pong)
    first = {
        n: (await caller.send_message(Ping("x"), AgentId("echo", f"k{n}"))).runtime
        for n in range(40)
    }
    assert set(first.values()) == {"a", "c"}
    again = {
        n: (await caller.send_message(Ping("x"), AgentId("echo", f"k{n}"))).runtime
        for n in range(40)
    }
    assert again == first  # each agent stays where it was placed


async def test_a_registered_instance_is_the_one_that_answers(
    runtimes: Runtimes, services: Gateway
) -> None:
    host = runtimes("a")
    await host.start()
    instance = Echo("hand-made")
    await host.register_agent_instance(instance, AgentId("solo", "only"))
    await eventually(lambda: services.directory.live_workers("solo"), timeout=15)
    caller = await _caller(runtimes, "b", Pong)
    reply = await caller.send_message(Ping("x"), AgentId("solo", "only"))
    assert reply.runtime == "hand-made"
    assert await host.try_get_underlying_agent_instance(AgentId("solo", "only"), Echo) is instance
    assert (await host.agent_metadata(AgentId("solo", "only")))["description"] == "echo"
    with pytest.raises(MeshError, match="not registered here") as raised:
        await caller.send_message(Ping("x"), AgentId("solo", "other"))
    assert raised.value.code == 400


async def test_stop_when_idle_waits_for_the_message_in_hand(
    runtimes: Runtimes, services: Gateway
) -> None:
    host = await _hosting(runtimes, services, "echo")
    caller = await _caller(runtimes, "b", Pong)
    call = asyncio.create_task(caller.send_message(Ping("slow", delay=0.5), AgentId("echo", "k")))
    await eventually(lambda: services._waiting_on.get("a"), timeout=10)
    await asyncio.wait_for(host.stop_when_idle(), timeout=10)
    assert (await call).text == "slow"  # finished, not cut off
    await eventually(lambda: not services.directory.live_workers("echo"), timeout=15)


async def test_an_autogen_worker_process_drains_and_leaves_on_sigterm(
    runtimes: Runtimes, services: Gateway, spawn_worker: type
) -> None:
    worker = spawn_worker(
        worker_id="ag-term", extra_args=["--autogen", "tests.autogen_agents:register"]
    )
    await eventually(lambda: services.directory.live_workers("echo"), timeout=20)
    caller = await _caller(runtimes, "b", Pong)
    call = asyncio.create_task(caller.send_message(Ping("last", delay=0.5), AgentId("echo", "k")))
    await eventually(lambda: services._waiting_on.get("ag-term"), timeout=10)
    worker.terminate()
    assert (await call).text == "last"  # the message in hand was finished
    assert await worker.wait(15) == 0
    await eventually(lambda: not services.directory.live_workers("echo"), timeout=10)


async def test_a_call_past_the_runtimes_timeout_is_504_and_its_handler_cancelled(
    nats_url: str, subjects: Subjects, runtimes: Runtimes, services: Gateway, seen: list[str]
) -> None:
    from tests.autogen_agents import Patient

    host = runtimes("a")
    await host.start()
    await Patient.register(host, "patient", Patient)
    await eventually(lambda: services.directory.live_workers("patient"), timeout=15)
    hasty = NatsAgentRuntime(nats_url, prefix=subjects.prefix, timeout=1.0)
    await hasty.start()
    try:
        started = asyncio.get_running_loop().time()
        with pytest.raises(MeshError) as raised:
            await hasty.send_message(Ping("late", delay=30), AgentId("patient", "p"))
        assert raised.value.code == 504
        assert asyncio.get_running_loop().time() - started < 3
        # The handler ran into the same deadline, and its token said so.
        await eventually(lambda: "cancelled|late|True" in seen, timeout=10)
    finally:
        await hasty.close()


async def test_a_handler_still_running_when_its_runtime_stops_can_send(
    runtimes: Runtimes, services: Gateway
) -> None:
    from tests.autogen_agents import Ask, Asker

    host = await _hosting(runtimes, services, "echo")
    asker_host = runtimes("c")
    await asker_host.start()
    await Asker.register(asker_host, "asker", Asker)
    asker_host.add_message_serializer(try_get_known_serializers_for_type(Pong))
    await eventually(lambda: services.directory.live_workers("asker"), timeout=15)
    caller = await _caller(runtimes, "b", Pong)
    call = asyncio.create_task(
        caller.send_message(Ask("echo", "late", delay=0.5), AgentId("asker", "k"))
    )
    await eventually(lambda: services._waiting_on.get("c"), timeout=10)
    await asker_host.stop()  # drains: the handler sends after this began
    reply = await call
    assert (reply.text, reply.runtime) == ("late", "a")
    assert host.worker_id == "a"


async def test_registered_instances_stay_on_their_process_across_idle_eviction(
    nats_url: str, subjects: Subjects, services: Gateway
) -> None:
    made: list[NatsAgentRuntime] = []
    try:
        for name in ("p1", "p2"):
            runtime = NatsAgentRuntime(
                nats_url,
                prefix=subjects.prefix,
                worker_config=WorkerConfig(
                    worker_id=name, heartbeat_interval=0.3, idle_timeout=0.3
                ),
                timeout=10,
            )
            made.append(runtime)
            await runtime.start()
            await runtime.register_agent_instance(Echo(name), AgentId("solo", name))
        await eventually(lambda: len(services.directory.live_workers("solo")) == 2, timeout=15)
        caller = made[0]
        caller.add_message_serializer(try_get_known_serializers_for_type(Pong))
        for _ in range(3):  # each round after both activations went idle and were evicted
            for name in ("p1", "p2"):
                reply = await caller.send_message(Ping("x"), AgentId("solo", name))
                assert reply.runtime == name
            await eventually(lambda: not any(r._instances for r in made), timeout=10)
    finally:
        for runtime in made:
            await runtime.close()
