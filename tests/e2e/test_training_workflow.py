"""End to end through the gateway, with every service as its own process (as `make run` starts
them): an ML engineer submits the example training job, watches its events, and finds its MLflow
run; the gateway call, the scheduler's work and the job.finished publication are one trace.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import grpc
import mlflow
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from plinth.events.v1 import events_pb2
from plinth.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from plinth.scheduler.v1 import scheduler_pb2 as pb
from plinth.scheduler.v1 import scheduler_pb2_grpc
from plinth_common.auth import bearer_interceptors
from plinth_common.devstack import LocalPlatform
from tests.helpers import eventually
from tests.otlp import PRODUCER, SERVER, OtlpReceiver, ReceivedSpan, spans_in_trace_of

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio(loop_scope="session")]
REPO = Path(__file__).resolve().parents[2]


async def test_every_service_reports_serving_through_health(platform: LocalPlatform) -> None:
    for service in platform.config.services:
        async with grpc.aio.insecure_channel(platform.address(service)) as channel:
            reply = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service="")
            )
            assert reply.status == health_pb2.HealthCheckResponse.SERVING, service


async def test_training_job_through_gateway_logs_to_mlflow_in_one_trace(
    platform: LocalPlatform, receiver: OtlpReceiver
) -> None:
    async with grpc.aio.insecure_channel(
        platform.address("gateway"), interceptors=bearer_interceptors(platform.admin_key)
    ) as channel:
        jobs = scheduler_pb2_grpc.SchedulerServiceStub(channel)
        events = gateway_pb2_grpc.EventServiceStub(channel)
        watch = events.WatchEvents(
            gateway_pb2.WatchEventsRequest(types=["job.started", "job.finished"], team="ml")
        )
        seen: list[gateway_pb2.Event] = []

        async def collect() -> None:
            async for event in watch:
                seen.append(event)

        # The gateway sends initial metadata once its subscription is live: nothing is missed.
        await watch.initial_metadata()
        collector = asyncio.create_task(collect())
        spec = pb.JobSpec(
            name="train-diabetes",
            team="ml",
            entrypoint=[sys.executable, "examples/train_diabetes.py", "--n-estimators", "50"],
            working_dir=str(REPO),
            register_as="diabetes",
        )
        job = (await jobs.SubmitJob(pb.SubmitJobRequest(spec=spec))).job

        async def finished() -> gateway_pb2.Event | None:
            return next(
                (e for e in seen if e.subject == job.id and e.type == "plinth.job.finished"), None
            )

        event = await eventually(finished, timeout=120)
        collector.cancel()
        done = await jobs.GetJob(pb.GetJobRequest(job_id=job.id))
        logs = b"".join(
            [c.data async for c in jobs.StreamJobLogs(pb.StreamJobLogsRequest(job_id=job.id))]
        )

    payload = events_pb2.JobFinished.FromString(event.data)
    assert payload.status == events_pb2.JOB_OUTCOME_SUCCEEDED, logs.decode(errors="replace")[-2000:]
    assert payload.mlflow_run_id and payload.mlflow_run_id == done.mlflow_run_id
    assert payload.register_as == "diabetes" and payload.duration_seconds > 0
    assert [e.type for e in seen if e.subject == job.id] == [
        "plinth.job.started",
        "plinth.job.finished",
    ]

    client = mlflow.MlflowClient(tracking_uri=platform.mlflow_url)
    run = await asyncio.to_thread(client.get_run, payload.mlflow_run_id)
    assert {"rmse", "mae", "r2"} <= set(run.data.metrics)
    assert run.data.params["n_estimators"] == "50"
    model_uri = done.outputs["model_uri"]
    mlflow.set_tracking_uri(platform.mlflow_url)
    model = await asyncio.to_thread(mlflow.pyfunc.load_model, model_uri)
    assert model.metadata.signature is not None

    async def whole_trace() -> list[ReceivedSpan]:
        spans = spans_in_trace_of(receiver, "plinth-scheduler", "job train-diabetes")
        names = {(s.service, s.name, s.kind) for s in spans}
        wanted = {
            ("plinth-gateway", "/plinth.scheduler.v1.SchedulerService/SubmitJob", SERVER),
            ("plinth-scheduler", "/plinth.scheduler.v1.SchedulerService/SubmitJob", SERVER),
            ("plinth-scheduler", "plinth.job.finished publish", PRODUCER),
        }
        sql = any(s.service == "plinth-scheduler" and s.name.startswith("INSERT") for s in spans)
        return spans if wanted <= names and sql else []

    spans = await eventually(whole_trace, timeout=15)
    assert len({s.trace_id for s in spans}) == 1


def _plinth(platform: LocalPlatform, *args: str) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "PLINTH_GATEWAY": platform.address("gateway"),
        "PLINTH_API_KEY": platform.admin_key,
    }
    return subprocess.run(
        [str(Path(sys.executable).with_name("plinth")), *args],
        env=env,
        check=False,  # the tests assert the exit code themselves
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )


async def test_cli_submits_follows_and_reports_errors_in_one_line(platform: LocalPlatform) -> None:
    submitted = await asyncio.to_thread(
        _plinth,
        platform,
        "jobs",
        "submit",
        "--name",
        "cli-job",
        "--team",
        "cli",
        "--",
        "python",
        "-c",
        "print('from the cli')",
    )
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip()
    logs = await asyncio.to_thread(_plinth, platform, "jobs", "logs", job_id, "--follow")
    assert "from the cli" in logs.stdout
    listed = await asyncio.to_thread(
        _plinth, platform, "jobs", "list", "--team", "cli", "-o", "json"
    )
    assert [j["id"] for j in json.loads(listed.stdout)] == [job_id]
    missing = await asyncio.to_thread(_plinth, platform, "jobs", "get", "j-nothere")
    assert (
        missing.returncode == 1
        and missing.stderr.count("\n") == 1
        and "NOT_FOUND" in missing.stderr
        and "j-nothere" in missing.stderr
    )
    bad = await asyncio.to_thread(
        _plinth, platform, "jobs", "submit", "--name", "Bad Name", "--team", "cli", "--", "true"
    )
    assert bad.returncode == 1 and "spec.name" in bad.stderr and "Traceback" not in bad.stderr
