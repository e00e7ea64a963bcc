"""Mesh's connections: nats-py's client with faster parsers and direct subscriptions."""

from __future__ import annotations

import asyncio
import random

import nats.errors
import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.errors import NoRespondersError

from mesh._connect import connect
from mesh._connection import Connection
from mesh.config import ConnectConfig
from mesh.testing import eventually

SAMPLES = [
    b"Content-Type: application/json\r\nMesh-Msg-Type: Tick\r\n\r\n",
    b"a:b\r\nc:\td \r\n",
    b"Name With Space: x\r\nok: y\r\n",
    b"no colon here\r\n\r\nx: 1\r\n",
    b": empty name\r\n",
    b"K\xc3\xa9y: value\r\nkey: v\xc3\xa9 \xff\r\n",
    b" padded : both sides \r\n",
    b"dup: 1\r\ndup: 2\r\n",
    b"tab\tin: name\r\nvertical\x0bin: name\r\nfs\x1cin: name\r\n",
    b"colon: in: value\r\n",
    b"",
]


@pytest.mark.parametrize("raw", SAMPLES)
def test_headers_parse_as_nats_py_parses_them(raw: bytes) -> None:
    assert Connection._parse_header_lines(raw) == NATS._parse_header_lines(raw)


def test_random_header_blocks_parse_as_nats_py_parses_them() -> None:
    rng = random.Random(7)
    alphabet = b"ab:Z- \t\r\n\x0b\x1c\xc3\xa9\xff0"
    for _ in range(5000):
        raw = bytes(rng.choice(alphabet) for _ in range(rng.randrange(60)))
        assert Connection._parse_header_lines(raw) == NATS._parse_header_lines(raw), raw


async def test_headers_cross_a_real_server_intact(mesh_nc: Connection) -> None:
    subscription = await mesh_nc.subscribe("header.check")
    sent = {"Content-Type": "application/json", "Mesh-Sender": "a/b", "X": "é ü"}
    await mesh_nc.publish("header.check", b"{}", headers=sent)
    msg = await subscription.next_msg(timeout=5)
    assert msg.headers == sent


async def test_a_direct_subscription_sees_what_a_queued_one_sees(mesh_nc: Connection) -> None:
    direct: list[Msg] = []
    await mesh_nc.subscribe_direct("direct.>", direct.append)
    queued = await mesh_nc.subscribe("direct.>")
    sent = [
        ("direct.a", b"one", None, ""),
        ("direct.b", b"", {"Content-Type": "application/json", "X": "é"}, "reply.to"),
        ("direct.c", b"x" * 70_000, {"K": "v"}, ""),  # more than one read
    ]
    for subject, data, headers, reply in sent:
        await mesh_nc.publish(subject, data, headers=headers, reply=reply)
    # A header block with a status line and headers after it, as the server writes its
    # idle heartbeats (the server passes a client's block on as it is).
    status = b"NATS/1.0 100 Idle Heartbeat\r\nNats-Last-Consumer: 10\r\n\r\n"
    await mesh_nc._send_command(
        b"HPUB direct.status %d %d\r\n%b\r\n" % (len(status), len(status), status)
    )
    await mesh_nc.flush()
    expected = [await queued.next_msg(timeout=5) for _ in range(len(sent) + 1)]
    await eventually(lambda: len(direct) == len(sent) + 1, timeout=5)
    for got, want in zip(direct, expected, strict=True):
        assert (got.subject, got.reply, got.data, got.headers) == (
            want.subject,
            want.reply,
            want.data,
            want.headers,
        )
    assert direct[-1].headers == {
        "Status": "100",
        "Description": "Idle Heartbeat",
        "Nats-Last-Consumer": "10",
    }


async def test_a_failing_direct_handler_leaves_the_connection_reading(mesh_nc: Connection) -> None:
    seen: list[bytes] = []

    def fail_on_bad(msg: Msg) -> None:
        seen.append(msg.data)
        if msg.data == b"bad":
            raise ValueError("handler bug")

    subscription = await mesh_nc.subscribe_direct("direct.fail", fail_on_bad)
    for data in (b"bad", b"good"):
        await mesh_nc.publish("direct.fail", data)
    await eventually(lambda: seen == [b"bad", b"good"], timeout=5)
    # Unsubscribed, the handler hears nothing more (a flush orders the two).
    await subscription.unsubscribe()
    await mesh_nc.publish("direct.fail", b"late")
    await mesh_nc.flush()
    reply = await mesh_nc.request("$JS.API.INFO", b"", timeout=5)  # a round trip past it
    assert reply.data and seen == [b"bad", b"good"]
    assert mesh_nc.is_connected


async def test_requests_get_their_own_replies_or_a_clear_error(
    mesh_nc: Connection,
) -> None:

    async def echo(msg: Msg) -> None:
        await asyncio.sleep(0.001 * (int(msg.data) % 5))  # replies out of request order
        await msg.respond(msg.data)

    await mesh_nc.subscribe("request.echo", cb=echo)
    await mesh_nc.subscribe("request.silent")
    replies = await asyncio.gather(
        *(mesh_nc.request("request.echo", str(n).encode(), timeout=5) for n in range(200))
    )
    assert [reply.data for reply in replies] == [str(n).encode() for n in range(200)]
    with pytest.raises(NoRespondersError):
        await mesh_nc.request("request.nobody", b"", timeout=5)
    with pytest.raises(nats.errors.TimeoutError):
        await mesh_nc.request("request.silent", b"", timeout=0.2)  # heard, never answered


class _Recorded:
    """Stands in for a connection's outgoing buffer."""

    def __init__(self) -> None:
        self.commands: list[bytes] = []

    async def __call__(self, command: bytes, priority: bool = False) -> None:
        self.commands.append(bytes(command))


async def _publish_command(
    client: NATS, subject: str, reply: str, payload: bytes, headers: dict[str, str] | None
) -> list[bytes]:
    recorded = _Recorded()
    client._send_command = recorded  # type: ignore[method-assign]
    await client._send_publish(subject, reply, payload, len(payload), headers)
    return recorded.commands


async def test_publish_commands_are_byte_for_byte_nats_pys() -> None:
    rng = random.Random(11)
    names = ["Content-Type", " Mesh-Request-Id ", "", "  ", "X", "Nats-Msg-Id", "a.b", "ü"]
    names += ["bad name", "bad:name", "tab\tname", "ok-" + "x" * 40]
    values = ["application/json", " padded ", "line\r\nbreak", "", "é ü", "a\nb\rc", "x" * 300]
    for _ in range(2000):
        headers = None
        if rng.random() < 0.8:
            headers = {rng.choice(names): rng.choice(values) for _ in range(rng.randrange(5))}
        subject = rng.choice(["a", "mesh.rpc.t.k", "ünï.code"])
        reply = rng.choice(["", "_INBOX.x.y"])
        payload = rng.randbytes(rng.choice([0, 3, 100]))
        outcomes: list[object] = []
        for client in (NATS(), Connection()):
            try:
                outcomes.append(await _publish_command(client, subject, reply, payload, headers))
            except nats.errors.BadHeaderError as exc:
                outcomes.append(("bad header", str(exc)))
        assert outcomes[0] == outcomes[1], (headers, outcomes)


async def test_a_request_waiting_when_the_connection_closes_fails_at_once(
    nats_url: str,
) -> None:
    nc = await connect(ConnectConfig(url=nats_url), name="closing")
    await nc.subscribe("request.silent")  # heard, never answered
    waiting = asyncio.create_task(nc.request("request.silent", b"", timeout=30))
    unlimited = asyncio.create_task(nc.request("request.silent", b"", timeout=None))
    await nc.flush()
    await nc.close()
    async with asyncio.timeout(5):
        for request in (waiting, unlimited):
            with pytest.raises(nats.errors.ConnectionClosedError):
                await request


async def test_a_direct_subscription_with_a_limit_ends_after_it(mesh_nc: Connection) -> None:
    seen: list[bytes] = []
    subscription = await mesh_nc.subscribe_direct("direct.limited", lambda m: seen.append(m.data))
    await subscription.unsubscribe(limit=2)
    for n in range(4):
        await mesh_nc.publish("direct.limited", str(n).encode())
    await mesh_nc.flush()
    await mesh_nc.request("$JS.API.INFO", b"", timeout=5)  # a round trip past them
    assert seen == [b"0", b"1"] and subscription.delivered == 2
