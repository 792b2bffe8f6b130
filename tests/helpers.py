"""Helpers shared by the tests: waiting, event capture, service settings."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import grpc
import nats
import nats.errors
import nats.js.errors
from nats.aio.msg import Msg

from plinth_common.auth import InternalTokens, Principal, Role, identity_interceptors
from plinth_common.config import Env

T = TypeVar("T")

#: The internal key services under test share (``service_env`` sets it), so tests can call
#: a service port directly as the gateway would, with a forwarded identity.
TEST_INTERNAL_KEY = "plinth-test-internal-key"
TEST_TOKENS = InternalTokens(TEST_INTERNAL_KEY.encode())
#: A platform admin: what tests of a service's behaviour (not its access rules) call as.
ADMIN = Principal("test-admin", admin=True, via="test")


def member(name: str, **roles: Role) -> Principal:
    """A user with the given team roles: ``member("ann", vision=Role.DEVELOPER)``."""
    return Principal(name, teams=dict(roles), via="test")


def channel_as(target: str, principal: Principal = ADMIN, **options: object) -> grpc.aio.Channel:
    """A channel to a service port whose calls carry ``principal`` as the gateway forwards it."""
    return grpc.aio.insecure_channel(
        target,
        options=list(options.items()),
        interceptors=identity_interceptors(TEST_TOKENS, principal),
    )


class TritonIdentity:
    """A ``tritonclient`` plugin whose calls carry ``principal`` as the gateway forwards it, for
    a stock client dialing serving's port: ``client.register_plugin(TritonIdentity(ADMIN))``."""

    def __init__(self, principal: Principal = ADMIN) -> None:
        self._principal = principal

    def __call__(self, request: Any) -> None:
        header, token = TEST_TOKENS.metadata(self._principal)
        request.headers[header] = token


async def eventually(
    probe: Callable[[], Awaitable[T | None]], *, timeout: float = 20.0, interval: float = 0.05
) -> T:
    """Calls ``probe`` until it returns something truthy and returns that; fails after
    ``timeout`` seconds. A probe that returns ``X | None`` makes the result an ``X``."""
    deadline = time.monotonic() + timeout
    last: T | None = None
    while time.monotonic() < deadline:
        last = await probe()
        if last:
            return last
        await asyncio.sleep(interval)
    raise AssertionError(f"not reached within {timeout}s (last value: {last!r})")


class EventRecorder:
    """Subscribes to ``plinth.>`` with a plain nats-py client and keeps every message."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.messages: list[Msg] = []
        self._nc: nats.NATS | None = None

    async def __aenter__(self) -> EventRecorder:
        self._nc = await nats.connect(self.url)
        await self._nc.subscribe("plinth.>", cb=self._keep)
        return self

    async def _keep(self, msg: Msg) -> None:
        self.messages.append(msg)

    async def __aexit__(self, *exc: object) -> None:
        assert self._nc is not None
        await self._nc.close()

    def of(self, subject_id: str) -> list[str]:
        """Types of the events about ``subject_id`` (ce-subject), in arrival order."""
        return [
            m.subject for m in self.messages if (m.headers or {}).get("ce-subject") == subject_id
        ]


async def stored_event_types(url: str, subject_id: str) -> list[str]:
    """Types of the events about ``subject_id`` that the PLINTH stream holds, in stream order."""
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        try:
            subscription = await js.pull_subscribe("plinth.>", stream="PLINTH")
        except nats.js.errors.NotFoundError:
            return []  # no service has created the stream (yet)
        types: list[str] = []
        while True:
            try:
                messages = await subscription.fetch(256, timeout=0.5)
            except (nats.errors.TimeoutError, TimeoutError):
                return types
            for msg in messages:
                if (msg.headers or {}).get("ce-subject") == subject_id:
                    types.append(msg.subject)
                await msg.ack()
    finally:
        await nc.close()


def service_env(data_dir: Path, nats_url: str, **extra: str) -> Env:
    """An Env for a service under test: its own data dir, ephemeral gRPC ports."""
    values = {
        "PLINTH_DATA_DIR": str(data_dir),
        "PLINTH_NATS_URL": nats_url,
        "PLINTH_SCHEDULER_PORT": "0",
        "PLINTH_GATEWAY_PORT": "0",
        "PLINTH_GATEWAY_HTTP_PORT": "0",
        "PLINTH_REGISTRY_PORT": "0",
        "PLINTH_FEATURES_PORT": "0",
        "PLINTH_SERVING_PORT": "0",
        "PLINTH_INTERNAL_KEY": TEST_INTERNAL_KEY,
    }
    values.update(extra)
    return Env(values)


class _BearerSync(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):  # type: ignore[misc]
    """Adds ``authorization: Bearer <key>`` to every call of a blocking channel."""

    def __init__(self, key: str) -> None:
        self._header = ("authorization", f"Bearer {key}")

    def _details(self, details: Any) -> Any:
        metadata = [*(details.metadata or ()), self._header]
        return details._replace(metadata=metadata)

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)


def with_bearer(channel: grpc.Channel, key: str) -> grpc.Channel:
    """A blocking channel whose calls carry ``key`` as their bearer credential."""
    return grpc.intercept_channel(channel, _BearerSync(key))
