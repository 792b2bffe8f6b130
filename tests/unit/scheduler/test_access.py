"""Who may do what with jobs, and the team MLflow credentials each job gets.

Two teams (``vision`` owns the job, ``nlp`` does not), every role; the service on a real SQLite
store with a fake executor and a fake registry.
"""

from __future__ import annotations

import logging
from typing import Any

import pytest
import sqlalchemy as sa

from plinth_common.auth import Principal, Role
from plinth_common.db import Database
from plinth_common.errors import InvalidArgument, NotFound, PermissionDenied
from services.scheduler.credentials import CachedCredentials, TeamCredentials
from services.scheduler.domain import ExitStatus, JobSpec, JobState
from services.scheduler.service import SchedulerService
from services.scheduler.store import outbox_table
from tests.helpers import ADMIN, member
from tests.unit.scheduler.conftest import MakeService
from tests.unit.scheduler.fakes import FakeCredentials, FakeExecutor

pytestmark = pytest.mark.asyncio(loop_scope="session")

VIEWER = member("vera", vision=Role.VIEWER)
DEVELOPER = member("dev", vision=Role.DEVELOPER)
MAINTAINER = member("mae", vision=Role.MAINTAINER)
OUTSIDER = member("otto", nlp=Role.MAINTAINER)
SCHEDULER_ITSELF = Principal.service("serving")  # a service with no job permissions


def spec(team: str = "vision", **fields: Any) -> JobSpec:
    return JobSpec(**{"name": "train", "team": team, "entrypoint": ["python", "t.py"], **fields})


@pytest.mark.parametrize(
    ("caller", "outcome"),
    [
        (VIEWER, PermissionDenied),
        (DEVELOPER, None),
        (MAINTAINER, None),
        (ADMIN, None),
        (OUTSIDER, NotFound),
        (SCHEDULER_ITSELF, NotFound),
    ],
)
async def test_submitting_needs_developer_in_the_team(
    service: SchedulerService, caller: Principal, outcome: type[Exception] | None
) -> None:
    if outcome is None:
        job = await service.submit(caller, spec())
        assert job.team == "vision" and job.state is JobState.QUEUED
        return
    with pytest.raises(outcome) as caught:
        await service.submit(caller, spec())
    if outcome is NotFound:
        assert caught.value.kind == "team" and caught.value.name == "vision"  # type: ignore[attr-defined]
    else:
        assert str(caught.value) == "jobs.submit on vision needs developer"
    assert (await service.list(ADMIN))[0] == []


@pytest.mark.parametrize(
    ("caller", "read", "cancel"),
    [
        (VIEWER, None, PermissionDenied),
        (DEVELOPER, None, None),
        (MAINTAINER, None, None),
        (ADMIN, None, None),
        (OUTSIDER, NotFound, NotFound),
    ],
)
async def test_reading_and_cancelling_a_job_of_the_team(
    service: SchedulerService,
    caller: Principal,
    read: type[Exception] | None,
    cancel: type[Exception] | None,
) -> None:
    job = await service.submit(DEVELOPER, spec())
    if read is None:
        assert (await service.get(caller, job.id)).id == job.id
        assert [c async for c in service.logs(caller, job.id, follow=False)]
    else:
        with pytest.raises(read) as caught:
            await service.get(caller, job.id)
        # Exactly what a missing id answers: the job's existence does not leak.
        with pytest.raises(NotFound) as missing:
            await service.get(caller, "j-nope")
        assert str(caught.value) == str(missing.value).replace("j-nope", job.id)
        with pytest.raises(read):
            [c async for c in service.logs(caller, job.id, follow=False)]
    if cancel is None:
        assert (await service.cancel(caller, job.id)).state is JobState.CANCELLED
    else:
        with pytest.raises(cancel):
            await service.cancel(caller, job.id)
        assert (await service.get(ADMIN, job.id)).state is JobState.QUEUED


async def test_listing_shows_only_the_callers_teams(service: SchedulerService) -> None:
    vision = await service.submit(ADMIN, spec("vision"))
    nlp = await service.submit(ADMIN, spec("nlp"))
    other = await service.submit(ADMIN, spec("robotics"))
    both = member("bo", vision=Role.VIEWER, nlp=Role.VIEWER)

    def ids(jobs: list[Any]) -> set[str]:
        return {j.id for j in jobs}

    assert ids((await service.list(VIEWER))[0]) == {vision.id}
    assert ids((await service.list(both))[0]) == {vision.id, nlp.id}
    assert ids((await service.list(ADMIN))[0]) == {vision.id, nlp.id, other.id}
    assert ids((await service.list(both, team="nlp"))[0]) == {nlp.id}
    assert (await service.list(member("nobody")))[0] == []
    with pytest.raises(NotFound) as caught:
        await service.list(VIEWER, team="nlp")
    assert caught.value.kind == "team"
    # A team nobody has jobs in answers the same as one with jobs.
    with pytest.raises(NotFound):
        await service.list(VIEWER, team="empty")


# --- MLflow credentials ------------------------------------------------------------------


async def test_a_job_gets_its_teams_mlflow_credentials_and_they_are_not_shown(
    make_service: MakeService, executor: FakeExecutor, db: Database
) -> None:
    registry = FakeCredentials()
    service = make_service(executor, credentials=registry)
    vision = await service.submit(DEVELOPER, spec("vision"))
    nlp = await service.submit(ADMIN, spec("nlp"))
    assert await service.dispatch_once() == 2

    env = executor.environments[vision.id]
    assert env["MLFLOW_TRACKING_USERNAME"] == "vision-mlflow"
    assert env["MLFLOW_TRACKING_PASSWORD"] == "pw-vision"
    assert env["MLFLOW_TRACKING_URI"] == "http://mlflow.test"
    assert executor.environments[nlp.id]["MLFLOW_TRACKING_PASSWORD"] == "pw-nlp"
    # The job record users read, and the events, carry none of it.
    stored = await service.get(ADMIN, vision.id)
    assert "MLFLOW_TRACKING_PASSWORD" not in stored.spec.env
    assert "pw-vision" not in repr(stored)
    async with db.read() as session:
        events = (await session.execute(sa.select(outbox_table))).mappings().all()
    assert events and not any(b"pw-" in bytes(row["data"]) for row in events)
    assert not any("pw-" in str(row["headers"]) for row in events)


async def test_the_schedulers_own_mlflow_login_never_reaches_a_job(
    service: SchedulerService, executor: FakeExecutor
) -> None:
    job = await service.submit(ADMIN, spec())
    await service.dispatch_once()
    env = executor.environments[job.id]
    assert "MLFLOW_TRACKING_PASSWORD" not in env and "MLFLOW_TRACKING_USERNAME" not in env


@pytest.mark.parametrize("name", ["MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"])
async def test_a_spec_may_not_set_mlflow_credentials(service: SchedulerService, name: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        await service.submit(ADMIN, spec(env={name: "team-b-user"}))
    assert caught.value.field == "spec.env" and "set by the platform" in str(caught.value)


async def test_a_registry_that_cannot_be_reached_keeps_jobs_queued_until_it_is_back(
    make_service: MakeService, executor: FakeExecutor, caplog: pytest.LogCaptureFixture
) -> None:
    registry = FakeCredentials(down=True)
    service = make_service(executor, credentials=registry)
    first = await service.submit(ADMIN, spec())
    second = await service.submit(ADMIN, spec())
    with caplog.at_level(logging.WARNING):
        assert await service.dispatch_once() == 0
        assert await service.dispatch_once() == 0
    assert (await service.get(ADMIN, first.id)).state is JobState.QUEUED
    assert (await service.get(ADMIN, second.id)).state is JobState.QUEUED
    assert executor.launched == []
    assert registry.asked == ["vision", "vision"], "one ask per team and dispatch"
    assert "stays queued" in caplog.text

    registry.down = False
    assert await service.dispatch_once() == 2
    assert executor.environments[first.id]["MLFLOW_TRACKING_USERNAME"] == "vision-mlflow"


async def test_refused_credentials_fail_the_job_with_the_reason(
    make_service: MakeService, executor: FakeExecutor
) -> None:
    registry = FakeCredentials(refused={"vision": NotFound("team", "vision")})
    service = make_service(executor, credentials=registry)
    refused = await service.submit(ADMIN, spec("vision"))
    fine = await service.submit(ADMIN, spec("nlp"))
    assert await service.dispatch_once() == 1
    done = await service.get(ADMIN, refused.id)
    assert done.state is JobState.FAILED
    assert "MLflow credentials of team vision" in done.failure_reason
    assert executor.launched == [fine.id]
    executor.handles[fine.id].exit(ExitStatus(exit_code=0))


async def test_credentials_are_cached_per_team_for_a_while() -> None:
    now = [0.0]
    registry = FakeCredentials()
    cached = CachedCredentials(registry, ttl_s=60, clock=lambda: now[0])
    assert await cached.for_team("vision") == TeamCredentials("vision-mlflow", "pw-vision")
    await cached.for_team("vision")
    await cached.for_team("nlp")
    assert registry.asked == ["vision", "nlp"]
    now[0] = 61.0
    await cached.for_team("vision")
    assert registry.asked == ["vision", "nlp", "vision"]
    # A failure is not remembered: the next dispatch asks again.
    registry.down = True
    now[0] = 200.0
    with pytest.raises(Exception, match="cannot be reached"):
        await cached.for_team("vision")
    registry.down = False
    assert (await cached.for_team("vision")).username == "vision-mlflow"  # type: ignore[union-attr]
    assert "pw-" not in repr(TeamCredentials("u", "pw-secret"))


# Both teams share one queue with room for one job at a time.
SHARED_QUEUE = """
flavors: [{name: cpu}]
cluster_queues:
  - name: shared
    teams: [vision, nlp]
    flavors:
      - flavor: cpu
        resources: {cpu: {nominal: 1}, memory: {nominal: 4Gi}}
"""


async def test_a_member_sees_their_queue_and_counts_but_not_names_other_teams_jobs(
    service: SchedulerService,
) -> None:
    await service.apply_queue_config(ADMIN, SHARED_QUEUE)
    await service.submit(ADMIN, spec(team="nlp", name="holder"))
    await service.dispatch_once()
    theirs = await service.submit(ADMIN, spec(team="nlp", name="theirs"))
    mine = await service.submit(ADMIN, spec(name="mine"))
    await service.dispatch_once()

    view = await service.queue_status(VIEWER)
    (queue,) = view.report.queues
    assert queue.name == "shared" and queue.pending == 2 and queue.admitted == 1
    # Only vision's job is listed, at the position the nlp job ahead of it leaves.
    assert [(p.job_id, p.position_in_queue) for p in view.report.pending] == [(mine.id, 2)]
    assert theirs.id not in view.jobs and view.jobs[mine.id].name == "mine"
    everything = await service.queue_status(ADMIN)
    assert [p.job_id for p in everything.report.pending] == [theirs.id, mine.id]
    assert [p.job_id for p in (await service.queue_status(ADMIN, team="nlp")).report.pending] == [
        theirs.id
    ]
    with pytest.raises(NotFound):
        await service.queue_status(VIEWER, team="nlp")


@pytest.mark.parametrize("caller", [VIEWER, DEVELOPER, MAINTAINER, OUTSIDER, SCHEDULER_ITSELF])
async def test_only_admins_read_and_apply_the_queue_configuration(
    service: SchedulerService, caller: Principal
) -> None:
    with pytest.raises(PermissionDenied):
        await service.apply_queue_config(caller, SHARED_QUEUE)
    with pytest.raises(PermissionDenied):
        await service.queue_config(caller)
    assert (await service.queue_config(ADMIN)).version == 0
