"""gRPC servicer of ``plinth.serving.v1.ServingService``: protobuf in, domain call, protobuf out."""

from __future__ import annotations

from collections.abc import Mapping

import grpc

from plinth.serving.v1 import serving_pb2, serving_pb2_grpc
from plinth_common.auth import current_principal
from plinth_common.prototime import to_timestamp
from services.serving.domain import (
    BatchingSettings,
    Deployment,
    DeploymentSpec,
    Limits,
    Slo,
)
from services.serving.service import ServingService
from services.serving.traffic import WindowStats


def _version_traffic(
    deployment: Deployment, measured: Mapping[str, WindowStats | None]
) -> list[serving_pb2.VersionTraffic]:
    shown = []
    for version, percent in deployment.traffic.items():
        stats = measured.get(version)
        row = serving_pb2.VersionTraffic(
            version=version, percent=percent, canary=version != deployment.serving_version
        )
        if stats is not None:
            row.measured = True
            row.requests_per_second = stats.rate
            row.error_rate_percent = stats.error_rate_pct
            row.p99_ms = stats.p99_ms
        shown.append(row)
    return shown


def deployment_to_proto(
    deployment: Deployment, measured: Mapping[str, WindowStats | None] | None = None
) -> serving_pb2.Deployment:
    """Domain deployment -> ``plinth.serving.v1.Deployment`` (with each version's traffic as
    the data plane ``measured`` it, when given)."""
    batching = deployment.batching
    pending = deployment.pending_traffic
    return serving_pb2.Deployment(
        name=deployment.name,
        team=deployment.team,
        model_name=deployment.model_name,
        alias=deployment.alias,
        triton=serving_pb2.TritonSettings(
            max_batch_size=batching.max_batch_size,
            max_queue_delay_microseconds=batching.max_queue_delay_us,
            instance_count=batching.instance_count,
        ),
        state=serving_pb2.DeploymentState.Value(f"DEPLOYMENT_STATE_{deployment.state.value}"),
        serving_version=deployment.serving_version,
        loading_version=deployment.loading_version,
        target_version=deployment.target_version,
        last_error=deployment.last_error,
        shared_with=deployment.shared_with,
        traffic=_version_traffic(deployment, measured or {}),
        pending_traffic=[
            serving_pb2.TrafficShare(version=v, percent=p)
            for v, p in (pending.split if pending else ())
        ],
        slo=serving_pb2.Slo(
            max_error_rate_percent=deployment.slo.max_error_rate_pct,
            max_p99_ms=deployment.slo.max_p99_ms,
            window_seconds=deployment.slo.window_s,
        ),
        limits=serving_pb2.Limits(
            max_concurrency=deployment.limits.max_concurrency,
            max_queue=deployment.limits.max_queue,
        ),
        created_at=to_timestamp(deployment.created_at),
        updated_at=to_timestamp(deployment.updated_at),
    )


def spec_from_proto(request: serving_pb2.CreateDeploymentRequest) -> DeploymentSpec:
    """``CreateDeploymentRequest`` -> domain spec (validation happens in the service)."""
    return DeploymentSpec(
        name=request.name,
        team=request.team,
        model_name=request.model_name,
        alias=request.alias,
        shared_with=tuple(request.shared_with),
        slo=Slo(
            max_error_rate_pct=request.slo.max_error_rate_percent,
            max_p99_ms=request.slo.max_p99_ms,
            window_s=request.slo.window_seconds,
        ),
        limits=Limits(
            max_concurrency=request.limits.max_concurrency, max_queue=request.limits.max_queue
        ),
        batching=BatchingSettings(
            max_batch_size=request.triton.max_batch_size,
            max_queue_delay_us=request.triton.max_queue_delay_microseconds,
            instance_count=request.triton.instance_count,
        ),
    )


class ServingServicer(serving_pb2_grpc.ServingServiceServicer):
    """Serves ``plinth.serving.v1.ServingService`` from a :class:`ServingService`."""

    def __init__(self, service: ServingService) -> None:
        self._service = service

    def _shown(self, deployment: Deployment) -> serving_pb2.Deployment:
        return deployment_to_proto(deployment, self._service.measured(deployment))

    async def CreateDeployment(
        self, request: serving_pb2.CreateDeploymentRequest, context: grpc.aio.ServicerContext
    ) -> serving_pb2.Deployment:
        created = await self._service.create(current_principal(), spec_from_proto(request))
        return deployment_to_proto(created)

    async def GetDeployment(
        self, request: serving_pb2.GetDeploymentRequest, context: grpc.aio.ServicerContext
    ) -> serving_pb2.Deployment:
        return self._shown(await self._service.get(current_principal(), request.name))

    async def ListDeployments(
        self, request: serving_pb2.ListDeploymentsRequest, context: grpc.aio.ServicerContext
    ) -> serving_pb2.ListDeploymentsResponse:
        found, token = await self._service.list(
            current_principal(),
            team=request.team,
            page_size=request.page_size,
            page_token=request.page_token,
        )
        return serving_pb2.ListDeploymentsResponse(
            deployments=[deployment_to_proto(d) for d in found], next_page_token=token
        )

    async def ShareDeployment(
        self, request: serving_pb2.ShareDeploymentRequest, context: grpc.aio.ServicerContext
    ) -> serving_pb2.Deployment:
        shared = await self._service.share(current_principal(), request.name, list(request.teams))
        return deployment_to_proto(shared)

    async def DeleteDeployment(
        self, request: serving_pb2.DeleteDeploymentRequest, context: grpc.aio.ServicerContext
    ) -> serving_pb2.DeleteDeploymentResponse:
        await self._service.delete(current_principal(), request.name)
        return serving_pb2.DeleteDeploymentResponse()

    async def SetTraffic(
        self, request: serving_pb2.SetTrafficRequest, context: grpc.aio.ServicerContext
    ) -> serving_pb2.Deployment:
        changed = await self._service.set_traffic(
            current_principal(),
            request.name,
            [(share.version, share.percent) for share in request.traffic],
            reason=request.reason,
        )
        return self._shown(changed)
