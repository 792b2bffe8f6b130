"""OpenTelemetry set-up from the standard ``OTEL_*`` variables, and JSON logs that carry trace ids.

Spans are exported over OTLP/gRPC when ``OTEL_EXPORTER_OTLP_ENDPOINT`` (or the traces-specific
variable) is set and ``OTEL_TRACES_EXPORTER`` is not ``none``; otherwise a tracer provider still
runs, so trace context is created and propagated (into NATS headers, job environments) even
when nothing is collected. Metrics (``opentelemetry.metrics``) are exported over OTLP/gRPC only
when ``OTEL_METRICS_EXPORTER=otlp`` is set as well.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from typing import Any

from opentelemetry import metrics, trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricReader, PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor


@dataclass
class Telemetry:
    """What :func:`setup_telemetry` built; ``shutdown`` flushes pending spans and metrics."""

    provider: TracerProvider
    meter_provider: MeterProvider

    def shutdown(self) -> None:
        """Flushes and stops span and metric export."""
        self.provider.force_flush(timeout_millis=5000)
        self.provider.shutdown()
        self.meter_provider.shutdown(timeout_millis=5000)


def _otlp_wanted(signal: str) -> bool:
    if os.environ.get(f"OTEL_{signal}_EXPORTER", "otlp").lower() == "none":
        return False
    return bool(
        os.environ.get(f"OTEL_EXPORTER_OTLP_{signal}_ENDPOINT")
        or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    )


def _metric_readers() -> list[MetricReader]:
    # Opt-in, unlike spans: a trace-only collector (Jaeger's OTLP port) would answer every
    # export with UNIMPLEMENTED and fill the logs.
    if os.environ.get("OTEL_METRICS_EXPORTER", "none").lower() != "otlp" or not _otlp_wanted(
        "METRICS"
    ):
        return []
    from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter

    return [PeriodicExportingMetricReader(OTLPMetricExporter())]


def setup_telemetry(service_name: str, *, trace_grpc_clients: bool = True) -> Telemetry:
    """Installs the global tracer provider and the gRPC and SQLAlchemy instrumentation.

    Args:
        service_name: used when ``OTEL_SERVICE_NAME`` is unset.
        trace_grpc_clients: also patch grpc.aio channels (servers always are). The gateway turns
            this off: it forwards bytes and carries the trace context itself, cheaper per call.
    """
    resource = Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME", service_name)})
    provider = TracerProvider(resource=resource)
    if _otlp_wanted("TRACES"):
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(
            BatchSpanProcessor(OTLPSpanExporter(), schedule_delay_millis=200)
        )
    trace.set_tracer_provider(provider)
    meter_provider = MeterProvider(resource=resource, metric_readers=_metric_readers())
    metrics.set_meter_provider(meter_provider)
    instrument_grpc_aio(clients=trace_grpc_clients)
    instrument_sqlalchemy()
    return Telemetry(provider=provider, meter_provider=meter_provider)


def instrument_grpc_aio(*, clients: bool = True) -> None:
    """Patches grpc.aio so that every server (and client) call is a span (idempotent)."""
    from opentelemetry.instrumentation.grpc import (
        GrpcAioInstrumentorClient,
        GrpcAioInstrumentorServer,
    )

    instrumentors: list[GrpcAioInstrumentorServer | GrpcAioInstrumentorClient] = [
        GrpcAioInstrumentorServer()
    ]
    if clients:
        instrumentors.append(GrpcAioInstrumentorClient())
    for instrumentor in instrumentors:
        if not instrumentor.is_instrumented_by_opentelemetry:
            instrumentor.instrument()


def grpc_clients_traced() -> bool:
    """Whether grpc.aio channels open client spans and inject the trace context themselves."""
    from opentelemetry.instrumentation.grpc import GrpcAioInstrumentorClient

    return bool(GrpcAioInstrumentorClient().is_instrumented_by_opentelemetry)


def instrument_sqlalchemy() -> None:
    """Makes every SQL statement of engines created from now on a span (idempotent)."""
    from opentelemetry.instrumentation.sqlalchemy import SQLAlchemyInstrumentor

    instrumentor = SQLAlchemyInstrumentor()
    if not instrumentor.is_instrumented_by_opentelemetry:
        instrumentor.instrument(enable_commenter=False)


class JsonLogFormatter(logging.Formatter):
    """One JSON object a line, with the current ``trace_id`` and ``span_id`` when inside a span."""

    converter = time.gmtime  # type: ignore[assignment]  # logging's documented way to log UTC

    def __init__(self, service: str) -> None:
        super().__init__()
        self._service = service

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "service": self._service,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        ctx = trace.get_current_span().get_span_context()
        if ctx.is_valid:
            entry["trace_id"] = format(ctx.trace_id, "032x")
            entry["span_id"] = format(ctx.span_id, "016x")
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def setup_logging(service: str, level: str = "INFO") -> None:
    """Sends the root logger's records to stderr as JSON lines."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonLogFormatter(service))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("aiosqlite", "sqlalchemy.engine", "nats", "alembic.runtime.migration"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
