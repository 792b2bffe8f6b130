"""What every service process has: a store, a NATS connection, an outbox relay, consumers and a
gRPC server, started and stopped in the right order. Service apps compose one of these.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol, Unpack

import grpc
from sqlalchemy import Table

from plinth_common.auth import InternalTokens, ServiceAuthInterceptor, load_internal_key
from plinth_common.config import CommonSettings
from plinth_common.db import Database
from plinth_common.events import ConsumerSettings, EventBus, EventConsumer, Outbox, OutboxRelay
from plinth_common.events.consumer import ConsumerOptions, EffectHandler, Handler
from plinth_common.grpc_server import GrpcServer
from plinth_common.metrics import Metrics

log = logging.getLogger(__name__)


class ServiceRuntime:
    """Infrastructure of one service process.

    :attr:`metrics` is the process's metrics (its own registry): the gRPC server, the outbox
    relay and the consumers record into it, a service declares its own families on it, and
    its endpoint serves on ``settings.metrics_port`` from :meth:`start` to :meth:`stop`
    (:attr:`metrics_port` is the bound port).

    Args:
        settings: the service's common settings.
        outbox_table: its ``event_outbox`` table (None for a service that emits nothing).
        processed_table: its ``processed_events`` table (None for one that consumes nothing).
        migrations: its Alembic folder.
        interceptors: extra server interceptors (an overload bound), after the error mapping.
        verify_callers: admit only calls carrying the identity the gateway forwards (every
            service; the gateway authenticates callers itself and passes False).
    """

    def __init__(
        self,
        settings: CommonSettings,
        *,
        outbox_table: Table | None = None,
        processed_table: Table | None = None,
        migrations: Path | None = None,
        interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
        verify_callers: bool = True,
    ) -> None:
        self.settings = settings
        self.tokens = InternalTokens(
            load_internal_key(settings.internal_key, settings.internal_key_file)
        )
        if verify_callers:
            interceptors = [*interceptors, ServiceAuthInterceptor(self.tokens)]
        self.metrics = Metrics(settings.service, enabled=settings.metrics_enabled)
        self.db = Database(settings.database_url)
        self.bus = EventBus(settings.nats_url, name=f"plinth-{settings.service}")
        self.server = GrpcServer(
            host=settings.host,
            port=settings.port,
            domain=f"{settings.service}.plinth",
            interceptors=interceptors,
            metrics=self.metrics,
        )
        self.outbox = (
            Outbox(outbox_table, source=f"/plinth/{settings.service}")
            if outbox_table is not None
            else None
        )
        self.relay = (
            OutboxRelay(self.db, outbox_table, self.bus, metrics=self.metrics)
            if outbox_table is not None
            else None
        )
        self._processed_table = processed_table
        self._migrations = migrations
        self.consumers: list[EventConsumer] = []

    def require_outbox(self) -> Outbox:
        """The outbox, for a service that emits events (built with an ``outbox_table``).

        Raises:
            RuntimeError: the runtime was built without one (a wiring mistake).
        """
        if self.outbox is None:
            raise RuntimeError(f"the {self.settings.service} runtime was built without an outbox")
        return self.outbox

    def consume(
        self,
        durable: str,
        subjects: Sequence[str],
        handler: Handler | EffectHandler,
        **options: Unpack[ConsumerOptions],
    ) -> EventConsumer:
        """Declares a durable consumer, started with the runtime.

        Args:
            durable: the consumer's durable name.
            subjects: the subjects it handles.
            handler: a database-only handler, or an :class:`EffectHandler` for one that does I/O.
            **options: further :class:`ConsumerSettings` fields.
        """
        if self._processed_table is None:
            raise RuntimeError("a consuming service needs a processed_events table")
        consumer = EventConsumer(
            self.bus,
            self.db,
            self._processed_table,
            ConsumerSettings(durable=durable, subjects=subjects, **options),
            handler,
            metrics=self.metrics,
        )
        self.consumers.append(consumer)
        return consumer

    @property
    def metrics_port(self) -> int:
        """The metrics endpoint's bound port (0 before :meth:`start`)."""
        return self.metrics.port

    async def start(self) -> None:
        """Serves metrics, migrates the store, starts NATS, relay and consumers, binds the gRPC
        server (NOT_SERVING)."""
        self.settings.service_dir.mkdir(parents=True, exist_ok=True)
        # First, so that a slow migration or an unreachable NATS can be watched.
        await self.metrics.serve(self.settings.host, self.settings.metrics_port)
        try:
            if self._migrations is not None:
                await self.db.migrate(self._migrations)
            await self.bus.start()
            if self.relay is not None:
                await self.relay.start()
            for consumer in self.consumers:
                await consumer.start()
            port = await self.server.start()
        except BaseException:
            await self.metrics.close()  # a failed start leaves no port bound
            raise
        log.info("%s listening on %s:%d", self.settings.service, self.settings.host, port)

    async def stop(self) -> None:
        """Health to NOT_SERVING, drain calls, stop consumers, flush the outbox, close everything."""
        await self.server.stop()
        for consumer in self.consumers:
            await consumer.stop()
        if self.relay is not None:
            await self.relay.stop()
        await self.bus.stop()
        await self.db.close()
        await self.metrics.close()


class Engine(Protocol):
    """The real system a service drives (MLflow, Feast, Triton)."""

    async def start(self) -> None: ...

    async def is_ready(self) -> bool: ...

    async def stop(self) -> None: ...


class EngineHealth:
    """Keeps a service's gRPC health equal to its engine's readiness: NOT_SERVING until the
    engine answers, and again whenever it stops answering.

    Args:
        server: the service's gRPC server.
        engine: the engine to probe.
        name: the engine's name, for logs.
        interval_s: probe period once ready (four times faster while not ready).
    """

    def __init__(
        self, server: GrpcServer, engine: Engine, *, name: str, interval_s: float = 2.0
    ) -> None:
        self._server = server
        self._engine = engine
        self._name = name
        self._interval_s = interval_s
        self._task: asyncio.Task[None] | None = None
        self.ready = asyncio.Event()

    async def start(self) -> None:
        """Starts probing in the background."""
        self._task = asyncio.create_task(self._probe_forever(), name=f"health-{self._name}")

    async def _probe_forever(self) -> None:
        serving: bool | None = None
        while True:
            cause = ""
            try:
                ready = await self._engine.is_ready()
            except Exception as exc:  # noqa: BLE001 - a probe that fails means "not ready"
                ready, cause = False, f" ({type(exc).__name__}: {exc})"
            if ready != serving:
                await self._server.set_serving(ready)
                log.log(
                    logging.INFO if ready else logging.WARNING,
                    "%s is %s%s",
                    self._name,
                    "ready" if ready else "not ready",
                    cause,
                )
                serving = ready
            elif cause:
                log.debug("%s probe failed%s", self._name, cause)
            if ready:
                self.ready.set()
            else:
                self.ready.clear()
            await asyncio.sleep(self._interval_s if ready else self._interval_s / 4)

    async def stop(self) -> None:
        """Stops probing."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
