"""The watched KV mirror: it loads, follows changes, and recovers a stalled watch."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from nats.aio.client import Client as NATS
from nats.js.errors import KeyWrongLastSequenceError, NoStreamResponseError
from nats.js.kv import KeyValue

from mesh._kv import BucketConfig, KvMirror, compare_and_set, ensure_bucket
from mesh.subjects import Subjects
from mesh.testing import eventually

CHECK = 0.2


@pytest.fixture
async def kv(nc: NATS, subjects: Subjects) -> AsyncIterator[KeyValue]:
    bucket = await ensure_bucket(nc.jetstream(), BucketConfig(name=f"{subjects.prefix}-mirror"))
    yield bucket
    await nc.jetstream().delete_key_value(f"{subjects.prefix}-mirror")


async def _stall(nc: NATS, mirror: KvMirror) -> None:
    """What a node restart can leave behind: the watch's consumer gone, and the
    client's own recovery (its heartbeat check) no longer running."""
    watcher = mirror._watcher
    assert watcher is not None and watcher._sub is not None
    jsi = watcher._sub._sub._jsi
    jsi._hbtask.cancel()
    await nc.jetstream().delete_consumer(watcher._sub._stream, watcher._sub._consumer)


async def test_loads_current_values_and_follows_changes(kv: KeyValue) -> None:
    await kv.put("a", b"1")
    mirror = KvMirror(kv, check_interval=CHECK)
    await mirror.start()
    try:
        assert mirror.entries["a"].value == b"1"
        await kv.put("b", b"2")
        await kv.delete("a")
        await eventually(lambda: "a" not in mirror.entries and "b" in mirror.entries, timeout=5)
    finally:
        await mirror.aclose()


async def test_a_stalled_watch_is_watched_anew_and_catches_up(nc: NATS, kv: KeyValue) -> None:
    await kv.put("before", b"0")
    changes: list[str] = []
    mirror = KvMirror(kv, on_change=lambda key, entry: changes.append(key), check_interval=CHECK)
    await mirror.start()
    try:
        await _stall(nc, mirror)
        await kv.put("during", b"1")
        await kv.delete("before")
        await eventually(
            lambda: "during" in mirror.entries and "before" not in mirror.entries,
            timeout=10,
            message="the mirror caught up with changes made while its watch was stalled",
        )
        assert mirror.stalls >= 1
        await kv.put("after", b"2")  # and the new watch follows
        await eventually(lambda: "after" in mirror.entries, timeout=5)
    finally:
        await mirror.aclose()


async def test_a_stalled_headers_only_watch_recovers_too(nc: NATS, kv: KeyValue) -> None:
    changed: list[str] = []
    mirror = KvMirror(
        kv, on_change=lambda key, entry: changed.append(key), values=False, check_interval=CHECK
    )
    await mirror.start()
    try:
        await _stall(nc, mirror)
        await kv.put("x", b"1")
        await eventually(lambda: mirror.stalls >= 1, timeout=10)
        await kv.put("y", b"2")
        # Both reported: the change made while stalled, and the one made after.
        await eventually(lambda: {"x", "y"} <= set(changed), timeout=5)
    finally:
        await mirror.aclose()


async def test_a_quiet_or_busy_healthy_watch_is_left_alone(kv: KeyValue) -> None:
    mirror = KvMirror(kv, check_interval=CHECK)
    await mirror.start()
    try:
        for n in range(1, 201):  # busy across several checks
            await kv.put(f"k{n % 7}", str(n).encode())
            if n % 50 == 0:
                await eventually(lambda c=mirror.checks: mirror.checks > c, timeout=5)
        await eventually(lambda: mirror.last_revision == 200, timeout=5)
        checked = mirror.checks
        await eventually(lambda: mirror.checks >= checked + 4, timeout=10)  # then quiet
        assert mirror.stalls == 0
    finally:
        await mirror.aclose()


async def test_compare_and_set_answers_as_kv_update_does(nc: NATS, kv: KeyValue) -> None:
    js, bucket = nc.jetstream(), kv._name
    first = await kv.put("cas", b"one")
    second = await compare_and_set(js, bucket, "cas", b"two", last=first)
    assert second > first and (await kv.get("cas")).value == b"two"
    with pytest.raises(KeyWrongLastSequenceError):
        await compare_and_set(js, bucket, "cas", b"stale", last=first)
    assert (await kv.get("cas")).value == b"two"
    with pytest.raises(KeyWrongLastSequenceError):  # kv.update says the same
        await kv.update("cas", b"stale", last=first)
    with pytest.raises(NoStreamResponseError):
        await compare_and_set(js, "no-such-bucket", "cas", b"x", last=1)
