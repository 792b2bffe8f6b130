"""The SDK's one connection to the gateway: the channel, deadlines, unary and server-streaming
calls, and the translation of gRPC failures into :mod:`plinth_sdk.errors`.

Every namespace (``jobs``, ``events``, ``models``, ``deployments``, ``features``) receives a
:class:`Transport` in its constructor and calls through it; none touches gRPC errors itself.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import grpc

from plinth_sdk.errors import from_rpc_error

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
    """A channel to the gateway with a default deadline, and error translation.

    The channel connects lazily, so constructing a transport never fails; the first call that
    cannot reach the gateway raises :class:`~plinth_sdk.errors.GatewayUnreachable`.

    Args:
        target: ``host:port`` of the gateway.
        timeout: Deadline in seconds of a unary call that names none.
        channel: A channel to use instead of dialling ``target`` (tests, custom credentials).
    """

    def __init__(
        self, target: str, *, timeout: float = 30.0, channel: grpc.Channel | None = None
    ) -> None:
        self._target = target
        self._timeout = timeout
        self._channel = channel or grpc.insecure_channel(target, options=_CHANNEL_OPTIONS)

    @property
    def target(self) -> str:
        """The gateway address this transport dials."""
        return self._target

    @property
    def timeout(self) -> float:
        """The default deadline in seconds of a unary call."""
        return self._timeout

    def stub(self, factory: Callable[[grpc.Channel], _Stub]) -> _Stub:
        """A generated stub (``XServiceStub``) on this transport's channel."""
        return factory(self._channel)

    def unary(self, method: Callable[..., _T], request: Any, *, timeout: float | None = None) -> _T:
        """Calls a unary RPC with the default deadline (or ``timeout``), converting errors."""
        try:
            return method(request, timeout=self._timeout if timeout is None else timeout)
        except grpc.RpcError as err:
            raise from_rpc_error(err, target=self._target) from None

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
            raise from_rpc_error(err, target=self._target) from None
        finally:
            call.cancel()

    def close(self) -> None:
        """Closes the channel; calls in flight are cancelled."""
        self._channel.close()
