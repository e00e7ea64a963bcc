"""KV watches that mark the end of the current values only once they are all in."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from nats.js.errors import NoKeysError
from nats.js.kv import KV_DEL, KeyValue

from mesh._connection import Connection
from mesh._kv import BucketConfig, ensure_bucket
from mesh._kv_watch import history, keys, watch
from mesh.subjects import Subjects


@pytest.fixture
async def kv(mesh_nc: Connection, subjects: Subjects) -> AsyncIterator[KeyValue]:
    name = f"{subjects.prefix}-watch"
    yield await ensure_bucket(mesh_nc.jetstream(), BucketConfig(name=name, history=8))
    await mesh_nc.jetstream().delete_key_value(name)


async def test_history_is_whole_every_time(kv: KeyValue) -> None:
    # nats-py's own history() came back short or empty in 1-2% of reads on a mesh
    # connection (its consumer's info read before the values): 300 reads catch it.
    for n in range(3):
        await kv.put("k", str(n).encode())
    for _ in range(300):
        assert [entry.value for entry in await history(kv, "k")] == [b"0", b"1", b"2"]
    with pytest.raises(NoKeysError):
        await history(kv, "never")


async def test_keys_lists_the_keys_with_a_value(kv: KeyValue) -> None:
    assert await keys(kv) == []
    await kv.put("a", b"1")
    await kv.put("b.c", b"2")
    await kv.put("gone", b"3")
    await kv.delete("gone")
    assert sorted(await keys(kv)) == ["a", "b.c"]


async def test_a_watch_gives_the_current_values_then_the_end_then_changes(
    kv: KeyValue,
) -> None:
    await kv.put("a", b"1")
    await kv.put("a", b"2")
    await kv.put("b", b"3")
    watcher = await watch(kv, ">")
    try:
        current = [await watcher.updates(timeout=5) for _ in range(3)]
        assert [(e.key, e.value) for e in current[:2] if e] == [("a", b"2"), ("b", b"3")]
        assert current[2] is None
        await kv.delete("a")
        change = await watcher.updates(timeout=5)
        assert change is not None and (change.key, change.operation) == ("a", KV_DEL)
    finally:
        await watcher.stop()  # type: ignore[no-untyped-call]


async def test_a_watch_of_nothing_ends_at_once(kv: KeyValue) -> None:
    watcher = await watch(kv, "nothing.>")
    try:
        assert await watcher.updates(timeout=5) is None
    finally:
        await watcher.stop()  # type: ignore[no-untyped-call]
