"""Registered models, versions, aliases, promotion policies and runs: ``plinth.models``,
``plinth.runs``.

Example:
    >>> from plinth_sdk import Plinth
    >>> with Plinth() as plinth:
    ...     plinth.models.set_policy("diabetes", ["rmse < 60"], require_approval=True)
    ...     plinth.models.update_policy("diabetes", add_rules=["r2 >= 0.4"])  # keeps the rest
    ...     plinth.models.promote("diabetes", "3", approved=True)
    ...     # four-eyes: a second maintainer approves, then the first one promotes
    ...     plinth.models.update_policy("diabetes", require_distinct_approver=True)
    ...     plinth.models.approve("diabetes", "4", alias="production", comment="reviewed")
"""

from __future__ import annotations

import builtins
from collections.abc import Callable, Iterable, Iterator, Mapping

from plinth.registry.v1 import registry_pb2, registry_pb2_grpc
from plinth_common import names
from plinth_common.names import DEFAULT_ALIAS
from plinth_sdk.errors import NotFound, refused_locally
from plinth_sdk.models import (
    ModelVersion,
    PolicyReport,
    PolicyRule,
    Promotion,
    PromotionPolicy,
    RegisteredModel,
    Run,
    VersionApproval,
)
from plinth_sdk.paging import check_page_size, paged
from plinth_sdk.transport import Transport

__all__ = ["DEFAULT_ALIAS", "ModelsAPI", "RunsAPI"]

_MAX_VERSIONS_PAGE = 200  # the registry's bound for versions (models: the common 500)


class ModelsAPI:
    """Registered models and their versions: ``plinth.models``.

    Args:
        transport: The connection to the gateway.
    """

    def __init__(self, transport: Transport) -> None:
        self._transport = transport
        self._stub = transport.stub(registry_pb2_grpc.RegistryServiceStub)

    # ----------------------------------------------------------------- models

    def list(
        self,
        *,
        team: str | None = None,
        prefix: str | None = None,
        tags: Mapping[str, str] | None = None,
        page_size: int = 50,
    ) -> builtins.list[RegisteredModel]:
        """Returns the first page of registered models, by name; see :meth:`iter`.

        Args:
            team: Only this team's models.
            prefix: Only names starting with this.
            tags: Only models carrying all these tags.
            page_size: Models per page, 1 to 500.
        """
        models, _ = self._search_page(team, prefix, tags, page_size)("")
        return models

    def iter(
        self,
        *,
        team: str | None = None,
        prefix: str | None = None,
        tags: Mapping[str, str] | None = None,
        page_size: int = 100,
    ) -> Iterator[RegisteredModel]:
        """Yields every matching registered model, fetching pages as needed."""
        return paged(self._search_page(team, prefix, tags, page_size))

    search = iter
    """Alias of :meth:`iter`."""

    def get(self, name: str) -> RegisteredModel:
        """Returns one registered model, with its aliases and promotion policy.

        Raises:
            NotFound: no model has this name.
        """
        for model in self.iter(prefix=name):
            if model.name == name:
                return model
        raise NotFound("NOT_FOUND", f"registered model {name!r} not found")

    # ----------------------------------------------------------------- versions

    def versions(self, name: str, *, page_size: int = 100) -> builtins.list[ModelVersion]:
        """Returns every version of a model, newest first.

        Raises:
            NotFound: no model has this name.
        """
        return builtins.list(self.iter_versions(name, page_size=page_size))

    def iter_versions(self, name: str, *, page_size: int = 100) -> Iterator[ModelVersion]:
        """Yields the versions of a model, newest first, fetching pages as needed."""
        check_page_size(page_size, maximum=_MAX_VERSIONS_PAGE)

        def fetch(token: str) -> tuple[builtins.list[ModelVersion], str]:
            request = registry_pb2.ListModelVersionsRequest(
                name=name, page_size=page_size, page_token=token
            )
            response = self._transport.unary(self._stub.ListModelVersions, request)
            versions = [ModelVersion.from_proto(v) for v in response.versions]
            return versions, response.next_page_token

        return paged(fetch)

    def get_version(self, name: str, version: str | int) -> ModelVersion:
        """Returns one version.

        Raises:
            NotFound: the model or the version does not exist.
        """
        request = registry_pb2.GetModelVersionRequest(name=name, version=str(version))
        return ModelVersion.from_proto(self._transport.unary(self._stub.GetModelVersion, request))

    def get_by_alias(self, name: str, *, alias: str = DEFAULT_ALIAS) -> ModelVersion:
        """Returns the version an alias points to.

        Raises:
            NotFound: the model or the alias does not exist.
        """
        request = registry_pb2.GetModelVersionByAliasRequest(name=name, alias=alias)
        return ModelVersion.from_proto(
            self._transport.unary(self._stub.GetModelVersionByAlias, request)
        )

    def create_version(
        self,
        name: str,
        *,
        team: str,
        run_id: str,
        artifact_path: str = "model",
        tags: Mapping[str, str] | None = None,
        model_tags: Mapping[str, str] | None = None,
    ) -> ModelVersion:
        """Registers the model a run logged as a new version.

        Creates the registered model, owned by ``team``, if it does not exist yet.

        Args:
            name: Registered model name.
            team: Owning team.
            run_id: The MLflow run that logged the model.
            artifact_path: The name the run logged the model under.
            tags: Tags of the version (``plinth.*`` keys are reserved).
            model_tags: Tags of the registered model (``list(tags=...)`` filters on them).

        Raises:
            NotFound: the run, or the model it logged, does not exist.
            PermissionDenied: the model exists and belongs to another team.
        """
        request = registry_pb2.CreateModelVersionRequest(
            name=name,
            team=team,
            run_id=run_id,
            artifact_path=artifact_path,
            tags=dict(tags or {}),
            model_tags=dict(model_tags or {}),
        )
        return ModelVersion.from_proto(
            self._transport.unary(self._stub.CreateModelVersion, request)
        )

    # ----------------------------------------------------------------- aliases and policy

    def promote(
        self,
        name: str,
        version: str | int,
        *,
        alias: str = DEFAULT_ALIAS,
        approved: bool = False,
        team: str | None = None,
    ) -> Promotion:
        """Points an alias at a version (deployments following the alias then load it).

        Args:
            name: Registered model name.
            version: The version to promote.
            alias: The alias to move; ``"production"`` by default.
            approved: The caller's approval, needed when the policy requires one.
            team: When given, the model must belong to this team.

        Raises:
            ApprovalRequired: the policy requires approval; promote with ``approved=True``.
            PolicyViolation: a policy rule does not hold; the message names it.
            InvalidArgument: the name, version or alias is malformed (checked before sending).
            NotFound: the model or the version does not exist.
        """
        with refused_locally():
            names.check_model_name(name)
            names.check_version(str(version))
            names.check_alias(alias)
        request = registry_pb2.SetAliasRequest(
            name=name, alias=alias, version=str(version), approved=approved, team=team or ""
        )
        return Promotion.from_proto(self._transport.unary(self._stub.SetAlias, request))

    def approve(
        self, name: str, version: str | int, *, alias: str = DEFAULT_ALIAS, comment: str = ""
    ) -> VersionApproval:
        """Records the caller's approval of a version for an alias (a maintainer of the model's
        team). A policy that requires approval then lets the alias move to this version; with
        four-eyes (``require_distinct_approver``) only someone else's promotion counts it.

        Args:
            name: Registered model name.
            version: The version approved.
            alias: The alias it is approved for; ``"production"`` by default.
            comment: Why, kept with the approval.

        Returns:
            The approval, and the version with every approval it has.

        Raises:
            InvalidArgument: the name, version or alias is malformed (checked before sending).
            NotFound: the model or the version does not exist (or is another team's).
            PermissionDenied: the caller is not a maintainer of the model's team.
        """
        with refused_locally():
            names.check_model_name(name)
            names.check_version(str(version))
            names.check_alias(alias)
        request = registry_pb2.ApproveModelVersionRequest(
            name=name, version=str(version), alias=alias, comment=comment
        )
        return VersionApproval.from_proto(
            self._transport.unary(self._stub.ApproveModelVersion, request)
        )

    def delete_alias(self, name: str, alias: str, *, team: str | None = None) -> str:
        """Removes an alias and returns the version it pointed to.

        Raises:
            NotFound: the model or the alias does not exist.
        """
        request = registry_pb2.DeleteAliasRequest(name=name, alias=alias, team=team or "")
        response = self._transport.unary(self._stub.DeleteAlias, request)
        return str(response.previous_version)

    def set_policy(
        self,
        name: str,
        rules: Iterable[str | PolicyRule] = (),
        *,
        require_approval: bool = False,
        aliases: Iterable[str] = (),
        team: str | None = None,
        require_distinct_approver: bool = False,
    ) -> PolicyReport:
        """Replaces a model's whole promotion policy; no rules and no approval removes it.

        What is not passed is not kept: ``set_policy("m", ["rmse < 70"])`` turns off a
        required approval. To change one part and keep the rest, use :meth:`update_policy`.

        Args:
            name: Registered model name.
            rules: Rules such as ``"rmse < 60"`` or :class:`PolicyRule` values; all must hold
                on a version's run metrics for it to be promoted.
            require_approval: Promotions must pass ``approved=True``.
            aliases: The aliases the policy guards; empty guards every alias.
            team: When given, the model must belong to this team.
            require_distinct_approver: Four-eyes: the approval must be recorded by someone
                other than the promoter (:meth:`approve`).

        Returns:
            The model with its new policy, and the registry's warnings (e.g. a rule on a
            metric no version of the model has).

        Raises:
            ValueError: a rule is not ``METRIC OP THRESHOLD``; the message names it.
            InvalidArgument: an alias is malformed or reserved (checked before sending).
            NotFound: no model has this name.
        """
        guarded = _checked_aliases(aliases, "policy.aliases")
        policy = PromotionPolicy(
            rules=_parsed_rules(rules),
            require_approval=require_approval,
            aliases=guarded,
            require_distinct_approver=require_distinct_approver,
        )
        request = registry_pb2.SetPolicyRequest(
            name=name, policy=policy.to_proto(), team=team or ""
        )
        return PolicyReport.from_proto(self._transport.unary(self._stub.SetPolicy, request))

    def update_policy(
        self,
        name: str,
        *,
        add_rules: Iterable[str | PolicyRule] = (),
        remove_rules: Iterable[str] = (),
        require_approval: bool | None = None,
        aliases: Iterable[str] | None = None,
        team: str | None = None,
        require_distinct_approver: bool | None = None,
    ) -> PolicyReport:
        """Changes part of a model's promotion policy; what is not passed stays as it is.

        The registry applies the change to the stored policy (removals first, then additions),
        so concurrent changes do not undo each other. A policy left with no rule and no
        approval requirement is removed.

        Args:
            name: Registered model name.
            add_rules: Rules to add, such as ``"rmse < 60"``; one on a metric that has a rule
                with the same operator replaces that rule.
            remove_rules: Metric names whose rules are removed.
            require_approval: The new approval requirement; None keeps it.
            aliases: The new guarded aliases (empty: every alias); None keeps them.
            team: When given, the model must belong to this team.
            require_distinct_approver: Four-eyes on (the approval must come from someone
                other than the promoter) or off; None keeps it.

        Returns:
            The model with its whole policy after the change, and the registry's warnings
            (e.g. a rule on a metric no version has, or a removal that found no rule).

        Raises:
            ValueError: a rule is not ``METRIC OP THRESHOLD``; the message names it.
            InvalidArgument: an alias is malformed or reserved (checked before sending).
            NotFound: no model has this name.
        """
        update = registry_pb2.PolicyUpdate(
            add_rules=[rule.to_proto() for rule in _parsed_rules(add_rules)],
            remove_rule_metrics=[remove_rules] if isinstance(remove_rules, str) else remove_rules,
        )
        if require_approval is not None:
            update.require_approval = require_approval
        if require_distinct_approver is not None:
            update.require_distinct_approver = require_distinct_approver
        if aliases is not None:
            guarded = _checked_aliases(aliases, "update.aliases")
            update.aliases.CopyFrom(registry_pb2.GuardedAliases(aliases=guarded))
        request = registry_pb2.SetPolicyRequest(name=name, update=update, team=team or "")
        return PolicyReport.from_proto(self._transport.unary(self._stub.SetPolicy, request))

    def get_policy(self, name: str) -> PromotionPolicy:
        """Returns a model's promotion policy (empty when none is set).

        Raises:
            NotFound: no model has this name.
        """
        return self.describe_policy(name).policy

    def describe_policy(self, name: str) -> PolicyReport:
        """Returns a model's promotion policy with the registry's warnings about it.

        Raises:
            NotFound: no model has this name.
        """
        request = registry_pb2.GetPolicyRequest(name=name)
        return PolicyReport.from_proto(self._transport.unary(self._stub.GetPolicy, request))

    def _search_page(
        self,
        team: str | None,
        prefix: str | None,
        tags: Mapping[str, str] | None,
        page_size: int,
    ) -> Callable[[str], tuple[builtins.list[RegisteredModel], str]]:
        check_page_size(page_size)

        def fetch(token: str) -> tuple[builtins.list[RegisteredModel], str]:
            request = registry_pb2.SearchModelsRequest(
                name_prefix=prefix or "",
                team=team or "",
                tags=dict(tags or {}),
                page_size=page_size,
                page_token=token,
            )
            response = self._transport.unary(self._stub.SearchModels, request)
            models = [RegisteredModel.from_proto(model) for model in response.models]
            return models, response.next_page_token

        return fetch


def _parsed_rules(rules: Iterable[str | PolicyRule]) -> tuple[PolicyRule, ...]:
    if isinstance(rules, str | PolicyRule):
        rules = [rules]  # one rule given bare
    return tuple(PolicyRule.parse(rule) for rule in rules)


def _checked_aliases(aliases: Iterable[str], field: str) -> tuple[str, ...]:
    guarded = (aliases,) if isinstance(aliases, str) else tuple(aliases)
    with refused_locally():
        for alias in guarded:
            names.check_alias(alias, field)
    return guarded


class RunsAPI:
    """MLflow tracking runs, through the registry: ``plinth.runs``.

    Args:
        transport: The connection to the gateway.
    """

    def __init__(self, transport: Transport) -> None:
        self._transport = transport
        self._stub = transport.stub(registry_pb2_grpc.RegistryServiceStub)

    def get(self, run_id: str) -> Run:
        """Returns one run with its metrics, parameters and tags.

        Raises:
            NotFound: no run has this id.
        """
        return Run.from_proto(
            self._transport.unary(self._stub.GetRun, registry_pb2.GetRunRequest(run_id=run_id))
        )

    def iter(
        self,
        *,
        experiment_ids: Iterable[str] = (),
        filter: str = "",
        page_size: int = 100,
    ) -> Iterator[Run]:
        """Yields runs, e.g. ``filter="metrics.rmse < 60"``, fetching pages as needed."""
        experiments = builtins.list(experiment_ids)
        check_page_size(page_size)

        def fetch(token: str) -> tuple[builtins.list[Run], str]:
            request = registry_pb2.ListRunsRequest(
                experiment_ids=experiments, filter=filter, page_size=page_size, page_token=token
            )
            response = self._transport.unary(self._stub.ListRuns, request)
            return [Run.from_proto(run) for run in response.runs], response.next_page_token

        return paged(fetch)
