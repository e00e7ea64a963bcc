"""The cache on KV mesh-cache: TTL, patterns, and near caches kept coherent by a watch."""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import nats
import pytest
from nats.aio.client import Client as NATS

from mesh._connect import connect
from mesh.cache import Cache
from mesh.config import ConnectConfig
from mesh.errors import InvalidIdError
from mesh.server import NatsServer
from mesh.subjects import Subjects
from mesh.testing import eventually
from tests.conftest import REPO


@pytest.fixture
async def cache(nc: NATS, subjects: Subjects) -> AsyncIterator[Cache]:
    async with Cache(nc, "sessions", subjects) as c:
        yield c


async def test_set_get_delete_and_json(cache: Cache) -> None:
    assert await cache.get("user.1") is None
    await cache.set("user.1", b"ann")
    assert await cache.get("user.1") == b"ann"
    await cache.set_json("user.2", {"name": "bo"})
    assert await cache.get_json("user.2") == {"name": "bo"}
    await cache.delete("user.1")
    assert await cache.get("user.1") is None


async def test_reads_after_the_first_come_from_the_near_cache(
    nc: NATS, subjects: Subjects, cache: Cache
) -> None:
    async with Cache(nc, "sessions", subjects) as writer:
        await writer.set("k", b"v")
    assert await cache.get("k") == b"v"
    assert (cache.stats.hits, cache.stats.misses) == (0, 1)
    assert await cache.get("k") == b"v"
    assert (cache.stats.hits, cache.stats.misses) == (1, 1)


async def test_an_entry_lapses_after_its_ttl(nc: NATS, subjects: Subjects, cache: Cache) -> None:
    await cache.set("short", b"lived", ttl=1)
    assert await cache.get("short") == b"lived"
    async with Cache(nc, "sessions", subjects, near=False) as direct:
        assert await direct.get("short") == b"lived"
        await eventually(lambda: _is_none(direct.get("short")), timeout=6, interval=0.2)
    await eventually(lambda: _is_none(cache.get("short")), timeout=3)


async def _is_none(read: object) -> bool:
    return await read is None  # type: ignore[misc]


async def test_invalidate_removes_the_matching_keys_everywhere(
    nc: NATS, subjects: Subjects, cache: Cache
) -> None:
    for key in ("user.1.name", "user.1.mail", "user.2.name", "order.1"):
        await cache.set(key, key.encode())
    async with Cache(nc, "sessions", subjects) as other:
        assert await other.get("user.1.name") == b"user.1.name"  # held near, over there
        assert await cache.invalidate("user.1.*") == 2
        await eventually(lambda: other.stats.invalidations == 1, timeout=2)
        assert await other.get("user.1.name") is None
    assert await cache.get("user.1.mail") is None
    assert await cache.get("user.2.name") == b"user.2.name"
    assert await cache.invalidate("user.>") == 1
    assert await cache.get("order.1") == b"order.1"


async def test_namespaces_are_separate(nc: NATS, subjects: Subjects, cache: Cache) -> None:
    async with Cache(nc, "other", subjects) as other:
        await other.set("user.1", b"theirs")
        assert await cache.get("user.1") is None
        assert await cache.invalidate(">") == 0
        assert await other.get("user.1") == b"theirs"


async def test_bad_names_are_refused(cache: Cache, nc: NATS) -> None:
    with pytest.raises(InvalidIdError):
        await cache.get("bad\x00key")
    with pytest.raises(InvalidIdError):
        await cache.invalidate("user.>.x")
    with pytest.raises(InvalidIdError):
        Cache(nc, "")


async def test_a_change_reaches_the_near_cache_of_another_process(
    nats_url: str, subjects: Subjects, cache: Cache
) -> None:
    await cache.set("shared", b"v1")
    peer = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.cache_peer",
        nats_url,
        subjects.prefix,
        "sessions",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        cwd=REPO,
    )
    assert peer.stdin is not None and peer.stdout is not None

    async def ask() -> list[str]:
        assert peer.stdin is not None and peer.stdout is not None
        peer.stdin.write(b"get shared\n")
        await peer.stdin.drain()
        async with asyncio.timeout(10):
            return (await peer.stdout.readline()).decode().split()

    try:
        async with asyncio.timeout(15):
            assert (await peer.stdout.readline()).strip() == b"ready"
        assert await ask() == ["v1", "0", "0"]
        assert await ask() == ["v1", "1", "0"]  # held near: no round trip
        await cache.set("shared", b"v2")
        changed_at = time.monotonic()
        answer = await eventually(
            lambda: _answer_is(ask(), "v2"), timeout=2, interval=0.01, message="v2 over there"
        )
        assert answer[2] == "1"  # dropped by the watch, not aged out (near_max_age is 600 s)
        assert time.monotonic() - changed_at < 2
        await cache.delete("shared")
        await eventually(lambda: _answer_is(ask(), "-"), timeout=2, interval=0.01)
    finally:
        peer.stdin.close()
        async with asyncio.timeout(10):
            await peer.wait()


async def _answer_is(question: object, value: str) -> list[str] | None:
    answer: list[str] = await question  # type: ignore[misc]
    return answer if answer[0] == value else None


async def test_a_change_made_while_disconnected_is_not_served_stale(tmp_path: Path) -> None:
    server = NatsServer(store_dir=tmp_path)
    await asyncio.to_thread(server.start)
    port, subjects = server.port, Subjects("cachert")
    nc = await connect(ConnectConfig(url=server.url), name="cache-holder")
    try:
        async with Cache(nc, "sessions", subjects) as cache:
            await cache.set("k", b"v1")
            assert await cache.get("k") == b"v1"
            await asyncio.to_thread(lambda: server.stop(keep_store=True))
            server = NatsServer(port=port, store_dir=tmp_path)
            await asyncio.to_thread(server.start)
            writer = await nats.connect(server.url)
            try:
                async with Cache(writer, "sessions", subjects, near=False) as elsewhere:

                    async def written() -> bool:
                        await elsewhere.set("k", b"v2")  # JetStream may still be recovering
                        return True

                    await eventually(written, timeout=10)
            finally:
                await writer.close()
            await eventually(lambda: _answer_is_bytes(cache.get("k"), b"v2"), timeout=10)
    finally:
        await nc.close()
        await asyncio.to_thread(server.stop)


async def _answer_is_bytes(read: object, value: bytes) -> bool:
    return await read == value  # type: ignore[misc]
