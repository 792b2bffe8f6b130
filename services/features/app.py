"""Wiring of the features service: one Feast repository, loaded once per process."""

from __future__ import annotations

import asyncio
import gc
import logging
import math
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from plinth.features.v1 import features_pb2, features_pb2_grpc
from plinth_common.config import CommonSettings, Env
from plinth_common.metrics import (
    FEATURES_FRESHNESS,
    FEATURES_ONLINE_READ_DURATION,
    Metrics,
    observe,
)
from plinth_common.runtime import EngineHealth, ServiceRuntime
from services.features.events import OutboxFeatureEvents
from services.features.feast_adapter import FeastAdapter
from services.features.feast_engine import FeastEngine, FeastSettings
from services.features.repository import Limits, RepositoryFolder
from services.features.service import FeaturesService
from services.features.servicer import FeaturesServicer
from services.features.store import SqlFreshnessStore, outbox_table, processed_table

MIGRATIONS = Path(__file__).parent / "migrations"
# Feast's file registry logs "Registry cache expired, so refreshing" at INFO on every cache
# expiry (every health probe and plan refresh): more than half of the log, none of it news.
_QUIET_LOGGERS = ("feast.infra.registry",)


@dataclass(frozen=True, kw_only=True)
class FeaturesSettings:
    """The features service's settings (``PLINTH_FEAST_*``, ``PLINTH_FEATURES_*``).

    Attributes:
        common: settings every service reads.
        feast: the Feast repository and its stores.
        read_workers: threads serving online reads and pushes (``PLINTH_FEATURES_READ_WORKERS``).
        batch_workers: threads for apply, materialization and historical retrieval.
        plan_ttl_s: how long resolved feature references are cached; bounds how long a registry
            change made by another process goes unnoticed (``PLINTH_FEATURES_PLAN_TTL_S``).
        max_repository_bytes: total size of one ``ApplyRepository`` upload.
        inline_read_max_keys: SQLite online reads of at most this many entity keys run on the
            event loop without waiting for locks, saving two thread handoffs; larger reads, and
            any that meet a writer's lock, run in a worker thread. 0 sends every read to a
            worker thread (``PLINTH_FEATURES_INLINE_READ_MAX_KEYS``).
    """

    common: CommonSettings
    feast: FeastSettings
    read_workers: int = 2
    batch_workers: int = 2
    plan_ttl_s: float = 10.0
    max_repository_bytes: int = 8 << 20
    inline_read_max_keys: int = 32

    @classmethod
    def from_env(cls, env: Env | None = None) -> FeaturesSettings:
        """Reads the environment; the repository defaults to a folder under the data dir."""
        env = env or Env()
        common = CommonSettings.from_env("features", env)
        return cls(
            common=common,
            feast=FeastSettings(
                repo_path=env.path("PLINTH_FEAST_REPO", common.data_dir / "feast"),
                project=env.str("PLINTH_FEAST_PROJECT", "plinth"),
                online_store_url=env.optional("PLINTH_FEAST_REDIS_URL"),
            ),
            read_workers=env.int("PLINTH_FEATURES_READ_WORKERS", 2),
            batch_workers=env.int("PLINTH_FEATURES_BATCH_WORKERS", 2),
            plan_ttl_s=env.float("PLINTH_FEATURES_PLAN_TTL_S", 10.0),
            max_repository_bytes=env.int("PLINTH_FEATURES_MAX_REPOSITORY_BYTES", 8 << 20),
            inline_read_max_keys=env.int("PLINTH_FEATURES_INLINE_READ_MAX_KEYS", 32),
        )


class FeatureMetrics:
    """Online read latency and freshness per feature view (view names are admin-declared, so
    the labels stay bounded). Freshness is computed at each scrape from the newest data time
    the service knows (restored at start from its store and Feast's registry; absent for a view
    never materialized nor pushed to, and gone once the view is deleted)."""

    def __init__(self, metrics: Metrics) -> None:
        self._reads = metrics.histogram(FEATURES_ONLINE_READ_DURATION)
        self._freshness = metrics.gauge(FEATURES_FRESHNESS)
        self._until: dict[str, float] = {}

    def online_read(self, views: Sequence[str], seconds: float) -> None:
        """Observes one read's latency for each view it read."""
        for view in views:
            observe(self._reads.labels(view), seconds)

    def refreshed(self, views: Sequence[str], until: datetime) -> None:
        """Sets the views' newest data time (never backwards)."""
        for view in views:
            stamp = until.timestamp()
            first = view not in self._until
            self._until[view] = max(stamp, self._until.get(view, stamp))
            if first:
                self._freshness.labels(view).set_function(self._age_of(view))

    def forgotten(self, views: Sequence[str]) -> None:
        """The views were deleted: their freshness series go (no age that keeps growing)."""
        for view in views:
            self._until.pop(view, None)
            self._freshness.remove(view)

    def _age_of(self, view: str) -> Callable[[], float]:
        def age() -> float:
            until = self._until.get(view)
            return math.nan if until is None else max(0.0, time.time() - until)

        return age


class FeaturesApp:
    """The features process: Feast, the outbox, the gRPC server and the health that follows Feast."""

    def __init__(self, settings: FeaturesSettings) -> None:
        self.settings = settings
        self.runtime = ServiceRuntime(
            settings.common,
            outbox_table=outbox_table,
            processed_table=processed_table,
            migrations=MIGRATIONS,
        )
        for name in _QUIET_LOGGERS:
            logging.getLogger(name).setLevel(logging.WARNING)
        self.feast = FeastEngine(settings.feast)
        self._reads = ThreadPoolExecutor(
            max_workers=settings.read_workers, thread_name_prefix="feast-read"
        )
        self._batch = ThreadPoolExecutor(
            max_workers=settings.batch_workers, thread_name_prefix="feast-batch"
        )
        self.adapter = FeastAdapter(
            engine=self.feast,
            folder=RepositoryFolder(settings.feast.repo_path),
            reads=self._reads,
            batch=self._batch,
            plan_ttl_s=settings.plan_ttl_s,
            inline_read_max_keys=settings.inline_read_max_keys,
        )
        self.service = FeaturesService(
            engine=self.adapter,
            db=self.runtime.db,
            events=OutboxFeatureEvents(
                self.runtime.require_outbox(), project=settings.feast.project
            ),
            limits=Limits(max_total_bytes=settings.max_repository_bytes),
            observer=FeatureMetrics(self.runtime.metrics),
            freshness=SqlFreshnessStore(self.runtime.db),
        )
        self.runtime.server.add(
            features_pb2_grpc.add_FeaturesServiceServicer_to_server,
            FeaturesServicer(self.service),
            features_pb2.DESCRIPTOR.services_by_name["FeaturesService"].full_name,
        )
        self.health = EngineHealth(self.runtime.server, self.feast, name="feast")

    @property
    def port(self) -> int:
        """The bound gRPC port."""
        return self.runtime.server.port

    async def start(self) -> None:
        """Serves at once (NOT_SERVING) while Feast loads; SERVING once it answers.

        Freshness is known from the first scrape after the store is migrated (the store's
        times), and before SERVING with Feast's registry merged in.
        """
        await self.runtime.start()
        await self.service.load_freshness()
        await self.feast.start()
        await self.service.restore_freshness()
        await self.health.start()
        # Feast, pandas, dask and pyarrow leave ~200k long-lived objects; each full collection
        # that scans them stalls the loop, and the requests in flight, for 50-150 ms. None of
        # it is garbage: exempt it from collection (newer objects are collected as usual).
        gc.collect()
        gc.freeze()

    async def stop(self) -> None:
        """Stops the server (draining calls), then the Feast workers, then Feast."""
        await self.health.stop()
        # Drains the calls first, so that the last pushes' times are written (stopping the
        # server again in runtime.stop is a no-op).
        await self.runtime.server.stop()
        await self.service.flush_freshness()
        await self.runtime.stop()
        # Waits for running Feast calls, then releases the worker threads.
        await asyncio.to_thread(self._reads.shutdown, wait=True)
        await asyncio.to_thread(self._batch.shutdown, wait=True)
        await self.feast.stop()
