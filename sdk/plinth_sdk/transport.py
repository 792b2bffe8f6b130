"""The SDK's one connection to the gateway: the channel, deadlines, unary and server-streaming
calls, the credential every call carries, and the translation of gRPC failures into
:mod:`plinth_sdk.errors`.

Every namespace (``jobs``, ``events``, ``models``, ``deployments``, ``features``, ``teams``,
...) receives a :class:`Transport` in its constructor and calls through it; none touches gRPC
errors or credentials itself. Which key is sent is decided once, when the transport is built
(see :mod:`plinth_sdk.credentials`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple, TypeVar

import grpc

from plinth_sdk.credentials import LOGIN_HINT, resolve_credential
from plinth_sdk.errors import PlinthClientError, Unauthenticated, from_rpc_error, reworded

__all__ = ["DEFAULT_GATEWAY", "GATEWAY_ENV", "Transport", "resolve_target"]

DEFAULT_GATEWAY = "127.0.0.1:50051"
GATEWAY_ENV = "PLINTH_GATEWAY"
_MAX_MESSAGE_BYTES = 64 * 2**20  # inference tensors and feature tables outgrow gRPC's 4 MiB
_CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", _MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", _MAX_MESSAGE_BYTES),
]

_T = TypeVar("_T")
_Stub = TypeVar("_Stub")


def resolve_target(target: str | None = None) -> str:
    """Returns ``target``, else ``$PLINTH_GATEWAY``, else ``127.0.0.1:50051``."""
    return target or os.environ.get(GATEWAY_ENV) or DEFAULT_GATEWAY


class Transport:
    """A channel to the gateway with a default deadline, a credential, and error translation.

    Every call on the channel, whichever stub makes it, carries ``authorization: Bearer <key>``
    when a key was found (see :func:`~plinth_sdk.credentials.resolve_credential` for the order).
    The channel connects lazily, so constructing a transport never fails; the first call that
    cannot reach the gateway raises :class:`~plinth_sdk.errors.GatewayUnreachable`.

    Args:
        target: ``host:port`` of the gateway.
        timeout: Deadline in seconds of a unary call that names none.
        channel: A channel to use instead of dialling ``target`` (tests, TLS); the credential
            is added to its calls all the same.
        api_key: The API key to send; None looks for one (``$PLINTH_API_KEY``, ``plinth
            login``, the local platform's admin key).
    """

    def __init__(
        self,
        target: str,
        *,
        timeout: float = 30.0,
        channel: grpc.Channel | None = None,
        api_key: str | None = None,
    ) -> None:
        self._target = target
        self._timeout = timeout
        self._credential = resolve_credential(target, api_key)
        base = channel or grpc.insecure_channel(target, options=_CHANNEL_OPTIONS)
        self._channel = (
            grpc.intercept_channel(base, _BearerToken(self._credential.metadata))
            if self._credential is not None
            else base
        )

    @property
    def target(self) -> str:
        """The gateway address this transport dials."""
        return self._target

    @property
    def timeout(self) -> float:
        """The default deadline in seconds of a unary call."""
        return self._timeout

    @property
    def credential_source(self) -> str:
        """Where the key the calls carry came from (``$PLINTH_API_KEY``, ...), "" for none."""
        return self._credential.source if self._credential is not None else ""

    def stub(self, factory: Callable[[grpc.Channel], _Stub]) -> _Stub:
        """A generated stub (``XServiceStub``) on this transport's channel."""
        return factory(self._channel)

    def unary(self, method: Callable[..., _T], request: Any, *, timeout: float | None = None) -> _T:
        """Calls a unary RPC with the default deadline (or ``timeout``), converting errors."""
        try:
            return method(request, timeout=self._timeout if timeout is None else timeout)
        except grpc.RpcError as err:
            raise self._error(err) from None

    def stream(
        self, method: Callable[..., Any], request: Any, *, timeout: float | None
    ) -> Iterator[Any]:
        """Yields the messages of a server stream, converting errors.

        Args:
            method: The stub's streaming method.
            request: The request message.
            timeout: Deadline of the whole stream; None for streams that follow live output.

        Closing the generator early (``break``, garbage collection, Ctrl-C) cancels the call,
        so the server stops sending.
        """
        call = method(request, timeout=timeout)
        try:
            yield from call
        except grpc.RpcError as err:
            raise self._error(err) from None
        finally:
            call.cancel()

    def close(self) -> None:
        """Closes the channel; calls in flight are cancelled."""
        self._channel.close()

    def __repr__(self) -> str:
        source = self.credential_source or "no credential"
        return f"Transport(target={self._target!r}, credential={source!r})"

    def _error(self, err: grpc.RpcError) -> PlinthClientError:
        """The SDK error of a failed call: an UNAUTHENTICATED one says where the key sent came
        from (or that none was sent) and how to log in; the key itself never appears in it (the
        server's own words stay in ``details``)."""
        error = from_rpc_error(err, target=self._target)
        if self._credential is not None:
            error = _redacted(error, self._credential.key)
        if isinstance(error, Unauthenticated):
            if self._credential is None:
                # The server's words (what header to send) matter less than where to get a key.
                message = f"no API key was sent to the gateway at {self._target}"
            else:
                message = f"{error.message}; the key sent came from {self._credential.source}"
            error = reworded(error, f"{message}; {LOGIN_HINT}")
        return error


def _redacted(error: PlinthClientError, key: str) -> PlinthClientError:
    """``error`` with every occurrence of ``key`` replaced: a server (or a proxy) that echoes a
    header back must not put the key into a log or a terminal."""
    if not key or key not in str(error) + error.details + "".join(error.metadata.values()):
        return error
    error.details = error.details.replace(key, _REDACTED)
    error.metadata = {name: value.replace(key, _REDACTED) for name, value in error.metadata.items()}
    return reworded(error, error.message.replace(key, _REDACTED))


_REDACTED = "<redacted>"


class _CallDetails(NamedTuple):
    method: str
    timeout: float | None
    metadata: Sequence[tuple[str, str | bytes]] | None
    credentials: grpc.CallCredentials | None
    wait_for_ready: bool | None
    compression: grpc.Compression | None


class _ClientCallDetails(_CallDetails, grpc.ClientCallDetails):
    """The details gRPC passes on, with the credential added to the metadata."""


class _BearerToken(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds the credential's metadata to every call of the channel it intercepts."""

    def __init__(self, metadata: Sequence[tuple[str, str]]) -> None:
        self._metadata = tuple(metadata)

    def _with_credential(self, details: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        given = [(k, v) for k, v in (details.metadata or ()) if k != "authorization"]
        return _ClientCallDetails(
            details.method,
            details.timeout,
            [*given, *self._metadata],
            details.credentials,
            getattr(details, "wait_for_ready", None),
            getattr(details, "compression", None),
        )

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._with_credential(details), request)

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._with_credential(details), request)

    def intercept_stream_unary(self, continuation: Any, details: Any, requests: Any) -> Any:
        return continuation(self._with_credential(details), requests)

    def intercept_stream_stream(self, continuation: Any, details: Any, requests: Any) -> Any:
        return continuation(self._with_credential(details), requests)
