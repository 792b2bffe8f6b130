"""A minimal OTLP/gRPC trace receiver, so tests see the spans that service processes export."""

from __future__ import annotations

from dataclasses import dataclass

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from plinth_common.net import free_tcp_port

SERVER, CLIENT, PRODUCER, CONSUMER = 2, 3, 4, 5  # OTLP SpanKind values


@dataclass(frozen=True)
class ReceivedSpan:
    """One exported span, flattened."""

    service: str
    name: str
    trace_id: str
    span_id: str
    parent_span_id: str
    kind: int


class _Collector(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self) -> None:
        self.spans: list[ReceivedSpan] = []

    async def Export(
        self,
        request: trace_service_pb2.ExportTraceServiceRequest,
        context: grpc.aio.ServicerContext,
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        for resource_spans in request.resource_spans:
            service = next(
                (
                    a.value.string_value
                    for a in resource_spans.resource.attributes
                    if a.key == "service.name"
                ),
                "",
            )
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    self.spans.append(
                        ReceivedSpan(
                            service,
                            span.name,
                            span.trace_id.hex(),
                            span.span_id.hex(),
                            span.parent_span_id.hex(),
                            span.kind,
                        )
                    )
        return trace_service_pb2.ExportTraceServiceResponse()


class OtlpReceiver:
    """Listens on a free loopback port; point ``OTEL_EXPORTER_OTLP_ENDPOINT`` at :attr:`endpoint`."""

    def __init__(self) -> None:
        self.port = free_tcp_port()
        self._collector = _Collector()
        # A plain server: the receiver's own calls must not be traced by the instrumentation.
        self._server = grpc.aio.server()
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(self._collector, self._server)
        self._server.add_insecure_port(f"127.0.0.1:{self.port}")

    @property
    def endpoint(self) -> str:
        """The OTLP endpoint URL."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def spans(self) -> list[ReceivedSpan]:
        """Every span received so far."""
        return list(self._collector.spans)

    async def start(self) -> None:
        """Starts listening."""
        await self._server.start()

    async def stop(self) -> None:
        """Stops listening."""
        await self._server.stop(0)


def spans_in_trace_of(receiver: OtlpReceiver, service: str, name: str) -> list[ReceivedSpan]:
    """Every span of the trace that holds the first span named ``name`` from ``service``."""
    anchor = next((s for s in receiver.spans if s.service == service and s.name == name), None)
    return [s for s in receiver.spans if anchor is not None and s.trace_id == anchor.trace_id]
