"""gRPC servicer of the scheduler: protobuf in, domain call (with the verified caller), protobuf
out. Nothing else."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from plinth.scheduler.v1 import scheduler_pb2, scheduler_pb2_grpc
from plinth_common.auth import current_principal
from plinth_common.errors import InvalidArgument
from plinth_common.prototime import to_timestamp
from services.scheduler.domain import (
    Attempt,
    EndReason,
    Job,
    JobSpec,
    JobState,
    PendingInfo,
    Resources,
    RetryPolicy,
    right_sizing_hint,
)
from services.scheduler.queueing.report import QueueReport
from services.scheduler.service import QueueConfigView, QueueView, SchedulerService


def _resources(resources: Resources) -> scheduler_pb2.Resources:
    return scheduler_pb2.Resources(
        cpu=resources.cpu, memory_bytes=resources.memory_bytes, gpu=resources.gpu
    )


def _end_reason(reason: EndReason | None) -> int:
    if reason is None:
        return scheduler_pb2.END_REASON_UNSPECIFIED
    return scheduler_pb2.EndReason.Value(f"END_REASON_{reason.name}")


def attempt_to_proto(attempt: Attempt) -> scheduler_pb2.Attempt:
    """Domain attempt -> ``plinth.scheduler.v1.Attempt``."""
    return scheduler_pb2.Attempt(
        number=attempt.number,
        flavor=attempt.flavor,
        admitted_at=to_timestamp(attempt.admitted_at),
        started_at=to_timestamp(attempt.started_at),
        finished_at=to_timestamp(attempt.finished_at),
        end_reason=_end_reason(attempt.end_reason),
        exit_code=attempt.exit_code,
        signal=attempt.signal,
        message=attempt.message,
        queue_wait_seconds=attempt.queue_wait_s,
        run_seconds=attempt.run_s,
        requested=_resources(attempt.requested),
        peak_memory_bytes=attempt.peak_memory_bytes,
        cpu_seconds=attempt.cpu_seconds,
    )


def pending_to_proto(info: PendingInfo) -> scheduler_pb2.PendingInfo:
    """Where a queued job stands -> ``plinth.scheduler.v1.PendingInfo``."""
    return scheduler_pb2.PendingInfo(
        position_in_queue=info.position_in_queue,
        position_in_cohort=info.position_in_cohort,
        reason=info.reason,
        estimated_start=to_timestamp(info.estimated_start),
        estimate_basis=info.estimate_basis,
    )


def job_to_proto(job: Job) -> scheduler_pb2.Job:
    """Domain job -> ``plinth.scheduler.v1.Job``."""
    spec = job.spec
    attempts = job.all_attempts()
    current = attempts[-1] if attempts else None
    retry = spec.retry
    return scheduler_pb2.Job(
        id=job.id,
        spec=scheduler_pb2.JobSpec(
            name=spec.name,
            team=spec.team,
            entrypoint=list(spec.entrypoint),
            working_dir=spec.working_dir,
            env=dict(spec.env),
            resources=_resources(spec.resources),
            register_as=spec.register_as,
            priority=spec.priority,
            replicas=spec.replicas,
            max_run_time_seconds=spec.max_run_time_s,
            retry=scheduler_pb2.RetryPolicy(
                user_failure_limit=retry.user_failure_limit,
                infrastructure_failure_limit=retry.infrastructure_failure_limit,
                backoff_initial_seconds=retry.backoff_initial_s,
                backoff_max_seconds=retry.backoff_max_s,
            ),
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
        queue=job.queue,
        flavor=job.flavor,
        priority=job.priority,
        priority_value=job.priority_value,
        attempt=job.attempt,
        attempts=[attempt_to_proto(a) for a in attempts],
        pending=pending_to_proto(job.pending)
        if job.pending is not None and job.state is JobState.QUEUED
        else None,
        right_sizing_hint=right_sizing_hint(job.attempts),
        admitted_at=to_timestamp(job.admitted_at),
        queue_wait_seconds=current.queue_wait_s if current is not None else 0.0,
    )


def spec_from_proto(spec: scheduler_pb2.JobSpec) -> JobSpec:
    """``plinth.scheduler.v1.JobSpec`` -> domain spec (validation happens in the service).

    Unset retry fields take :class:`RetryPolicy`'s defaults.
    """
    defaults, retry = RetryPolicy(), spec.retry
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
        priority=spec.priority,
        replicas=spec.replicas,
        max_run_time_s=spec.max_run_time_seconds,
        retry=RetryPolicy(
            user_failure_limit=retry.user_failure_limit
            if retry.HasField("user_failure_limit")
            else defaults.user_failure_limit,
            infrastructure_failure_limit=retry.infrastructure_failure_limit
            if retry.HasField("infrastructure_failure_limit")
            else defaults.infrastructure_failure_limit,
            backoff_initial_s=retry.backoff_initial_seconds
            if retry.HasField("backoff_initial_seconds")
            else defaults.backoff_initial_s,
            backoff_max_s=retry.backoff_max_seconds
            if retry.HasField("backoff_max_seconds")
            else defaults.backoff_max_s,
        ),
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


def queue_status_to_proto(view: QueueView) -> scheduler_pb2.QueueStatus:
    """What a caller may see of the queues -> ``plinth.scheduler.v1.QueueStatus``."""
    report: QueueReport = view.report
    queues = [
        scheduler_pb2.ClusterQueueStatus(
            name=queue.name,
            cohort=queue.cohort,
            teams=list(queue.teams),
            usage=[
                scheduler_pb2.QuotaUsage(
                    flavor=usage.flavor,
                    resource=usage.resource,
                    nominal=usage.nominal,
                    used=usage.usage,
                    borrowed=usage.borrowed,
                    lent=usage.lent,
                )
                for usage in queue.resources
            ],
            pending=queue.pending,
            admitted=queue.admitted,
        )
        for queue in report.queues
    ]
    pending = []
    for entry in report.pending:
        job = view.jobs.get(entry.job_id)
        pending.append(
            scheduler_pb2.PendingJob(
                job_id=entry.job_id,
                name=job.name if job is not None else "",
                team=entry.team,
                queue=entry.queue,
                priority=job.priority if job is not None else "",
                info=pending_to_proto(
                    PendingInfo(
                        position_in_queue=entry.position_in_queue,
                        position_in_cohort=entry.position_in_cohort,
                        reason=entry.reason,
                        estimated_start=entry.estimated_start,
                        estimate_basis=entry.estimate_basis,
                    )
                ),
            )
        )
    return scheduler_pb2.QueueStatus(queues=queues, pending=pending)


def config_to_proto(view: QueueConfigView) -> scheduler_pb2.QueueConfigInfo:
    """A queue configuration -> ``plinth.scheduler.v1.QueueConfigInfo``."""
    return scheduler_pb2.QueueConfigInfo(
        version=view.version,
        document=view.document,
        applied_at=to_timestamp(view.applied_at),
        applied_by=view.applied_by,
        warnings=list(view.warnings),
    )


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

    async def GetQueue(
        self, request: scheduler_pb2.GetQueueRequest, context: grpc.aio.ServicerContext
    ) -> scheduler_pb2.QueueStatus:
        view = await self._service.queue_status(current_principal(), team=request.team)
        return queue_status_to_proto(view)

    async def ApplyQueueConfig(
        self, request: scheduler_pb2.ApplyQueueConfigRequest, context: grpc.aio.ServicerContext
    ) -> scheduler_pb2.QueueConfigInfo:
        view = await self._service.apply_queue_config(
            current_principal(), request.document, dry_run=request.dry_run
        )
        return config_to_proto(view)

    async def GetQueueConfig(
        self, request: scheduler_pb2.GetQueueConfigRequest, context: grpc.aio.ServicerContext
    ) -> scheduler_pb2.QueueConfigInfo:
        return config_to_proto(await self._service.queue_config(current_principal()))
