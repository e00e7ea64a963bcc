"""The pull consumer in a priority group: pinned, refused, pinned again."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import orjson
import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.errors import MsgAlreadyAckdError

from mesh._connect import connect
from mesh._consume import PullConsumer, ack, delivery_of
from mesh.config import ConnectConfig
from mesh.testing import eventually

GROUP = "mesh"


@pytest.fixture
async def pinned_stream(nc: NATS) -> AsyncIterator[tuple[str, str]]:
    """A stream and a durable consumer with the pinned_client policy."""
    stream, durable = f"PIN_{uuid.uuid4().hex[:8].upper()}", "pinned"
    subject = f"pin.{stream.lower()}"
    await nc.jetstream().add_stream(name=stream, subjects=[f"{subject}.>"])
    config = {
        "durable_name": durable,
        "ack_policy": "explicit",
        "priority_groups": [GROUP],
        "priority_policy": "pinned_client",
        "priority_timeout": int(60e9),
    }
    reply = await nc.request(
        f"$JS.API.CONSUMER.CREATE.{stream}.{durable}",
        orjson.dumps({"stream_name": stream, "config": config}),
        timeout=5,
    )
    assert "error" not in orjson.loads(reply.data)
    yield stream, subject
    await nc.jetstream().delete_stream(stream)


def _consumer(nc: NATS, stream: str, received: list[bytes]) -> PullConsumer:
    def take(msg: Msg) -> None:
        received.append(msg.data)

    return PullConsumer(
        nc,
        stream,
        "pinned",
        take,
        lambda: 100,
        lambda: None,
        batch=10,
        expires=1.0,
        heartbeat=0.5,
        group=GROUP,
    )


async def test_a_client_whose_pin_was_taken_away_pulls_again_and_is_pinned_anew(
    nc: NATS, pinned_stream: tuple[str, str]
) -> None:
    stream, subject = pinned_stream
    received: list[bytes] = []
    consumer = _consumer(nc, stream, received)
    consumer.start()
    try:
        await nc.jetstream().publish(f"{subject}.a", b"first")
        await eventually(lambda: received == [b"first"], timeout=10)
        first_pin = consumer.pin_id
        assert first_pin is not None
        # The server's pin goes (as after a leader change, or an operator's unpin): the
        # pulls naming the old id are refused, and the client must pull without it.
        await nc.request(
            f"$JS.API.CONSUMER.UNPIN.{stream}.pinned", orjson.dumps({"group": GROUP}), timeout=5
        )
        await nc.jetstream().publish(f"{subject}.a", b"second")
        await eventually(lambda: received == [b"first", b"second"], timeout=10)
        assert consumer.pin_id is not None and consumer.pin_id != first_pin
    finally:
        await consumer.stop()


async def test_unpin_hands_the_events_to_the_standby(
    nc: NATS, pinned_stream: tuple[str, str]
) -> None:
    stream, subject = pinned_stream
    first: list[bytes] = []
    second: list[bytes] = []
    active, standby = _consumer(nc, stream, first), _consumer(nc, stream, second)
    active.start()
    try:
        await nc.jetstream().publish(f"{subject}.a", b"one")
        await eventually(lambda: first == [b"one"], timeout=10)
        standby.start()
        await active.stop()
        await active.unpin()
        # The pin timeout is a minute: only the unpin lets the standby in this soon.
        await nc.jetstream().publish(f"{subject}.a", b"two")
        await eventually(lambda: second == [b"two"], timeout=10)
        assert first == [b"one"]
    finally:
        await active.stop()
        await standby.stop()


def _keeping(nc: NATS, stream: str) -> tuple[PullConsumer, list[Msg]]:
    """A started pull consumer, and the list it keeps what it receives in."""
    messages: list[Msg] = []
    consumer = PullConsumer(
        nc, stream, "pinned", messages.append, lambda: 100, lambda: None, group=GROUP
    )
    consumer.start()
    return consumer, messages


async def _publish_three(nc: NATS, subject: str) -> None:
    for n in range(3):
        await nc.jetstream().publish(f"{subject}.a", str(n).encode())


async def test_delivery_of_reads_sequence_and_count_as_nats_py_does(
    nc: NATS, pinned_stream: tuple[str, str]
) -> None:
    stream, subject = pinned_stream
    consumer, messages = _keeping(nc, stream)
    try:
        await _publish_three(nc, subject)
        await eventually(lambda: len(messages) == 3, timeout=10)
        await messages[1].nak()  # comes back, counted twice
        await eventually(lambda: len(messages) == 4, timeout=10)
    finally:
        await consumer.stop()
    for msg in messages:
        assert delivery_of(msg) == (msg.metadata.sequence.stream, msg.metadata.num_delivered)
    assert delivery_of(messages[3]) == (2, 2)


def test_delivery_of_reads_the_domain_form_and_refuses_other_replies() -> None:
    # $JS.ACK.<domain>.<account>.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.<pending>.<x>
    reply = "$JS.ACK.hub.ACCHASH.EVENTS.mesh-deliver-x.3.1234.77.1700000000000000000.5.tok"
    msg = Msg(_client=None, subject="mesh.events.a.b", reply=reply)  # type: ignore[arg-type]
    assert delivery_of(msg) == (1234, 3)
    assert msg.metadata.sequence.stream == 1234 and msg.metadata.num_delivered == 3
    for bad in ("", "_INBOX.abc", "$JS.ACK.too.short", "$JS.ACK.a.b.c.1.2.3.4.5"):
        with pytest.raises(ValueError):
            delivery_of(Msg(_client=None, subject="x", reply=bad))  # type: ignore[arg-type]


async def test_ack_on_a_mesh_connection_settles_the_delivery_once(
    nc: NATS, nats_url: str, pinned_stream: tuple[str, str]
) -> None:
    stream, subject = pinned_stream
    mesh_nc = await connect(ConnectConfig(url=nats_url), name="ack-check")
    consumer, messages = _keeping(mesh_nc, stream)
    try:
        await _publish_three(nc, subject)
        await eventually(lambda: len(messages) == 3, timeout=10)
        for msg in messages:
            await ack(msg)
        with pytest.raises(MsgAlreadyAckdError):
            await ack(messages[0])

        async def all_acknowledged() -> bool:
            info = await nc.jetstream().consumer_info(stream, "pinned")
            return info.ack_floor is not None and info.ack_floor.stream_seq == 3

        await eventually(all_acknowledged, timeout=10)
        info = await nc.jetstream().consumer_info(stream, "pinned")
        assert info.num_ack_pending == 0 and info.num_redelivered == 0
    finally:
        await consumer.stop()
        await mesh_nc.close()
