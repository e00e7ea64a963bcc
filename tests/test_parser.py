"""The fast protocol parser reports exactly what nats-py's parser reports."""

from __future__ import annotations

import random

import pytest
from nats.errors import ProtocolError
from nats.protocol.parser import Parser

from mesh._parser import FastParser

Call = tuple[object, ...]


class Recorder:
    """Stands in for the client: records what the parser hands it."""

    def __init__(self) -> None:
        self.calls: list[Call] = []

    async def _process_msg(
        self, sid: int, subject: bytes, reply: bytes, data: bytes, headers: bytes | None
    ) -> None:
        self.calls.append(("msg", sid, bytes(subject), bytes(reply), data, headers))

    async def _process_ping(self) -> None:
        self.calls.append(("ping",))

    async def _process_pong(self) -> None:
        self.calls.append(("pong",))

    async def _process_info(self, info: dict[str, object]) -> None:
        self.calls.append(("info", info))

    async def _process_err(self, message: str) -> None:
        self.calls.append(("err", message))


def _message(rng: random.Random) -> bytes:
    subject = rng.choice([b"a", b"mesh.events.t.s1", b"_INBOX.x.y", b"a.b.c.d.e.f"])
    sid = str(rng.randint(1, 10_000)).encode()
    reply = rng.choice([b"", b"$JS.ACK.S.c.1.2.3.1700000000000000000.0", b"_INBOX.r"])
    payload = rng.randbytes(rng.choice([0, 1, 5, 100, 5000]))
    space = rng.choice([b" ", b"  ", b"\t"])
    reply_part = reply + space if reply else b""
    if rng.random() < 0.5:
        line = b"MSG " + subject + space + sid + space + reply_part
        return line + str(len(payload)).encode() + b"\r\n" + payload + b"\r\n"
    headers = rng.choice(
        [
            b"NATS/1.0\r\nContent-Type: application/json\r\nMesh-Msg-Type: T\r\n\r\n",
            b"NATS/1.0 100 Idle Heartbeat\r\nNats-Last-Consumer: 10\r\n\r\n",
            b"NATS/1.0 404 No Messages\r\n\r\n",
            b"NATS/1.0\r\n\r\n",
        ]
    )
    size = str(len(headers)).encode()
    total = str(len(headers) + len(payload)).encode()
    line = b"HMSG " + subject + space + sid + space + reply_part + size + space + total
    return line + b"\r\n" + headers + payload + b"\r\n"


def _other(rng: random.Random) -> bytes:
    return rng.choice(
        [
            b"PING\r\n",
            b"PONG\r\n",
            b"+OK\r\n",
            b"-ERR 'Slow Consumer'\r\n",
            b'INFO {"server_id":"x","max_payload":1048576}\r\n',
        ]
    )


def _stream(rng: random.Random, count: int) -> tuple[bytes, int]:
    """`count` operations, and how many of them the client hears of (all but +OK)."""
    parts = [_message(rng) if rng.random() < 0.8 else _other(rng) for _ in range(count)]
    return b"".join(parts), sum(part != b"+OK\r\n" for part in parts)


def _cuts(rng: random.Random, data: bytes) -> list[bytes]:
    """`data` in reads of random sizes, some of them tiny."""
    chunks, at = [], 0
    while at < len(data):
        size = rng.choice([1, 2, 7, 64, 1000, 32768])
        chunks.append(data[at : at + size])
        at += size
    return chunks


async def _parse(parser_class: type[Parser], chunks: list[bytes]) -> list[Call]:
    recorder = Recorder()
    parser = parser_class(recorder)
    for chunk in chunks:
        await parser.parse(chunk)
    assert not parser.buf
    return recorder.calls


@pytest.mark.parametrize("seed", range(40))
async def test_the_same_calls_as_nats_py_for_streams_cut_anywhere(seed: int) -> None:
    rng = random.Random(seed)
    data, heard = _stream(rng, 200)
    chunks = _cuts(rng, data)
    expected = await _parse(Parser, chunks)
    assert len(expected) == heard
    assert await _parse(FastParser, chunks) == expected


@pytest.mark.parametrize(
    "line",
    [
        b"MSG a 1\r\n",  # no size
        b"MSG a x 5\r\nhello\r\n",  # sid not a number
        b"MSG a 1 x\r\n",  # size not a number
        b"HMSG a 1 5\r\n",  # no total
        b"HMSG a 1 r x 5\r\n",
        b"HELLO\r\n",
        b"WHAT\r\n",
    ],
)
async def test_malformed_lines_are_protocol_errors_in_both(line: bytes) -> None:
    for parser_class in (Parser, FastParser):
        with pytest.raises(ProtocolError):
            await parser_class(Recorder()).parse(line)


async def test_a_reset_while_a_message_is_handled_drops_the_rest_of_the_read() -> None:
    class Resetting(Recorder):
        async def _process_msg(self, *args: object) -> None:
            self.calls.append(("msg",))
            parser.reset()  # as nats-py does when it starts reconnecting

    recorder = Resetting()
    parser = FastParser(recorder)
    await parser.parse(b"MSG a 1 2\r\nhi\r\nMSG a 1 2\r\nho\r\n")
    assert recorder.calls == [("msg",)]
    assert not parser.buf
    await parser.parse(b"PING\r\n")  # a fresh start reads on
    assert recorder.calls == [("msg",), ("ping",)]
