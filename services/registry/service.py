"""Registry domain logic: runs, registration (by RPC and from finished jobs), reads through a
small cache, promotion under a policy. Imports neither grpc nor nats.

Ownership: every registered model carries its team in the ``plinth.team`` tag; only that team
registers versions into it. Promotion policies live in the ``plinth.policy`` tag. Versions carry
lineage tags (``plinth.run_id``, ``plinth.job_id``, ``plinth.entrypoint``, ``plinth.metric.*``).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Protocol

from plinth_common.errors import FailedPrecondition, InvalidArgument, NotFound, PermissionDenied
from plinth_common.names import check_alias, check_model_name, check_team, check_version
from plinth_common.paging import check_page_size
from services.registry.cache import ReadCache
from services.registry.domain import (
    JOB_ID_TAG,
    METRIC_TAG_PREFIX,
    MODEL_ID_TAG,
    POLICY_TAG,
    TEAM_TAG,
    FinishedJob,
    LoggedModel,
    ModelQuery,
    ModelRef,
    ModelVersion,
    PolicyOutcome,
    PolicyUpdate,
    Promotion,
    PromotionPolicy,
    RegisteredModel,
    Run,
    check_artifact_path,
    check_experiment_ids,
    check_policy,
    check_run_id,
    check_tags,
    check_update,
    enforce_policy,
    lineage_tags,
    parse_model_uri,
    policy_warnings,
    update_warnings,
)
from services.registry.mlflow_store import MlflowModel, MlflowVersion, Page

log = logging.getLogger(__name__)

_LOCK_STRIPES = 64
# Each version on a page costs a run lookup for its metrics: a smaller page than elsewhere.
MAX_VERSIONS_PAGE = 200
# A policy's metric names are checked against the newest versions: their metric tags (written
# at registration), and their runs' metrics (logged later) for the newest few.
_CHECKED_VERSIONS = 200
_CHECKED_RUNS = 20
_NAME_PREFIX_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-")


class ModelStore(Protocol):
    """MLflow's tracking and registry store, as the registry uses it (``MlflowStore``).

    Reads return None for a missing object; errors are already Plinth's (Unavailable naming
    MLflow, InvalidArgument naming the field).
    """

    async def get_run(self, run_id: str) -> Run | None: ...

    async def search_runs(
        self,
        experiment_ids: Sequence[str],
        *,
        filter_string: str,
        max_results: int,
        page_token: str,
    ) -> Page: ...

    async def experiment_ids(self) -> list[str]: ...

    async def get_logged_model(self, model_id: str) -> LoggedModel | None: ...

    async def logged_models_of_run(self, run: Run, name: str) -> list[LoggedModel]: ...

    async def get_model(self, name: str) -> MlflowModel | None: ...

    async def create_model(self, name: str, tags: Mapping[str, str]) -> bool: ...

    async def search_models(
        self, filter_string: str, *, max_results: int, page_token: str
    ) -> Page: ...

    async def set_model_tag(self, name: str, key: str, value: str) -> None: ...

    async def delete_model_tag(self, name: str, key: str) -> None: ...

    async def get_version(self, name: str, version: str) -> MlflowVersion | None: ...

    async def version_by_alias(self, name: str, alias: str) -> MlflowVersion | None: ...

    async def search_versions(
        self,
        filter_string: str,
        *,
        max_results: int,
        page_token: str = "",
        newest_first: bool = True,
    ) -> Page: ...

    async def create_version(
        self, name: str, *, source: str, run_id: str, tags: Mapping[str, str]
    ) -> MlflowVersion: ...

    async def set_alias(self, name: str, alias: str, version: str) -> None: ...

    async def delete_alias(self, name: str, alias: str) -> None: ...


class ModelEvents(Protocol):
    """Records ``plinth.model.*`` events (in the outbox, in a short transaction of its own).

    Called after the MLflow write it reports, never around it: no transaction is open while
    MLflow works.
    """

    async def version_created(self, version: ModelVersion, *, job_id: str) -> None: ...

    async def promoted(self, promotion: Promotion) -> None: ...


class RegistryService:
    """Runs, registered models, versions, aliases and policies, on MLflow.

    Args:
        mlflow: MLflow's store.
        events: the ``plinth.model.*`` event recorder.
        cache: answers of hot reads (versions, aliases, searches); dropped on every write made
            here, so it only needs a short TTL for writes made behind the registry's back.
        facts: what the registry never changes itself and reads often: a model's owning team
            and a run's metrics. A longer TTL; not dropped by the registry's writes. Policy
            checks read metrics fresh.
    """

    def __init__(
        self,
        *,
        mlflow: ModelStore,
        events: ModelEvents,
        cache: ReadCache,
        facts: ReadCache,
    ) -> None:
        self._mlflow = mlflow
        self._events = events
        self._cache = cache
        self._facts = facts
        # Writes to one model are serialized in this process, so a promotion's "previous
        # version" and the duplicate-job check cannot interleave with another write.
        self._locks = [asyncio.Lock() for _ in range(_LOCK_STRIPES)]

    # -- runs ---------------------------------------------------------------------------------

    async def get_run(self, run_id: str) -> Run:
        """A run, read through from MLflow tracking.

        Raises:
            NotFound: MLflow has no such run.
        """
        run = await self._mlflow.get_run(check_run_id(run_id))
        if run is None:
            raise NotFound("run", run_id)
        return run

    async def list_runs(
        self, *, experiment_ids: Sequence[str], filter_string: str, page_size: int, page_token: str
    ) -> tuple[list[Run], str]:
        """Runs matching an MLflow filter (every active experiment when none is named)."""
        ids = check_experiment_ids(experiment_ids)
        limit = check_page_size(page_size)
        _check_page_token(page_token)
        if len(filter_string) > 4096:
            raise InvalidArgument("filter", "at most 4096 characters")
        ids = ids or await self._mlflow.experiment_ids()
        page = await self._mlflow.search_runs(
            ids, filter_string=filter_string, max_results=limit, page_token=page_token
        )
        return page.items, page.next_page_token

    # -- registration -------------------------------------------------------------------------

    async def create_version(
        self,
        *,
        name: str,
        team: str,
        run_id: str,
        artifact_path: str = "",
        tags: Mapping[str, str] | None = None,
        model_tags: Mapping[str, str] | None = None,
    ) -> ModelVersion:
        """Registers the model a run logged as a new version; emits ``model.version_created``.

        ``tags`` go on the version, ``model_tags`` on the registered model (created, owned by
        ``team``, when it does not exist).

        Raises:
            InvalidArgument: a malformed name, team, run id, path or tag.
            NotFound: no such run, or the run logged no model of that name.
            PermissionDenied: the registered model belongs to another team.
        """
        check_model_name(name)
        check_team(team)
        ref = ModelRef(
            run_id=check_run_id(run_id), artifact_path=check_artifact_path(artifact_path or "model")
        )
        user_tags = check_tags(tags or {})
        user_model_tags = check_tags(model_tags or {}, "model_tags")
        async with self._write_lock(name):
            try:
                version = await self._register(
                    name=name, team=team, ref=ref, extra_tags=user_tags, model_tags=user_model_tags
                )
            finally:
                self._cache.invalidate()
            await self._events.version_created(version, job_id="")
        return version

    async def register_finished_job(self, job: FinishedJob) -> ModelVersion | None:
        """Registers the model a finished job logged, if it asked to and succeeded.

        Idempotent: the version tagged with this job id, if one exists (an earlier delivery
        registered it, then failed to record its event), is returned instead of creating
        another. The caller records ``model.version_created`` for the version returned, in the
        transaction that marks the job's event as processed.

        Returns:
            The version (new or found), or None when there was nothing to register.
        """
        if not job.register_as:
            return None
        if not job.succeeded:
            log.info("job %s failed; nothing registered as %r", job.job_id, job.register_as)
            return None
        name = check_model_name(job.register_as, "register_as")
        team = check_team(job.team)
        ref = parse_model_uri(job.model_uri, run_id=job.mlflow_run_id)
        async with self._write_lock(name):
            try:
                version = await self._version_of_job(name, job.job_id)
                if version is None:
                    version = await self._register(
                        name=name, team=team, ref=ref, job_id=job.job_id, entrypoint=job.entrypoint
                    )
                else:
                    log.info(
                        "job %s already registered %s version %s; reusing it",
                        job.job_id,
                        name,
                        version.version,
                    )
            finally:
                self._cache.invalidate()
        log.info(
            "registered %s version %s from job %s (run %s)",
            name,
            version.version,
            job.job_id,
            version.run_id,
        )
        return version

    async def _register(
        self,
        *,
        name: str,
        team: str,
        ref: ModelRef,
        extra_tags: Mapping[str, str] | None = None,
        model_tags: Mapping[str, str] | None = None,
        job_id: str = "",
        entrypoint: Sequence[str] = (),
    ) -> ModelVersion:
        run, logged = await self._find_logged_model(ref)
        await self._ensure_owned(name, team, model_tags or {})
        tags = {
            **(extra_tags or {}),
            **lineage_tags(run=run, model=logged, job_id=job_id, entrypoint=entrypoint),
        }
        # The source is the logged model's artifact location (``mlflow-artifacts:/...``), which
        # anyone downloads through the tracking server. (A ``models:/m-...`` source would make
        # MLflow's store resolve it through the process-wide tracking URI.)
        created = await self._mlflow.create_version(
            name, source=logged.artifact_location, run_id=run.run_id, tags=tags
        )
        return _compose(created, team=team, metrics=run.metrics)

    async def _find_logged_model(self, ref: ModelRef) -> tuple[Run, LoggedModel]:
        if ref.model_id:
            logged = await self._mlflow.get_logged_model(ref.model_id)
            if logged is None:
                raise NotFound("logged model", ref.model_id)
            if ref.run_id and logged.source_run_id != ref.run_id:
                raise FailedPrecondition(
                    f"logged model {ref.model_id} comes from run {logged.source_run_id}, not {ref.run_id}"
                )
            run = await self.get_run(logged.source_run_id)
        else:
            run = await self.get_run(ref.run_id)
            found = await self._mlflow.logged_models_of_run(run, ref.artifact_path)
            if not found:
                raise NotFound("logged model", f"runs:/{ref.run_id}/{ref.artifact_path}")
            logged = found[0]
        if logged.status != "READY":
            raise FailedPrecondition(
                f"logged model {logged.model_id} of run {run.run_id} is {logged.status}, not READY"
            )
        return run, logged

    async def _ensure_owned(self, name: str, team: str, model_tags: Mapping[str, str]) -> None:
        found = await self._mlflow.get_model(name)
        if found is None:
            if await self._mlflow.create_model(name, {**model_tags, TEAM_TAG: team}):
                return
            found = await self._mlflow.get_model(name)  # created concurrently by someone else
            if found is None:
                raise FailedPrecondition(
                    f"registered model {name!r} was created and deleted concurrently; retry"
                )
        owner = found.tags.get(TEAM_TAG, "")
        if not owner:
            raise FailedPrecondition(
                f"registered model {name!r} has no owning team (no {TEAM_TAG} tag); it was not created through Plinth"
            )
        if owner != team:
            raise PermissionDenied(
                f"registered model {name!r} belongs to team {owner!r}; team {team!r} may not register versions of it",
                owner=owner,
            )
        for key, value in model_tags.items():
            if found.tags.get(key) != value:
                await self._mlflow.set_model_tag(name, key, value)

    async def _version_of_job(self, name: str, job_id: str) -> ModelVersion | None:
        page = await self._mlflow.search_versions(
            f"name = '{name}' AND tags.`{JOB_ID_TAG}` = {_quote(job_id, 'job_id')}", max_results=1
        )
        if not page.items:
            return None
        version: MlflowVersion = page.items[0]
        found = await self._mlflow.get_version(name, version.version)  # with its aliases
        return _compose(
            found or version,
            team=(await self._model(name)).team,
            metrics=await self._metrics(version.run_id, fresh=True),
        )

    # -- reads --------------------------------------------------------------------------------

    async def get_version(self, name: str, version: str) -> ModelVersion:
        """One version, with its owner and its run's metrics.

        Raises:
            NotFound: no such model or version.
        """
        check_model_name(name)
        check_version(version)
        return await self._cache.get(
            ("version", name, version), lambda: self._load_version(name, version)
        )

    async def _load_version(self, name: str, number: str) -> ModelVersion:
        found = await self._mlflow.get_version(name, number)
        if found is None:
            await self._model(name)  # NotFound names the model when it is the model that is missing
            raise NotFound("model version", f"{name}/{number}")
        team, metrics = await asyncio.gather(self._team(name), self._metrics(found.run_id))
        return _compose(found, team=team, metrics=metrics)

    async def version_by_alias(self, name: str, alias: str) -> ModelVersion:
        """The version an alias points to.

        Raises:
            NotFound: no such model, or the model has no such alias.
        """
        check_model_name(name)
        check_alias(alias)
        return await self._cache.get(
            ("alias", name, alias), lambda: self._load_version_by_alias(name, alias)
        )

    async def _load_version_by_alias(self, name: str, alias: str) -> ModelVersion:
        found = await self._mlflow.version_by_alias(name, alias)
        if found is None:
            await self._model(name)
            raise NotFound("alias", f"{name}@{alias}")
        team, metrics = await asyncio.gather(self._team(name), self._metrics(found.run_id))
        return _compose(found, team=team, metrics=metrics)

    async def list_versions(
        self, name: str, *, page_size: int, page_token: str
    ) -> tuple[list[ModelVersion], str]:
        """A model's versions, newest first."""
        check_model_name(name)
        limit = check_page_size(page_size, maximum=MAX_VERSIONS_PAGE)
        _check_page_token(page_token)
        model = await self._model(name)
        page = await self._mlflow.search_versions(
            f"name = '{name}'", max_results=limit, page_token=page_token
        )
        run_ids = sorted({v.run_id for v in page.items if v.run_id})
        found = await asyncio.gather(*(self._metrics(r) for r in run_ids))
        metrics = dict(zip(run_ids, found, strict=True))
        versions = [
            _compose(
                v,
                team=model.team,
                metrics=metrics.get(v.run_id, {}),
                aliases=_aliases_of(model.aliases, v.version),
            )
            for v in page.items
        ]
        return versions, page.next_page_token

    async def search_models(
        self, query: ModelQuery, *, page_size: int, page_token: str
    ) -> tuple[list[RegisteredModel], str]:
        """Registered models by name prefix, team and tags, by name, a page at a time."""
        if len(query.name_prefix) > 128 or not set(query.name_prefix) <= _NAME_PREFIX_CHARS:
            raise InvalidArgument("name_prefix", "letters, digits, '.', '_' and '-', at most 128")
        if query.team:
            check_team(query.team)
        check_tags(query.tags, allow_reserved=True)
        limit = check_page_size(page_size)
        _check_page_token(page_token)
        key = (
            "search",
            query.name_prefix,
            query.team,
            tuple(sorted(query.tags.items())),
            limit,
            page_token,
        )
        return await self._cache.get(key, lambda: self._load_models(query, limit, page_token))

    async def _load_models(
        self, query: ModelQuery, limit: int, page_token: str
    ) -> tuple[list[RegisteredModel], str]:
        clauses = []
        if query.name_prefix:
            clauses.append(f"name LIKE '{query.name_prefix}%'")
        if query.team:
            clauses.append(f"tags.`{TEAM_TAG}` = '{query.team}'")
        clauses += [
            f"tags.`{key}` = {_quote(value, 'tags')}" for key, value in sorted(query.tags.items())
        ]
        filter_string = " AND ".join(clauses)
        models: list[RegisteredModel] = []
        token = page_token
        # LIKE treats '_' in the prefix as a wildcard: drop false matches and keep fetching
        # exactly what is missing, so MLflow's next-page token stays exact.
        while True:
            page = await self._mlflow.search_models(
                filter_string, max_results=limit - len(models), page_token=token
            )
            models += [_registered(m) for m in page.items if m.name.startswith(query.name_prefix)]
            token = page.next_page_token
            if len(models) >= limit or not token:
                return models, token

    # -- promotion ----------------------------------------------------------------------------

    async def set_alias(
        self, *, name: str, alias: str, version: str, approved: bool = False, team: str = ""
    ) -> Promotion:
        """Moves an alias to a version when the model's policy allows; emits ``model.promoted``.

        Setting an alias to the version it already points to succeeds and emits the event
        again, so a caller retrying after a lost answer also heals a lost event.

        Raises:
            NotFound: no such model or version.
            PermissionDenied: ``team`` is given and does not own the model.
            FailedPrecondition: a policy rule does not hold (naming it and the actual value), a
                metric is missing, or approval is required and not given.
        """
        check_model_name(name)
        check_alias(alias)
        check_version(version)
        async with self._write_lock(name):
            model = await self._model(name)
            _check_owner(model, team)
            found = await self._mlflow.get_version(name, version)
            if found is None:
                raise NotFound("model version", f"{name}/{version}")
            metrics = await self._metrics(found.run_id, fresh=True)
            policy = _stored_policy(model)  # fails closed: an unreadable tag blocks promotion
            enforce_policy(
                policy, model=name, alias=alias, version=version, metrics=metrics, approved=approved
            )
            previous = model.aliases.get(alias, "")
            aliases = _aliases_of({**model.aliases, alias: version}, version)
            promoted = _compose(found, team=model.team, metrics=metrics, aliases=aliases)
            promotion = Promotion(version=promoted, alias=alias, previous_version=previous)
            try:
                await self._mlflow.set_alias(name, alias, version)
            finally:
                self._cache.invalidate()
            # After the move, not around it: if MLflow refuses, no event. If recording fails,
            # the caller sees the error and its retry (same alias, same version) records it.
            await self._events.promoted(promotion)
        log.info("%s@%s -> version %s (was %s)", name, alias, version, previous or "unset")
        return promotion

    async def delete_alias(self, *, name: str, alias: str, team: str = "") -> str:
        """Removes an alias; returns the version it pointed to.

        Raises:
            NotFound: no such model or alias.
        """
        check_model_name(name)
        check_alias(alias)
        async with self._write_lock(name):
            model = await self._model(name)
            _check_owner(model, team)
            previous = model.aliases.get(alias)
            if previous is None:
                raise NotFound("alias", f"{name}@{alias}")
            try:
                await self._mlflow.delete_alias(name, alias)
            finally:
                self._cache.invalidate()
        return previous

    async def get_policy(self, name: str) -> PolicyOutcome:
        """A model's policy (empty when none is set), with warnings about its rules.

        Raises:
            NotFound: no such model.
        """
        check_model_name(name)
        model = await self._model(name)
        known = await self._known_metrics(name) if model.policy.rules else set()
        return PolicyOutcome(
            model=model,
            warnings=tuple(policy_warnings(model.policy, model=name, known_metrics=known)),
        )

    async def set_policy(
        self, *, name: str, policy: PromotionPolicy, team: str = ""
    ) -> PolicyOutcome:
        """Replaces a model's whole policy (an empty one removes it).

        Returns:
            The model with its new policy, and warnings such as a rule on a metric no version
            of the model has (with the closest names its versions have).

        Raises:
            InvalidArgument: a malformed rule or alias, naming the field.
            NotFound: no such model.
            PermissionDenied: ``team`` is given and does not own the model.
        """
        check_model_name(name)
        check_policy(policy)
        async with self._write_lock(name):
            model = await self._model(name)
            _check_owner(model, team)
            return await self._store_policy(model, policy)

    async def update_policy(
        self, *, name: str, update: PolicyUpdate, team: str = ""
    ) -> PolicyOutcome:
        """Changes a model's stored policy: removes and adds rules, sets the flags given.

        A rule with the metric and op of a stored rule replaces it; removals apply first. A
        result with no rule and no approval requirement removes the policy.

        Returns:
            The model with its whole policy after the change, and warnings: those of
            :meth:`set_policy`, and a removal that found no rule on that metric.

        Raises:
            InvalidArgument: a malformed rule, metric or alias, or more rules than allowed.
            NotFound: no such model.
            PermissionDenied: ``team`` is given and does not own the model.
            FailedPrecondition: the stored policy cannot be read (nothing to change).
        """
        check_model_name(name)
        check_update(update)
        async with self._write_lock(name):
            model = await self._model(name)
            _check_owner(model, team)
            before = _stored_policy(model)
            after = check_policy(update.applied_to(before))
            outcome = await self._store_policy(model, after)
        return PolicyOutcome(
            model=outcome.model,
            warnings=(*update_warnings(update, before=before), *outcome.warnings),
        )

    async def _store_policy(self, model: RegisteredModel, policy: PromotionPolicy) -> PolicyOutcome:
        # Read before writing: if MLflow fails here, nothing has changed yet.
        known = await self._known_metrics(model.name) if policy.rules else set()
        try:
            if policy.empty:
                await self._mlflow.delete_model_tag(model.name, POLICY_TAG)
            else:
                await self._mlflow.set_model_tag(model.name, POLICY_TAG, policy.to_json())
        finally:
            self._cache.invalidate()
        stored = await self._model(model.name)
        log.info("%s: promotion policy now %s", model.name, stored.policy.to_json())
        return PolicyOutcome(
            model=stored,
            warnings=tuple(policy_warnings(policy, model=model.name, known_metrics=known)),
        )

    async def _known_metrics(self, name: str) -> set[str]:
        """Metric names the model's newest versions have."""
        page = await self._mlflow.search_versions(f"name = '{name}'", max_results=_CHECKED_VERSIONS)
        versions: list[MlflowVersion] = page.items
        known = {
            key.removeprefix(METRIC_TAG_PREFIX)
            for version in versions
            for key in version.tags
            if key.startswith(METRIC_TAG_PREFIX)
        }
        run_ids = list(dict.fromkeys(v.run_id for v in versions if v.run_id))[:_CHECKED_RUNS]
        # Fresh, as the promotions the policy will guard read them (policies change rarely).
        for metrics in await asyncio.gather(*(self._metrics(r, fresh=True) for r in run_ids)):
            known.update(metrics)
        return known

    # -- helpers ------------------------------------------------------------------------------

    @asynccontextmanager
    async def _write_lock(self, name: str) -> AsyncIterator[None]:
        async with self._locks[hash(name) % _LOCK_STRIPES]:
            yield

    async def _model(self, name: str) -> RegisteredModel:
        found = await self._mlflow.get_model(name)
        if found is None:
            raise NotFound("registered model", name)
        return _registered(found)

    async def _team(self, name: str) -> str:
        return await self._facts.get(("team", name), lambda: self._load_team(name))

    async def _load_team(self, name: str) -> str:
        return (await self._model(name)).team

    async def _metrics(self, run_id: str, *, fresh: bool = False) -> Mapping[str, float]:
        if not run_id:
            return {}
        if fresh:
            return await self._load_metrics(run_id)
        return await self._facts.get(("metrics", run_id), lambda: self._load_metrics(run_id))

    async def _load_metrics(self, run_id: str) -> Mapping[str, float]:
        run = await self._mlflow.get_run(run_id)
        return run.metrics if run is not None else {}


def _compose(
    found: MlflowVersion,
    *,
    team: str,
    metrics: Mapping[str, float],
    aliases: Sequence[str] | None = None,
) -> ModelVersion:
    return ModelVersion(
        name=found.name,
        version=found.version,
        team=team,
        run_id=found.run_id,
        source=found.source,
        status=found.status,
        aliases=tuple(sorted(found.aliases if aliases is None else aliases)),
        tags=dict(found.tags),
        metrics=dict(metrics),
        created_at=found.created_at,
        model_id=found.tags.get(MODEL_ID_TAG, ""),
    )


def _aliases_of(alias_map: Mapping[str, str], version: str) -> list[str]:
    # From the model's alias map: MLflow's version searches may leave a version's aliases out.
    return [alias for alias, target in alias_map.items() if target == version]


def _registered(model: MlflowModel) -> RegisteredModel:
    policy = PromotionPolicy()
    if POLICY_TAG in model.tags:
        try:
            policy = PromotionPolicy.from_json(model.tags[POLICY_TAG])
        except FailedPrecondition:
            log.warning("registered model %s has an unreadable %s tag", model.name, POLICY_TAG)
    return RegisteredModel(
        name=model.name,
        team=model.tags.get(TEAM_TAG, ""),
        description=model.description,
        tags=dict(model.tags),
        aliases=dict(model.aliases),
        latest_version=model.latest_version,
        policy=policy,
    )


def _stored_policy(model: RegisteredModel) -> PromotionPolicy:
    # Strict, unlike _registered: a change to a policy that cannot be read would lose it.
    if POLICY_TAG not in model.tags:
        return PromotionPolicy()
    return PromotionPolicy.from_json(model.tags[POLICY_TAG])


def _check_owner(model: RegisteredModel, team: str) -> None:
    if team and check_team(team) != model.team:
        raise PermissionDenied(
            f"registered model {model.name!r} belongs to team {model.team!r}, not {team!r}",
            owner=model.team,
        )


def _quote(value: str, field_name: str) -> str:
    # MLflow's filter grammar has no escapes: pick the quote the value does not contain.
    if "'" not in value:
        return f"'{value}'"
    if '"' not in value:
        return f'"{value}"'
    raise InvalidArgument(field_name, "a value cannot contain both ' and \"")


def _check_page_token(token: str) -> None:
    """MLflow's tokens are base64 JSON objects: refuse anything else before MLflow sees it."""
    if not token:
        return
    try:
        decoded = json.loads(base64.b64decode(token.encode("ascii"), validate=True))
    except (ValueError, UnicodeError, binascii.Error):
        decoded = None
    if not isinstance(decoded, dict):
        raise InvalidArgument("page_token", "not a token this server issued")
