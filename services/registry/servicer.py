"""gRPC servicer of the registry: protobuf in, domain call, protobuf out. Nothing else."""

from __future__ import annotations

from collections.abc import Iterable

import grpc

from plinth.registry.v1 import registry_pb2 as pb
from plinth.registry.v1 import registry_pb2_grpc
from plinth_common.prototime import to_timestamp
from services.registry.domain import (
    ModelQuery,
    ModelVersion,
    PolicyOutcome,
    PolicyRule,
    PolicyUpdate,
    PromotionPolicy,
    RegisteredModel,
    Run,
)
from services.registry.service import RegistryService


def run_to_proto(run: Run) -> pb.Run:
    """Domain run -> ``plinth.registry.v1.Run``."""
    return pb.Run(
        run_id=run.run_id,
        experiment_id=run.experiment_id,
        status=run.status,
        start_time=to_timestamp(run.start_time),
        end_time=to_timestamp(run.end_time),
        metrics=run.metrics,
        params=run.params,
        tags=run.tags,
        artifact_uri=run.artifact_uri,
    )


def policy_to_proto(policy: PromotionPolicy) -> pb.PromotionPolicy:
    """Domain policy -> ``plinth.registry.v1.PromotionPolicy``."""
    return pb.PromotionPolicy(
        rules=[
            pb.PolicyRule(metric=r.metric, op=r.op, threshold=r.threshold) for r in policy.rules
        ],
        require_approval=policy.require_approval,
        aliases=list(policy.aliases),
    )


def policy_from_proto(policy: pb.PromotionPolicy) -> PromotionPolicy:
    """``plinth.registry.v1.PromotionPolicy`` -> domain policy (validated by the service)."""
    return PromotionPolicy(
        rules=_rules_from_proto(policy.rules),
        require_approval=policy.require_approval,
        aliases=tuple(policy.aliases),
    )


def _rules_from_proto(rules: Iterable[pb.PolicyRule]) -> tuple[PolicyRule, ...]:
    return tuple(PolicyRule(metric=r.metric, op=r.op, threshold=r.threshold) for r in rules)


def update_from_proto(update: pb.PolicyUpdate) -> PolicyUpdate:
    """``plinth.registry.v1.PolicyUpdate`` -> domain change (validated by the service)."""
    return PolicyUpdate(
        add_rules=_rules_from_proto(update.add_rules),
        remove_rule_metrics=tuple(update.remove_rule_metrics),
        require_approval=(update.require_approval if update.HasField("require_approval") else None),
        aliases=tuple(update.aliases.aliases) if update.HasField("aliases") else None,
    )


def model_to_proto(model: RegisteredModel) -> pb.RegisteredModel:
    """Domain registered model -> ``plinth.registry.v1.RegisteredModel``."""
    return pb.RegisteredModel(
        name=model.name,
        team=model.team,
        description=model.description,
        tags=model.user_tags(),
        aliases=model.aliases,
        latest_version=model.latest_version,
        policy=policy_to_proto(model.policy),
    )


def version_to_proto(version: ModelVersion) -> pb.ModelVersion:
    """Domain model version -> ``plinth.registry.v1.ModelVersion``."""
    return pb.ModelVersion(
        name=version.name,
        version=version.version,
        team=version.team,
        run_id=version.run_id,
        source=version.source,
        status=version.status,
        aliases=list(version.aliases),
        tags=version.tags,
        metrics=version.metrics,
        created_at=to_timestamp(version.created_at),
        model_id=version.model_id,
    )


class RegistryServicer(registry_pb2_grpc.RegistryServiceServicer):
    """Serves ``plinth.registry.v1.RegistryService`` from a :class:`RegistryService`."""

    def __init__(self, service: RegistryService) -> None:
        self._service = service

    async def GetRun(self, request: pb.GetRunRequest, context: grpc.aio.ServicerContext) -> pb.Run:
        return run_to_proto(await self._service.get_run(request.run_id))

    async def ListRuns(
        self, request: pb.ListRunsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListRunsResponse:
        runs, token = await self._service.list_runs(
            experiment_ids=list(request.experiment_ids),
            filter_string=request.filter,
            page_size=request.page_size,
            page_token=request.page_token,
        )
        return pb.ListRunsResponse(runs=[run_to_proto(r) for r in runs], next_page_token=token)

    async def CreateModelVersion(
        self, request: pb.CreateModelVersionRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelVersion:
        version = await self._service.create_version(
            name=request.name,
            team=request.team,
            run_id=request.run_id,
            artifact_path=request.artifact_path,
            tags=dict(request.tags),
            model_tags=dict(request.model_tags),
        )
        return version_to_proto(version)

    async def GetModelVersion(
        self, request: pb.GetModelVersionRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelVersion:
        return version_to_proto(await self._service.get_version(request.name, request.version))

    async def GetModelVersionByAlias(
        self, request: pb.GetModelVersionByAliasRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelVersion:
        return version_to_proto(await self._service.version_by_alias(request.name, request.alias))

    async def ListModelVersions(
        self, request: pb.ListModelVersionsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListModelVersionsResponse:
        versions, token = await self._service.list_versions(
            request.name, page_size=request.page_size, page_token=request.page_token
        )
        return pb.ListModelVersionsResponse(
            versions=[version_to_proto(v) for v in versions], next_page_token=token
        )

    async def SearchModels(
        self, request: pb.SearchModelsRequest, context: grpc.aio.ServicerContext
    ) -> pb.SearchModelsResponse:
        query = ModelQuery(
            name_prefix=request.name_prefix, team=request.team, tags=dict(request.tags)
        )
        models, token = await self._service.search_models(
            query, page_size=request.page_size, page_token=request.page_token
        )
        return pb.SearchModelsResponse(
            models=[model_to_proto(m) for m in models], next_page_token=token
        )

    async def SetAlias(
        self, request: pb.SetAliasRequest, context: grpc.aio.ServicerContext
    ) -> pb.SetAliasResponse:
        promotion = await self._service.set_alias(
            name=request.name,
            alias=request.alias,
            version=request.version,
            approved=request.approved,
            team=request.team,
        )
        return pb.SetAliasResponse(
            version=version_to_proto(promotion.version), previous_version=promotion.previous_version
        )

    async def DeleteAlias(
        self, request: pb.DeleteAliasRequest, context: grpc.aio.ServicerContext
    ) -> pb.DeleteAliasResponse:
        previous = await self._service.delete_alias(
            name=request.name, alias=request.alias, team=request.team
        )
        return pb.DeleteAliasResponse(previous_version=previous)

    async def GetPolicy(
        self, request: pb.GetPolicyRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetPolicyResponse:
        outcome = await self._service.get_policy(request.name)
        return pb.GetPolicyResponse(
            model=model_to_proto(outcome.model), warnings=list(outcome.warnings)
        )

    async def SetPolicy(
        self, request: pb.SetPolicyRequest, context: grpc.aio.ServicerContext
    ) -> pb.SetPolicyResponse:
        outcome: PolicyOutcome
        if request.WhichOneof("change") == "update":
            outcome = await self._service.update_policy(
                name=request.name, update=update_from_proto(request.update), team=request.team
            )
        else:  # no change at all is the empty policy, which removes it (as before updates)
            outcome = await self._service.set_policy(
                name=request.name, policy=policy_from_proto(request.policy), team=request.team
            )
        return pb.SetPolicyResponse(
            model=model_to_proto(outcome.model), warnings=list(outcome.warnings)
        )
