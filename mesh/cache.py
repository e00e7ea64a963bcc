"""A namespaced cache on KV ``mesh-cache``, with a coherent near cache in each process.

Entries live in the bucket under ``<namespace>.<key>`` (dots in a key separate
segments, so ``invalidate("user.42.*")`` drops every entry under ``user.42``), each
with an optional TTL after which the server removes it. Each `Cache` also keeps the
entries this process read or wrote (the near cache), and one headers-only watch on the
namespace drops an entry here as soon as it changes, is deleted or lapses anywhere.
After a reconnect the near cache starts empty (changes may have been missed), and no
entry is served from it for longer than ``near_max_age`` however quiet the watch.

Example::

    async with Cache(nc, "sessions") as cache:
        await cache.set("user.42", b"...", ttl=300)
        value = await cache.get("user.42")
        await cache.invalidate("user.*")
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson
from nats.aio.client import Client as NATS
from nats.js.errors import KeyNotFoundError
from nats.js.kv import KV_DEL, KV_PURGE, KeyValue

from mesh._connect import on_reconnect
from mesh._kv import BucketConfig, KvMirror, MirroredEntry, ensure_bucket, put_with_ttl
from mesh._kv_watch import keys as kv_keys
from mesh._lifecycle import Lifecycle
from mesh.errors import NoWorkerAvailableError
from mesh.subjects import Subjects

#: The least a TTL'd entry's lapse marker is kept, so that every watcher sees it.
MARKER_TTL = 60.0


def cache_bucket(subjects: Subjects) -> BucketConfig:
    return BucketConfig(name=subjects.cache_bucket, description="mesh cache", marker_ttl=MARKER_TTL)


@dataclass(slots=True)
class _Near:
    value: bytes
    revision: int
    until: float


@dataclass(slots=True)
class CacheStats:
    """How the near cache has done."""

    hits: int = 0
    misses: int = 0
    invalidations: int = 0


class Cache(Lifecycle):
    """One namespace of the mesh cache.

    Args:
        nc: A connected client; the cache does not close it.
        namespace: Whose entries (any printable text).
        subjects: The mesh's names.
        near: Keep a near cache in this process.
        near_max_age: Seconds an entry may be served from the near cache at most.
        near_max_entries: Entries the near cache holds at most (least recently used go).
    """

    def __init__(
        self,
        nc: NATS,
        namespace: str,
        subjects: Subjects | None = None,
        *,
        near: bool = True,
        near_max_age: float = 30.0,
        near_max_entries: int = 10_000,
    ) -> None:
        self._nc = nc
        self._subjects = subjects or Subjects()
        self.namespace = namespace
        self._prefix = Subjects.cache_pattern(namespace, "x")[:-1]  # "<escaped ns>."
        self._near_on = near
        self._near_max_age = near_max_age
        self._near_max_entries = near_max_entries
        self._near: OrderedDict[str, _Near] = OrderedDict()
        # The last revision the watch reported per recently changed key: a read that
        # raced with a change must not put the older value back.
        self._changed: OrderedDict[str, int] = OrderedDict()
        self._kv: KeyValue | None = None
        self._watch: KvMirror | None = None
        self._forget_reconnect: Callable[[], None] = lambda: None
        self.stats = CacheStats()

    async def start(self) -> None:
        if self._kv is not None:
            return
        self._kv = await ensure_bucket(self._nc.jetstream(), cache_bucket(self._subjects))
        if self._near_on:
            self._watch = KvMirror(
                self._kv, f"{self._prefix}>", on_change=self._dropped, values=False
            )
            await self._watch.start()
            self._forget_reconnect = on_reconnect(self._nc, self._rewatch)

    async def shutdown(self) -> None:
        self._forget_reconnect()
        if self._watch is not None:
            await self._watch.aclose()
            self._watch = None
        self._near.clear()

    async def get(self, key: str) -> bytes | None:
        """The value, from the near cache when it holds it; ``None`` when absent."""
        full = Subjects.cache_key(self.namespace, key)
        held = self._near.get(full)
        if held is not None:
            if held.until > time.monotonic():
                self.stats.hits += 1
                self._near.move_to_end(full)
                return held.value
            del self._near[full]
        self.stats.misses += 1
        try:
            entry = await self._bucket().get(full)
        except KeyNotFoundError:
            return None
        if entry.value is None or entry.operation in (KV_DEL, KV_PURGE):
            return None
        self._hold(full, entry.value, int(entry.revision or 0))
        return entry.value

    async def set(self, key: str, value: bytes, *, ttl: float | None = None) -> None:
        """Store `value`, lapsing after `ttl` seconds (whole seconds, rounded up) if given."""
        full = Subjects.cache_key(self.namespace, key)
        if ttl is None:
            revision = await self._bucket().put(full, value)
        else:
            revision = await put_with_ttl(
                self._nc.jetstream(), self._subjects.cache_bucket, full, value, ttl
            )
        self._hold(full, value, revision, ttl)

    async def get_json(self, key: str) -> Any:
        value = await self.get(key)
        return None if value is None else orjson.loads(value)

    async def set_json(self, key: str, value: Any, *, ttl: float | None = None) -> None:
        await self.set(key, orjson.dumps(value), ttl=ttl)

    async def delete(self, key: str) -> None:
        """Remove the entry here and everywhere."""
        full = Subjects.cache_key(self.namespace, key)
        self._near.pop(full, None)
        await self._bucket().purge(full)

    async def invalidate(self, pattern: str) -> int:
        """Remove every entry whose key matches `pattern` (``*`` one segment, ``>`` the
        rest); return how many there were."""
        kv = self._bucket()
        keys = await kv_keys(kv, Subjects.cache_pattern(self.namespace, pattern))
        for full in keys:
            self._near.pop(full, None)
            await kv.purge(full)
        return len(keys)

    def _hold(self, full: str, value: bytes, revision: int, ttl: float | None = None) -> None:
        if not self._near_on or revision < self._changed.get(full, 0):
            return
        age = self._near_max_age if ttl is None else min(ttl, self._near_max_age)
        self._near[full] = _Near(value, revision, time.monotonic() + age)
        self._near.move_to_end(full)
        while len(self._near) > self._near_max_entries:
            self._near.popitem(last=False)

    def _dropped(self, full: str, change: MirroredEntry | None) -> None:
        revision = change.revision if change is not None else 0
        held = self._near.get(full)
        if held is not None and held.revision >= revision:
            return  # our own write coming back, or news older than what we hold
        if held is not None:
            del self._near[full]
            self.stats.invalidations += 1
        # A read of an older revision that is still landing must not put it back.
        self._changed[full] = max(self._changed.get(full, 0), revision)
        self._changed.move_to_end(full)
        while len(self._changed) > self._near_max_entries:
            self._changed.popitem(last=False)

    async def _rewatch(self) -> None:
        self._near.clear()
        if self._watch is not None:
            await self._watch.restart()

    def _bucket(self) -> KeyValue:
        if self._kv is None:
            raise NoWorkerAvailableError(f"cache {self.namespace!r} is not started")
        return self._kv
