"""Two teams on one platform, through the gateway as their members would call it: each sees only
its own work, roles limit what a member may do, MLflow's own access control keeps a job of one
team out of the other's experiments, and no service port answers a call that skipped the gateway.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import Awaitable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from plinth.features.v1 import features_pb2, features_pb2_grpc
from plinth.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from plinth.registry.v1 import registry_pb2, registry_pb2_grpc
from plinth.scheduler.v1 import scheduler_pb2, scheduler_pb2_grpc
from plinth.serving.v1 import serving_pb2, serving_pb2_grpc
from plinth_common.auth import (
    InternalTokens,
    Principal,
    bearer_interceptors,
    identity_interceptors,
)
from plinth_common.devstack import LocalPlatform
from plinth_sdk import NotFound, PermissionDenied, Plinth, Unauthenticated

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio(loop_scope="session")]
REPO = Path(__file__).resolve().parents[2]
TEAM_A, TEAM_B = "iso-a", "iso-b"


KEYS: dict[str, str] = {}


@pytest.fixture(scope="module")
def people(platform: LocalPlatform) -> Iterator[dict[str, Plinth]]:
    """Clients of an admin and of three members: ann (developer of A), vic (viewer of A) and
    bob (developer of B), each with an API key of their own (in ``KEYS``)."""
    admin = Plinth(platform.address("gateway"), api_key=platform.admin_key, timeout=60)
    for team in (TEAM_A, TEAM_B):
        admin.teams.create(team)
    roles = {"ann": (TEAM_A, "developer"), "vic": (TEAM_A, "viewer"), "bob": (TEAM_B, "developer")}
    clients = {"admin": admin}
    for user, (team, role) in roles.items():
        admin.teams.add_member(team, user, role=role)
        key = admin.keys.create(f"{user}-e2e", owner=user)
        KEYS[user] = key.secret
        clients[user] = Plinth(platform.address("gateway"), api_key=key.secret, timeout=60)
    yield clients
    for client in clients.values():
        client.close()


def _tenancy_job(client: Plinth, team: str, other: str) -> str:
    job = client.jobs.submit(
        name="mlflow-tenancy",
        team=team,
        command=[sys.executable, "tests/e2e/jobs/mlflow_tenancy.py", "--other-team", other],
        working_dir=str(REPO),
    )
    done = client.jobs.wait(job.id, timeout=120)
    logs = "".join(chunk.decode() for chunk in client.jobs.logs(job.id))
    assert done.state == "SUCCEEDED", f"{done.failure_reason}\n{logs[-2000:]}"
    return logs


async def test_each_team_sees_only_its_own_work(
    platform: LocalPlatform, people: dict[str, Plinth]
) -> None:
    ann, vic, bob = people["ann"], people["vic"], people["bob"]
    started = datetime.now(UTC)
    b_logs = await asyncio.to_thread(_tenancy_job, bob, TEAM_B, TEAM_A)
    a_logs = await asyncio.to_thread(_tenancy_job, ann, TEAM_A, TEAM_B)

    # MLflow itself refuses a job of team A another team's experiment; its own run logged fine.
    assert "OWN-RUN " in a_logs and "OWN-RUN " in b_logs
    assert "OTHER DENIED" in a_logs, a_logs[-2000:]

    a_jobs = await asyncio.to_thread(ann.jobs.list, team=TEAM_A)
    assert a_jobs and {job.team for job in a_jobs} == {TEAM_A}
    # Bob sees his team's job only, and A's job as if it did not exist.
    assert {job.team for job in await asyncio.to_thread(bob.jobs.list)} == {TEAM_B}
    with pytest.raises(NotFound):
        await asyncio.to_thread(bob.jobs.get, a_jobs[0].id)
    with pytest.raises(NotFound):
        await asyncio.to_thread(bob.jobs.list, team=TEAM_A)
    # Vic may read A's jobs but not cancel or submit: the message names what is needed.
    assert (await asyncio.to_thread(vic.jobs.get, a_jobs[0].id)).id == a_jobs[0].id
    with pytest.raises(PermissionDenied, match=r"jobs\.submit .*needs developer"):
        await asyncio.to_thread(
            vic.jobs.submit, name="nope", team=TEAM_A, command=["true"], working_dir=str(REPO)
        )

    # Bob's event stream never carries team A's events.
    seen = await _events_since(platform, KEYS["bob"], started, seconds=3.0)
    assert seen and {event.team for event in seen} == {TEAM_B}


async def _events_since(
    platform: LocalPlatform, key: str, since: datetime, *, seconds: float
) -> list[gateway_pb2.Event]:
    """Every event the key's holder is shown from ``since`` on, watching for ``seconds``."""
    request = gateway_pb2.WatchEventsRequest()
    request.since.FromDatetime(since)
    events: list[gateway_pb2.Event] = []
    async with grpc.aio.insecure_channel(
        platform.address("gateway"), interceptors=bearer_interceptors(key)
    ) as channel:
        watch = gateway_pb2_grpc.EventServiceStub(channel).WatchEvents(request, timeout=seconds)
        with contextlib.suppress(grpc.aio.AioRpcError):  # the deadline ends the watch
            async for event in watch:
                events.append(event)
    return events


async def test_credentials_are_required_and_revocation_is_immediate(
    platform: LocalPlatform, people: dict[str, Plinth]
) -> None:
    async with grpc.aio.insecure_channel(platform.address("gateway")) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as anonymous:
            await scheduler_pb2_grpc.SchedulerServiceStub(channel).ListJobs(
                scheduler_pb2.ListJobsRequest(), timeout=10
            )
    assert anonymous.value.code() is grpc.StatusCode.UNAUTHENTICATED
    admin = people["admin"]
    key = await asyncio.to_thread(admin.keys.create, "short-lived", owner="ann")
    holder = Plinth(platform.address("gateway"), api_key=key.secret, timeout=10)
    assert (await asyncio.to_thread(holder.whoami)).name == "ann"
    await asyncio.to_thread(admin.keys.revoke, key.key.id)
    with pytest.raises(Unauthenticated) as refused:
        await asyncio.to_thread(holder.whoami)
    assert key.secret not in str(refused.value)


def _own_read(service: str, channel: grpc.aio.Channel) -> Awaitable[object]:
    """A harmless read of the service's own API (one that any member may make)."""
    if service == "scheduler":
        return scheduler_pb2_grpc.SchedulerServiceStub(channel).ListJobs(
            scheduler_pb2.ListJobsRequest(), timeout=10
        )
    if service == "registry":
        return registry_pb2_grpc.RegistryServiceStub(channel).SearchModels(
            registry_pb2.SearchModelsRequest(), timeout=10
        )
    if service == "features":
        return features_pb2_grpc.FeaturesServiceStub(channel).ListFeatureViews(
            features_pb2.ListFeatureViewsRequest(), timeout=10
        )
    return serving_pb2_grpc.ServingServiceStub(channel).ListDeployments(
        serving_pb2.ListDeploymentsRequest(), timeout=10
    )


@pytest.mark.parametrize("service", ["scheduler", "registry", "features", "serving"])
async def test_service_ports_refuse_calls_that_skipped_the_gateway(
    platform: LocalPlatform, service: str
) -> None:
    address = platform.address(service)
    async with grpc.aio.insecure_channel(address) as channel:
        # Health stays open for probes; everything else needs the gateway's identity.
        health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.aio.AioRpcError) as bare:
            await _own_read(service, channel)
    assert bare.value.code() is grpc.StatusCode.UNAUTHENTICATED

    # An identity signed with any other key than the platform's is no identity.
    forged = InternalTokens(b"not-the-platform-key")
    async with grpc.aio.insecure_channel(
        address, interceptors=identity_interceptors(forged, Principal("mallory", admin=True))
    ) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as fake:
            await _own_read(service, channel)
    assert fake.value.code() is grpc.StatusCode.UNAUTHENTICATED
