"""W3C trace context carried in NATS headers (the opentelemetry-python-contrib pattern)."""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping

from opentelemetry import context as otel_context
from opentelemetry import propagate


def inject(headers: MutableMapping[str, str], context: otel_context.Context | None = None) -> None:
    """Writes ``traceparent`` (and ``tracestate``) of ``context`` (default: current) into ``headers``."""
    propagate.inject(headers, context=context)


def extract(headers: Mapping[str, str] | None) -> otel_context.Context:
    """The trace context carried by ``headers`` (an empty context when there is none)."""
    carrier = {k: v for k, v in (headers or {}).items() if k in ("traceparent", "tracestate")}
    return propagate.extract(carrier)


def traceparent_of_current() -> dict[str, str]:
    """The current trace context as a headers dict."""
    carrier: dict[str, str] = {}
    inject(carrier)
    return carrier
