"""The features service as a real gRPC server on a real Feast repository and a real nats-server.

One app for the module (Feast costs seconds to load): the example driver repository is applied
through ``ApplyRepository`` and materialized once; tests compare with Feast's own answers from
the same repository.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import pytest_asyncio
from google.protobuf import struct_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from examples.feature_repo.generate_data import DEFAULT_START, definition_files, generate
from plinth.events.v1 import events_pb2
from plinth.features.v1 import features_pb2 as pb
from plinth.features.v1 import features_pb2_grpc
from plinth_common.nats_server import NatsServer
from services.features.app import FeaturesApp, FeaturesSettings
from tests.helpers import ADMIN, EventRecorder, channel_as, eventually, service_env

pytestmark = pytest.mark.asyncio(loop_scope="session")

PROJECT = "features_test"
STATS = [
    "driver_hourly_stats:conv_rate",
    "driver_hourly_stats:acc_rate",
    "driver_hourly_stats:avg_daily_trips",
]
WINDOW = (datetime(2023, 12, 1, tzinfo=UTC), datetime(2024, 2, 1, tzinfo=UTC))
# Feast's FieldStatus numbers (feast.serving) -> plinth.features.v1's.
FEAST_STATUS = {
    1: pb.FIELD_STATUS_PRESENT,
    2: pb.FIELD_STATUS_NULL_VALUE,
    3: pb.FIELD_STATUS_NOT_FOUND,
    4: pb.FIELD_STATUS_OUTSIDE_MAX_AGE,
}


@dataclass
class Features:
    """The running app, a stub to it, the generated data and Feast on the same repository."""

    app: FeaturesApp
    channel: grpc.aio.Channel
    stub: features_pb2_grpc.FeaturesServiceStub
    data: pd.DataFrame
    nats_url: str
    feast: Any

    @property
    def repo(self) -> Path:
        return self.app.settings.feast.repo_path


def window_request(**fields: Any) -> pb.MaterializeRequest:
    request = pb.MaterializeRequest(**fields)
    request.start_time.FromDatetime(WINDOW[0])
    request.end_time.FromDatetime(WINDOW[1])
    return request


def rows(*driver_ids: Any) -> list[struct_pb2.Struct]:
    out = []
    for driver_id in driver_ids:
        row = struct_pb2.Struct()
        row.update({"driver_id": driver_id})
        out.append(row)
    return out


def plain(value: struct_pb2.Value) -> Any:
    kind = value.WhichOneof("kind")
    return None if kind in (None, "null_value") else getattr(value, kind)


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def features(
    tmp_path_factory: pytest.TempPathFactory, nats_server: NatsServer
) -> AsyncIterator[Features]:
    base = tmp_path_factory.mktemp("features")
    app = FeaturesApp(
        FeaturesSettings.from_env(
            service_env(base / "data", nats_server.url, PLINTH_FEAST_PROJECT=PROJECT)
        )
    )
    await app.start()
    channel = channel_as(f"127.0.0.1:{app.port}", ADMIN)  # behaviour tests call as an admin
    try:
        stub = features_pb2_grpc.FeaturesServiceStub(channel)
        data = generate(app.settings.feast.repo_path / "data")
        await stub.ApplyRepository(pb.ApplyRepositoryRequest(files=definition_files()))
        await stub.Materialize(window_request())
        from feast import FeatureStore

        reference = FeatureStore(repo_path=str(app.settings.feast.repo_path))
        yield Features(
            app=app,
            channel=channel,
            stub=stub,
            data=data,
            nats_url=nats_server.url,
            feast=reference,
        )
    finally:
        await channel.close()
        await app.stop()


async def expect_error(call: Any, code: grpc.StatusCode) -> str:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    assert caught.value.code() == code, caught.value.details()
    return caught.value.details() or ""


# --- repository ----------------------------------------------------------------------------


async def test_health_is_serving_once_feast_answers(features: Features) -> None:
    health = health_pb2_grpc.HealthStub(features.channel)

    async def serving() -> bool:
        answer = await health.Check(
            health_pb2.HealthCheckRequest(service="plinth.features.v1.FeaturesService")
        )
        return answer.status == health_pb2.HealthCheckResponse.SERVING

    await eventually(serving)


async def test_apply_replaces_the_definitions_and_deletes_what_is_gone(features: Features) -> None:
    extra = b"""
from datetime import timedelta
from feast import FeatureView, Field
from feast.types import Float32
from driver_repo import driver, driver_stats_source

driver_extra = FeatureView(name="driver_extra", entities=[driver], ttl=timedelta(days=1),
                           schema=[Field(name="conv_rate", dtype=Float32)], source=driver_stats_source)
"""
    files = {**definition_files(), "views/extra.py": extra}
    added = await features.stub.ApplyRepository(pb.ApplyRepositoryRequest(files=files))
    assert "driver_extra" in added.feature_views
    assert (features.repo / "definitions" / "views" / "extra.py").read_bytes() == extra

    again = await features.stub.ApplyRepository(pb.ApplyRepositoryRequest(files=definition_files()))
    assert list(again.entities) == ["driver"]
    assert sorted(again.feature_views) == ["driver_hourly_stats", "driver_hourly_stats_fresh"]
    assert "driver_stats_push_source" in again.data_sources
    assert "FeatureView:driver_extra" in again.deleted
    assert not (features.repo / "definitions" / "views").exists()
    # Package and module names of the last apply do not linger.
    assert (
        "driver_extra"
        in (
            await features.stub.ApplyRepository(pb.ApplyRepositoryRequest(files=files))
        ).feature_views
    )
    await features.stub.ApplyRepository(pb.ApplyRepositoryRequest(files=definition_files()))

    listed = await features.stub.ListFeatureViews(pb.ListFeatureViewsRequest())
    by_name = {v.name: v for v in listed.feature_views}
    assert sorted(by_name) == ["driver_hourly_stats", "driver_hourly_stats_fresh"]
    stats = by_name["driver_hourly_stats"]
    assert list(stats.features) == ["conv_rate", "acc_rate", "avg_daily_trips"]
    assert list(stats.entities) == ["driver"] and list(stats.join_keys) == ["driver_id"]
    assert stats.ttl_seconds == timedelta(days=2).total_seconds() and stats.online
    assert stats.batch_source == "driver_hourly_stats_source"
    assert by_name["driver_hourly_stats_fresh"].push_source == "driver_stats_push_source"


async def test_feasts_output_goes_to_the_log_and_its_registry_refreshes_stay_quiet(
    features: Features, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    view = b"""
from datetime import timedelta
from feast import FeatureView, Field
from feast.types import Float32
from driver_repo import driver, driver_stats_source

driver_logged = FeatureView(name="driver_logged", entities=[driver], ttl=timedelta(days=1),
                            schema=[Field(name="conv_rate", dtype=Float32)], source=driver_stats_source)
"""
    capsys.readouterr()
    with caplog.at_level(logging.INFO):
        await features.stub.ApplyRepository(
            pb.ApplyRepositoryRequest(files={**definition_files(), "logged.py": view})
        )
        await features.stub.ApplyRepository(pb.ApplyRepositoryRequest(files=definition_files()))
    printed = capsys.readouterr()
    assert "driver_logged" not in printed.out + printed.err
    messages = [r.getMessage() for r in caplog.records]
    assert "feast: Created feature view driver_logged" in messages
    assert not logging.getLogger("feast.infra.registry.registry").isEnabledFor(logging.INFO)


@pytest.mark.parametrize(
    "path",
    [
        "../escape.py",
        "/tmp/absolute.py",
        "views/../../escape.py",
        "./driver_repo.py",
        "a//b.py",
        "notes.txt",
        ".hidden.py",
        "views\\win.py",
        "c:/drive.py",
        "x" * 300 + ".py",
        "json.py",
    ],
)
async def test_apply_refuses_paths_that_could_leave_the_repository(
    features: Features, path: str
) -> None:
    files = {**definition_files(), path: b"x = 1\n"}
    details = await expect_error(
        features.stub.ApplyRepository(pb.ApplyRepositoryRequest(files=files)),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert details.startswith("files["), details
    assert (
        not (features.repo.parent / "escape.py").exists()
        and not (features.repo / "escape.py").exists()
    )
    assert not Path("/tmp/absolute.py").exists()


async def test_apply_refuses_oversized_uploads_and_broken_code_keeping_the_previous_definitions(
    features: Features,
) -> None:
    big = {"driver_repo.py": b"#" * (2 << 20)}
    details = await expect_error(
        features.stub.ApplyRepository(pb.ApplyRepositoryRequest(files=big)),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert details.startswith("files['driver_repo.py']")
    await expect_error(
        features.stub.ApplyRepository(pb.ApplyRepositoryRequest(files={})),
        grpc.StatusCode.INVALID_ARGUMENT,
    )

    broken = {"driver_repo.py": b"from feast import Entity\ndriver = Entity(name='driver'\n"}
    details = await expect_error(
        features.stub.ApplyRepository(pb.ApplyRepositoryRequest(files=broken)),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert details.startswith("files['driver_repo.py']") and "syntax error" in details

    raising = {"driver_repo.py": b"raise RuntimeError('boom')\n"}
    details = await expect_error(
        features.stub.ApplyRepository(pb.ApplyRepositoryRequest(files=raising)),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert "RuntimeError: boom" in details
    exiting = {"driver_repo.py": b"import sys\nsys.exit(3)\n"}
    details = await expect_error(
        features.stub.ApplyRepository(pb.ApplyRepositoryRequest(files=exiting)),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert "SystemExit" in details

    listed = await features.stub.ListFeatureViews(pb.ListFeatureViewsRequest())
    assert sorted(v.name for v in listed.feature_views) == [
        "driver_hourly_stats",
        "driver_hourly_stats_fresh",
    ]
    assert (features.repo / "definitions" / "driver_repo.py").read_bytes() == definition_files()[
        "driver_repo.py"
    ]
    assert not any((features.repo / ".incoming").iterdir())


MISSING_SOURCE = b"""
from datetime import timedelta
from feast import FeatureView, Field, FileSource, PushSource
from feast.types import Float32, Int64
from driver_repo import driver

missing_source = FileSource(name="missing_source", path="data/not_generated.parquet",
                            timestamp_field="event_timestamp")
schema = [Field(name="driver_id", dtype=Int64), Field(name="conv_rate", dtype=Float32)]
driver_missing = FeatureView(name="driver_missing", entities=[driver], ttl=timedelta(days=1),
                             schema=schema, source=missing_source)
missing_push = PushSource(name="missing_push", batch_source=missing_source)
driver_missing_fresh = FeatureView(name="driver_missing_fresh", entities=[driver],
                                   ttl=timedelta(days=1), schema=schema, source=missing_push)
"""


async def test_apply_warns_of_a_source_it_cannot_read_and_materialize_names_it(
    features: Features,
) -> None:
    files = {**definition_files(), "missing.py": MISSING_SOURCE}
    try:
        applied = await features.stub.ApplyRepository(pb.ApplyRepositoryRequest(files=files))
        assert "driver_missing" in applied.feature_views
        assert len(applied.warnings) == 1, applied.warnings
        warning = applied.warnings[0]
        assert "'missing_source'" in warning and "does not exist" in warning
        assert str(features.repo / "data" / "not_generated.parquet") in warning

        details = await expect_error(
            features.stub.Materialize(window_request(feature_views=["driver_missing"])),
            grpc.StatusCode.FAILED_PRECONDITION,
        )
        assert "'missing_source'" in details and "does not exist" in details

        row = struct_pb2.Struct()
        row.update({"driver_id": 1001, "conv_rate": 0.5})
        online_only = pb.PushFeaturesRequest(push_source="missing_push", rows=[row])
        assert (await features.stub.PushFeatures(online_only)).rows == 1
        offline = pb.PushFeaturesRequest(push_source="missing_push", rows=[row], to_offline=True)
        details = await expect_error(
            features.stub.PushFeatures(offline), grpc.StatusCode.FAILED_PRECONDITION
        )
        assert "'missing_source'" in details and "does not exist" in details
    finally:
        restored = await features.stub.ApplyRepository(
            pb.ApplyRepositoryRequest(files=definition_files())
        )
    assert list(restored.warnings) == []


async def test_apply_refuses_a_view_name_the_api_could_not_address(features: Features) -> None:
    bad = definition_files()["driver_repo.py"].replace(
        b'name="driver_hourly_stats_fresh"', b'name="driver hourly stats"'
    )
    details = await expect_error(
        features.stub.ApplyRepository(pb.ApplyRepositoryRequest(files={"driver_repo.py": bad})),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert details.startswith("files") and "'driver hourly stats'" in details
    listed = await features.stub.ListFeatureViews(pb.ListFeatureViewsRequest())
    assert "driver_hourly_stats_fresh" in {v.name for v in listed.feature_views}


# --- materialization ------------------------------------------------------------------------


async def test_materialize_emits_features_materialized(features: Features) -> None:
    async with EventRecorder(features.nats_url) as recorder:
        response = await features.stub.Materialize(
            window_request(feature_views=["driver_hourly_stats"])
        )

        def this_run() -> list[Any]:
            # The fixture's own run may be relayed while the recorder listens: this run's
            # event is the one with this run's duration.
            return [
                m
                for m in recorder.messages
                if m.subject == "plinth.features.materialized"
                and (m.headers or {}).get("ce-subject") == PROJECT
                and events_pb2.FeaturesMaterialized.FromString(m.data).duration_seconds
                == pytest.approx(response.duration_seconds)
            ]

        messages = await eventually(lambda: _async(this_run()))
    assert list(response.feature_views) == ["driver_hourly_stats"]
    assert response.duration_seconds > 0
    assert len(messages) == 1
    event = events_pb2.FeaturesMaterialized.FromString(messages[0].data)
    assert list(event.feature_views) == ["driver_hourly_stats"]
    assert event.start_time.ToDatetime(tzinfo=UTC) == WINDOW[0]
    assert event.end_time.ToDatetime(tzinfo=UTC) == WINDOW[1]
    assert messages[0].headers["ce-source"] == "/plinth/features"


async def test_materialize_incremental_starts_where_the_last_run_ended(features: Features) -> None:
    end = WINDOW[1] + timedelta(hours=1)
    request = pb.MaterializeIncrementalRequest(feature_views=["driver_hourly_stats"])
    request.end_time.FromDatetime(end)
    async with EventRecorder(features.nats_url) as recorder:
        response = await features.stub.MaterializeIncremental(request)
        await eventually(
            lambda: _async(
                any(m.subject == "plinth.features.materialized" for m in recorder.messages)
            )
        )
    assert list(response.feature_views) == ["driver_hourly_stats"]
    assert response.start_time.ToDatetime(tzinfo=UTC) == WINDOW[1]
    assert response.end_time.ToDatetime(tzinfo=UTC) == end
    listed = await features.stub.ListFeatureViews(pb.ListFeatureViewsRequest())
    by_name = {v.name: v for v in listed.feature_views}
    assert by_name["driver_hourly_stats"].data_until.ToDatetime(tzinfo=UTC) == end


async def test_materialize_validates_its_request(features: Features) -> None:
    details = await expect_error(
        features.stub.Materialize(window_request(feature_views=["no_such_view"])),
        grpc.StatusCode.NOT_FOUND,
    )
    assert "no_such_view" in details
    inverted = pb.MaterializeRequest()
    inverted.start_time.FromDatetime(WINDOW[1])
    inverted.end_time.FromDatetime(WINDOW[0])
    details = await expect_error(
        features.stub.Materialize(inverted), grpc.StatusCode.INVALID_ARGUMENT
    )
    assert details.startswith("start_time")
    details = await expect_error(
        features.stub.Materialize(pb.MaterializeRequest()), grpc.StatusCode.INVALID_ARGUMENT
    )
    assert details.startswith("start_time")


# --- online ---------------------------------------------------------------------------------


@pytest.mark.parametrize("extra", [0, 60], ids=["small-read", "large-read"])
async def test_online_values_equal_feasts_own(features: Features, extra: int) -> None:
    # 424242 was never materialized; 1001 twice. Small reads run on the loop, large ones in a
    # worker thread (PLINTH_FEATURES_INLINE_READ_MAX_KEYS).
    ids = [1001, 1002, 1150, 1200, 424242, 1001, *range(1003, 1003 + extra)]
    response = await features.stub.GetOnlineFeatures(
        pb.GetOnlineFeaturesRequest(features=STATS, entity_rows=rows(*ids))
    )
    reference = features.feast.get_online_features(STATS, [{"driver_id": i} for i in ids])
    expected = reference.to_dict()
    vectors = dict(
        zip(reference.proto.metadata.feature_names.val, reference.proto.results, strict=True)
    )

    assert [c.name for c in response.columns] == STATS
    for column in response.columns:
        feature = column.name.split(":")[1]
        assert [plain(v) for v in column.values] == expected[feature]
        assert list(column.statuses) == [FEAST_STATUS[s] for s in vectors[feature].statuses]
        assert [t.seconds for t in column.event_timestamps] == [
            t.seconds for t in vectors[feature].event_timestamps
        ]
        assert (
            column.statuses[4] == pb.FIELD_STATUS_NOT_FOUND
            and column.values[4].WhichOneof("kind") == "null_value"
        )
        assert column.statuses[0] == pb.FIELD_STATUS_PRESENT

    # The materialized value is each driver's latest row.
    latest = features.data[features.data.driver_id == 1150].iloc[-1]
    trips = next(c for c in response.columns if c.name.endswith("avg_daily_trips"))
    assert trips.values[2].number_value == latest.avg_daily_trips
    assert (
        trips.event_timestamps[2].ToDatetime(tzinfo=UTC) == latest.event_timestamp.to_pydatetime()
    )


async def test_a_small_read_meeting_a_writers_lock_waits_in_a_worker_thread(
    features: Features,
) -> None:
    import sqlite3

    writer = sqlite3.connect(features.repo / "data" / "online_store.db", isolation_level=None)
    try:
        writer.execute("BEGIN EXCLUSIVE")
        read = asyncio.ensure_future(
            features.stub.GetOnlineFeatures(
                pb.GetOnlineFeaturesRequest(features=STATS, entity_rows=rows(1001))
            )
        )
        await asyncio.sleep(0.3)
        assert not read.done()
        # The event loop is not blocked meanwhile.
        listed = await asyncio.wait_for(
            features.stub.ListFeatureViews(pb.ListFeatureViewsRequest()), timeout=5
        )
        assert listed.feature_views
        writer.execute("COMMIT")
        response = await asyncio.wait_for(read, timeout=10)
    finally:
        writer.close()
    assert all(c.statuses[0] == pb.FIELD_STATUS_PRESENT for c in response.columns)


async def test_online_accepts_integral_numbers_and_int64_strings(features: Features) -> None:
    response = await features.stub.GetOnlineFeatures(
        pb.GetOnlineFeaturesRequest(features=STATS[:1], entity_rows=rows(1003.0, "1003"))
    )
    values = response.columns[0].values
    assert (
        values[0].number_value == values[1].number_value
        and response.columns[0].statuses[0] == pb.FIELD_STATUS_PRESENT
    )


ODFV = b"""
import pandas as pd
from feast import Field
from feast.on_demand_feature_view import on_demand_feature_view
from feast.types import Float64
from driver_repo import driver_hourly_stats

@on_demand_feature_view(sources=[driver_hourly_stats], schema=[Field(name="conv_plus_acc", dtype=Float64)], mode="pandas")
def driver_ratios(inputs: pd.DataFrame) -> pd.DataFrame:
    out = pd.DataFrame()
    out["conv_plus_acc"] = inputs["conv_rate"] + inputs["acc_rate"]
    return out
"""


async def test_on_demand_views_are_served_through_feast_itself(features: Features) -> None:
    applied = await features.stub.ApplyRepository(
        pb.ApplyRepositoryRequest(files={**definition_files(), "ratios.py": ODFV})
    )
    assert list(applied.on_demand_feature_views) == ["driver_ratios"]
    try:
        refs = ["driver_ratios:conv_plus_acc", "driver_hourly_stats:conv_rate"]
        response = await features.stub.GetOnlineFeatures(
            pb.GetOnlineFeaturesRequest(features=refs, entity_rows=rows(1001, 1002))
        )
        features.feast.refresh_registry()
        expected = features.feast.get_online_features(
            refs, [{"driver_id": 1001}, {"driver_id": 1002}]
        ).to_dict()
        assert [plain(v) for v in response.columns[0].values] == pytest.approx(
            expected["conv_plus_acc"]
        )
        assert [plain(v) for v in response.columns[1].values] == expected["conv_rate"]
    finally:
        await features.stub.ApplyRepository(pb.ApplyRepositoryRequest(files=definition_files()))


@pytest.mark.parametrize("bad", ["abc", 1001.5, True, None, [1001], {"id": 1}])
async def test_online_wrong_key_type_is_invalid_argument_naming_the_key(
    features: Features, bad: Any
) -> None:
    request = pb.GetOnlineFeaturesRequest(features=STATS, entity_rows=rows(1001, bad))
    details = await expect_error(
        features.stub.GetOnlineFeatures(request), grpc.StatusCode.INVALID_ARGUMENT
    )
    assert details.startswith("entity_rows[1].driver_id"), details


async def test_online_refuses_malformed_requests(features: Features) -> None:
    missing = pb.GetOnlineFeaturesRequest(
        features=STATS,
        entity_rows=[struct_pb2.Struct(fields={"driver": struct_pb2.Value(number_value=1)})],
    )
    assert "entity_rows[0].driver_id" in await expect_error(
        features.stub.GetOnlineFeatures(missing), grpc.StatusCode.INVALID_ARGUMENT
    )
    no_rows = pb.GetOnlineFeaturesRequest(features=STATS)
    assert (
        await expect_error(
            features.stub.GetOnlineFeatures(no_rows), grpc.StatusCode.INVALID_ARGUMENT
        )
    ).startswith("entity_rows")
    bad_ref = pb.GetOnlineFeaturesRequest(features=["conv_rate"], entity_rows=rows(1001))
    assert (
        await expect_error(
            features.stub.GetOnlineFeatures(bad_ref), grpc.StatusCode.INVALID_ARGUMENT
        )
    ).startswith("features[0]")
    twice = pb.GetOnlineFeaturesRequest(features=[STATS[0], STATS[0]], entity_rows=rows(1001))
    assert (
        await expect_error(features.stub.GetOnlineFeatures(twice), grpc.StatusCode.INVALID_ARGUMENT)
    ).startswith("features[1]")


async def test_online_unknown_view_or_feature_is_not_found_naming_it(features: Features) -> None:
    unknown_view = pb.GetOnlineFeaturesRequest(
        features=["no_such_view:conv_rate"], entity_rows=rows(1001)
    )
    assert "'no_such_view'" in await expect_error(
        features.stub.GetOnlineFeatures(unknown_view), grpc.StatusCode.NOT_FOUND
    )
    unknown_feature = pb.GetOnlineFeaturesRequest(
        features=[STATS[0], "driver_hourly_stats:speed"], entity_rows=rows(1001)
    )
    details = await expect_error(
        features.stub.GetOnlineFeatures(unknown_feature), grpc.StatusCode.NOT_FOUND
    )
    assert "'driver_hourly_stats:speed'" in details


async def test_push_then_read_online(features: Features) -> None:
    pushed_at = datetime(2024, 3, 1, 12, 0, 7, tzinfo=UTC)
    row = struct_pb2.Struct()
    row.update(
        {
            "driver_id": 1007,
            "conv_rate": 0.25,
            "acc_rate": 0.75,
            "avg_daily_trips": 42,
            "event_timestamp": pushed_at.isoformat(),
        }
    )
    received = datetime.now(UTC)
    response = await features.stub.PushFeatures(
        pb.PushFeaturesRequest(push_source="driver_stats_push_source", rows=[row])
    )
    assert response.rows == 1
    listed = await features.stub.ListFeatureViews(pb.ListFeatureViewsRequest())
    fed = {v.name: v for v in listed.feature_views}["driver_hourly_stats_fresh"]
    assert received <= fed.data_until.ToDatetime(tzinfo=UTC) <= datetime.now(UTC)

    fresh = [
        "driver_hourly_stats_fresh:conv_rate",
        "driver_hourly_stats_fresh:acc_rate",
        "driver_hourly_stats_fresh:avg_daily_trips",
    ]
    online = await features.stub.GetOnlineFeatures(
        pb.GetOnlineFeaturesRequest(features=fresh, entity_rows=rows(1007))
    )
    assert [plain(c.values[0]) for c in online.columns] == [0.25, 0.75, 42]
    assert all(c.statuses[0] == pb.FIELD_STATUS_PRESENT for c in online.columns)
    assert online.columns[0].event_timestamps[0].ToDatetime(tzinfo=UTC) == pushed_at
    reference = features.feast.get_online_features(fresh, [{"driver_id": 1007}]).to_dict()
    assert [reference[f.split(":")[1]][0] for f in fresh] == [
        plain(c.values[0]) for c in online.columns
    ]


async def test_push_validates_source_and_types(features: Features) -> None:
    row = struct_pb2.Struct()
    row.update({"driver_id": 1007, "conv_rate": "high"})
    unknown = pb.PushFeaturesRequest(push_source="no_such_source", rows=[row])
    assert "'no_such_source'" in await expect_error(
        features.stub.PushFeatures(unknown), grpc.StatusCode.NOT_FOUND
    )
    wrong = pb.PushFeaturesRequest(push_source="driver_stats_push_source", rows=[row])
    assert (
        await expect_error(features.stub.PushFeatures(wrong), grpc.StatusCode.INVALID_ARGUMENT)
    ).startswith("rows[0].conv_rate")
    typo = struct_pb2.Struct()
    typo.update({"driver_id": 1007, "conv_rat": 0.1})
    request = pb.PushFeaturesRequest(push_source="driver_stats_push_source", rows=[typo])
    assert (
        await expect_error(features.stub.PushFeatures(request), grpc.StatusCode.INVALID_ARGUMENT)
    ).startswith("rows[0].conv_rat")


# --- offline --------------------------------------------------------------------------------


def arrow_bytes(frame: pd.DataFrame) -> bytes:
    table = pa.Table.from_pandas(frame, preserve_index=False)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def parquet_bytes(frame: pd.DataFrame) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), sink)
    return sink.getvalue().to_pybytes()


@pytest.mark.parametrize("table_format", [pb.TABLE_FORMAT_ARROW_IPC, pb.TABLE_FORMAT_PARQUET])
async def test_historical_features_are_point_in_time_correct(
    features: Features, table_format: int
) -> None:
    hour = timedelta(hours=1)
    entity = pd.DataFrame(
        {
            "driver_id": [1001, 1001, 1002, 1002, 1001],
            "event_timestamp": pd.to_datetime(
                [
                    DEFAULT_START
                    + 5 * hour
                    + timedelta(minutes=30),  # between rows 5 and 6 -> row 5
                    DEFAULT_START - hour,  # before any row -> null
                    DEFAULT_START
                    + 10 * hour
                    + timedelta(minutes=5),  # at row 10's creation -> row 10
                    DEFAULT_START
                    + 60 * hour,  # 13 h after the last row, inside the 2-day TTL -> row 47
                    DEFAULT_START + 5 * hour + timedelta(minutes=30),  # a repeated entity row
                ],
                utc=True,
            ),
            "label": [1, 0, 1, 0, 1],
        }
    )
    encode = arrow_bytes if table_format == pb.TABLE_FORMAT_ARROW_IPC else parquet_bytes
    request = pb.GetHistoricalFeaturesRequest(
        features=STATS, entity_table=encode(entity), format=table_format
    )
    response = await features.stub.GetHistoricalFeatures(request)
    assert response.format == table_format and response.rows == len(entity)
    if table_format == pb.TABLE_FORMAT_ARROW_IPC:
        result = pa.ipc.open_stream(response.table).read_all()
    else:
        result = pq.read_table(pa.BufferReader(response.table))
    assert result.column_names == [
        "driver_id",
        "event_timestamp",
        "label",
        "conv_rate",
        "acc_rate",
        "avg_daily_trips",
    ]
    assert result.schema.field("avg_daily_trips").type == pa.int64()
    got = result.to_pylist()

    def row(driver_id: int, hours: int) -> dict[str, Any]:
        match = features.data[
            (features.data.driver_id == driver_id)
            & (features.data.event_timestamp == DEFAULT_START + hours * hour)
        ]
        assert len(match) == 1
        return {k: match.iloc[0][k].item() for k in ("conv_rate", "acc_rate", "avg_daily_trips")}

    def features_of(r: dict[str, Any]) -> dict[str, Any]:
        return {k: r[k] for k in ("conv_rate", "acc_rate", "avg_daily_trips")}

    assert [r["driver_id"] for r in got] == [1001, 1001, 1002, 1002, 1001]
    assert [r["label"] for r in got] == [1, 0, 1, 0, 1]
    assert features_of(got[0]) == pytest.approx(row(1001, 5))
    assert features_of(got[1]) == {"conv_rate": None, "acc_rate": None, "avg_daily_trips": None}
    assert features_of(got[2]) == pytest.approx(row(1002, 10))
    assert features_of(got[3]) == pytest.approx(row(1002, 47))
    assert features_of(got[4]) == features_of(got[0])


async def test_historical_features_name_what_is_wrong(features: Features) -> None:
    good = pd.DataFrame(
        {"driver_id": [1001], "event_timestamp": pd.to_datetime([DEFAULT_START], utc=True)}
    )
    no_time = pd.DataFrame({"driver_id": [1001]})
    details = await expect_error(
        features.stub.GetHistoricalFeatures(
            pb.GetHistoricalFeaturesRequest(features=STATS, entity_table=arrow_bytes(no_time))
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert details.startswith("entity_table.event_timestamp")
    strings = pd.DataFrame(
        {"driver_id": ["1001"], "event_timestamp": pd.to_datetime([DEFAULT_START], utc=True)}
    )
    details = await expect_error(
        features.stub.GetHistoricalFeatures(
            pb.GetHistoricalFeaturesRequest(features=STATS, entity_table=arrow_bytes(strings))
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert details.startswith("entity_table.driver_id")
    details = await expect_error(
        features.stub.GetHistoricalFeatures(
            pb.GetHistoricalFeaturesRequest(features=["nope:x"], entity_table=arrow_bytes(good))
        ),
        grpc.StatusCode.NOT_FOUND,
    )
    assert "'nope'" in details
    details = await expect_error(
        features.stub.GetHistoricalFeatures(
            pb.GetHistoricalFeaturesRequest(features=STATS, entity_table=b"not a table")
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert details.startswith("entity_table")


async def _async(value: Any) -> Any:
    return value
