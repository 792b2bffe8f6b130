"""gRPC servicer of the registry: protobuf in, domain call, protobuf out. Nothing else."""

from __future__ import annotations

from collections.abc import Iterable

import grpc

from plinth.registry.v1 import registry_pb2 as pb
from plinth.registry.v1 import registry_pb2_grpc
from plinth_common.auth.grpc_auth import current_principal
from plinth_common.prototime import to_timestamp
from services.registry.domain import (
    Approval,
    ModelQuery,
    ModelVersion,
    PolicyOutcome,
    PolicyRule,
    PolicyUpdate,
    PromotionPolicy,
    PromotionRecord,
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
        require_distinct_approver=policy.require_distinct_approver,
    )


def policy_from_proto(policy: pb.PromotionPolicy) -> PromotionPolicy:
    """``plinth.registry.v1.PromotionPolicy`` -> domain policy (validated by the service)."""
    return PromotionPolicy(
        rules=_rules_from_proto(policy.rules),
        require_approval=policy.require_approval,
        aliases=tuple(policy.aliases),
        require_distinct_approver=policy.require_distinct_approver,
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
        require_distinct_approver=(
            update.require_distinct_approver
            if update.HasField("require_distinct_approver")
            else None
        ),
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
        approvals=[approval_to_proto(a) for a in version.approvals],
        history=[promotion_to_proto(p) for p in version.history],
    )


def approval_to_proto(approval: Approval) -> pb.Approval:
    """Domain approval -> ``plinth.registry.v1.Approval``."""
    return pb.Approval(
        alias=approval.alias,
        approved_by=approval.approved_by,
        approved_at=to_timestamp(approval.approved_at),
        comment=approval.comment,
    )


def promotion_to_proto(record: PromotionRecord) -> pb.Promotion:
    """Domain promotion record -> ``plinth.registry.v1.Promotion``."""
    return pb.Promotion(
        alias=record.alias,
        promoted_by=record.promoted_by,
        approved_by=record.approved_by,
        promoted_at=to_timestamp(record.promoted_at),
        previous_version=record.previous_version,
    )


class RegistryServicer(registry_pb2_grpc.RegistryServiceServicer):
    """Serves ``plinth.registry.v1.RegistryService`` from a :class:`RegistryService`."""

    def __init__(self, service: RegistryService) -> None:
        self._service = service

    async def GetRun(self, request: pb.GetRunRequest, context: grpc.aio.ServicerContext) -> pb.Run:
        return run_to_proto(await self._service.get_run(current_principal(), request.run_id))

    async def ListRuns(
        self, request: pb.ListRunsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListRunsResponse:
        runs, token = await self._service.list_runs(
            current_principal(),
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
            current_principal(),
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
        version = await self._service.get_version(
            current_principal(), request.name, request.version
        )
        return version_to_proto(version)

    async def GetModelVersionByAlias(
        self, request: pb.GetModelVersionByAliasRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelVersion:
        version = await self._service.version_by_alias(
            current_principal(), request.name, request.alias
        )
        return version_to_proto(version)

    async def ListModelVersions(
        self, request: pb.ListModelVersionsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListModelVersionsResponse:
        versions, token = await self._service.list_versions(
            current_principal(),
            request.name,
            page_size=request.page_size,
            page_token=request.page_token,
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
            current_principal(), query, page_size=request.page_size, page_token=request.page_token
        )
        return pb.SearchModelsResponse(
            models=[model_to_proto(m) for m in models], next_page_token=token
        )

    async def SetAlias(
        self, request: pb.SetAliasRequest, context: grpc.aio.ServicerContext
    ) -> pb.SetAliasResponse:
        promotion = await self._service.set_alias(
            current_principal(),
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
            current_principal(), name=request.name, alias=request.alias, team=request.team
        )
        return pb.DeleteAliasResponse(previous_version=previous)

    async def GetPolicy(
        self, request: pb.GetPolicyRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetPolicyResponse:
        outcome = await self._service.get_policy(current_principal(), request.name)
        return pb.GetPolicyResponse(
            model=model_to_proto(outcome.model), warnings=list(outcome.warnings)
        )

    async def SetPolicy(
        self, request: pb.SetPolicyRequest, context: grpc.aio.ServicerContext
    ) -> pb.SetPolicyResponse:
        outcome: PolicyOutcome
        if request.WhichOneof("change") == "update":
            outcome = await self._service.update_policy(
                current_principal(),
                name=request.name,
                update=update_from_proto(request.update),
                team=request.team,
            )
        else:  # no change at all is the empty policy, which removes it (as before updates)
            outcome = await self._service.set_policy(
                current_principal(),
                name=request.name,
                policy=policy_from_proto(request.policy),
                team=request.team,
            )
        return pb.SetPolicyResponse(
            model=model_to_proto(outcome.model), warnings=list(outcome.warnings)
        )

    async def ApproveModelVersion(
        self, request: pb.ApproveModelVersionRequest, context: grpc.aio.ServicerContext
    ) -> pb.ApproveModelVersionResponse:
        version, approval = await self._service.approve(
            current_principal(),
            name=request.name,
            version=request.version,
            alias=request.alias,
            comment=request.comment,
        )
        return pb.ApproveModelVersionResponse(
            version=version_to_proto(version), approval=approval_to_proto(approval)
        )

    async def GetTeamCredentials(
        self, request: pb.GetTeamCredentialsRequest, context: grpc.aio.ServicerContext
    ) -> pb.TeamCredentials:
        found = await self._service.team_credentials(current_principal(), request.team)
        return pb.TeamCredentials(team=found.team, username=found.username, password=found.password)
