"""The features service on a Redis online store (``PLINTH_TEST_REDIS_URL``, e.g. redis://127.0.0.1:6379/0).

A Feast project of the test's own keeps runs apart; its keys are deleted afterwards.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from google.protobuf import struct_pb2

from examples.feature_repo.generate_data import definition_files, generate
from plinth.features.v1 import features_pb2 as pb
from plinth.features.v1 import features_pb2_grpc
from plinth_common.nats_server import NatsServer
from services.features.app import FeaturesApp, FeaturesSettings
from tests.helpers import ADMIN, channel_as, service_env

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="session")]

STATS = [
    "driver_hourly_stats:conv_rate",
    "driver_hourly_stats:acc_rate",
    "driver_hourly_stats:avg_daily_trips",
]
FRESH = ["driver_hourly_stats_fresh:conv_rate", "driver_hourly_stats_fresh:avg_daily_trips"]


def _redis_url() -> str:
    url = os.environ.get("PLINTH_TEST_REDIS_URL")
    if not url:
        pytest.skip("PLINTH_TEST_REDIS_URL is not set (CI sets it; see .ci/run)")
    return url


def rows(*driver_ids: int) -> list[struct_pb2.Struct]:
    return [
        struct_pb2.Struct(fields={"driver_id": struct_pb2.Value(number_value=d)})
        for d in driver_ids
    ]


def plain(value: struct_pb2.Value) -> Any:
    kind = value.WhichOneof("kind")
    return None if kind in (None, "null_value") else getattr(value, kind)


@pytest_asyncio.fixture(loop_scope="session")
async def redis_features(
    tmp_path: Path, nats_server: NatsServer
) -> AsyncIterator[tuple[FeaturesApp, features_pb2_grpc.FeaturesServiceStub]]:
    url = _redis_url()
    project = f"plinth_it_{uuid.uuid4().hex[:10]}"
    env = service_env(
        tmp_path / "data", nats_server.url, PLINTH_FEAST_REDIS_URL=url, PLINTH_FEAST_PROJECT=project
    )
    app = FeaturesApp(FeaturesSettings.from_env(env))
    await app.start()
    channel = channel_as(f"127.0.0.1:{app.port}", ADMIN)
    try:
        yield app, features_pb2_grpc.FeaturesServiceStub(channel)
    finally:
        await channel.close()
        await app.stop()
        import redis.asyncio as aioredis

        client = aioredis.from_url(url)
        try:
            # Feast's Redis keys end with the project name.
            keys = [key async for key in client.scan_iter(match=f"*{project}", count=1000)]
            if keys:
                await client.delete(*keys)
            assert not [key async for key in client.scan_iter(match=f"*{project}", count=1000)]
        finally:
            await client.aclose()


async def test_apply_materialize_and_read_online_from_redis(
    redis_features: tuple[FeaturesApp, features_pb2_grpc.FeaturesServiceStub],
) -> None:
    app, stub = redis_features
    assert app.feast.store.config.online_store.type == "redis"
    assert await app.feast.is_ready()
    generate(app.settings.feast.repo_path / "data", drivers=20, hours=6)
    applied = await stub.ApplyRepository(pb.ApplyRepositoryRequest(files=definition_files()))
    assert "driver_hourly_stats" in applied.feature_views

    request = pb.MaterializeRequest(feature_views=["driver_hourly_stats"])
    request.start_time.FromDatetime(datetime(2023, 12, 1, tzinfo=UTC))
    request.end_time.FromDatetime(datetime(2024, 2, 1, tzinfo=UTC))
    await stub.Materialize(request)

    ids = [1001, 1010, 5, 1001]
    response = await stub.GetOnlineFeatures(
        pb.GetOnlineFeaturesRequest(features=STATS, entity_rows=rows(*ids))
    )
    reference = app.feast.store.get_online_features(
        STATS, [{"driver_id": i} for i in ids]
    ).to_dict()
    for column in response.columns:
        assert [plain(v) for v in column.values] == reference[column.name.split(":")[1]]
        assert list(column.statuses) == [
            pb.FIELD_STATUS_PRESENT,
            pb.FIELD_STATUS_PRESENT,
            pb.FIELD_STATUS_NOT_FOUND,
            pb.FIELD_STATUS_PRESENT,
        ]

    row = struct_pb2.Struct()
    row.update({"driver_id": 1002, "conv_rate": 0.5, "acc_rate": 0.5, "avg_daily_trips": 9})
    assert (
        await stub.PushFeatures(
            pb.PushFeaturesRequest(push_source="driver_stats_push_source", rows=[row])
        )
    ).rows == 1
    fresh = await stub.GetOnlineFeatures(
        pb.GetOnlineFeaturesRequest(features=FRESH, entity_rows=rows(1002))
    )
    assert [plain(c.values[0]) for c in fresh.columns] == [0.5, 9]
