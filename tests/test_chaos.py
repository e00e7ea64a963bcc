"""Faults while work goes on, every operation's outcome counted, Jepsen-style.

Sizes are bounded for CI; ``just chaos`` (MESH_CHAOS_SCALE=10) runs them longer.
Each test prints its counts.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import random
import signal
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import nats
import pytest
from nats.aio.client import Client as NATS

from mesh import AgentId, MeshClient, MeshError, TopicId
from mesh._state_store import StateStore
from mesh.cluster import NatsCluster
from mesh.config import EventsConfig, StateConfig
from mesh.errors import ConflictError, StateNotFoundError
from mesh.handlers.gateway import Gateway
from mesh.handlers.registry import Registry
from mesh.handlers.router import Router
from mesh.subjects import Subjects
from mesh.testing import WorkerProcess, eventually
from tests.conftest import REPO

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(600)]
SCALE = int(os.environ.get("MESH_CHAOS_SCALE") or 1)
#: Pause between one worker's operations, so that the work spans several faults.
PACE = 0.08


@dataclass
class Tally:
    """Each operation's outcome: ok (acknowledged), failed (refused), unknown."""

    outcomes: Counter[str] = field(default_factory=Counter)

    def __str__(self) -> str:
        return ", ".join(f"{k} {v}" for k, v in sorted(self.outcomes.items()))


@pytest.fixture
async def cluster(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[NatsCluster]:
    monkeypatch.setenv("MESH_REPLICAS", "3")
    nodes = NatsCluster(3)
    await asyncio.to_thread(nodes.start)
    try:
        yield nodes
    finally:
        await asyncio.to_thread(nodes.stop)


async def _connect(cluster: NatsCluster) -> NATS:
    nc = await nats.connect(
        servers=cluster.urls.split(","), max_reconnect_attempts=-1, reconnect_time_wait=0.2
    )
    await eventually(lambda: nc.jetstream().account_info(), timeout=30, message="JetStream")
    return nc


async def _kill_nodes(cluster: NatsCluster, stop: asyncio.Event, kills: Counter[str]) -> None:
    """SIGKILL a random node every couple of seconds and bring it back."""
    rng = random.Random(7)
    await asyncio.sleep(0.5)
    while not stop.is_set():
        node = rng.choice(cluster.nodes)
        await asyncio.to_thread(node.kill)
        kills["node kills"] += 1
        await asyncio.sleep(1.0)
        await asyncio.to_thread(node.start)
        await asyncio.sleep(1.5)


async def test_events_no_acknowledged_event_is_lost_while_nodes_die(cluster: NatsCluster) -> None:
    nc = await _connect(cluster)
    subjects = Subjects("chaosev")
    config = EventsConfig(retry_delay=0.1, handler_timeout=5.0, ack_wait=10.0)
    tally, kills = Tally(), Counter[str]()
    async with (
        Registry(nc, subjects),
        Gateway(nc, subjects) as gateway,
        Router(nc, subjects, config) as router,
    ):
        worker = WorkerProcess(
            cluster.urls,
            ["tests.agents:Ledger"],
            worker_id="chaos-ledger",
            heartbeat_interval=0.5,
            prefix=subjects.prefix,
            env={"PYTHONPATH": str(REPO), "MESH_REPLICAS": "3"},
        ).start()
        try:
            await eventually(lambda: gateway.directory.live_workers("ledger"), timeout=30)
            await eventually(
                lambda: (d := router.consumer("ledger")) is not None and d.subscriptions,
                timeout=30,
            )
            client = MeshClient(nc, subjects=subjects)
            count, sources = 300 * SCALE, 10
            acked: set[int] = set()
            queue = list(range(count))

            async def publisher() -> None:
                while queue:
                    n = queue.pop()
                    topic = TopicId("orders.created", f"s{n % sources}")
                    try:
                        await client.publish(
                            topic, {"n": n}, message_type="OrderEvent", timeout=15,
                            message_id=f"ev-{n}",
                        )  # fmt: skip
                        acked.add(n)
                        tally.outcomes["ok"] += 1
                    except MeshError:
                        tally.outcomes["unknown"] += 1  # maybe stored, maybe not
                    await asyncio.sleep(PACE)  # spread over the faults

            stop = asyncio.Event()
            chaos = asyncio.create_task(_kill_nodes(cluster, stop, kills))
            await asyncio.gather(*(publisher() for _ in range(4)))
            stop.set()
            await chaos
            handled: Counter[int] = Counter()

            async def all_handled() -> bool:
                handled.clear()
                for s in range(sources):
                    log = await client.call(
                        AgentId("ledger", f"s{s}"), {}, message_type="GetLog", timeout=5
                    )
                    handled.update(log["seen"])
                return acked <= set(handled)

            await eventually(all_handled, timeout=120, interval=1.0, message="every event handled")
            lost = acked - set(handled)
            duplicated = sum(c - 1 for c in handled.values() if c > 1)
            print(
                f"\nevents: {count} published ({tally}), {kills['node kills']} node kills;"
                f" lost {len(lost)}, handled {len(set(handled))}, redelivered {duplicated}"
            )
            assert kills["node kills"] >= 1
            assert not lost
            assert set(handled) <= set(range(count))
        finally:
            await worker.aclose()
    await nc.close()


async def test_state_cas_increments_equal_acknowledged_ones_while_nodes_die(
    cluster: NatsCluster,
) -> None:
    nc = await _connect(cluster)
    subjects = Subjects("chaosst")
    store = StateStore(nc.jetstream(), subjects, StateConfig())
    await eventually(lambda: _started(store), timeout=30)
    counters = [AgentId("counter", f"c{i}") for i in range(10)]
    per_client = 10 * SCALE
    tally, kills = Tally(), Counter[str]()
    acknowledged: Counter[AgentId] = Counter()

    async def client(c: int) -> None:
        rng = random.Random(c)
        for _ in range(per_client):
            agent = rng.choice(counters)
            op = uuid.uuid4().hex[:12]
            while True:  # read-modify-write until it lands or is known to have landed
                try:
                    try:
                        record = await store.get(agent)
                        value, version = record.state["value"], record.version
                        ops = record.state["ops"]
                    except StateNotFoundError:
                        value, version, ops = 0, 0, []
                    await store.put(
                        agent,
                        {"value": value + 1, "ops": [*ops, op][-64:]},
                        expected_version=version,
                    )
                    acknowledged[agent] += 1
                    tally.outcomes["ok"] += 1
                    await asyncio.sleep(PACE * 8)  # spread over the faults
                    break
                except ConflictError:
                    tally.outcomes["conflict, retried"] += 1
                except Exception:
                    # Unknown: it may have landed. Look, once the cluster answers again.
                    tally.outcomes["unknown"] += 1
                    if await _landed(store, agent, op):
                        acknowledged[agent] += 1
                        tally.outcomes["unknown, found landed"] += 1
                        break
                    await asyncio.sleep(0.2)

    stop = asyncio.Event()
    chaos = asyncio.create_task(_kill_nodes(cluster, stop, kills))
    await asyncio.gather(*(client(c) for c in range(32)))
    stop.set()
    await chaos
    finals = {a: (await store.get(a)).state["value"] for a in counters if acknowledged[a]}
    print(
        f"\nstate: {32 * per_client} increments ({tally}), {kills['node kills']} node kills;"
        f" counters {sum(finals.values())}, acknowledged {sum(acknowledged.values())}"
    )
    assert finals == {a: acknowledged[a] for a in counters if acknowledged[a]}
    await nc.close()


async def _started(store: StateStore) -> bool:
    await store.start()
    return True


async def _landed(store: StateStore, agent: AgentId, op: str) -> bool:
    for _ in range(100):
        try:
            record = await store.get(agent)
        except StateNotFoundError:
            return False
        except Exception:
            await asyncio.sleep(0.2)
            continue
        return op in record.state["ops"]
    raise AssertionError(f"{agent} never became readable again")


async def test_rpc_every_call_is_answered_by_its_deadline_while_workers_die(
    nats_url: str, nc: NATS, subjects: Subjects, gateway: Gateway, spawn_worker: type
) -> None:
    from mesh.testing import WorkerProcess as _Worker

    agents = ("workers.echo:Echo", "workers.counter:Counter")
    workers: dict[str, _Worker] = {
        name: spawn_worker(*agents, worker_id=name) for name in ("rpc-a", "rpc-b")
    }
    await eventually(lambda: len(gateway.directory.live_workers("counter")) == 2, timeout=20)
    client = MeshClient(nc, subjects=subjects)
    tally, kills = Tally(), Counter[str]()
    deadline, late = 2.0, []
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    async def caller(c: int) -> None:
        n = 0
        while not stop.is_set():
            n += 1
            token = f"{c}-{n}"
            placed = n % 2 == 0
            started = loop.time()
            try:
                if placed:
                    key = f"k{c % 8}"
                    reply = await client.call(
                        AgentId("counter", key), {"by": 1}, message_type="Increment",
                        timeout=deadline,
                    )  # fmt: skip
                    assert reply["key"] == key, (reply, key)  # never someone else's reply
                else:
                    reply = await client.call(
                        AgentId("echo", token), {"text": token}, timeout=deadline
                    )
                    assert reply["text"] == token, (reply, token)
                tally.outcomes["ok"] += 1
            except MeshError as exc:
                tally.outcomes[f"{int(exc.code)}"] += 1
            took = loop.time() - started
            if took > deadline + 1.0:
                late.append(took)

    async def chaos() -> None:
        rng = random.Random(11)
        for _ in range(3 * SCALE):
            await asyncio.sleep(1.5)
            name = rng.choice(sorted(workers))
            workers[name].kill()
            kills["worker kills"] += 1
            await asyncio.sleep(0.5)
            workers[name] = spawn_worker(*agents, worker_id=name)
        await asyncio.sleep(1.5)
        stop.set()

    await asyncio.gather(chaos(), *(caller(c) for c in range(8)))
    total = sum(tally.outcomes.values())
    errors = total - tally.outcomes["ok"]
    print(
        f"\nrpc: {total} calls ({tally}), {kills['worker kills']} worker kills;"
        f" error rate {errors / total:.1%}, answered late {len(late)}"
    )
    assert not late, late
    assert set(tally.outcomes) <= {"ok", "503", "504"}, tally
    assert tally.outcomes["ok"] > total / 2


async def test_rolling_restart_under_load_loses_no_acknowledged_write(
    cluster: NatsCluster,
) -> None:
    nc = await _connect(cluster)
    subjects = Subjects("chaosroll")
    tally: Tally = Tally()
    agents = ("workers.counter:Counter",)
    env = {"PYTHONPATH": str(REPO), "MESH_REPLICAS": "3"}

    def worker(name: str) -> WorkerProcess:
        return WorkerProcess(
            cluster.urls, agents, worker_id=name, heartbeat_interval=0.5,
            prefix=subjects.prefix, env=env,
        ).start()  # fmt: skip

    async with Registry(nc, subjects), Gateway(nc, subjects) as gateway:
        workers = {name: worker(name) for name in ("roll-a", "roll-b")}
        try:
            await eventually(
                lambda: len(gateway.directory.live_workers("counter")) == 2, timeout=30
            )
            client = MeshClient(nc, subjects=subjects)
            counters = [AgentId("counter", f"r{i}") for i in range(8)]
            acked: Counter[AgentId] = Counter()
            uncertain: Counter[AgentId] = Counter()
            stop = asyncio.Event()

            async def caller(c: int) -> None:
                rng = random.Random(c)
                while not stop.is_set():
                    agent = rng.choice(counters)
                    try:
                        await client.call(agent, {"by": 1}, message_type="Increment", timeout=5)
                        acked[agent] += 1
                        tally.outcomes["ok"] += 1
                    except MeshError as exc:
                        tally.outcomes[str(int(exc.code))] += 1
                        uncertain[agent] += 1  # it may have been saved before the error
                    await asyncio.sleep(PACE / 4)

            async def roll() -> None:
                for node in cluster.nodes:  # each NATS node, gracefully
                    await asyncio.sleep(1.0)
                    await asyncio.to_thread(node.stop, keep_store=True)
                    await asyncio.to_thread(node.start)
                for name in sorted(workers):  # then each worker, gracefully
                    await asyncio.sleep(1.0)
                    workers[name].terminate()
                    await workers[name].wait(30)
                    workers[name] = worker(name)
                    await eventually(
                        lambda: len(gateway.directory.live_workers("counter")) == 2, timeout=30
                    )
                await asyncio.sleep(1.0)
                stop.set()

            await asyncio.gather(roll(), *(caller(c) for c in range(6)))
            finals = {}
            for agent in counters:
                reply = await eventually(
                    lambda a=agent: client.call(a, {}, message_type="GetCount", timeout=5),
                    timeout=30,
                )
                finals[agent] = reply["value"]
            lost = {a: acked[a] - finals[a] for a in counters if finals[a] < acked[a]}
            print(
                f"\nrolling restart: {sum(tally.outcomes.values())} increments ({tally});"
                f" counted {sum(finals.values())}, acknowledged {sum(acked.values())},"
                f" lost {sum(lost.values())}"
            )
            assert not lost
            assert all(finals[a] <= acked[a] + uncertain[a] for a in counters)
            # Retryable only: 503/504, and 409 (an agent moving between draining and
            # fresh workers: the message had no effect, nothing was overwritten).
            assert set(tally.outcomes) <= {"ok", "409", "503", "504"}, tally
        finally:
            for process in workers.values():
                await process.aclose()
    await nc.close()


async def test_single_activation_no_committed_runs_overlap_and_no_stale_writes(
    nats_url: str, nc: NATS, subjects: Subjects, registry: object, spawn_worker: type
) -> None:
    extra = await nats.connect(nats_url)
    gateways = [Gateway(nc, subjects), Gateway(extra, subjects)]
    for g in gateways:
        await g.start()
    names = [f"one-{n}" for n in range(5)]
    workers = {n: spawn_worker("tests.agents:Tracker", worker_id=n) for n in names}
    tally, faults = Tally(), Counter[str]()
    try:
        await eventually(
            lambda: len(gateways[0].directory.live_workers("tracker")) == 5, timeout=30
        )
        client = MeshClient(nc, subjects=subjects)
        ids = [AgentId("tracker", f"t{i}") for i in range(100 * SCALE)]
        stop = asyncio.Event()

        async def caller(c: int) -> None:
            rng = random.Random(c)
            while not stop.is_set():
                try:
                    await client.call(rng.choice(ids), {}, message_type="Track", timeout=3)
                    tally.outcomes["ok"] += 1
                except MeshError as exc:
                    tally.outcomes[str(int(exc.code))] += 1

        async def chaos() -> None:
            rng = random.Random(5)
            for round_ in range(4 * SCALE):
                await asyncio.sleep(1.0)
                name = rng.choice(names)
                if round_ % 2 == 0:  # a zombie: paused past its lapse, then back
                    os.kill(workers[name].pid, signal.SIGSTOP)
                    faults["SIGSTOP"] += 1
                    await asyncio.sleep(2.0)
                    os.kill(workers[name].pid, signal.SIGCONT)
                else:
                    workers[name].kill()
                    faults["SIGKILL"] += 1
                    await asyncio.sleep(0.5)
                    workers[name] = spawn_worker("tests.agents:Tracker", worker_id=name)
            await asyncio.sleep(1.0)
            stop.set()

        await asyncio.gather(chaos(), *(caller(c) for c in range(8)))
        store = StateStore(nc.jetstream(), subjects)
        await store.start()
        overlaps = stale = runs = 0
        for agent in ids:
            try:
                record = await store.get(agent)
            except MeshError:
                continue
            spans = sorted(record.state["runs"], key=lambda run: run[1])
            runs += len(spans)
            overlaps += sum(1 for a, b in itertools.pairwise(spans) if b[1] < a[2])
            marks = [v.epoch or 0 for v in await store.history(agent)]
            stale += sum(1 for a, b in itertools.pairwise(marks) if b < a)
        print(
            f"\nsingle activation: {sum(tally.outcomes.values())} calls ({tally}),"
            f" {dict(faults)}; committed runs {runs}, overlapping {overlaps},"
            f" stale-epoch writes {stale}"
        )
        assert runs > 0
        assert overlaps == 0
        assert stale == 0
    finally:
        for n in names:
            with contextlib.suppress(ProcessLookupError):
                os.kill(workers[n].pid, signal.SIGCONT)
        for g in gateways:
            await g.shutdown()
        await extra.close()


async def test_a_gateway_cut_off_from_nats_answers_nothing_wrong_and_comes_back(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Gateway A is connected only to node 1, gateway B only to node 2, callers only to
    node 3. Node 1 is SIGKILLed and restarted: while A is cut off, B answers everything;
    then A reconnects, watches KV anew and serves again, and no reply ever carries
    another call's text."""
    monkeypatch.setenv("MESH_REPLICAS", "3")
    # Not advertised: a client given one node's URL cannot fail over to the others.
    cluster = NatsCluster(3, advertise=False)
    await asyncio.to_thread(cluster.start)
    try:
        await _cut_off_gateway(cluster)
    finally:
        await asyncio.to_thread(cluster.stop)


async def _cut_off_gateway(cluster: NatsCluster) -> None:
    node_a, node_b, node_c = cluster.nodes

    async def connect_to(url: str) -> NATS:
        nc = await nats.connect(url, max_reconnect_attempts=-1, reconnect_time_wait=0.2)
        await eventually(lambda: nc.jetstream().account_info(), timeout=30, message="JetStream")
        return nc

    nc_a, nc_b, nc_c = [await connect_to(node.url) for node in (node_a, node_b, node_c)]
    subjects = Subjects("chaoscut")
    tally = Tally()
    wrong: list[tuple[str, str]] = []
    # The worker is on node 3 with the callers: only gateway A loses NATS.
    worker = WorkerProcess(
        node_c.url, ["workers.echo:Echo"], worker_id="cut-echo", heartbeat_interval=0.5,
        prefix=subjects.prefix, env={"PYTHONPATH": str(REPO), "MESH_REPLICAS": "3"},
    ).start()  # fmt: skip
    try:
        async with (
            Registry(nc_b, subjects),
            Gateway(nc_a, subjects) as gateway_a,
            Gateway(nc_b, subjects) as gateway_b,
        ):
            for gateway in (gateway_a, gateway_b):
                await eventually(lambda g=gateway: g.directory.live_workers("echo"), timeout=30)
            client = MeshClient(nc_c, subjects=subjects)
            stop = asyncio.Event()

            async def caller(c: int) -> None:
                for n in itertools.count():
                    if stop.is_set():
                        return
                    text = f"{c}-{n}-{uuid.uuid4().hex[:8]}"
                    try:
                        reply = await client.call(
                            AgentId("echo", f"k{n % 16}"), {"text": text}, timeout=3
                        )
                    except MeshError as exc:
                        tally.outcomes[str(int(exc.code))] += 1
                    else:
                        tally.outcomes["ok"] += 1
                        if reply["text"] != text:
                            wrong.append((text, reply["text"]))
                    await asyncio.sleep(PACE / 4)

            callers = [asyncio.create_task(caller(c)) for c in range(4)]
            try:
                await eventually(lambda: gateway_a.requests_served > 10, timeout=30)
                await asyncio.to_thread(node_a.kill)
                cut_at = gateway_a.requests_served
                served_b = gateway_b.requests_served
                await eventually(
                    lambda: gateway_b.requests_served > served_b + 50 * SCALE, timeout=60
                )
                assert gateway_a.requests_served == cut_at  # it heard nothing, said nothing
                await asyncio.to_thread(node_a.start)
                await eventually(
                    lambda: gateway_a.requests_served > cut_at + 50 * SCALE,
                    timeout=60,
                    message="the cut-off gateway serves again after its node came back",
                )
                # Its directory follows the worker again (heartbeats fail while the
                # registry's bucket elects a new leader, so not necessarily at once).
                await eventually(lambda: gateway_a.directory.live_workers("echo"), timeout=30)
            finally:
                stop.set()
                await asyncio.gather(*callers)
            print(f"\ngateway cut off: {sum(tally.outcomes.values())} calls ({tally})")
            assert not wrong, wrong[:5]
            assert set(tally.outcomes) <= {"ok", "503", "504"}, tally
            assert tally.outcomes["ok"] >= 100 * SCALE
    finally:
        worker.terminate()
        await worker.aclose()
        for nc in (nc_a, nc_b, nc_c):
            await nc.close()
