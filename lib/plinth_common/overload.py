"""A bound on the work one process takes on at a time.

Without it grpc.aio accepts every call and runs it, so a burst larger than the process can
serve queues up in memory (and in the engines behind it) without limit, every caller waits, and
nobody learns to back off. :class:`OverloadInterceptor` admits at most ``max_in_flight`` unary
calls at once; the next one answers RESOURCE_EXHAUSTED at once, with ``RetryInfo``, and costs
the process nothing while it is refused.

Server-streaming calls (``WatchEvents``, ``logs --follow``) live for minutes or hours while
doing almost no work, so they are counted apart from unary calls, against ``max_streams``
(None: not bounded). A watcher therefore never takes a slot a unary call needs.

The interceptor raises :class:`~plinth_common.errors.ResourceExhausted`; the one error
interceptor (listed before this one) maps it to the status and its rich details.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from plinth_common.errors import ResourceExhausted
from plinth_common.grpc_server import rewrap

__all__ = ["InFlight", "OverloadInterceptor"]


class InFlight:
    """A counter of running calls with a ceiling; refuses instead of waiting.

    Args:
        kind: what is counted, for the error message ("calls", "streams").
        limit: the most that may run at once; None: no ceiling (only counted).
        retry_after_s: the retry delay the refusal suggests.
    """

    def __init__(self, kind: str, *, limit: int | None, retry_after_s: float) -> None:
        if limit is not None and limit < 1:
            raise ValueError(f"the {kind} limit must be 1 or more, not {limit}")
        self.kind = kind
        self.limit = limit
        self.retry_after_s = retry_after_s
        self.current = 0
        self.peak = 0
        self.refused = 0

    def enter(self) -> None:
        """Takes a slot.

        Raises:
            ResourceExhausted: every slot is taken.
        """
        if self.limit is not None and self.current >= self.limit:
            self.refused += 1
            raise ResourceExhausted(
                f"the server is at its limit of {self.limit} {self.kind} in flight; "
                f"retry in {self.retry_after_s:g}s",
                retry_after_s=self.retry_after_s,
                limit=self.limit,
                kind=self.kind,
            )
        # One event loop runs every handler: the check and the increment cannot interleave.
        self.current += 1
        self.peak = max(self.peak, self.current)

    def leave(self) -> None:
        """Gives the slot back."""
        self.current -= 1


class OverloadInterceptor(grpc.aio.ServerInterceptor):
    """Refuses a call at once, RESOURCE_EXHAUSTED with ``RetryInfo``, when the process already
    runs ``max_in_flight`` unary calls (or ``max_streams`` server streams).

    Put it after :class:`~plinth_common.grpc_server.ErrorMappingInterceptor` (as
    ``GrpcServer(interceptors=[...])`` does), which turns the refusal into the status.

    Args:
        max_in_flight: unary calls (request-response) running at once.
        max_streams: server-streaming calls open at once; None: not bounded (they are only
            counted, in :attr:`streams`).
        retry_after_s: the delay the refusal's ``RetryInfo`` suggests.
        exempt: full method paths never refused (``/grpc.health.v1.Health/Check``: an
            orchestrator must see the process alive while it is busy).
    """

    def __init__(
        self,
        *,
        max_in_flight: int,
        max_streams: int | None = None,
        retry_after_s: float = 0.5,
        exempt: frozenset[str] = frozenset(
            {"/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch"}
        ),
    ) -> None:
        self.calls = InFlight("calls", limit=max_in_flight, retry_after_s=retry_after_s)
        self.streams = InFlight("streams", limit=max_streams, retry_after_s=retry_after_s)
        self._exempt = exempt

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method in self._exempt:
            return handler
        # Client streams: Plinth serves none; rewrap leaves them unbounded rather than guessed at.
        return rewrap(
            handler,
            unary=lambda behaviour: _bounded_unary(behaviour, self.calls),
            stream=lambda behaviour: _bounded_stream(behaviour, self.streams),
        )


def _bounded_unary(
    behaviour: Callable[..., Awaitable[Any]], slots: InFlight
) -> Callable[..., Awaitable[Any]]:
    async def bounded(request: Any, context: grpc.aio.ServicerContext) -> Any:
        slots.enter()
        try:
            return await behaviour(request, context)
        finally:
            slots.leave()

    return bounded


def _bounded_stream(
    behaviour: Callable[..., AsyncIterator[Any]], slots: InFlight
) -> Callable[..., AsyncIterator[Any]]:
    async def bounded(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        slots.enter()
        try:
            async for item in behaviour(request, context):
                yield item
        finally:
            slots.leave()

    return bounded
