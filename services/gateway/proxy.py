"""Forwarding of whole gRPC services to their upstream, bytes in and bytes out.

The gateway re-exposes each service's API unchanged. Messages are not decoded: the forwarder
passes the serialized request on and the serialized response back, so a hop costs little more
than the call itself. Upstream errors keep their status code and rich details; an upstream that
cannot be reached is UNAVAILABLE naming it.

The caller's credential stays at the gateway: ``authorization`` and any ``x-plinth-principal``
a client sent are dropped from the forwarded metadata, and the gateway adds the identity it
verified, signed with the internal key (:class:`~plinth_common.auth.InternalTokens`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor

from plinth_common.auth import PRINCIPAL_HEADER, InternalTokens, current_principal
from plinth_common.errors import PlinthError
from plinth_common.events.tracing import traceparent_of_current
from plinth_common.grpc_server import UpstreamStatus, upstream_error
from plinth_common.rich_status import details_of
from plinth_common.telemetry import grpc_clients_traced

# Headers the transport or the tracing instrumentation set afresh on the outgoing call.
_HOP_BY_HOP = ("grpc-", ":", "traceparent", "tracestate", "user-agent", "content-type", "te")
# Headers that never leave the gateway: the caller's credential, and a forged identity.
_DROPPED = frozenset({"authorization", PRINCIPAL_HEADER})


@dataclass(frozen=True)
class Upstream:
    """A service the gateway forwards to.

    Attributes:
        name: short name for messages ("scheduler").
        channel: the open channel to it.
        services: the protobuf services it serves.
        only: per service full name, the methods forwarded; a service not named here is
            forwarded whole. This keeps, e.g., Triton's model-repository methods off the gateway.
    """

    name: str
    channel: grpc.aio.Channel
    services: tuple[ServiceDescriptor, ...]
    only: Mapping[str, frozenset[str]] = field(default_factory=dict)

    def methods(self) -> Iterator[tuple[ServiceDescriptor, MethodDescriptor]]:
        """The (service, method) pairs to forward."""
        for service in self.services:
            allowed = self.only.get(service.full_name)
            for method in service.methods:
                if allowed is None or method.name in allowed:
                    yield service, method


def _forwarded_metadata(
    context: grpc.aio.ServicerContext, inject_trace: bool, tokens: InternalTokens | None
) -> list[tuple[str, Any]]:
    metadata = [
        (k, v)
        for k, v in (context.invocation_metadata() or ())
        if not k.startswith(_HOP_BY_HOP) and k not in _DROPPED
    ]
    if tokens is not None:
        metadata.append(tokens.metadata(current_principal()))
    if inject_trace:
        metadata.extend(traceparent_of_current().items())
    return metadata


def forwarded_error(
    exc: grpc.aio.AioRpcError, upstream: str, *, caller_deadline: bool
) -> PlinthError:
    """The error the gateway answers for a failed forwarded call.

    Args:
        exc: the upstream call's failure.
        upstream: the upstream's short name.
        caller_deadline: whether the forwarded deadline was the caller's own (not the gateway's
            default): its expiry is then DEADLINE_EXCEEDED, as a direct call would answer,
            rather than the upstream "not answering in time".
    """
    if caller_deadline and exc.code() is grpc.StatusCode.DEADLINE_EXCEEDED:
        return UpstreamStatus(
            exc.code(),
            exc.details() or "deadline exceeded",
            details=details_of(exc.trailing_metadata()),
        )
    return upstream_error(exc, upstream)


class ForwardingHandler(grpc.GenericRpcHandler):
    """Serves every method of the upstreams' services by calling the upstream.

    Args:
        upstreams: where each service lives.
        default_timeout_s: deadline of a forwarded unary call when the client set none.
        tokens: mints the forwarded identity of the current caller
            (:func:`~plinth_common.auth.current_principal`, set by the gateway's auth
            interceptor); None forwards no identity (tests of the forwarding alone).
    """

    def __init__(
        self,
        upstreams: Iterable[Upstream],
        *,
        default_timeout_s: float = 30.0,
        tokens: InternalTokens | None = None,
    ) -> None:
        self._default_timeout_s = default_timeout_s
        self._tokens = tokens
        # Without client instrumentation the forwarder carries the trace context itself.
        self._inject_trace = not grpc_clients_traced()
        self._handlers: dict[str, grpc.RpcMethodHandler] = {}
        for upstream in upstreams:
            for service, method in upstream.methods():
                path = f"/{service.full_name}/{method.name}"
                self._handlers[path] = self._handler_for(
                    upstream, path, method.server_streaming, method.client_streaming
                )

    @property
    def service_names(self) -> list[str]:
        """Full names of the forwarded services."""
        return sorted({path.split("/")[1] for path in self._handlers})

    def service(
        self, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        return self._handlers.get(handler_call_details.method)

    def _timeout(self, context: grpc.aio.ServicerContext) -> tuple[float, bool]:
        """The forwarded call's timeout, and whether it is the caller's own deadline."""
        remaining = context.time_remaining()
        if remaining is None or remaining > self._default_timeout_s:
            return self._default_timeout_s, False
        return remaining, True

    def _handler_for(
        self, upstream: Upstream, path: str, server_streaming: bool, client_streaming: bool
    ) -> grpc.RpcMethodHandler:
        if client_streaming:
            raise NotImplementedError(f"{path}: client streaming is not forwarded")
        if server_streaming:
            stream_call = upstream.channel.unary_stream(path)

            async def forward_stream(
                request: bytes, context: grpc.aio.ServicerContext
            ) -> AsyncIterator[bytes]:
                remaining = (
                    context.time_remaining()
                )  # streams (logs --follow) keep the client's deadline only
                call = stream_call(
                    request,
                    timeout=remaining,
                    metadata=_forwarded_metadata(context, self._inject_trace, self._tokens),
                )
                try:
                    async for response in call:
                        yield response
                except grpc.aio.AioRpcError as exc:
                    raise forwarded_error(
                        exc, upstream.name, caller_deadline=remaining is not None
                    ) from None
                finally:
                    call.cancel()

            return grpc.unary_stream_rpc_method_handler(forward_stream)

        unary_call = upstream.channel.unary_unary(path)

        async def forward_unary(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            timeout, caller_deadline = self._timeout(context)
            try:
                return await unary_call(
                    request,
                    timeout=timeout,
                    metadata=_forwarded_metadata(context, self._inject_trace, self._tokens),
                )
            except grpc.aio.AioRpcError as exc:
                raise forwarded_error(exc, upstream.name, caller_deadline=caller_deadline) from None

        return grpc.unary_unary_rpc_method_handler(forward_unary)


def open_channel(target: str, options: Mapping[str, Any] | None = None) -> grpc.aio.Channel:
    """An insecure channel to an upstream, sized for gateway traffic."""
    merged = {
        "grpc.max_receive_message_length": 64 * 1024 * 1024,
        "grpc.max_send_message_length": 64 * 1024 * 1024,
    }
    merged.update(options or {})
    return grpc.aio.insecure_channel(target, options=list(merged.items()))
