"""The JetStream streams mesh keeps: ``MESH_EVENTS`` and ``MESH_DLQ``."""

from __future__ import annotations

from nats.js.api import RetentionPolicy, StorageType, StreamConfig
from nats.js.client import JetStreamContext
from nats.js.errors import NotFoundError

from mesh._kv import deployment_replicas
from mesh._retry import while_unavailable
from mesh.subjects import Subjects

#: Nats-Msg-Id de-duplicates within this window.
DUPLICATE_WINDOW = 120.0


async def ensure_stream(js: JetStreamContext, config: StreamConfig) -> None:
    """Create the stream unless it exists (its existing settings are left alone); waits
    out a JetStream that is briefly unavailable (`while_unavailable`)."""
    await while_unavailable(lambda: _create_stream(js, config), f"stream {config.name}")


async def _create_stream(js: JetStreamContext, config: StreamConfig) -> None:
    assert config.name is not None
    try:
        await js.stream_info(config.name)
        return
    except NotFoundError:
        pass
    try:
        await js.add_stream(config)
    except Exception:
        await js.stream_info(config.name)  # created meanwhile by another process


async def ensure_event_streams(js: JetStreamContext, subjects: Subjects, retention: float) -> None:
    """``MESH_EVENTS`` for events and ``MESH_DLQ`` for events that exhausted deliveries."""
    await ensure_stream(
        js,
        StreamConfig(
            name=subjects.stream("events"),
            description="mesh events",
            subjects=[subjects.events_all],
            retention=RetentionPolicy.LIMITS,
            storage=StorageType.FILE,
            max_age=retention,
            duplicate_window=min(DUPLICATE_WINDOW, retention),
            num_replicas=deployment_replicas(),
        ),
    )
    await ensure_stream(
        js,
        StreamConfig(
            name=subjects.stream("dlq"),
            description="mesh events that exhausted their deliveries",
            subjects=[subjects.dlq_all],
            retention=RetentionPolicy.LIMITS,
            storage=StorageType.FILE,
            max_age=retention,
            num_replicas=deployment_replicas(),
        ),
    )
