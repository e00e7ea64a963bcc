"""Several deliveries in one message to a worker (what the router sends events with)."""

from __future__ import annotations

import msgpack
from nats.aio.client import Client as NATS

from mesh import Worker, WorkerConfig
from mesh.handlers.registry import Registry
from mesh.subjects import Subjects
from tests import agents
from tests.agents import Pacer
from tests.helpers import assert_error


def _batch(*items: list[object]) -> bytes:
    return msgpack.packb({"items": list(items)}, use_bin_type=True)


async def test_each_delivery_in_a_batch_gets_its_own_outcome(
    nc: NATS, subjects: Subjects, registry: Registry
) -> None:
    agents.CALLS.clear()
    async with Worker(nc, [Pacer], WorkerConfig(worker_id="batcher"), subjects):
        reply = await nc.request(
            subjects.worker_batch("batcher"),
            _batch(
                ["pacer", "a", {"Mesh-Msg-Type": "Pace"}, b'{"seconds": 0}'],
                ["pacer", "b", {"Mesh-Msg-Type": "Sprint"}, b"{}"],
                ["pacer", "c", {}, b"{not json"],
                ["pacer", "a", {}, b'{"seconds": 0}'],
            ),
            timeout=5,
        )
    results = msgpack.unpackb(reply.data)["results"]
    assert [r[0] for r in results] == [0, 400, 400, 0]
    assert results[1][1] == "UnknownMessageType"
    assert results[2][1] == "InvalidPayload"
    assert agents.CALLS["a"] == 2


async def test_malformed_batch_gets_400(nc: NATS, subjects: Subjects, registry: Registry) -> None:
    async with Worker(nc, [Pacer], WorkerConfig(worker_id="batcher"), subjects):
        subject = subjects.worker_batch("batcher")
        assert_error(await nc.request(subject, b"junk", timeout=5), 400, "InvalidPayload")
        assert_error(
            await nc.request(subject, msgpack.packb({"items": [["pacer"]]}), timeout=5),
            400,
            "InvalidPayload",
        )
        assert_error(
            await nc.request(subject, _batch(["no/slash", "k", {}, b"{}"]), timeout=5),
            400,
            "InvalidId",
        )
