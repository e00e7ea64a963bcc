"""Mesh's connections: nats-py's client with a faster header parser, same results."""

from __future__ import annotations

import random

import pytest
from nats.aio.client import Client as NATS

from mesh._connect import Connection, connect
from mesh.config import ConnectConfig

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


async def test_headers_cross_a_real_server_intact(nats_url: str) -> None:
    nc = await connect(ConnectConfig(url=nats_url), name="header-check")
    try:
        assert isinstance(nc, Connection)
        subscription = await nc.subscribe("header.check")
        sent = {"Content-Type": "application/json", "Mesh-Sender": "a/b", "X": "é ü"}
        await nc.publish("header.check", b"{}", headers=sent)
        msg = await subscription.next_msg(timeout=5)
        assert msg.headers == sent
    finally:
        await nc.close()
