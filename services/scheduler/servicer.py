"""gRPC servicer of the scheduler: protobuf in, domain call (with the verified caller), protobuf
out. Nothing else."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from plinth.scheduler.v1 import scheduler_pb2, scheduler_pb2_grpc
from plinth_common.auth import current_principal
from plinth_common.errors import InvalidArgument
from plinth_common.prototime import to_timestamp
from services.scheduler.domain import Job, JobSpec, JobState, Resources
from services.scheduler.service import SchedulerService


def job_to_proto(job: Job) -> scheduler_pb2.Job:
    """Domain job -> ``plinth.scheduler.v1.Job``."""
    spec, resources = job.spec, job.spec.resources
    return scheduler_pb2.Job(
        id=job.id,
        spec=scheduler_pb2.JobSpec(
            name=spec.name,
            team=spec.team,
            entrypoint=list(spec.entrypoint),
            working_dir=spec.working_dir,
            env=dict(spec.env),
            resources=scheduler_pb2.Resources(
                cpu=resources.cpu, memory_bytes=resources.memory_bytes, gpu=resources.gpu
            ),
            register_as=spec.register_as,
        ),
        state=scheduler_pb2.JobState.Value(f"JOB_STATE_{job.state.value}"),
        created_at=to_timestamp(job.created_at),
        started_at=to_timestamp(job.started_at),
        finished_at=to_timestamp(job.finished_at),
        exit_code=job.exit_code or 0,
        signal=job.signal or 0,
        failure_reason=job.failure_reason,
        mlflow_run_id=job.mlflow_run_id,
        outputs=dict(job.outputs),
    )


def spec_from_proto(spec: scheduler_pb2.JobSpec) -> JobSpec:
    """``plinth.scheduler.v1.JobSpec`` -> domain spec (validation happens in the service)."""
    return JobSpec(
        name=spec.name,
        team=spec.team,
        entrypoint=list(spec.entrypoint),
        working_dir=spec.working_dir,
        env=dict(spec.env),
        resources=Resources(
            cpu=spec.resources.cpu, memory_bytes=spec.resources.memory_bytes, gpu=spec.resources.gpu
        ),
        register_as=spec.register_as,
    )


def state_from_proto(state: int) -> JobState | None:
    """``plinth.scheduler.v1.JobState`` -> domain state; None for UNSPECIFIED (any state).

    Raises:
        InvalidArgument: for a number that is no state.
    """
    if state == scheduler_pb2.JOB_STATE_UNSPECIFIED:
        return None
    try:
        return JobState(scheduler_pb2.JobState.Name(state).removeprefix("JOB_STATE_"))
    except ValueError:
        raise InvalidArgument("state", f"unknown job state {state}") from None


class SchedulerServicer(scheduler_pb2_grpc.SchedulerServiceServicer):
    """Serves ``plinth.scheduler.v1.SchedulerService`` from a :class:`SchedulerService`."""

    def __init__(self, service: SchedulerService) -> None:
        self._service = service

    async def SubmitJob(
        self, request: scheduler_pb2.SubmitJobRequest, context: grpc.aio.ServicerContext
    ) -> scheduler_pb2.SubmitJobResponse:
        job = await self._service.submit(current_principal(), spec_from_proto(request.spec))
        return scheduler_pb2.SubmitJobResponse(job=job_to_proto(job))

    async def GetJob(
        self, request: scheduler_pb2.GetJobRequest, context: grpc.aio.ServicerContext
    ) -> scheduler_pb2.Job:
        return job_to_proto(await self._service.get(current_principal(), request.job_id))

    async def ListJobs(
        self, request: scheduler_pb2.ListJobsRequest, context: grpc.aio.ServicerContext
    ) -> scheduler_pb2.ListJobsResponse:
        jobs, token = await self._service.list(
            current_principal(),
            team=request.team,
            state=state_from_proto(request.state),
            page_size=request.page_size,
            page_token=request.page_token,
        )
        return scheduler_pb2.ListJobsResponse(
            jobs=[job_to_proto(j) for j in jobs], next_page_token=token
        )

    async def CancelJob(
        self, request: scheduler_pb2.CancelJobRequest, context: grpc.aio.ServicerContext
    ) -> scheduler_pb2.Job:
        return job_to_proto(await self._service.cancel(current_principal(), request.job_id))

    async def StreamJobLogs(
        self, request: scheduler_pb2.StreamJobLogsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[scheduler_pb2.LogChunk]:
        async for chunk in self._service.logs(
            current_principal(), request.job_id, follow=request.follow
        ):
            yield scheduler_pb2.LogChunk(data=chunk)
