"""gRPC server start-up shared by every service: grpc.aio, health, reflection, the one
interceptor that maps domain errors to status codes, and graceful shutdown on SIGTERM/SIGINT.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any, Protocol

import grpc
from google.protobuf.message import DecodeError
from google.rpc import status_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection
from opentelemetry import trace
from prometheus_client import Counter, Histogram

from plinth_common import errors
from plinth_common.metrics import GRPC_SERVER_DURATION, GRPC_SERVER_REQUESTS, Metrics, observe
from plinth_common.rich_status import DETAILS_KEY, RichDetails, details_of, status_of

log = logging.getLogger(__name__)

_STATUS_BY_ERROR: list[tuple[type[errors.PlinthError], grpc.StatusCode]] = [
    (errors.InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.NotFound, grpc.StatusCode.NOT_FOUND),
    (errors.AlreadyExists, grpc.StatusCode.ALREADY_EXISTS),
    (errors.FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.PermissionDenied, grpc.StatusCode.PERMISSION_DENIED),
    (errors.Unauthenticated, grpc.StatusCode.UNAUTHENTICATED),
    (errors.ResourceExhausted, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (errors.Unavailable, grpc.StatusCode.UNAVAILABLE),
]

# Codes gRPC itself produces when the peer, not its handler, failed: without a rich status
# from a Plinth server they mean "could not reach it".
_TRANSPORT_CODES = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


class UpstreamStatus(errors.PlinthError):
    """A status returned by a service this one called, passed on unchanged (code, message and
    rich details), as the gateway does for every forwarded call."""

    def __init__(self, code: grpc.StatusCode, message: str, *, details: RichDetails) -> None:
        super().__init__(message, **details.metadata)
        # A peer that is not a Plinth server (Triton, a plain gRPC server) sends no reason.
        self.reason = details.reason
        self.code = code
        self.rich = details


def upstream_error(exc: grpc.aio.AioRpcError, upstream: str) -> errors.PlinthError:
    """The error to raise for a failed call to the ``upstream`` service.

    A status the upstream's own handler sent (it carries rich details) passes on unchanged; a
    call that could not reach the upstream becomes :class:`~plinth_common.errors.Unavailable`
    naming it, so the caller learns which service is down, not that "something" is.
    """
    details = details_of(exc.trailing_metadata())
    if exc.code() in _TRANSPORT_CODES and not details.reason:
        what = (
            "did not answer in time"
            if exc.code() is grpc.StatusCode.DEADLINE_EXCEEDED
            else "cannot be reached"
        )
        return errors.Unavailable(
            f"the {upstream} service {what}; retry shortly", dependency=f"{upstream} service"
        )
    return UpstreamStatus(exc.code(), exc.details() or exc.code().name, details=details)


def status_for(error: errors.PlinthError) -> grpc.StatusCode:
    """The gRPC status code of a domain error (INTERNAL for the bare base class)."""
    if isinstance(error, UpstreamStatus):
        return error.code
    for error_type, code in _STATUS_BY_ERROR:
        if isinstance(error, error_type):
            return code
    return grpc.StatusCode.INTERNAL


def domain_of(method: str) -> str:
    """``ErrorInfo.domain`` for a method path: ``/plinth.scheduler.v1.X/Y`` -> ``scheduler.plinth``."""
    package = method.lstrip("/").split("/", 1)[0].split(".")
    if len(package) >= 2 and package[0] == "plinth":
        return f"{package[1]}.plinth"
    return "plinth"


def _trailer(status: status_pb2.Status | bytes) -> tuple[tuple[str, bytes], ...]:
    raw = status if isinstance(status, bytes) else status.SerializeToString()
    return ((DETAILS_KEY, raw),) if raw else ()


def internal_error(where: str) -> errors.PlinthError:
    """Logs the exception being handled (with its traceback) and returns what the caller gets:
    INTERNAL with the trace id that finds the log line, never the exception's text or paths.

    Args:
        where: what failed, for the log (the method, or the HTTP route).
    """
    log.exception("unexpected error in %s", where)
    ctx = trace.get_current_span().get_span_context()
    trace_id = format(ctx.trace_id, "032x") if ctx.is_valid else "none"
    return errors.PlinthError(f"internal error (trace_id {trace_id})", trace_id=trace_id)


async def _abort_for(
    exc: BaseException, context: grpc.aio.ServicerContext, method: str, domain: str | None
) -> None:
    if isinstance(exc, UpstreamStatus):
        await context.abort(exc.code, exc.message, trailing_metadata=_trailer(exc.rich.raw))
    if not isinstance(exc, errors.PlinthError):
        exc = internal_error(method)
    code = status_for(exc)
    status = status_of(exc, code=code, domain=domain or domain_of(method))
    await context.abort(code, exc.message, trailing_metadata=_trailer(status))


def _decoder(deserialize: Callable[[bytes], Any] | None) -> Callable[[bytes], Any]:
    """Decodes inside the handler, so undecodable bytes become INVALID_ARGUMENT, not UNKNOWN."""
    if deserialize is None:
        return lambda raw: raw

    def decode(raw: bytes) -> Any:
        try:
            return deserialize(raw)
        except DecodeError:
            raise errors.InvalidArgument(
                "request",
                "the bytes do not decode as this method's request message",
                reason="MALFORMED_REQUEST",
            ) from None

    return decode


UnaryBehaviour = Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]
StreamBehaviour = Callable[[Any, grpc.aio.ServicerContext], AsyncIterator[Any]]


def rewrap(
    handler: grpc.RpcMethodHandler,
    *,
    unary: Callable[[UnaryBehaviour], UnaryBehaviour],
    stream: Callable[[StreamBehaviour], StreamBehaviour],
) -> grpc.RpcMethodHandler:
    """``handler`` with its unary or server-streaming behaviour wrapped, its (de)serializers
    kept: what an interceptor that runs code around each call returns. Client-streaming
    handlers (Plinth serves none) pass unchanged."""
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(
            unary(handler.unary_unary),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(
            stream(handler.unary_stream),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
    return handler


class MethodMetrics:
    """The call figures of one method: ``plinth_grpc_server_requests_total`` by final code, and
    ``plinth_grpc_server_request_duration_seconds`` for unary calls (a stream's length says
    nothing about latency), with the call's trace id as the exemplar."""

    def __init__(self, metrics: Metrics, path: str) -> None:
        service, _, method = path.lstrip("/").rpartition("/")
        self._labels = (service, method)
        self._requests = metrics.counter(GRPC_SERVER_REQUESTS)
        self._duration_family = metrics.histogram(GRPC_SERVER_DURATION)
        self._duration: Histogram | None = None
        self._by_code: dict[grpc.StatusCode, Counter] = {}

    def record(self, code: grpc.StatusCode | None, seconds: float | None) -> None:
        """Counts one call that ended with ``code`` (None: OK) and took ``seconds`` (None: a
        stream, not timed)."""
        code = code or grpc.StatusCode.OK
        counter = self._by_code.get(code)
        if counter is None:
            counter = self._by_code[code] = self._requests.labels(*self._labels, code.name)
        counter.inc()
        if seconds is not None:
            if self._duration is None:
                self._duration = self._duration_family.labels(*self._labels)
            observe(self._duration, seconds)


class CallMetrics:
    """:class:`MethodMetrics` per method path, made on a method's first call. Only paths the
    server has a handler for get here, so a caller cannot invent label values."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics
        self._methods: dict[str, MethodMetrics] = {}

    def of(self, path: str) -> MethodMetrics:
        """The figures of the method at ``path`` (``/package.Service/Method``)."""
        found = self._methods.get(path)
        if found is None:
            found = self._methods[path] = MethodMetrics(self._metrics, path)
        return found


class ErrorMappingInterceptor(grpc.aio.ServerInterceptor):
    """Maps :class:`~plinth_common.errors.PlinthError` to status codes with rich details
    (``ErrorInfo``, ``BadRequest``, ``ResourceInfo``, ``RetryInfo``); anything else to INTERNAL
    without its text. Requests are decoded inside, so undecodable bytes are INVALID_ARGUMENT.

    Args:
        domain: ``ErrorInfo.domain`` of the errors this process raises (``gateway.plinth``);
            by default derived from the method's package. Set it where a process serves
            methods of another service's API (the gateway), so that an error the gateway
            raises itself does not read as the service's own.
        metrics: where to count calls and time them (:class:`MethodMetrics`). The count is
            taken here, in the wrapper every call passes anyway, so it costs no layer of its own;
            it sees the final code, after this mapping and every interceptor after it.
    """

    def __init__(self, *, domain: str | None = None, metrics: Metrics | None = None) -> None:
        self._domain = domain
        # Metrics switched off cost the wrapper nothing, not even a no-op recording.
        self._calls = CallMetrics(metrics) if metrics is not None and metrics.enabled else None

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = handler_call_details.method
        decode = _decoder(handler.request_deserializer)
        calls = self._calls.of(method) if self._calls is not None else None
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                _wrap_unary(handler.unary_unary, method, decode, self._domain, calls),
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                _wrap_stream(handler.unary_stream, method, decode, self._domain, calls),
                response_serializer=handler.response_serializer,
            )
        # Client streams decode message by message inside grpc; Plinth serves none today.
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(
                _wrap_unary(handler.stream_unary, method, _identity, self._domain, calls),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return grpc.stream_stream_rpc_method_handler(
            _wrap_stream(handler.stream_stream, method, _identity, self._domain, calls),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


def _identity(request: Any) -> Any:
    return request


def _wrap_unary(
    behaviour: Callable[..., Any],
    method: str,
    decode: Callable[[Any], Any],
    domain: str | None,
    calls: MethodMetrics | None = None,
) -> Callable[..., Awaitable[Any]]:
    async def wrapped(request: Any, context: grpc.aio.ServicerContext) -> Any:
        start = time.perf_counter()
        code: grpc.StatusCode | None = grpc.StatusCode.CANCELLED  # unless the call ends
        try:
            response = await behaviour(decode(request), context)
            code = context.code()  # None, or what the handler set without raising
            return response
        except grpc.aio.AbortError:
            code = context.code()
            raise
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - this is the one place that maps every error
            try:
                await _abort_for(exc, context, method, domain)
            finally:
                code = context.code()
        finally:
            if calls is not None:
                calls.record(code, time.perf_counter() - start)

    return wrapped


def _wrap_stream(
    behaviour: Callable[..., Any],
    method: str,
    decode: Callable[[Any], Any],
    domain: str | None,
    calls: MethodMetrics | None = None,
) -> Callable[..., AsyncIterator[Any]]:
    async def wrapped(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        code: grpc.StatusCode | None = grpc.StatusCode.CANCELLED
        try:
            async for item in behaviour(decode(request), context):
                yield item
            code = context.code()
        except grpc.aio.AbortError:
            code = context.code()
            raise
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001
            try:
                await _abort_for(exc, context, method, domain)
            finally:
                code = context.code()
        finally:
            if calls is not None:
                calls.record(code, None)

    return wrapped


class Registration(Protocol):
    """A generated ``add_XServicer_to_server`` function."""

    def __call__(self, servicer: Any, server: grpc.aio.Server) -> None: ...


class GrpcServer:
    """A grpc.aio server with health, reflection and the error interceptor.

    Args:
        host: address to bind.
        port: port to bind; 0 picks a free one (see :attr:`port` after :meth:`start`).
        interceptors: extra interceptors, run after the error mapping.
        domain: ``ErrorInfo.domain`` of this process's own errors (see
            :class:`ErrorMappingInterceptor`).
        metrics: where to count and time calls (see :class:`ErrorMappingInterceptor`); None
            records nothing.
    """

    def __init__(
        self,
        *,
        host: str,
        port: int,
        interceptors: Iterable[grpc.aio.ServerInterceptor] = (),
        domain: str | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self._server = grpc.aio.server(
            interceptors=[ErrorMappingInterceptor(domain=domain, metrics=metrics), *interceptors],
            options=[
                ("grpc.so_reuseport", 0),
                ("grpc.max_receive_message_length", 64 * 1024 * 1024),
            ],
        )
        self._host = host
        self._requested_port = port
        self._service_names: list[str] = []
        self.health = health_aio.HealthServicer()
        self.port = 0

    @property
    def server(self) -> grpc.aio.Server:
        """The underlying server, for generic handlers."""
        return self._server

    def add(self, register: Registration, servicer: Any, service_name: str) -> None:
        """Registers a servicer; ``service_name`` is its full protobuf name (for health, reflection)."""
        register(servicer, self._server)
        self._service_names.append(service_name)

    def add_name(self, service_name: str) -> None:
        """Declares a service added through a generic handler, for health and reflection."""
        self._service_names.append(service_name)

    async def start(self) -> int:
        """Binds, starts, and returns the bound port. Health starts NOT_SERVING."""
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        reflection.enable_server_reflection(
            [
                *self._service_names,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ],
            self._server,
        )
        self.port = self._server.add_insecure_port(f"{self._host}:{self._requested_port}")
        if self.port == 0:
            raise errors.Unavailable(f"cannot bind {self._host}:{self._requested_port}")
        await self._server.start()
        await self.set_serving(False)
        return self.port

    async def set_serving(self, serving: bool) -> None:
        """Sets every registered service (and the server as a whole, "") to SERVING or NOT_SERVING."""
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ("", *self._service_names):
            await self.health.set(name, status)

    async def stop(self, grace: float = 5.0) -> None:
        """Health to NOT_SERVING, then stops taking calls and waits ``grace`` seconds for running ones."""
        await self.set_serving(False)
        await self._server.stop(grace)


class Service(Protocol):
    """What an entry point runs: a service app with a start and a stop."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


async def run_until_signalled(app: Service) -> None:
    """Starts ``app``, waits for SIGTERM or SIGINT, then stops it (graceful shutdown)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await app.start()
    try:
        await stop.wait()
    finally:
        log.info("shutting down")
        await app.stop()
