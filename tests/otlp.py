"""A minimal OTLP/gRPC trace receiver, so tests see the spans that service processes export."""

from __future__ import annotations

import base64
import json
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import grpc
from google.protobuf import json_format
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


def _flatten(request: trace_service_pb2.ExportTraceServiceRequest) -> list[ReceivedSpan]:
    spans = []
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
                spans.append(
                    ReceivedSpan(
                        service,
                        span.name,
                        span.trace_id.hex(),
                        span.span_id.hex(),
                        span.parent_span_id.hex(),
                        span.kind,
                    )
                )
    return spans


class _Collector(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self) -> None:
        self.spans: list[ReceivedSpan] = []

    async def Export(
        self,
        request: trace_service_pb2.ExportTraceServiceRequest,
        context: grpc.aio.ServicerContext,
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        self.spans.extend(_flatten(request))
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


def _decode_http_export(
    content_type: str, body: bytes
) -> trace_service_pb2.ExportTraceServiceRequest:
    """An OTLP/HTTP export body, protobuf or JSON (what Triton's C++ exporter sends)."""
    if not content_type.startswith("application/json"):
        return trace_service_pb2.ExportTraceServiceRequest.FromString(body)
    document = json.loads(body)
    # OTLP/JSON spells ids in hex where protobuf's JSON mapping expects base64.
    for resource_spans in document.get("resourceSpans", []):
        for scope_spans in resource_spans.get("scopeSpans", []):
            for span in scope_spans.get("spans", []):
                for key in ("traceId", "spanId", "parentSpanId"):
                    if span.get(key):
                        span[key] = base64.b64encode(bytes.fromhex(span[key])).decode()
                for link in span.get("links", []):
                    for key in ("traceId", "spanId"):
                        if link.get(key):
                            link[key] = base64.b64encode(bytes.fromhex(link[key])).decode()
    return json_format.ParseDict(
        document, trace_service_pb2.ExportTraceServiceRequest(), ignore_unknown_fields=True
    )


class OtlpHttpReceiver:
    """An OTLP/HTTP (protobuf) trace receiver on a free loopback port, for exporters that speak
    only HTTP (Triton's): point them at :attr:`traces_url`. Runs in a thread of its own, so it
    answers while a test blocks its event loop on a synchronous client."""

    def __init__(self) -> None:
        self._spans: list[ReceivedSpan] = []
        self._lock = threading.Lock()
        self.requests = 0
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                ok = self.path == "/v1/traces"
                if ok:
                    request = _decode_http_export(self.headers.get("Content-Type", ""), body)
                    with receiver._lock:
                        receiver._spans.extend(_flatten(request))
                        receiver.requests += 1
                reply = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
                self.send_response(200 if ok else 404)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, format: str, *args: object) -> None:
                """Quiet: pytest captures stderr, and every export would be a line."""

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def traces_url(self) -> str:
        """The OTLP/HTTP traces URL (``/v1/traces``)."""
        return f"http://127.0.0.1:{self.port}/v1/traces"

    @property
    def spans(self) -> list[ReceivedSpan]:
        """Every span received so far."""
        with self._lock:
            return list(self._spans)

    def start(self) -> None:
        """Starts listening."""
        self._thread.start()

    def stop(self) -> None:
        """Stops listening and closes the socket."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)
