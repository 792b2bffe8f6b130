"""The scheduler as a real gRPC server, with a real nats-server and real job processes."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sqlite3
import sys
from collections.abc import AsyncIterator, Callable
from hashlib import sha256
from pathlib import Path
from typing import Any

import grpc
import pytest
import pytest_asyncio

from plinth.registry.v1 import registry_pb2, registry_pb2_grpc
from plinth.scheduler.v1 import scheduler_pb2 as pb
from plinth.scheduler.v1 import scheduler_pb2_grpc
from plinth_common.auth import (
    PRINCIPAL_HEADER,
    InternalTokens,
    Principal,
    Role,
    ServiceAuthInterceptor,
    current_principal,
)
from plinth_common.nats_server import NatsServer
from services.scheduler.app import SchedulerApp, SchedulerSettings
from services.scheduler.credentials import TeamCredentialsSource
from tests.helpers import (
    ADMIN,
    TEST_TOKENS,
    EventRecorder,
    channel_as,
    eventually,
    member,
    service_env,
    stored_event_types,
)
from tests.unit.scheduler.fakes import FakeCredentials

pytestmark = pytest.mark.asyncio(loop_scope="session")
PY = sys.executable


class Scheduler:
    """A running scheduler app and a stub to it."""

    def __init__(self, app: SchedulerApp) -> None:
        self.app = app
        # Behaviour tests call as an admin, as the gateway would forward one.
        self.channel = channel_as(f"127.0.0.1:{app.port}", ADMIN)
        self.stub = scheduler_pb2_grpc.SchedulerServiceStub(self.channel)

    async def submit(self, *command: str, name: str = "t", team: str = "ml", **spec: Any) -> pb.Job:
        response = await self.stub.SubmitJob(
            pb.SubmitJobRequest(
                spec=pb.JobSpec(name=name, team=team, entrypoint=list(command), **spec)
            )
        )
        return response.job

    async def wait_state(self, job_id: str, *states: int, timeout: float = 30) -> pb.Job:
        async def probe() -> pb.Job | None:
            job = await self.stub.GetJob(pb.GetJobRequest(job_id=job_id))
            return job if job.state in states else None

        return await eventually(probe, timeout=timeout)

    async def close(self) -> None:
        await self.channel.close()
        await self.app.stop()


StartScheduler = Callable[..., Any]


@pytest_asyncio.fixture(loop_scope="session")
async def start_scheduler(tmp_path: Path, nats_server: NatsServer) -> AsyncIterator[StartScheduler]:
    running: list[Scheduler] = []

    async def start(credentials: TeamCredentialsSource | None = None, **env: str) -> Scheduler:
        # No registry runs here: jobs get no MLflow credentials unless a test passes a source.
        env = {"PLINTH_SCHEDULER_MLFLOW_AUTH": "none", **env}
        app = SchedulerApp(
            SchedulerSettings.from_env(service_env(tmp_path / "data", nats_server.url, **env)),
            credentials=credentials,
        )
        await app.start()
        scheduler = Scheduler(app)
        running.append(scheduler)
        return scheduler

    yield start
    for scheduler in running:
        await scheduler.close()


FINAL = (pb.JOB_STATE_SUCCEEDED, pb.JOB_STATE_FAILED, pb.JOB_STATE_CANCELLED)


async def test_job_runs_and_reports_life_cycle_events(
    start_scheduler: StartScheduler, nats_server: NatsServer, tmp_path: Path
) -> None:
    scheduler = await start_scheduler()
    script = (
        "import json, os; print('hello from', os.environ['PLINTH_JOB_ID']);"
        "json.dump({'mlflow_run_id': 'r123'}, open(os.environ['PLINTH_OUTPUT_FILE'], 'w'));"
        "assert os.environ['TRACEPARENT'].startswith('00-') and os.environ['MLFLOW_TRACKING_URI']"
    )
    async with EventRecorder(nats_server.url) as recorder:
        job = await scheduler.submit(PY, "-c", script, env={"GREETING": "hi"})
        assert job.id.startswith("j-") and job.state == pb.JOB_STATE_QUEUED
        done = await scheduler.wait_state(job.id, *FINAL)
        await eventually(lambda: _async(len(recorder.of(job.id)) >= 4))
    assert done.state == pb.JOB_STATE_SUCCEEDED, done.failure_reason
    assert done.exit_code == 0 and done.mlflow_run_id == "r123"
    assert recorder.of(job.id) == [
        "plinth.job.submitted",
        "plinth.job.admitted",
        "plinth.job.started",
        "plinth.job.finished",
    ]
    logs = b"".join(
        [c.data async for c in scheduler.stub.StreamJobLogs(pb.StreamJobLogsRequest(job_id=job.id))]
    )
    assert f"hello from {job.id}".encode() in logs


async def _async(value: Any) -> Any:
    return value


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ({"name": "Bad Name"}, "spec.name"),
        ({"team": ""}, "spec.team"),
        ({"entrypoint": []}, "spec.entrypoint"),
        ({"resources": pb.Resources(cpu=-1)}, "spec.resources.cpu"),
        ({"resources": pb.Resources(cpu=10_000)}, "spec.resources.cpu"),
        ({"resources": pb.Resources(memory_bytes=-5)}, "spec.resources.memory_bytes"),
        ({"resources": pb.Resources(gpu=8)}, "spec.resources.gpu"),
        ({"env": {"1BAD": "x"}}, "spec.env"),
        ({"env": {"PLINTH_JOB_ID": "x"}}, "spec.env"),
        ({"working_dir": "relative/dir"}, "spec.working_dir"),
        ({"name": "x" * 64}, "spec.name"),
        ({"entrypoint": ["echo", "y" * 5000]}, "spec.entrypoint"),
        ({"register_as": "../etc/passwd"}, "spec.register_as"),
    ],
)
async def test_invalid_spec_is_refused_naming_the_field(
    start_scheduler: StartScheduler, spec: dict[str, Any], field: str
) -> None:
    scheduler = await start_scheduler()
    fields = {"name": "ok", "team": "ml", "entrypoint": ["true"], **spec}
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await scheduler.stub.SubmitJob(pb.SubmitJobRequest(spec=pb.JobSpec(**fields)))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details().startswith(field), caught.value.details()


async def test_unknown_job_and_cancel_after_finish(start_scheduler: StartScheduler) -> None:
    scheduler = await start_scheduler()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await scheduler.stub.GetJob(pb.GetJobRequest(job_id="j-nope"))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND and "j-nope" in caught.value.details()
    job = await scheduler.submit("true")
    await scheduler.wait_state(job.id, *FINAL)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await scheduler.stub.CancelJob(pb.CancelJobRequest(job_id=job.id))
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION


async def test_crashed_and_killed_jobs_fail_with_exit_code_or_signal(
    start_scheduler: StartScheduler,
) -> None:
    scheduler = await start_scheduler()
    crashed = await scheduler.submit(PY, "-c", "import sys; sys.exit(3)")
    killed = await scheduler.submit(
        PY, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"
    )
    missing = await scheduler.submit("/no/such/program")
    crashed = await scheduler.wait_state(crashed.id, *FINAL)
    killed = await scheduler.wait_state(killed.id, *FINAL)
    missing = await scheduler.wait_state(missing.id, *FINAL)
    assert (
        crashed.state == pb.JOB_STATE_FAILED
        and crashed.exit_code == 3
        and crashed.failure_reason == "exit code 3"
    )
    assert (
        killed.state == pb.JOB_STATE_FAILED
        and killed.signal == 9
        and "SIGKILL" in killed.failure_reason
    )
    assert missing.state == pb.JOB_STATE_FAILED and "/no/such/program" in missing.failure_reason


async def test_cancel_running_and_queued_jobs(
    start_scheduler: StartScheduler, nats_server: NatsServer
) -> None:
    scheduler = await start_scheduler(PLINTH_SCHEDULER_CPU="1")
    async with EventRecorder(nats_server.url) as recorder:
        running = await scheduler.submit(
            PY, "-c", "import time; print('started', flush=True); time.sleep(60)"
        )
        queued = await scheduler.submit("true")
        await scheduler.wait_state(running.id, pb.JOB_STATE_RUNNING)
        assert (
            await scheduler.stub.GetJob(pb.GetJobRequest(job_id=queued.id))
        ).state == pb.JOB_STATE_QUEUED
        cancelled_queued = await scheduler.stub.CancelJob(pb.CancelJobRequest(job_id=queued.id))
        assert cancelled_queued.state == pb.JOB_STATE_CANCELLED
        await scheduler.stub.CancelJob(pb.CancelJobRequest(job_id=running.id))
        done = await scheduler.wait_state(running.id, *FINAL, timeout=20)
        await eventually(lambda: _async("plinth.job.cancelled" in recorder.of(running.id)))
    assert done.state == pb.JOB_STATE_CANCELLED and done.signal == 15
    assert "plinth.job.finished" not in recorder.of(running.id)


async def test_fifo_queue_and_listing_with_filters_and_pages(
    start_scheduler: StartScheduler,
) -> None:
    scheduler = await start_scheduler(PLINTH_SCHEDULER_CPU="1")
    first = await scheduler.submit(PY, "-c", "import time; time.sleep(0.5)", team="vision")
    others = [await scheduler.submit("true", name=f"n{i}", team="vision") for i in range(4)]
    nlp = await scheduler.submit("true", team="nlp")
    await scheduler.wait_state(nlp.id, *FINAL)
    finished = [await scheduler.wait_state(j.id, *FINAL) for j in [first, *others]]
    starts = [j.started_at.ToDatetime() for j in finished]
    assert starts == sorted(starts), "jobs must start in submission order"
    page = await scheduler.stub.ListJobs(pb.ListJobsRequest(team="vision", page_size=3))
    assert [j.id for j in page.jobs] == [j.id for j in reversed(others)][:3]
    rest = await scheduler.stub.ListJobs(
        pb.ListJobsRequest(team="vision", page_size=3, page_token=page.next_page_token)
    )
    assert [j.id for j in rest.jobs] == [others[0].id, first.id] and rest.next_page_token == ""
    succeeded = await scheduler.stub.ListJobs(
        pb.ListJobsRequest(team="nlp", state=pb.JOB_STATE_SUCCEEDED)
    )
    assert len(succeeded.jobs) == 1
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await scheduler.stub.ListJobs(pb.ListJobsRequest(page_token="garbage"))
    assert (
        caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        and "page_token" in caught.value.details()
    )


async def test_follow_logs_streams_until_the_job_ends(start_scheduler: StartScheduler) -> None:
    scheduler = await start_scheduler()
    job = await scheduler.submit(
        PY,
        "-c",
        "import time\nfor i in range(3):\n    print('line', i, flush=True); time.sleep(0.2)",
    )
    chunks = [
        c.data
        async for c in scheduler.stub.StreamJobLogs(
            pb.StreamJobLogsRequest(job_id=job.id, follow=True)
        )
    ]
    assert b"".join(chunks).decode().split() == ["line", "0", "line", "1", "line", "2"]


async def test_restart_reattaches_running_jobs_and_runs_queued_ones(
    start_scheduler: StartScheduler,
) -> None:
    first = await start_scheduler(PLINTH_SCHEDULER_CPU="1")
    running = await first.submit(PY, "-c", "import time; time.sleep(1.5); print('survived')")
    queued = await first.submit(PY, "-c", "print('ran after restart')")
    await first.wait_state(running.id, pb.JOB_STATE_RUNNING)
    await first.close()  # the scheduler goes away; the job's supervisor keeps running
    second = await start_scheduler(PLINTH_SCHEDULER_CPU="1")
    survived = await second.wait_state(running.id, *FINAL)
    ran = await second.wait_state(queued.id, *FINAL)
    assert survived.state == pb.JOB_STATE_SUCCEEDED and survived.exit_code == 0
    assert ran.state == pb.JOB_STATE_SUCCEEDED


async def test_job_whose_process_vanished_during_restart_is_failed_with_reason(
    start_scheduler: StartScheduler, tmp_path: Path
) -> None:
    first = await start_scheduler()
    # No infrastructure retries: a lost job fails at once (by default it would be retried).
    job = await first.submit(
        PY,
        "-c",
        "import time; time.sleep(30)",
        retry=pb.RetryPolicy(infrastructure_failure_limit=0),
    )
    job = await first.wait_state(job.id, pb.JOB_STATE_RUNNING)
    await first.close()
    job_pid = _pid_of(first, job.id)
    os.kill(job_pid, signal.SIGKILL)  # the supervisor dies too (host crash)
    await eventually(lambda: _async(_gone(job_pid)))
    second = await start_scheduler()
    lost = await second.wait_state(job.id, *FINAL)
    assert lost.state == pb.JOB_STATE_FAILED and "lost" in lost.failure_reason, (job_pid, lost)
    assert [a.end_reason for a in lost.attempts] == [pb.END_REASON_EXECUTOR_LOST]


def _gone(pid: int) -> bool:
    """True once ``pid`` has exited (a zombie has an empty command line)."""
    try:
        return not Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return True


def _pid_of(scheduler: Scheduler, job_id: str) -> int:
    path = scheduler.app.settings.common.service_dir / "scheduler.db"
    with sqlite3.connect(path) as conn:
        return int(conn.execute("select pid from jobs where id = ?", (job_id,)).fetchone()[0])


async def test_jobs_run_while_nats_is_down_and_events_follow_once_it_is_back(
    tmp_path: Path, own_nats: NatsServer
) -> None:
    app = SchedulerApp(
        SchedulerSettings.from_env(
            service_env(tmp_path / "chaos", own_nats.url, PLINTH_SCHEDULER_MLFLOW_AUTH="none")
        )
    )
    await app.start()
    scheduler = Scheduler(app)
    try:
        await app.runtime.bus.connected()  # the stream exists; then the broker goes away
        await own_nats.stop(kill=True)
        job = await scheduler.submit(PY, "-c", "print('no broker needed')")
        done = await scheduler.wait_state(job.id, *FINAL)
        assert done.state == pb.JOB_STATE_SUCCEEDED
        await own_nats.start()

        async def all_four() -> list[str]:
            types = await stored_event_types(own_nats.url, job.id)
            return types if len(types) >= 4 else []

        await eventually(all_four, timeout=30)
        await asyncio.sleep(1.0)  # a duplicate would have been stored by now
        assert await stored_event_types(own_nats.url, job.id) == [
            "plinth.job.submitted",
            "plinth.job.admitted",
            "plinth.job.started",
            "plinth.job.finished",
        ]
    finally:
        await scheduler.close()


# --- access: two teams, every role -------------------------------------------------------

OK, DENIED, HIDDEN = (
    grpc.StatusCode.OK,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.NOT_FOUND,
)


async def _code(call: Any) -> grpc.StatusCode:
    try:
        result = await call
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    assert result is not None
    return OK


async def _stream_code(stream: Any) -> grpc.StatusCode:
    try:
        [chunk async for chunk in stream]
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return OK


@pytest.mark.parametrize(
    ("caller", "reads", "writes"),
    [
        (member("vera", vision=Role.VIEWER), OK, DENIED),
        (member("dev", vision=Role.DEVELOPER), OK, OK),
        (member("mae", vision=Role.MAINTAINER), OK, OK),
        (member("otto", nlp=Role.MAINTAINER), HIDDEN, HIDDEN),
        (ADMIN, OK, OK),
    ],
    ids=["viewer", "developer", "maintainer", "non-member", "admin"],
)
async def test_each_role_may_do_what_its_team_role_allows(
    start_scheduler: StartScheduler,
    caller: Principal,
    reads: grpc.StatusCode,
    writes: grpc.StatusCode,
) -> None:
    scheduler = await start_scheduler()
    theirs = await scheduler.submit(PY, "-c", "import time; time.sleep(30)", team="vision")
    nlp = await scheduler.submit("true", team="nlp")
    async with channel_as(f"127.0.0.1:{scheduler.app.port}", caller) as channel:
        stub = scheduler_pb2_grpc.SchedulerServiceStub(channel)
        spec = pb.JobSpec(name="mine", team="vision", entrypoint=["true"])
        assert await _code(stub.SubmitJob(pb.SubmitJobRequest(spec=spec))) == writes
        assert await _code(stub.GetJob(pb.GetJobRequest(job_id=theirs.id))) == reads
        assert await _code(stub.ListJobs(pb.ListJobsRequest(team="vision"))) == reads
        logs = stub.StreamJobLogs(pb.StreamJobLogsRequest(job_id=theirs.id))
        assert await _stream_code(logs) == reads
        assert await _code(stub.CancelJob(pb.CancelJobRequest(job_id=theirs.id))) == writes
        if writes == DENIED:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.CancelJob(pb.CancelJobRequest(job_id=theirs.id))
            assert caught.value.details() == f"jobs.cancel on {theirs.id} needs developer"
        listed = await stub.ListJobs(pb.ListJobsRequest())
        visible = {j.id for j in listed.jobs}
        assert (theirs.id in visible) == (reads == OK)
        assert (nlp.id in visible) == caller.can_see("nlp")
        if reads != OK:
            # Another team's job answers exactly as a missing one.
            with pytest.raises(grpc.aio.AioRpcError) as theirs_error:
                await stub.GetJob(pb.GetJobRequest(job_id=theirs.id))
            with pytest.raises(grpc.aio.AioRpcError) as missing_error:
                await stub.GetJob(pb.GetJobRequest(job_id="j-000000000000"))
            assert theirs_error.value.details() == (missing_error.value.details() or "").replace(
                "j-000000000000", theirs.id
            )
    if writes != OK:
        await scheduler.stub.CancelJob(pb.CancelJobRequest(job_id=theirs.id))


async def test_a_call_without_the_gateways_identity_is_unauthenticated(
    start_scheduler: StartScheduler,
) -> None:
    scheduler = await start_scheduler()
    job = await scheduler.submit("true")
    forged = InternalTokens(b"not-the-platform-key").mint(ADMIN)
    for metadata in [(), ((PRINCIPAL_HEADER, forged),)]:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{scheduler.app.port}") as channel:
            stub = scheduler_pb2_grpc.SchedulerServiceStub(channel)
            calls = [
                stub.SubmitJob(
                    pb.SubmitJobRequest(spec=pb.JobSpec(name="x", team="ml", entrypoint=["true"])),
                    metadata=metadata,
                ),
                stub.GetJob(pb.GetJobRequest(job_id=job.id), metadata=metadata),
                stub.ListJobs(pb.ListJobsRequest(), metadata=metadata),
                stub.CancelJob(pb.CancelJobRequest(job_id=job.id), metadata=metadata),
            ]
            for call in calls:
                assert await _code(call) == grpc.StatusCode.UNAUTHENTICATED
            logs = stub.StreamJobLogs(pb.StreamJobLogsRequest(job_id=job.id), metadata=metadata)
            assert await _stream_code(logs) == grpc.StatusCode.UNAUTHENTICATED


# --- MLflow credentials --------------------------------------------------------------------


class FakeRegistry(registry_pb2_grpc.RegistryServiceServicer):
    """A registry port that hands out ``<team>-mlflow`` / ``pw-<team>`` to the scheduler only."""

    def __init__(self, *, refuse: bool = False) -> None:
        self.callers: list[Principal] = []
        self.refuse = refuse

    async def GetTeamCredentials(
        self, request: registry_pb2.GetTeamCredentialsRequest, context: grpc.aio.ServicerContext
    ) -> registry_pb2.TeamCredentials:
        caller = current_principal()
        self.callers.append(caller)
        if caller != Principal.service("scheduler") or self.refuse:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, "no MLflow user for you")
        return registry_pb2.TeamCredentials(
            team=request.team, username=f"{request.team}-mlflow", password=f"pw-{request.team}"
        )


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


# The job checks it got vision's password without the password appearing in its spec.
CHECK_CREDENTIALS = (
    "import hashlib, os, sys; print('user', os.environ.get('MLFLOW_TRACKING_USERNAME'));"
    "got = os.environ.get('MLFLOW_TRACKING_PASSWORD', '').encode();"
    f"sys.exit(0 if hashlib.sha256(got).hexdigest() == {sha256(b'pw-vision').hexdigest()!r} else 3)"
)


async def test_a_job_waits_for_the_registry_then_runs_with_its_teams_mlflow_user(
    start_scheduler: StartScheduler,
) -> None:
    port = _free_port()
    scheduler = await start_scheduler(
        PLINTH_SCHEDULER_MLFLOW_AUTH="registry", PLINTH_REGISTRY_ADDR=f"127.0.0.1:{port}"
    )
    job = await scheduler.submit(PY, "-c", CHECK_CREDENTIALS, team="vision")
    await asyncio.sleep(2.5)  # a dispatch pass or two while no registry answers
    waiting = await scheduler.stub.GetJob(pb.GetJobRequest(job_id=job.id))
    assert waiting.state == pb.JOB_STATE_QUEUED, waiting.failure_reason

    registry = FakeRegistry()
    server = grpc.aio.server(interceptors=[ServiceAuthInterceptor(TEST_TOKENS)])
    registry_pb2_grpc.add_RegistryServiceServicer_to_server(registry, server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    try:
        done = await scheduler.wait_state(job.id, *FINAL, timeout=30)
    finally:
        await server.stop(None)
    assert done.state == pb.JOB_STATE_SUCCEEDED, done.failure_reason
    assert registry.callers and all(c.name == "scheduler" for c in registry.callers)
    # Nothing a user reads shows the password: the job record, its log.
    assert "MLFLOW_TRACKING_PASSWORD" not in done.spec.env
    assert "pw-vision" not in str(done)
    logs = b"".join(
        [c.data async for c in scheduler.stub.StreamJobLogs(pb.StreamJobLogsRequest(job_id=job.id))]
    )
    assert logs.strip() == b"user vision-mlflow"


async def test_a_job_gets_its_teams_credentials_from_the_credentials_port(
    start_scheduler: StartScheduler,
) -> None:
    scheduler = await start_scheduler(credentials=FakeCredentials())
    job = await scheduler.submit(PY, "-c", CHECK_CREDENTIALS, team="vision")
    other = await scheduler.submit(PY, "-c", CHECK_CREDENTIALS, team="nlp")
    assert (await scheduler.wait_state(job.id, *FINAL)).state == pb.JOB_STATE_SUCCEEDED
    # Team nlp's job gets nlp's password, not vision's.
    assert (await scheduler.wait_state(other.id, *FINAL)).exit_code == 3


async def test_a_job_whose_credentials_the_registry_refuses_fails_saying_so(
    start_scheduler: StartScheduler,
) -> None:
    registry = FakeRegistry(refuse=True)
    server = grpc.aio.server(interceptors=[ServiceAuthInterceptor(TEST_TOKENS)])
    registry_pb2_grpc.add_RegistryServiceServicer_to_server(registry, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        scheduler = await start_scheduler(
            PLINTH_SCHEDULER_MLFLOW_AUTH="registry", PLINTH_REGISTRY_ADDR=f"127.0.0.1:{port}"
        )
        job = await scheduler.submit(PY, "-c", "print('never runs')", team="vision")
        done = await scheduler.wait_state(job.id, *FINAL)
    finally:
        await server.stop(None)
    assert done.state == pb.JOB_STATE_FAILED
    assert "MLflow credentials of team vision" in done.failure_reason
    assert "no MLflow user for you" in done.failure_reason
