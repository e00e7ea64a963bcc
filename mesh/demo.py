"""``mesh demo``: a scripted tour of mesh on an embedded NATS server.

It starts NATS, the registry and the gateway, two worker processes hosting the
example agents (``workers.echo`` and ``workers.counter``), then shows requests
crossing processes, a worker leaving while calls keep succeeding, and error
replies. Every step checks what it shows; the demo exits 1 if anything is off.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
from collections import Counter as Tally
from pathlib import Path
from typing import Any

from rich.console import Console

from mesh._connect import connect
from mesh._control import control_request
from mesh._tables import fetch_workers, workers_table
from mesh.cli import SERVICES, running_services
from mesh.client import MeshClient
from mesh.config import ConnectConfig
from mesh.errors import MeshError
from mesh.ids import AgentId, TopicId
from mesh.server import NatsServer
from mesh.subjects import Subjects
from mesh.testing import WorkerProcess, eventually

AGENTS = (
    "workers.echo:Echo",
    "workers.counter:Counter",
    "workers.orders:Billing",
    "workers.orders:Audit",
)
SAMPLE_ROUTES = Path(__file__).resolve().parent / "samples" / "routes.json"
HEARTBEAT = 0.5


class DemoFailedError(Exception):
    """Something the demo shows did not happen as it should."""


class _Tour:
    def __init__(
        self, console: Console, client: MeshClient, subjects: Subjects, logs: str, url: str
    ) -> None:
        self.console = console
        self.logs = logs
        self.url = url
        self.client = client
        self.subjects = subjects
        self.step_number = 0

    def step(self, title: str, explanation: str) -> None:
        self.step_number += 1
        self.console.print()
        self.console.rule(f"[bold]{self.step_number}. {title}")
        self.console.print(explanation, style="dim")

    def expect(self, ok: bool, what: str) -> None:
        if ok:
            self.console.print(f"  [green]✓[/] {what}")
        else:
            self.console.print(f"  [red]✗ {what}[/]")
            raise DemoFailedError(what)

    async def call(self, target: str, message: dict[str, Any], msg_type: str | None = None) -> Any:
        reply = await self.client.call(
            AgentId.parse(target), message, message_type=msg_type, timeout=10
        )
        self.console.print(f"  {target} ← {message}  →  {reply}")
        return reply

    async def call_error(
        self,
        target: str,
        message: dict[str, Any],
        msg_type: str | None = None,
        timeout: float = 10.0,
    ) -> MeshError:
        try:
            await self.client.call(
                AgentId.parse(target), message, message_type=msg_type, timeout=timeout
            )
        except MeshError as exc:
            self.console.print(
                f"  {target} ← {message}  →  [yellow]error {int(exc.code)} {exc.wire_type}[/]:"
                f" {exc.message}"
            )
            return exc
        raise DemoFailedError(f"{target} should have failed")


async def _live_worker_ids(client: MeshClient, subjects: Subjects) -> set[str]:
    return {w.id for w in await fetch_workers(client.nc, subjects) if w.status == "healthy"}


async def _tour(tour: _Tour, workers: dict[str, WorkerProcess]) -> None:
    console, client, subjects = tour.console, tour.client, tour.subjects

    tour.step(
        "Two workers register",
        "Each worker process hosts the agent types echo and counter. It registers with the "
        "registry (KV bucket mesh-workers) and heartbeats every 0.5 s with its load.",
    )
    await eventually(
        lambda: _live_worker_ids(client, subjects),
        timeout=20,
        message="workers registering",
    )
    live = await eventually(
        lambda: _has_all(client, subjects, set(workers)), timeout=20, message="both workers"
    )
    console.print(workers_table(sorted(await fetch_workers(client.nc, subjects), key=_by_id)))
    tour.expect(live, f"both workers are live: {', '.join(sorted(workers))}")

    tour.step(
        "Requests cross processes",
        "The client sends to mesh.rpc.<type>.<key>; the gateway picks a live worker and "
        "forwards by request/reply. echo is stateless, so calls spread over both workers.",
    )
    answered_by: Tally[str] = Tally()
    for name in ("alice", "bob", "carol", "dave"):
        reply = await tour.call(f"echo/{name}", {"text": f"hello {name}"})
        answered_by[reply["worker"]] += 1
    # The pool's queue group picks at random: a few dozen calls show the spread surely.
    for n in range(40):
        reply = await client.call(AgentId("echo", f"visitor-{n}"), {"text": "hi"})
        answered_by[reply["worker"]] += 1
    console.print(f"  …and 40 more: answered by {dict(sorted(answered_by.items()))}")
    tour.expect(len(answered_by) == 2, "echo calls were answered by both workers")

    tour.step(
        "Agents with identity stay put",
        "counter/alice is one agent: every request for it reaches the same activation, which "
        "handles one message at a time, so concurrent increments are never lost.",
    )
    first = await tour.call("counter/alice", {"by": 1}, "Increment")
    replies = await asyncio.gather(
        *(
            client.call(AgentId("counter", "alice"), {"by": 1}, message_type="Increment")
            for _ in range(20)
        )
    )
    final = await tour.call("counter/alice", {}, "GetCount")
    console.print("  …and 20 concurrent increments")
    tour.expect(final["value"] == 21, "counter/alice counted all 21 increments")
    tour.expect(
        {r["worker"] for r in replies} == {first["worker"]},
        f"every counter/alice request went to {first['worker']}",
    )

    leaving = first["worker"]
    staying = next(w for w in workers if w != leaving)
    tour.step(
        f"{leaving} stops while calls are in flight",
        f"SIGTERM tells {leaving} to drain: it announces 'draining' so gateways stop "
        "choosing it, finishes the requests it holds, deregisters and exits 0. "
        "Meanwhile 30 slow echo calls (0.5 s each) and a stream of quick ones keep going.",
    )
    slow_calls = [
        asyncio.create_task(
            client.call(AgentId("echo", f"slow-{i}"), {"text": "slow", "delay": 0.5}, timeout=15)
        )
        for i in range(30)
    ]
    await asyncio.sleep(0.2)  # let the slow calls reach both workers before the signal
    workers[leaving].terminate()
    outcomes: Tally[str] = Tally()
    exit_code: int | None = None
    while exit_code is None:
        try:
            await client.call(AgentId("echo", "stream"), {"text": "tick"}, timeout=5)
            outcomes["ok"] += 1
        except MeshError as exc:
            outcomes[f"error {int(exc.code)}"] += 1
        process = workers[leaving].process
        assert process is not None
        exit_code = process.poll()
    slow_results = await asyncio.gather(*slow_calls, return_exceptions=True)
    slow_ok = sum(1 for r in slow_results if not isinstance(r, BaseException))
    console.print(
        f"  slow echo calls: {slow_ok}/30 succeeded; answered by "
        f"{dict(Tally(r['worker'] for r in slow_results if isinstance(r, dict)))}"
    )
    console.print(f"  calls made while {leaving} was leaving: {dict(outcomes)}")
    tour.expect(exit_code == 0, f"{leaving} exited with code 0")
    tour.expect(slow_ok == 30, "every in-flight call was answered, none failed")
    tour.expect(set(outcomes) == {"ok"}, "no call failed while the worker left")
    ids = await eventually(
        lambda: _only(client, subjects, {staying}), timeout=5, message="registry update"
    )
    tour.expect(bool(ids), f"the registry now lists only {staying}")
    moved = await tour.call("counter/alice", {}, "GetCount")
    tour.expect(moved["worker"] == staying, f"counter/alice now lives on {staying}")
    tour.expect(
        moved["value"] == 21,
        "and it still counts 21: each count was saved in KV before its reply"
        " (nats kv get mesh-state counter.alice), and the new activation loaded it",
    )

    tour.step(
        "Errors are replies with protocol codes",
        "Every failure is answered, with Nats-Service-Error-Code and a JSON error body.",
    )
    err = await tour.call_error("weather/paris", {"city": "Paris"})
    tour.expect(int(err.code) == 404, "an agent type nobody hosts: 404")
    err = await tour.call_error("counter/alice", {"by": 0}, "Increment")
    tour.expect(int(err.code) == 400, "a payload that does not fit the message model: 400")
    err = await tour.call_error("counter/alice", {}, "Decrement")
    tour.expect(int(err.code) == 400, "a message type the agent does not handle: 400")
    err = await tour.call_error("counter/alice", {"by": 2_000_000}, "Increment")
    tour.expect(
        int(err.code) == 500,
        f"a handler that raises: 500; the traceback is in {tour.logs}/{staying}.log",
    )
    err = await tour.call_error("echo/slowpoke", {"text": "zzz", "delay": 5}, timeout=1.0)
    tour.expect(int(err.code) == 504, "a reply that misses its 1 s deadline: 504")

    await _events(tour)
    await _routing(tour)
    await _autogen(tour)
    await _watching(tour)


async def _watching(tour: _Tour) -> None:
    from mesh._tables import health_table
    from mesh._trace import TraceContext
    from mesh.handlers.monitor import HealthReport

    tour.step(
        "The mesh watches itself",
        "The monitor reports each component's health (mesh status shows it too) and alerts"
        " on mesh.alerts.<severity>.<rule>; a W3C traceparent ties a request's hops together.",
    )
    nc, subjects = tour.client.nc, tour.subjects

    async def healthy() -> HealthReport | None:
        report = await control_request(
            nc, subjects.service("monitor", "health"), None, HealthReport, timeout=3
        )
        return report if report is not None and report.status == "ok" else None

    report = await eventually(healthy, timeout=10, message="health ok")
    tour.console.print(health_table(report))
    tour.expect(report.status == "ok", "every component is ok")
    caller = TraceContext.new()
    reply = await nc.request(
        subjects.rpc(AgentId("echo", "traced")),
        b'{"text": "follow me"}',
        timeout=5,
        headers={"traceparent": caller.header()},
    )
    returned = TraceContext.parse((reply.headers or {}).get("traceparent"))
    tour.console.print(f"  sent traceparent {caller.header()}")
    tour.console.print(f"  reply traceparent {returned.header() if returned else None}")
    tour.expect(
        returned is not None and returned.trace_id == caller.trace_id,
        f"the reply continues trace {caller.trace_id}; every log line written while serving"
        " it carries it too",
    )


async def _autogen(tour: _Tour) -> None:
    tour.step(
        "AutoGen agents on mesh",
        "An AutoGen RoutedAgent, unchanged, hosted by mesh worker --autogen in its own"
        " process; an AutoGen runtime here reaches it with send_message. Its state is saved"
        " in mesh-state after each message.",
    )
    try:
        from autogen_core import AgentId as AutogenAgentId
        from autogen_core import try_get_known_serializers_for_type

        from mesh.autogen import NatsAgentRuntime
        from workers.autogen_greeter import Greet, Greeting
    except ImportError:
        tour.console.print("  skipped: pip install 'mesh[autogen]' to see it")
        return
    host = WorkerProcess(
        tour.url,
        [],
        worker_id="autogen-worker",
        heartbeat_interval=HEARTBEAT,
        prefix=tour.subjects.prefix,
        log_path=os.path.join(tour.logs, "autogen-worker.log"),
        extra_args=["--autogen", "workers.autogen_greeter:register"],
    ).start()
    runtime = NatsAgentRuntime(nc=tour.client.nc, prefix=tour.subjects.prefix)
    try:
        await runtime.start()
        runtime.add_message_serializer(try_get_known_serializers_for_type(Greeting))
        greeter = AutogenAgentId("greeter", "en")

        async def greet(name: str) -> Greeting:
            reply: Greeting = await runtime.send_message(Greet(name), greeter)
            tour.console.print(f"  runtime.send_message(Greet({name!r}), {greeter})  →  {reply}")
            return reply

        first = await eventually(lambda: greet("Ada"), timeout=20, message="the greeter")
        second = await greet("Grace")
        tour.expect(second.greeted == first.greeted + 1, "one agent, one mailbox, its count kept")
        saved = await runtime.agent_save_state(greeter)
        tour.expect(saved == {"greeted": second.greeted}, f"its saved state: {saved}")
    finally:
        await runtime.stop()
        host.terminate()
        with contextlib.suppress(TimeoutError):
            await host.wait(15)
        host.stop()


async def _ledger(tour: _Tour, agent: str) -> list[str]:
    reply = await tour.client.call(AgentId.parse(agent), {}, message_type="GetLedger")
    return list(reply["entries"])


async def _events(tour: _Tour) -> None:
    tour.step(
        "Events reach every subscribing agent type",
        "Events are stored in the JetStream stream MESH_EVENTS. billing subscribes to topic "
        "type orders.created, audit to every topic type starting with 'orders.'; each event "
        "on TopicId(<type>, 'shop-1') reaches AgentId(billing, 'shop-1') and "
        "AgentId(audit, 'shop-1'), once each, acknowledged only after the handler succeeded.",
    )
    events = (
        ("orders.created", {"order_id": "A-1", "amount": 12.5}),
        ("orders.created", {"order_id": "A-2", "amount": 99.0}),
        ("orders.shipped", {"order_id": "A-1"}),
    )
    for topic_type, payload in events:
        ack = await tour.client.publish(
            TopicId(topic_type, "shop-1"), payload, message_type="OrderEvent"
        )
        tour.console.print(f"  published on {topic_type}/shop-1: {payload} (stored #{ack.seq})")

    async def both_handled() -> bool:
        return (
            len(await _ledger(tour, "billing/shop-1")) == 2
            and len(await _ledger(tour, "audit/shop-1")) == 3
        )

    await eventually(both_handled, timeout=15, message="event delivery")
    billing = await _ledger(tour, "billing/shop-1")
    audit = await _ledger(tour, "audit/shop-1")
    tour.console.print(f"  billing/shop-1: {billing}")
    tour.console.print(f"  audit/shop-1:   {audit}")
    tour.expect(
        billing == ["billed A-1: 12.50", "billed A-2: 99.00"],
        "billing got both new orders, in order",
    )
    tour.expect(
        audit == ["orders.created A-1", "orders.created A-2", "orders.shipped A-1"],
        "audit's prefix subscription also caught orders.shipped",
    )


async def _routing(tour: _Tour) -> None:
    from mesh.handlers.router import RouteRequest
    from mesh.routing import RouteRule, RoutingDecision, load_rules

    tour.step(
        "Messages are routed by content",
        "The router decides which agent type should take a message: rules (loaded from "
        "mesh/samples/routes.json into KV mesh-routes), then what feedback taught it, then a "
        "default type.",
    )
    nc, subjects = tour.client.nc, tour.subjects
    rules = load_rules(await asyncio.to_thread(SAMPLE_ROUTES.read_text))
    for rule in rules:
        await control_request(
            nc, subjects.service("router", "rule_put"), rule, RouteRule, timeout=3
        )
    for text, expected in (
        ("明天北京的天气怎么样", "weather"),
        ("Please calculate 17 * 23", "calculator"),
        ("Translate 'good morning' into French", "translator"),
        ("Write me a limerick about NATS", "assistant"),
    ):
        decision = await control_request(
            nc,
            subjects.service("router", "route"),
            RouteRequest(text=text),
            RoutingDecision,
            timeout=3,
        )
        assert decision is not None
        tour.console.print(
            f"  {text!r} → {decision.target} ({decision.strategy}, {decision.confidence:.2f}):"
            f" {decision.reasoning}"
        )
        tour.expect(decision.target == expected, f"routed to {expected}")


async def _has_all(client: MeshClient, subjects: Subjects, expected: set[str]) -> bool:
    return expected <= await _live_worker_ids(client, subjects)


async def _only(client: MeshClient, subjects: Subjects, expected: set[str]) -> bool:
    return {w.id for w in await fetch_workers(client.nc, subjects)} == expected


def _by_id(record: Any) -> str:
    return str(record.id)


async def run_demo(data_dir: str | None = None) -> int:
    """Run the tour; 0 when every step held."""
    console = Console(highlight=False)
    subjects = Subjects()
    console.rule("[bold]mesh demo")
    server = NatsServer(store_dir=data_dir)
    await asyncio.to_thread(server.start)
    workers: dict[str, WorkerProcess] = {}
    logs = tempfile.mkdtemp(prefix="mesh-demo-")
    try:
        console.print(f"NATS with JetStream is listening on {server.url}")
        console.print(f"worker logs go to {logs}")
        connect_config = ConnectConfig(url=server.url)
        async with running_services(connect_config, SERVICES, subjects):
            console.print(
                "registry, state, gateway and router are serving (micro services"
                " mesh-registry, mesh-state, mesh-gateway, mesh-router)"
            )
            for worker_id in ("worker-a", "worker-b"):
                workers[worker_id] = WorkerProcess(
                    server.url,
                    AGENTS,
                    worker_id=worker_id,
                    heartbeat_interval=HEARTBEAT,
                    log_path=os.path.join(logs, f"{worker_id}.log"),
                    log_level="info",
                ).start()
            nc = await connect(connect_config, name="mesh-demo")
            client = MeshClient(nc, subjects=subjects)
            try:
                await _tour(_Tour(console, client, subjects, logs, server.url), workers)
            finally:
                await nc.drain()
                for worker in workers.values():
                    worker.terminate()
                for worker in workers.values():
                    with contextlib.suppress(TimeoutError):
                        await worker.wait(15)
    except (DemoFailedError, MeshError, AssertionError) as exc:
        console.print(f"[red bold]demo failed:[/] {exc}")
        return 1
    finally:
        for worker in workers.values():
            worker.stop()
        await asyncio.to_thread(server.stop)
    console.print()
    console.rule("[green bold]demo finished: every step held")
    return 0
