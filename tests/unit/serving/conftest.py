"""The serving use cases and reconciler on a real SQLite store (a temp file), a real model
repository (a temp folder), and fakes for the registry, MLflow, Triton and the outbox."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest_asyncio

from plinth_common.db import Database
from services.serving.app import MIGRATIONS
from services.serving.reconciler import Backoff, Reconciler
from services.serving.service import ServingService
from services.serving.store import DeploymentStore
from services.serving.triton.repository import ModelRepository
from tests.unit.serving.fakes import (
    FakeArtifacts,
    FakeEvents,
    FakeModelServer,
    FakePublisher,
    FakeRegistry,
)


@dataclass
class Clock:
    """Monotonic time that moves only when a test says so."""

    now: float = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Serving:
    """A service, its reconciler (not running: tests drive it) and the fakes behind them."""

    service: ServingService
    reconciler: Reconciler
    db: Database
    registry: FakeRegistry
    artifacts: FakeArtifacts
    models: FakeModelServer
    events: FakeEvents
    repository: ModelRepository
    clock: Clock
    publisher: FakePublisher

    async def reconcile(self) -> None:
        """One reconciliation pass, and every rollout it started, to the end."""
        await self.reconciler.reconcile_once()
        await self.reconciler.wait_idle()


@pytest_asyncio.fixture(loop_scope="session")
async def db(tmp_path: Path) -> AsyncIterator[Database]:
    database = Database(f"sqlite+aiosqlite:///{tmp_path / 'serving.db'}")
    await database.migrate(MIGRATIONS)
    yield database
    await database.close()


@pytest_asyncio.fixture(loop_scope="session")
async def serving(db: Database, tmp_path: Path) -> AsyncIterator[Serving]:
    store = DeploymentStore()
    registry, artifacts, models, events = (
        FakeRegistry(),
        FakeArtifacts(),
        FakeModelServer(),
        FakeEvents(),
    )
    repository = ModelRepository(tmp_path / "models")
    clock = Clock()
    publisher = FakePublisher(models)
    reconciler = Reconciler(
        db=db,
        store=store,
        events=events,
        repository=repository,
        artifacts=artifacts,
        models=models,
        registry=registry,
        unload_grace_s=0.0,
        # Jitter scales the delay by 0.5 to 1: the first retry is due within 10 s, never before 5.
        backoff=Backoff(initial_s=10.0, max_s=60.0),
        clock=clock,
        publisher=publisher,
    )
    service = ServingService(
        db=db,
        store=store,
        events=events,
        registry=registry,
        reconciler=reconciler,
        delete_wait_s=5.0,
        traffic_wait_s=5.0,
    )
    yield Serving(
        service=service,
        reconciler=reconciler,
        db=db,
        registry=registry,
        artifacts=artifacts,
        models=models,
        events=events,
        repository=repository,
        clock=clock,
        publisher=publisher,
    )
    await reconciler.stop()
