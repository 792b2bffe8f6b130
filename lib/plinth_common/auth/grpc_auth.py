"""The caller's identity inside a service: the interceptor that verifies the forwarded token,
the context variable servicers read it from, and the metadata a service attaches to its own
calls to another service.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from typing import Any, Generic, TypeVar

import grpc

from plinth_common.auth.permissions import Scope, rule_for
from plinth_common.auth.principal import Principal
from plinth_common.auth.tokens import PRINCIPAL_HEADER, InternalTokens
from plinth_common.errors import PermissionDenied, Unauthenticated
from plinth_common.grpc_server import StreamBehaviour, UnaryBehaviour, rewrap

__all__ = [
    "PeerStub",
    "ServiceAuthInterceptor",
    "acting_as",
    "bearer_interceptors",
    "current_principal",
    "identity_interceptors",
    "metadata_value",
]

_CURRENT: contextvars.ContextVar[Principal | None] = contextvars.ContextVar(
    "plinth_principal", default=None
)


def current_principal() -> Principal:
    """The verified caller of the call being served.

    Raises:
        Unauthenticated: outside a call that went through the auth interceptor.
    """
    principal = _CURRENT.get()
    if principal is None:
        raise Unauthenticated("no verified caller")
    return principal


@contextlib.contextmanager
def acting_as(principal: Principal) -> Iterator[Principal]:
    """Makes ``principal`` the current caller inside the block (interceptors, in-process calls)."""
    token = _CURRENT.set(principal)
    try:
        yield principal
    finally:
        _CURRENT.reset(token)


def metadata_value(context: grpc.aio.ServicerContext, key: str) -> str | None:
    """One invocation metadata value of the call (the first one with that key)."""
    for name, value in context.invocation_metadata() or ():
        if name == key:
            return value if isinstance(value, str) else value.decode(errors="replace")
    return None


class ServiceAuthInterceptor(grpc.aio.ServerInterceptor):
    """Admits only calls that carry a valid forwarded identity, to methods that have a rule.

    Public methods (health) pass without one. The verified principal is the current caller
    (:func:`current_principal`) while the handler runs.

    Args:
        tokens: verifies the ``x-plinth-principal`` token.
    """

    def __init__(self, tokens: InternalTokens) -> None:
        self._tokens = tokens

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = handler_call_details.method
        rule = rule_for(method)
        if rule is not None and rule.scope is Scope.PUBLIC:
            return handler
        tokens = self._tokens

        def verified(context: grpc.aio.ServicerContext) -> Principal:
            principal = tokens.verify(metadata_value(context, PRINCIPAL_HEADER))
            if rule is None:
                raise PermissionDenied(f"{method} has no authorization rule, so it is denied")
            return principal

        def unary(behaviour: UnaryBehaviour) -> UnaryBehaviour:
            async def as_caller(request: Any, context: grpc.aio.ServicerContext) -> Any:
                with acting_as(verified(context)):
                    return await behaviour(request, context)

            return as_caller

        def stream(behaviour: StreamBehaviour) -> StreamBehaviour:
            async def as_caller(
                request: Any, context: grpc.aio.ServicerContext
            ) -> AsyncIterator[Any]:
                with acting_as(verified(context)):
                    async for item in behaviour(request, context):
                        yield item

            return as_caller

        return rewrap(handler, unary=unary, stream=stream)


class _CallMetadata:
    """Sets one metadata header, computed per call, on every call of a channel."""

    def __init__(self, header: Callable[[], tuple[str, str]]) -> None:
        self._header = header

    def _details(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        key, value = self._header()
        metadata = grpc.aio.Metadata(*[(k, v) for k, v in (details.metadata or ()) if k != key])
        metadata.add(key, value)
        return grpc.aio.ClientCallDetails(
            details.method, details.timeout, metadata, details.credentials, details.wait_for_ready
        )


class MetadataUnaryInterceptor(_CallMetadata, grpc.aio.UnaryUnaryClientInterceptor):
    """Client interceptor: unary calls carry the header."""

    async def intercept_unary_unary(
        self,
        continuation: Callable[..., Any],
        client_call_details: grpc.aio.ClientCallDetails,
        request: Any,
    ) -> Any:
        return await continuation(self._details(client_call_details), request)


class MetadataStreamInterceptor(_CallMetadata, grpc.aio.UnaryStreamClientInterceptor):
    """Client interceptor: server-streaming calls carry the header."""

    async def intercept_unary_stream(
        self,
        continuation: Callable[..., Any],
        client_call_details: grpc.aio.ClientCallDetails,
        request: Any,
    ) -> Any:
        return await continuation(self._details(client_call_details), request)


def _interceptors(header: Callable[[], tuple[str, str]]) -> list[grpc.aio.ClientInterceptor]:
    return [MetadataUnaryInterceptor(header), MetadataStreamInterceptor(header)]


def identity_interceptors(
    tokens: InternalTokens, principal: Principal
) -> list[grpc.aio.ClientInterceptor]:
    """Interceptors for a channel whose every call is made as ``principal`` (a Plinth service
    calling another one); the token is re-minted as it nears expiry."""
    return _interceptors(lambda: tokens.metadata(principal))


def bearer_interceptors(credential: str) -> list[grpc.aio.ClientInterceptor]:
    """Interceptors for a channel to the gateway whose every call carries
    ``authorization: Bearer <credential>`` (an API key or an OIDC token)."""
    value = f"Bearer {credential}"
    return _interceptors(lambda: ("authorization", value))


_Stub = TypeVar("_Stub")


class PeerStub(Generic[_Stub]):
    """A stub of another Plinth service whose every call carries this service's own identity
    (serving asking the registry for an alias, the scheduler asking for a team's MLflow user).

    The channel opens on first use, inside the running event loop it then belongs to.

    Args:
        target: the peer's gRPC address.
        stub: the generated stub class (``registry_pb2_grpc.RegistryServiceStub``).
        tokens: mints the identity.
        principal: who this service is (``Principal.service("serving")``).
        options: gRPC channel options (a larger ``grpc.max_receive_message_length``).
    """

    def __init__(
        self,
        target: str,
        stub: Callable[[grpc.aio.Channel], _Stub],
        *,
        tokens: InternalTokens,
        principal: Principal,
        options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        self._target = target
        self._make_stub = stub
        self._tokens = tokens
        self._principal = principal
        self._options = list(options)
        self._channel: grpc.aio.Channel | None = None
        self._stub: _Stub | None = None

    def get(self) -> _Stub:
        """The stub, its channel opened if need be."""
        if self._stub is None:
            self._channel = grpc.aio.insecure_channel(
                self._target,
                options=self._options,
                interceptors=identity_interceptors(self._tokens, self._principal),
            )
            self._stub = self._make_stub(self._channel)
        return self._stub

    async def close(self) -> None:
        """Closes the channel (a later call opens a new one)."""
        if self._channel is not None:
            await self._channel.close()
        self._channel = self._stub = None
