"""Freshness across a restart of the features service, on a real Feast repository.

A platform engineer watching ``plinth_features_freshness_seconds`` through a deploy must see
neither a gap nor a wrong "fresh": the restarted process reports each view's newest data at its
first scrape, from its own store (pushes, its materializations) and from Feast's registry
(materializations made while it was down, by Feast itself).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import pytest_asyncio
from google.protobuf import struct_pb2
from prometheus_client.parser import text_string_to_metric_families

from examples.feature_repo.generate_data import definition_files, generate
from plinth.features.v1 import features_pb2 as pb
from plinth.features.v1 import features_pb2_grpc
from plinth_common.db import Database
from plinth_common.nats_server import NatsServer
from services.features.app import MIGRATIONS, FeaturesApp, FeaturesSettings
from services.features.store import SqlFreshnessStore
from tests.component.test_features import window_request
from tests.helpers import ADMIN, channel_as, service_env

pytestmark = pytest.mark.asyncio(loop_scope="session")

PROJECT = "features_restart"
STATS, PUSHED = "driver_hourly_stats", "driver_hourly_stats_fresh"
# The end of the window test_features materializes (window_request).
WINDOW_END = datetime(2024, 2, 1, tzinfo=UTC)


def data_until(app: FeaturesApp) -> dict[str, float]:
    """Each view's newest data time (epoch seconds) as a scrape of ``app`` shows it."""
    text = app.runtime.metrics.exposition(openmetrics=False).decode()
    now = time.time()
    return {
        s.labels["feature_view"]: now - s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "plinth_features_freshness_seconds" and not math.isnan(s.value)
    }


def push_row(driver_id: int) -> pb.PushFeaturesRequest:
    row = struct_pb2.Struct()
    row.update(
        {
            "driver_id": driver_id,
            "conv_rate": 0.5,
            "acc_rate": 0.5,
            "avg_daily_trips": 7,
            "event_timestamp": datetime.now(UTC).isoformat(),
        }
    )
    return pb.PushFeaturesRequest(push_source="driver_stats_push_source", rows=[row])


@pytest_asyncio.fixture(loop_scope="session")
async def settings(
    tmp_path_factory: pytest.TempPathFactory, nats_server: NatsServer
) -> AsyncIterator[FeaturesSettings]:
    base = tmp_path_factory.mktemp("features-restart")
    yield FeaturesSettings.from_env(
        service_env(base / "data", nats_server.url, PLINTH_FEAST_PROJECT=PROJECT)
    )


@asynccontextmanager
async def serving(
    settings: FeaturesSettings, files: dict[str, bytes] | None = None
) -> AsyncIterator[tuple[FeaturesApp, features_pb2_grpc.FeaturesServiceStub]]:
    """A features service on the example repository (``files`` applied, if given), stopped
    gracefully at the end."""
    app = FeaturesApp(settings)
    await app.start()
    channel = channel_as(f"127.0.0.1:{app.port}", ADMIN)
    try:
        stub = features_pb2_grpc.FeaturesServiceStub(channel)
        if files is not None:
            generate(settings.feast.repo_path / "data")
            await stub.ApplyRepository(pb.ApplyRepositoryRequest(files=files))
        yield app, stub
    finally:
        await channel.close()
        await app.stop()


async def first_scrape(settings: FeaturesSettings) -> dict[str, float]:
    """What a scrape right after a (re)start shows, before any call."""
    async with serving(settings) as (app, _):
        return data_until(app)


async def test_a_restarted_service_reports_freshness_at_its_first_scrape(
    settings: FeaturesSettings,
) -> None:
    async with serving(settings, definition_files()) as (app, stub):
        await stub.Materialize(window_request())
        await stub.PushFeatures(push_row(1001))
        # A second push within the service's write interval: only a graceful stop writes it.
        await asyncio.sleep(0.4)
        last_push = time.time()
        await stub.PushFeatures(push_row(1002))
        before = data_until(app)
    assert before[STATS] == pytest.approx(WINDOW_END.timestamp(), abs=1)
    assert before[PUSHED] >= last_push - 0.05

    after = await first_scrape(settings)
    assert sorted(after) == [STATS, PUSHED]
    assert after[STATS] == pytest.approx(before[STATS], abs=1)
    assert after[PUSHED] == pytest.approx(before[PUSHED], abs=0.1)


async def test_a_materialization_made_while_the_service_was_down_counts_at_once(
    settings: FeaturesSettings,
) -> None:
    async with serving(settings, definition_files()) as (app, _):
        assert data_until(app) == {}  # never materialized nor pushed to: no age to show
    later = datetime(2024, 1, 20, tzinfo=UTC)
    await asyncio.to_thread(_feast_materializes, settings.feast.repo_path, later)

    shown = await first_scrape(settings)
    assert shown[STATS] == pytest.approx(later.timestamp(), abs=1)
    assert PUSHED in shown  # Feast materialized every online view


async def test_a_deleted_view_stops_reporting_and_stays_gone_after_a_restart(
    settings: FeaturesSettings,
) -> None:
    extra = b"""
from datetime import timedelta
from feast import FeatureView, Field
from feast.types import Float32
from driver_repo import driver, driver_stats_source

driver_extra = FeatureView(name="driver_extra", entities=[driver], ttl=timedelta(days=1),
                           schema=[Field(name="conv_rate", dtype=Float32)], source=driver_stats_source)
"""
    async with serving(settings, {**definition_files(), "views/extra.py": extra}) as (app, stub):
        await stub.Materialize(window_request())
        assert "driver_extra" in data_until(app)
        await stub.ApplyRepository(pb.ApplyRepositoryRequest(files=definition_files()))
        # No age that keeps growing for a view that is gone (an alert on it would be false).
        assert sorted(data_until(app)) == [STATS, PUSHED]

    assert sorted(await first_scrape(settings)) == [STATS, PUSHED]


async def test_the_store_keeps_the_newest_time_whatever_order_replicas_write_in(
    tmp_path: Path,
) -> None:
    db = Database(f"sqlite+aiosqlite:///{tmp_path / 'features.db'}")
    await db.migrate(MIGRATIONS)
    try:
        store = SqlFreshnessStore(db)
        newer = datetime(2024, 2, 1, tzinfo=UTC)
        await store.record([STATS, PUSHED], newer)
        await store.record([STATS], newer - timedelta(days=1))  # a slower replica's older run
        await store.record([PUSHED], newer + timedelta(seconds=1))
        assert await store.newest() == {STATS: newer, PUSHED: newer + timedelta(seconds=1)}
        await store.forget([STATS])
        assert list(await store.newest()) == [PUSHED]
    finally:
        await db.close()


def _feast_materializes(repo: Path, end: datetime) -> None:
    """``feast materialize`` run by an operator, outside the service."""
    from feast import FeatureStore

    FeatureStore(repo_path=str(repo)).materialize(datetime(2024, 1, 1, tzinfo=UTC), end)
