"""Log lines: JSON (one object a line) for machines, text for a terminal.

Every line carries the service and, while a request is being served, its request id,
trace id and agent id (from `mesh._trace.current`). ``MESH_LOG_FORMAT`` picks
``json`` or ``text``; by default a terminal gets text and anything else JSON.
"""

from __future__ import annotations

import logging
import os
import sys
from datetime import UTC, datetime
from typing import Any

import orjson

from mesh._trace import current


class ContextFilter(logging.Filter):
    """Adds the service and the current request's ids to each record."""

    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def filter(self, record: logging.LogRecord) -> bool:
        record.service = self.service
        context = current.get()
        record.trace_id = context.trace.trace_id if context else None
        record.request_id = context.request_id if context else None
        record.agent_id = context.agent_id if context else None
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "service": getattr(record, "service", None),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in ("request_id", "trace_id", "agent_id"):
            value = getattr(record, name, None)
            if value:
                line[name] = value
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(line).decode()


class TextFormatter(logging.Formatter):
    """``time level service logger: message [trace request agent]``."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(service)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        ids = [
            f"{name}={value}"
            for name in ("trace_id", "request_id", "agent_id")
            if (value := getattr(record, name, None))
        ]
        return f"{text} [{' '.join(ids)}]" if ids else text


def configure_logging(level: str, service: str, fmt: str | None = None) -> None:
    """Log to stderr at `level`, as JSON or text (`fmt`, else ``MESH_LOG_FORMAT``)."""
    chosen = (fmt or os.environ.get("MESH_LOG_FORMAT") or "").lower()
    if chosen not in ("json", "text"):
        chosen = "text" if sys.stderr.isatty() else "json"
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(ContextFilter(service))
    handler.setFormatter(JsonFormatter() if chosen == "json" else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper(), logging.INFO))
