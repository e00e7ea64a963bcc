"""W3C trace context (``traceparent``) across every hop, and what log lines say about it.

A request or event keeps its trace id from the first mesh process that sees it to the
last: the gateway, the worker, the handler and whatever the handler sends or
publishes. Each hop gets a span id of its own. The current trace and request live in
context variables, which the log formatters read (`mesh._logging`).
"""

from __future__ import annotations

import contextlib
import random
import re
from collections.abc import Iterator, Mapping
from contextvars import ContextVar, Token
from types import TracebackType
from typing import Final, NamedTuple

from mesh import _otel
from mesh._wire import REQUEST_ID, TRACEPARENT

_TRACEPARENT = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")
_ZERO_TRACE: Final = "0" * 32
_ZERO_SPAN: Final = "0" * 16
_ids = random.Random()


def _random_span_id() -> str:
    # Ids need to be unique, not secret: the fast generator will do. All zeros is
    # invalid (one chance in 2**64): draw again.
    while (span_id := _ids.randbytes(8).hex()) == _ZERO_SPAN:
        pass
    return span_id


class TraceContext(NamedTuple):
    """One span of a trace: ``00-<trace_id>-<span_id>-<flags>``."""

    trace_id: str
    span_id: str
    flags: str = "01"

    @classmethod
    def new(cls) -> TraceContext:
        ids = _ids.randbytes(24).hex()  # both ids in one draw
        trace_id, span_id = ids[:32], ids[32:]
        if trace_id == _ZERO_TRACE or span_id == _ZERO_SPAN:
            return cls.new()  # invalid, and as rare as in `_random_span_id`
        return cls(trace_id, span_id)

    @classmethod
    def parse(cls, value: str | None) -> TraceContext | None:
        """The context a ``traceparent`` value names; ``None`` when absent or invalid."""
        if not value:
            return None
        match = _TRACEPARENT.fullmatch(value.strip())
        if match is None or match[1] == _ZERO_TRACE or match[2] == _ZERO_SPAN:
            return None
        return cls(match[1], match[2], match[3])

    def child(self) -> TraceContext:
        return TraceContext(self.trace_id, _random_span_id(), self.flags)

    def header(self) -> str:
        return f"00-{self.trace_id}-{self.span_id}-{self.flags}"


class LogContext(NamedTuple):
    """What log lines written while serving one request say about it."""

    trace: TraceContext
    request_id: str | None = None
    agent_id: str | None = None


current: ContextVar[LogContext | None] = ContextVar("mesh_log_context", default=None)


class _Hop:
    """`hop` without OpenTelemetry: a class rather than a generator, as it runs for
    every message."""

    __slots__ = ("_context", "_token")

    def __init__(self, context: LogContext) -> None:
        self._context = context
        self._token: Token[LogContext | None] | None = None

    def __enter__(self) -> TraceContext:
        self._token = current.set(self._context)
        return self._context.trace

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._token is not None:
            current.reset(self._token)


def hop(
    name: str,
    headers: Mapping[str, str],
    *,
    agent_id: str | None = None,
    request_id: str | None = None,
    server: bool = True,
) -> contextlib.AbstractContextManager[TraceContext]:
    """One hop of the request's trace: its span (an OpenTelemetry span too, when that is
    in use), and the log context of everything done meanwhile in this task."""
    parent = TraceContext.parse(headers.get(TRACEPARENT))
    request_id = request_id or headers.get(REQUEST_ID)
    if not _otel.available():  # the common case, kept cheap: it runs for every message
        trace = parent.child() if parent is not None else TraceContext.new()
        return _Hop(LogContext(trace, request_id, agent_id))
    return _otel_hop(name, parent, request_id, agent_id, server)


@contextlib.contextmanager
def _otel_hop(
    name: str,
    parent: TraceContext | None,
    request_id: str | None,
    agent_id: str | None,
    server: bool,
) -> Iterator[TraceContext]:
    parent_ids = (parent.trace_id, parent.span_id, parent.flags) if parent else None
    attributes = {"mesh.request_id": request_id or ""}
    if agent_id is not None:
        attributes["mesh.agent_type"] = agent_id.partition("/")[0]
    with _otel.span(name, parent_ids, server=server, attributes=attributes) as ids:
        assert ids is not None
        trace = TraceContext(ids[0], ids[1], parent.flags if parent else "01")
        with _Hop(LogContext(trace, request_id, agent_id)):
            yield trace


def outgoing() -> str | None:
    """The ``traceparent`` for a message sent from here: a child of the current span."""
    context = current.get()
    return context.trace.child().header() if context is not None else None
