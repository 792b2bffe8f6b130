"""Who may do what on the features service: a real gRPC server on a real Feast repository.

The example driver repository (team ``driver_performance``) plus a view of team ``pricing``,
an untagged view (admins only) and an on-demand view of ``driver_performance`` computed from
the ``pricing`` view. Every role of two teams calls every RPC through the forwarded identity a
gateway would attach; a call without one is UNAUTHENTICATED.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import pandas as pd
import pyarrow as pa
import pytest
import pytest_asyncio
from google.protobuf import struct_pb2

from examples.feature_repo.generate_data import DEFAULT_START, definition_files, generate
from plinth.features.v1 import features_pb2 as pb
from plinth.features.v1 import features_pb2_grpc
from plinth_common.auth import PRINCIPAL_HEADER, InternalTokens, Principal, Role
from plinth_common.nats_server import NatsServer
from services.features.app import FeaturesApp, FeaturesSettings
from tests.helpers import ADMIN, EventRecorder, channel_as, eventually, member, service_env

pytestmark = pytest.mark.asyncio(loop_scope="session")

TEAM, OTHER = "driver_performance", "pricing"
MORE_VIEWS = b"""
from datetime import timedelta
import pandas as pd
from feast import FeatureView, Field
from feast.on_demand_feature_view import on_demand_feature_view
from feast.types import Float32, Float64
from driver_repo import driver, driver_stats_source

driver_pricing = FeatureView(name="driver_pricing", entities=[driver], ttl=timedelta(days=2),
    schema=[Field(name="conv_rate", dtype=Float32)], source=driver_stats_source, online=True,
    tags={"team": "pricing"})
driver_untagged = FeatureView(name="driver_untagged", entities=[driver], ttl=timedelta(days=2),
    schema=[Field(name="acc_rate", dtype=Float32)], source=driver_stats_source, online=True)

@on_demand_feature_view(sources=[driver_pricing], schema=[Field(name="doubled", dtype=Float64)],
    mode="pandas", tags={"team": "driver_performance"})
def driver_priced(inputs: pd.DataFrame) -> pd.DataFrame:
    out = pd.DataFrame()
    out["doubled"] = inputs["conv_rate"] * 2
    return out
"""
WINDOW = (datetime(2023, 12, 1, tzinfo=UTC), datetime(2024, 2, 1, tzinfo=UTC))
OK = grpc.StatusCode.OK
DENIED, HIDDEN = grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.NOT_FOUND


@dataclass
class Platform:
    app: FeaturesApp
    nats_url: str

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.app.port}"


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def platform(
    tmp_path_factory: pytest.TempPathFactory, nats_server: NatsServer
) -> AsyncIterator[Platform]:
    base = tmp_path_factory.mktemp("features-access")
    app = FeaturesApp(
        FeaturesSettings.from_env(
            service_env(base / "data", nats_server.url, PLINTH_FEAST_PROJECT="access_test")
        )
    )
    await app.start()
    try:
        generate(app.settings.feast.repo_path / "data")
        async with channel_as(f"127.0.0.1:{app.port}", ADMIN) as channel:
            stub = features_pb2_grpc.FeaturesServiceStub(channel)
            files = {**definition_files(), "more.py": MORE_VIEWS}
            await stub.ApplyRepository(pb.ApplyRepositoryRequest(files=files))
            await stub.Materialize(window())
        yield Platform(app=app, nats_url=nats_server.url)
    finally:
        await app.stop()


def window(*views: str) -> pb.MaterializeRequest:
    request = pb.MaterializeRequest(feature_views=list(views))
    request.start_time.FromDatetime(WINDOW[0])
    request.end_time.FromDatetime(WINDOW[1])
    return request


def incremental(*views: str) -> pb.MaterializeIncrementalRequest:
    request = pb.MaterializeIncrementalRequest(feature_views=list(views))
    request.end_time.FromDatetime(WINDOW[1])
    return request


def driver_rows(*ids: int) -> list[struct_pb2.Struct]:
    out = []
    for driver_id in ids:
        row = struct_pb2.Struct()
        row.update({"driver_id": driver_id})
        out.append(row)
    return out


def online(*refs: str) -> pb.GetOnlineFeaturesRequest:
    return pb.GetOnlineFeaturesRequest(features=list(refs), entity_rows=driver_rows(1001))


def historical(*refs: str) -> pb.GetHistoricalFeaturesRequest:
    entity = pd.DataFrame(
        {
            "driver_id": [1001],
            "event_timestamp": pd.to_datetime([DEFAULT_START + timedelta(hours=5)], utc=True),
        }
    )
    table = pa.Table.from_pandas(entity, preserve_index=False)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return pb.GetHistoricalFeaturesRequest(
        features=list(refs), entity_table=sink.getvalue().to_pybytes()
    )


def push() -> pb.PushFeaturesRequest:
    row = struct_pb2.Struct()
    row.update(
        {
            "driver_id": 1009,
            "conv_rate": 0.5,
            "acc_rate": 0.5,
            "avg_daily_trips": 3,
            "event_timestamp": datetime(2024, 3, 1, tzinfo=UTC).isoformat(),
        }
    )
    return pb.PushFeaturesRequest(push_source="driver_stats_push_source", rows=[row])


async def code_of(call: Any) -> grpc.StatusCode:
    try:
        await call
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return OK


@pytest.mark.parametrize(
    ("caller", "reads", "writes"),
    [
        (member("vera", driver_performance=Role.VIEWER), OK, DENIED),
        (member("dev", driver_performance=Role.DEVELOPER), OK, OK),
        (member("mae", driver_performance=Role.MAINTAINER), OK, OK),
        (member("otto", pricing=Role.MAINTAINER), HIDDEN, HIDDEN),
        (ADMIN, OK, OK),
    ],
    ids=["viewer", "developer", "maintainer", "non-member", "admin"],
)
async def test_each_role_may_do_what_its_team_role_allows(
    platform: Platform, caller: Principal, reads: grpc.StatusCode, writes: grpc.StatusCode
) -> None:
    stats = "driver_hourly_stats:conv_rate"
    async with channel_as(platform.target, caller) as channel:
        stub = features_pb2_grpc.FeaturesServiceStub(channel)
        assert await code_of(stub.GetOnlineFeatures(online(stats))) == reads
        assert await code_of(stub.GetHistoricalFeatures(historical(stats))) == reads
        assert await code_of(stub.PushFeatures(push())) == writes
        assert await code_of(stub.Materialize(window("driver_hourly_stats"))) == writes
        assert await code_of(stub.MaterializeIncremental(incremental("driver_hourly_stats"))) == (
            writes
        )
        listed = {
            v.name
            for v in (await stub.ListFeatureViews(pb.ListFeatureViewsRequest())).feature_views
        }
        expected = {
            *(("driver_hourly_stats", "driver_hourly_stats_fresh") if caller.can_see(TEAM) else ()),
            *(("driver_pricing",) if caller.can_see(OTHER) else ()),
            *(("driver_untagged",) if caller.admin else ()),
        }
        assert listed == expected
        if not caller.admin:
            apply = stub.ApplyRepository(pb.ApplyRepositoryRequest(files=definition_files()))
            assert await code_of(apply) == DENIED


async def test_another_teams_view_answers_exactly_as_a_missing_one(platform: Platform) -> None:
    developer = member("dev", driver_performance=Role.DEVELOPER)
    async with channel_as(platform.target, developer) as channel:
        stub = features_pb2_grpc.FeaturesServiceStub(channel)
        answers = {}
        for view in ["driver_pricing", "driver_untagged", "no_such_view"]:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.GetOnlineFeatures(online("driver_hourly_stats:conv_rate", f"{view}:x"))
            answers[view] = (caught.value.code(), caught.value.details())
        assert answers == {view: (HIDDEN, f"feature view {view!r} not found") for view in answers}
        # An on-demand view of the team computed from another team's view reads that view.
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.GetOnlineFeatures(online("driver_priced:doubled"))
        assert caught.value.code() == HIDDEN and "'driver_pricing'" in (
            caught.value.details() or ""
        )
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Materialize(window("driver_pricing"))
        assert caught.value.code() == HIDDEN
    both = member("bo", driver_performance=Role.VIEWER, pricing=Role.VIEWER)
    async with channel_as(platform.target, both) as channel:
        stub = features_pb2_grpc.FeaturesServiceStub(channel)
        answer = await stub.GetOnlineFeatures(online("driver_priced:doubled"))
        assert answer.columns[0].name == "driver_priced:doubled"


async def test_denials_name_the_permission_and_the_role(platform: Platform) -> None:
    viewer = member("vera", driver_performance=Role.VIEWER)
    async with channel_as(platform.target, viewer) as channel:
        stub = features_pb2_grpc.FeaturesServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.PushFeatures(push())
        assert caught.value.details() == "features.push on driver_stats_push_source needs developer"
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.ApplyRepository(pb.ApplyRepositoryRequest(files=definition_files()))
        assert caught.value.details() == "features.apply needs admin"


async def test_materializing_all_covers_the_callers_teams_and_tells_only_them(
    platform: Platform,
) -> None:
    developer = member("dev", driver_performance=Role.DEVELOPER)
    async with (
        channel_as(platform.target, developer) as channel,
        EventRecorder(platform.nats_url) as recorder,
    ):
        stub = features_pb2_grpc.FeaturesServiceStub(channel)
        run = await stub.Materialize(window())
        assert sorted(run.feature_views) == ["driver_hourly_stats", "driver_hourly_stats_fresh"]

        async def materialized() -> list[Any]:
            return [m for m in recorder.messages if m.subject == "plinth.features.materialized"]

        events = await eventually(materialized)
    teams = {(m.headers or {}).get("ce-team", "") for m in events}
    assert teams == {TEAM}


async def test_a_call_without_the_gateways_identity_is_unauthenticated(platform: Platform) -> None:
    forged = InternalTokens(b"not-the-platform-key").mint(ADMIN)
    for metadata in [(), ((PRINCIPAL_HEADER, forged),)]:
        async with grpc.aio.insecure_channel(platform.target) as channel:
            stub = features_pb2_grpc.FeaturesServiceStub(channel)
            calls = [
                stub.ApplyRepository(
                    pb.ApplyRepositoryRequest(files=definition_files()), metadata=metadata
                ),
                stub.ListFeatureViews(pb.ListFeatureViewsRequest(), metadata=metadata),
                stub.Materialize(window(), metadata=metadata),
                stub.MaterializeIncremental(incremental(), metadata=metadata),
                stub.GetOnlineFeatures(online("driver_hourly_stats:conv_rate"), metadata=metadata),
                stub.PushFeatures(push(), metadata=metadata),
                stub.GetHistoricalFeatures(
                    historical("driver_hourly_stats:conv_rate"), metadata=metadata
                ),
            ]
            for call in calls:
                assert await code_of(call) == grpc.StatusCode.UNAUTHENTICATED
