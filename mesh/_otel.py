"""Spans through OpenTelemetry, when it is installed and a tracer provider is set.

mesh keeps its own trace context (`mesh._trace`) either way; with the ``otel`` extra
and a configured provider, each hop (the gateway's forward, the worker's handling) is
also an OpenTelemetry span in the caller's trace, and its span id is the one mesh
passes on, so the exported trace and the ``traceparent`` headers agree.

Processes started by the CLI configure a provider when ``MESH_OTEL_EXPORTER`` is
``otlp`` (OTLP over HTTP, from the ``otel`` extra; the endpoint comes from the usual
``OTEL_EXPORTER_OTLP_ENDPOINT``) or ``console``.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

try:
    from opentelemetry import trace as ot
    from opentelemetry.trace import (
        NonRecordingSpan,
        SpanContext,
        SpanKind,
        TraceFlags,
        set_span_in_context,
    )
except ImportError:  # the otel extra is not installed
    ot = None  # type: ignore[assignment]


_available: bool | None = None


def available() -> bool:
    """Whether spans would go anywhere: OpenTelemetry installed and a real provider set.

    Decided at the first hop of the process (set the provider before serving)."""
    global _available
    if _available is None:
        if ot is None:
            _available = False
        else:
            provider = ot.get_tracer_provider()
            _available = type(provider).__name__ not in (
                "ProxyTracerProvider",
                "NoOpTracerProvider",
            )
    return _available


@contextlib.contextmanager
def span(
    name: str,
    parent: tuple[str, str, str] | None,
    *,
    server: bool = True,
    attributes: dict[str, Any] | None = None,
) -> Iterator[tuple[str, str] | None]:
    """A span named `name` under `parent` ((trace_id, span_id, flags) in hex); yields its
    ``(trace_id, span_id)``, or ``None`` when OpenTelemetry is not in use."""
    if not available():
        yield None
        return
    context = None
    if parent is not None:
        remote = SpanContext(
            trace_id=int(parent[0], 16),
            span_id=int(parent[1], 16),
            is_remote=True,
            trace_flags=TraceFlags(int(parent[2], 16)),
        )
        context = set_span_in_context(NonRecordingSpan(remote))
    tracer = ot.get_tracer("mesh")
    kind = SpanKind.SERVER if server else SpanKind.CONSUMER
    with tracer.start_as_current_span(
        name, context=context, kind=kind, attributes=attributes or {}
    ) as current:
        ids = current.get_span_context()
        yield f"{ids.trace_id:032x}", f"{ids.span_id:016x}"


def configure_from_env(service: str) -> None:
    """Set up a provider for a CLI process, as ``MESH_OTEL_EXPORTER`` asks."""
    exporter_name = (os.environ.get("MESH_OTEL_EXPORTER") or "").lower()
    if not exporter_name or ot is None:
        return
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

    exporter: Any
    if exporter_name == "otlp":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import (  # type: ignore[import-not-found,unused-ignore]
            OTLPSpanExporter,
        )

        exporter = OTLPSpanExporter()
    else:
        exporter = ConsoleSpanExporter()
    provider = TracerProvider(resource=Resource.create({"service.name": f"mesh-{service}"}))
    provider.add_span_processor(BatchSpanProcessor(exporter))
    ot.set_tracer_provider(provider)
