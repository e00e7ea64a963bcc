"""The ``mesh`` command line."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import inspect
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any, cast

import orjson

from mesh import metrics
from mesh._conflicts import CONFLICT_POLICIES
from mesh._connect import connect
from mesh._control import control_request
from mesh._logging import configure_logging
from mesh._otel import configure_from_env as configure_tracing
from mesh.agent import Agent
from mesh.client import MeshClient
from mesh.codec import JSON_CODEC, MSGPACK_CODEC, json_object
from mesh.config import (
    AuthConfig,
    ConnectConfig,
    EventsConfig,
    GatewayConfig,
    MonitorConfig,
    RegistryConfig,
    StateConfig,
    WorkerConfig,
)
from mesh.errors import BadRequestError, MeshError
from mesh.ids import AgentId, TopicId
from mesh.server import NatsServer
from mesh.subjects import Subjects

logger = logging.getLogger("mesh")

SERVICES = ("registry", "state", "gateway", "router", "monitor")


def run(coro: Coroutine[Any, Any, int]) -> int:
    """Run `coro` on uvloop when it is installed."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency off Windows
        return asyncio.run(coro)
    return uvloop.run(coro)


def load_agent_class(spec: str) -> type[Agent]:
    """Import ``module:Class``; the current directory is importable, as for ``python -m``."""
    module_name, sep, class_name = spec.partition(":")
    if not sep or not module_name or not class_name:
        raise BadRequestError(f"expected MODULE:Class, not {spec!r}")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    module = importlib.import_module(module_name)
    cls = getattr(module, class_name, None)
    if not (isinstance(cls, type) and issubclass(cls, Agent)):
        raise BadRequestError(f"{spec} is not an Agent subclass")
    return cls


def load_function(spec: str) -> Callable[[Any], Awaitable[None] | None]:
    """Import ``module:function`` (the current directory is importable)."""
    module_name, sep, name = spec.partition(":")
    if not sep or not module_name or not name:
        raise BadRequestError(f"expected MODULE:function, not {spec!r}")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    function = getattr(importlib.import_module(module_name), name, None)
    if not callable(function):
        raise BadRequestError(f"{spec} is not a function")
    return cast(Callable[[Any], Awaitable[None] | None], function)


# Process plumbing


async def wait_for_stop_signal() -> None:
    """Return on SIGTERM or SIGINT."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)


@contextlib.asynccontextmanager
async def running_services(
    connect_config: ConnectConfig, names: Sequence[str], subjects: Subjects
) -> AsyncIterator[None]:
    """Run the named services on one connection for the duration of the block."""
    from mesh.handlers.gateway import Gateway
    from mesh.handlers.monitor import Monitor
    from mesh.handlers.registry import Registry
    from mesh.handlers.router import Router
    from mesh.handlers.state import StateService

    unknown = sorted(set(names) - set(SERVICES))
    if unknown:
        raise BadRequestError(f"unknown services {unknown}; choose from {list(SERVICES)}")
    nc = await connect(connect_config, name=f"{subjects.prefix}-services")
    started: list[Registry | StateService | Gateway | Router | Monitor] = []
    try:
        registry_config = RegistryConfig.from_env()
        for name in SERVICES:  # registry first: gateways and workers need it
            if name not in names:
                continue
            service: Registry | StateService | Gateway | Router | Monitor
            if name == "registry":
                service = Registry(nc, subjects, registry_config)
            elif name == "state":
                service = StateService(nc, subjects, StateConfig.from_env())
            elif name == "gateway":
                service = Gateway(
                    nc,
                    subjects,
                    GatewayConfig.from_env(),
                    registry_config,
                    auth=AuthConfig.from_env(),
                )
            elif name == "router":
                service = Router(nc, subjects, EventsConfig.from_env())
            else:
                service = Monitor(nc, subjects, MonitorConfig.from_env(), registry_config)
            await service.start()
            started.append(service)
            if isinstance(service, Registry | Gateway) and not any(
                isinstance(s, Registry | Gateway) for s in started[:-1]
            ):
                metrics.register_figures(
                    "mesh_live_workers",
                    "Live workers hosting each agent type.",
                    "agent_type",
                    service.directory.live_worker_counts,
                )
            logger.info("%s serving on %s", name, connect_config.url)
        yield
    finally:
        for service in reversed(started):
            await service.shutdown()
        await close_connection(nc)


@contextlib.contextmanager
def nats_for(args: argparse.Namespace) -> Any:
    """The NATS to use: ``--nats`` if given, else an embedded server for the block."""
    if args.nats:
        yield ConnectConfig.from_env({**os.environ, "MESH_NATS_URL": args.nats})
        return
    size = getattr(args, "cluster", None)
    if size:
        from mesh.cluster import NatsCluster

        # Every bucket and stream on up to three nodes, as in a production cluster.
        os.environ["MESH_REPLICAS"] = str(min(size, 3))
        with NatsCluster(size, store_dir=getattr(args, "data_dir", None)) as cluster:
            yield ConnectConfig.from_env({**os.environ, "MESH_NATS_URL": cluster.urls})
        return
    with NatsServer(store_dir=getattr(args, "data_dir", None)) as server:
        yield ConnectConfig.from_env({**os.environ, "MESH_NATS_URL": server.url})


@contextlib.asynccontextmanager
async def cli_connection(args: argparse.Namespace) -> AsyncIterator[Any]:
    """A short-lived connection for one CLI command (``--nats``, else ``MESH_NATS_URL``)."""
    connect_config = ConnectConfig.from_env({**os.environ, "MESH_NATS_URL": args.nats or ""})
    nc = await connect(connect_config, name="mesh-cli", reconnect=False)
    try:
        yield nc
    finally:
        await close_connection(nc)


async def jetstream_ready(connect_config: ConnectConfig, timeout: float = 30.0) -> None:
    """Wait until JetStream answers (a new cluster first elects its meta leader)."""
    nc = await connect(connect_config, name="mesh-up-probe", reconnect=False)
    try:
        async with asyncio.timeout(timeout):
            while True:
                try:
                    await nc.jetstream().account_info()
                    return
                except Exception:
                    await asyncio.sleep(0.2)
    finally:
        await close_connection(nc)


async def close_connection(nc: Any) -> None:
    """Drain `nc`, or just close it when it cannot drain (reconnecting, already closed)."""
    try:
        await nc.drain()
    except Exception as exc:
        logger.info("closing the NATS connection without draining: %s", exc)
        with contextlib.suppress(Exception):
            await nc.close()


# Commands


async def cmd_up(args: argparse.Namespace) -> int:
    with nats_for(args) as connect_config:
        subjects = Subjects(args.prefix)
        await jetstream_ready(connect_config)
        async with running_services(connect_config, SERVICES, subjects):
            print(f"mesh is up on {connect_config.url} (prefix {subjects.prefix})", flush=True)
            print(f"  workers:  MESH_NATS_URL={connect_config.url} mesh worker MODULE:Class")
            print(f"  call:     mesh --nats {connect_config.url} call echo/alice '{{...}}'")
            await wait_for_stop_signal()
    return 0


async def cmd_serve(args: argparse.Namespace) -> int:
    connect_config = ConnectConfig.from_env({**os.environ, "MESH_NATS_URL": args.nats or ""})
    async with running_services(connect_config, args.services, Subjects(args.prefix)):
        await wait_for_stop_signal()
    return 0


def worker_config(args: argparse.Namespace) -> WorkerConfig:
    base = WorkerConfig.from_env()
    return WorkerConfig(
        worker_id=args.worker_id or base.worker_id,
        heartbeat_interval=args.heartbeat_interval or base.heartbeat_interval,
        max_in_flight=args.max_in_flight or base.max_in_flight,
        capacity=args.capacity or base.capacity,
        drain_timeout=args.drain_timeout or base.drain_timeout,
        idle_timeout=args.idle_timeout or base.idle_timeout,
        register_timeout=base.register_timeout,
        mailbox_limit=base.mailbox_limit,
    )


async def serve_worker(args: argparse.Namespace, agents: Sequence[type[Agent]]) -> int:
    from mesh.worker import Worker

    subjects = Subjects(args.prefix)
    connect_config = ConnectConfig.from_env({**os.environ, "MESH_NATS_URL": args.nats or ""})
    config = worker_config(args)
    nc = await connect(connect_config, name=f"{subjects.prefix}-worker")
    try:
        worker = Worker(nc, agents, config, subjects)
        metrics.register_figures(
            "mesh_activations",
            "Agents active on this worker.",
            "agent_type",
            worker.activation_counts,
        )
        print(f"worker {worker.id} hosting {', '.join(worker.agent_types)}", flush=True)
        await worker.run(handle_signals=True)
    finally:
        await close_connection(nc)
    return 0


async def cmd_worker(args: argparse.Namespace) -> int:
    if args.autogen:
        if args.agents:
            raise BadRequestError("give either MODULE:Class agents or --autogen, not both")
        return await serve_autogen(args, load_function(args.autogen))
    if not args.agents:
        raise BadRequestError("which agents? mesh worker MODULE:Class [...]")
    return await serve_worker(args, [load_agent_class(spec) for spec in args.agents])


async def serve_autogen(
    args: argparse.Namespace, register: Callable[[Any], Awaitable[None] | None]
) -> int:
    """Host AutoGen agents: `register` registers them on a `NatsAgentRuntime`."""
    from mesh.autogen import NatsAgentRuntime

    subjects = Subjects(args.prefix)
    connect_config = ConnectConfig.from_env({**os.environ, "MESH_NATS_URL": args.nats or ""})
    nc = await connect(connect_config, name=f"{subjects.prefix}-autogen-worker")
    try:
        runtime = NatsAgentRuntime(nc=nc, prefix=subjects.prefix, worker_config=worker_config(args))
        await runtime.start()
        try:
            registered = register(runtime)
            if inspect.isawaitable(registered):
                await registered
            print(f"worker {runtime.worker_id} hosting AutoGen agents", flush=True)
            await runtime.stop_when_signal()
        finally:
            await runtime.close()
    finally:
        await close_connection(nc)
    return 0


async def cmd_call(args: argparse.Namespace) -> int:
    target = AgentId.parse(args.agent)
    try:
        payload = orjson.loads(args.payload) if args.payload else None
    except orjson.JSONDecodeError as exc:
        raise BadRequestError(f"the payload is not JSON: {exc}") from exc
    connect_config = ConnectConfig.from_env({**os.environ, "MESH_NATS_URL": args.nats or ""})
    client = await MeshClient.connect(
        connect_config,
        subjects=Subjects(args.prefix),
        codec=MSGPACK_CODEC if args.msgpack else JSON_CODEC,
    )
    async with client:
        reply = await client.call(target, payload, message_type=args.type, timeout=args.timeout)
    print(orjson.dumps(reply, option=orjson.OPT_INDENT_2).decode() if reply is not None else "")
    return 0


async def cmd_publish(args: argparse.Namespace) -> int:
    topic = TopicId.parse(args.topic)
    try:
        payload = orjson.loads(args.payload) if args.payload else None
    except orjson.JSONDecodeError as exc:
        raise BadRequestError(f"the payload is not JSON: {exc}") from exc
    connect_config = ConnectConfig.from_env({**os.environ, "MESH_NATS_URL": args.nats or ""})
    client = await MeshClient.connect(connect_config, subjects=Subjects(args.prefix))
    async with client:
        ack = await client.publish(topic, payload, message_type=args.type, message_id=args.msg_id)
    print(f"stored as {ack.stream} #{ack.seq}" + (" (duplicate, dropped)" if ack.duplicate else ""))
    return 0


async def cmd_subscriptions(args: argparse.Namespace) -> int:
    from mesh._tables import fetch_subscriptions, print_subscriptions

    async with cli_connection(args) as nc:
        print_subscriptions(
            await fetch_subscriptions(nc, Subjects(args.prefix), never_matched=args.never_matched)
        )
    return 0


async def cmd_routes(args: argparse.Namespace) -> int:
    from mesh.handlers.router import RemovedReply, RouteRequest, RuleDeleteRequest, RulesReply
    from mesh.routing import RouteRule, RoutingDecision, load_rules

    subjects = Subjects(args.prefix)
    async with cli_connection(args) as nc:
        if args.action == "load":
            try:
                text = await asyncio.to_thread(Path(args.arg).read_text)
            except OSError as exc:
                raise BadRequestError(f"cannot read {args.arg}: {exc.strerror}") from exc
            rules = load_rules(text)
            for rule in rules:
                await control_request(
                    nc, subjects.service("router", "rule_put"), rule, RouteRule, timeout=3
                )
            print(f"loaded {len(rules)} rules")
        elif args.action == "remove":
            removed = await control_request(
                nc,
                subjects.service("router", "rule_delete"),
                RuleDeleteRequest(id=args.arg),
                RemovedReply,
                timeout=3,
            )
            print("removed" if removed and removed.removed else "no such rule")
        elif args.action == "route":
            decision = await control_request(
                nc,
                subjects.service("router", "route"),
                RouteRequest(text=args.arg, sender=args.sender),
                RoutingDecision,
                timeout=3,
            )
            assert decision is not None
            print(decision.model_dump_json(indent=2))
        else:
            listed = await control_request(
                nc, subjects.service("router", "rules"), None, RulesReply, timeout=3
            )
            for rule in listed.rules if listed else []:
                what = f"/{rule.pattern}/" if rule.pattern else f"sender {rule.sender_type}"
                print(f"{rule.id:16} -> {rule.target:14} {rule.confidence:.2f}  {what}")
    return 0


async def cmd_state(args: argparse.Namespace) -> int:
    from mesh.state import StateClient

    agent_id = AgentId.parse(args.agent)
    async with cli_connection(args) as nc:
        store = StateClient(nc, Subjects(args.prefix))
        if args.action == "get":
            record = await store.get(agent_id, version=args.version)
            print(record.model_dump_json(indent=2))
        elif args.action == "history":
            for v in await store.history(agent_id):
                print(f"v{v.version:<5} {v.updated_at.isoformat()}  {v.checksum}  {v.writer or ''}")
        elif args.action == "put":
            state = json_object(args.state, "the state")
            saved = await store.put(
                agent_id,
                state,
                expected_version=args.expected_version,
                policy=args.policy,
                writer="mesh-cli",
            )
            print(f"saved {agent_id} as version {saved.version}" + (" (merged)" * saved.merged))
        else:
            deleted = await store.delete(agent_id, expected_version=args.expected_version)
            print(f"deleted the state of {agent_id}" if deleted else f"{agent_id} had no state")
    return 0


async def cmd_clients(args: argparse.Namespace) -> int:
    from mesh.clients import ClientRegistry

    async with cli_connection(args) as nc:
        registry = ClientRegistry(nc.jetstream(), Subjects(args.prefix))
        if args.action == "add":
            if not args.client:
                raise BadRequestError("mesh clients add CLIENT_ID [--agent-types ...]")
            agent_types = [t.strip() for t in args.agent_types.split(",") if t.strip()]
            key = await registry.add(
                args.client,
                agent_types=agent_types,
                rate=args.rate,
                burst=args.burst,
                description=args.description,
            )
            print(f"Authorization: ApiKey {key}")
            print("(shown once: only a salted hash of the secret is kept)", file=sys.stderr)
        elif args.action == "revoke":
            revoked = await registry.revoke(args.client)
            print(f"revoked {args.client}" if revoked else f"no client {args.client!r}")
        else:
            for record in await registry.list():
                rate = f"{record.rate:g}/s" if record.rate else "default rate"
                patterns = ",".join(record.agent_types)
                print(f"{record.id:20} {patterns:30} {rate:14} {record.description}")
    return 0


async def cmd_alerts(args: argparse.Namespace) -> int:
    from mesh._tables import print_alerts
    from mesh.alerts import Silence
    from mesh.handlers.monitor import (
        AlertsReply,
        SilenceRequest,
        UnsilenceReply,
        UnsilenceRequest,
    )

    subjects = Subjects(args.prefix)
    async with cli_connection(args) as nc:
        if args.action == "silence":
            silence = await control_request(
                nc,
                subjects.service("monitor", "silence"),
                SilenceRequest(
                    rule=args.rule, seconds=parse_duration(args.duration), reason=args.reason
                ),
                Silence,
                timeout=5,
            )
            assert silence is not None
            print(f"{silence.rule} silenced until {silence.until.isoformat(timespec='seconds')}")
        elif args.action == "unsilence":
            removed = await control_request(
                nc,
                subjects.service("monitor", "unsilence"),
                UnsilenceRequest(rule=args.rule),
                UnsilenceReply,
                timeout=5,
            )
            print("unsilenced" if removed and removed.removed else f"{args.rule} was not silenced")
        else:
            listed = await control_request(
                nc, subjects.service("monitor", "alerts"), None, AlertsReply, timeout=5
            )
            assert listed is not None
            print_alerts(listed.alerts, listed.silences)
    return 0


def parse_duration(text: str) -> float:
    """``90``, ``90s``, ``30m``, ``2h``, ``1d`` as seconds."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    text = text.strip().lower()
    scale = units.get(text[-1:])
    number = text[:-1] if scale else text
    try:
        seconds = float(number) * (scale or 1)
    except ValueError:
        raise BadRequestError(f"{text!r} is not a duration like 90s, 30m or 2h") from None
    if seconds <= 0:
        raise BadRequestError("a duration must be positive")
    return seconds


async def cmd_status(args: argparse.Namespace) -> int:
    from mesh._tables import fetch_status, print_status

    subjects = Subjects(args.prefix)
    async with cli_connection(args) as nc:
        while True:
            status = await fetch_status(nc, subjects)
            print_status(status, clear=args.watch)
            if not args.watch:
                return 0 if status.health is not None and status.health.status == "ok" else 1
            await asyncio.sleep(args.interval)


async def cmd_workers(args: argparse.Namespace) -> int:
    from mesh._tables import fetch_types, fetch_workers, print_types, print_workers

    async with cli_connection(args) as nc:
        subjects = Subjects(args.prefix)
        if args.command == "workers":
            print_workers(await fetch_workers(nc, subjects))
        else:
            print_types(await fetch_types(nc, subjects))
    return 0


async def cmd_demo(args: argparse.Namespace) -> int:
    from mesh.demo import run_demo

    return await run_demo(data_dir=args.data_dir)


async def cmd_bench(args: argparse.Namespace) -> int:
    from mesh.bench import run_bench

    return await run_bench(
        requests=args.requests,
        events=args.events,
        inflight=args.inflight,
        hold=args.hold,
        json_path=args.json,
    )


# Parsing


def add_worker_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--worker-id", help="stable worker id (default: host-pid-random)")
    parser.add_argument("--heartbeat-interval", type=float, help="seconds between heartbeats")
    parser.add_argument(
        "--max-in-flight", type=int, help="requests held at once; more are answered 503"
    )
    parser.add_argument("--drain-timeout", type=float, help="seconds in-flight work may finish")
    parser.add_argument(
        "--capacity", type=int, help="requests it serves well at once (advertised to gateways)"
    )
    parser.add_argument(
        "--idle-timeout", type=float, help="seconds before an unused agent is deactivated"
    )


def add_common_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--nats",
        default=os.environ.get("MESH_NATS_URL"),
        help="NATS URL (env MESH_NATS_URL); up embeds a server when absent, demo and"
        " bench always start their own",
    )
    parser.add_argument("--prefix", default=os.environ.get("MESH_PREFIX") or "mesh")
    parser.add_argument("--log-level", default=os.environ.get("MESH_LOG_LEVEL") or "warning")
    parser.add_argument(
        "--metrics-port",
        type=int,
        default=int(os.environ.get("MESH_METRICS_PORT") or 0) or None,
        help="serve Prometheus /metrics on this port (env MESH_METRICS_PORT; off by default)",
    )
    parser.add_argument(
        "--log-format",
        choices=("json", "text"),
        default=os.environ.get("MESH_LOG_FORMAT") or None,
        help="JSON lines, or text (default: text in a terminal, else JSON)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mesh", description=__doc__)
    add_common_options(parser)
    commands = parser.add_subparsers(dest="command", required=True)

    up = commands.add_parser("up", help="embedded NATS and every service, for development")
    up.add_argument("--data-dir", help="JetStream store (default: a temporary folder)")
    up.add_argument(
        "--cluster", type=int, metavar="N", help="embed an N-node NATS cluster instead (3)"
    )

    serve = commands.add_parser("serve", help="run chosen services against a NATS server")
    serve.add_argument("services", nargs="+", choices=SERVICES)

    worker = commands.add_parser("worker", help="host agent types: mesh worker MODULE:Class")
    worker.add_argument("agents", nargs="*", metavar="MODULE:Class")
    worker.add_argument(
        "--autogen",
        metavar="MODULE:function",
        help="host AutoGen agents: the function registers them on the runtime it is given",
    )
    add_worker_options(worker)

    call = commands.add_parser("call", help="send a request to an agent and print the reply")
    call.add_argument("agent", metavar="TYPE/KEY")
    call.add_argument("payload", nargs="?", default=None, metavar="JSON")
    call.add_argument("--type", help="message type (Mesh-Msg-Type)")
    call.add_argument("--timeout", type=float, default=10.0)
    call.add_argument("--msgpack", action="store_true", help="send and receive msgpack")

    publish = commands.add_parser("publish", help="publish an event: mesh publish TYPE/SOURCE JSON")
    publish.add_argument("topic", metavar="TOPIC_TYPE/SOURCE")
    publish.add_argument("payload", nargs="?", default=None, metavar="JSON")
    publish.add_argument("--type", help="message type (Mesh-Msg-Type)")
    publish.add_argument("--msg-id", help="Nats-Msg-Id: publishing it again is dropped")

    subscriptions = commands.add_parser("subscriptions", help="list subscriptions and stats")
    subscriptions.add_argument("--never-matched", action="store_true")

    routes = commands.add_parser(
        "routes", help="content routing: list | load FILE | remove ID | route TEXT"
    )
    routes.add_argument("action", choices=("list", "load", "remove", "route"))
    routes.add_argument("arg", nargs="?", default="", metavar="FILE|ID|TEXT")
    routes.add_argument("--sender", help="type/key of the sending agent, for route")

    state = commands.add_parser(
        "state", help="saved agent state: get | history | put | delete TYPE/KEY"
    )
    state.add_argument("action", choices=("get", "history", "put", "delete"))
    state.add_argument("agent", metavar="TYPE/KEY")
    state.add_argument("state", nargs="?", default="", metavar="JSON", help="for put")
    state.add_argument("--version", type=int, help="for get: an older version")
    state.add_argument(
        "--expected-version", type=int, help="for put and delete: only over this version"
    )
    state.add_argument(
        "--policy", choices=CONFLICT_POLICIES, default="reject", help="for put: on conflict"
    )
    clients = commands.add_parser("clients", help="gateway clients: add ID | list | revoke ID")
    clients.add_argument("action", choices=("add", "list", "revoke"))
    clients.add_argument("client", nargs="?", default="", metavar="CLIENT_ID")
    clients.add_argument(
        "--agent-types", default="*", help="comma-separated patterns it may call (default *)"
    )
    clients.add_argument("--rate", type=float, help="requests per second (default MESH_RATE_LIMIT)")
    clients.add_argument("--burst", type=int, help="requests at once beyond the rate")
    clients.add_argument("--description", default="")
    alerts = commands.add_parser(
        "alerts", help="alerts: list | silence RULE --for 30m | unsilence RULE"
    )
    alerts.add_argument(
        "action", choices=("list", "silence", "unsilence"), nargs="?", default="list"
    )
    alerts.add_argument("rule", nargs="?", default="")
    alerts.add_argument("--for", dest="duration", default="1h", help="how long to silence")
    alerts.add_argument("--reason", default="")
    status = commands.add_parser("status", help="health, workers, agent types and alerts")
    status.add_argument("--watch", action="store_true", help="refresh until interrupted")
    status.add_argument("--interval", type=float, default=2.0, help="seconds between refreshes")
    commands.add_parser("workers", help="list live workers")
    commands.add_parser("agents", help="list agent types and their workers")

    demo = commands.add_parser("demo", help="a scripted tour on an embedded NATS")
    demo.add_argument("--data-dir")

    bench = commands.add_parser("bench", help="request/reply through mesh vs raw NATS")
    bench.add_argument("--requests", type=int, default=5000, help="per concurrency level")
    bench.add_argument("--events", type=int, default=20_000, help="events published")
    bench.add_argument("--inflight", type=int, default=100_000, help="requests held at once")
    bench.add_argument("--hold", type=float, default=5.0, help="seconds each is held")
    bench.add_argument("--json", metavar="PATH", help="also write the figures here")
    return parser


COMMANDS = {
    "up": cmd_up,
    "serve": cmd_serve,
    "worker": cmd_worker,
    "call": cmd_call,
    "publish": cmd_publish,
    "routes": cmd_routes,
    "subscriptions": cmd_subscriptions,
    "state": cmd_state,
    "clients": cmd_clients,
    "alerts": cmd_alerts,
    "status": cmd_status,
    "workers": cmd_workers,
    "agents": cmd_workers,
    "demo": cmd_demo,
    "bench": cmd_bench,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    service = "+".join(args.services) if args.command == "serve" else args.command
    configure_logging(args.log_level, service, args.log_format)
    configure_tracing(service)
    if args.metrics_port:
        metrics.serve_metrics(args.metrics_port)
    try:
        return run(COMMANDS[args.command](args))
    except MeshError as exc:
        print(f"error {int(exc.code)} {exc.wire_type}: {exc.message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def worker_main(agents: Sequence[type[Agent]], argv: Sequence[str] | None = None) -> None:
    """Entry point of ``python -m workers.<name>``: a worker for `agents`."""
    parser = argparse.ArgumentParser(description=f"a worker for {[a.__name__ for a in agents]}")
    add_common_options(parser)
    add_worker_options(parser)
    args = parser.parse_args(argv)
    configure_logging(args.log_level, "worker", args.log_format)
    configure_tracing("worker")
    if args.metrics_port:
        metrics.serve_metrics(args.metrics_port)
    try:
        sys.exit(run(serve_worker(args, agents)))
    except MeshError as exc:
        print(f"error {int(exc.code)} {exc.wire_type}: {exc.message}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    sys.exit(main())
