"""Registry domain logic: runs, registration (by RPC and from finished jobs), reads through a
small cache, promotion under a policy, approvals, team MLflow users. Imports neither grpc nor
nats.

Ownership: every registered model carries its team in the ``plinth.team`` tag; only that team
registers versions into it. Promotion policies live in the ``plinth.policy`` tag. Versions carry
lineage tags (``plinth.run_id``, ``plinth.job_id``, ``plinth.entrypoint``, ``plinth.metric.*``).

Access: every public method takes the verified caller (a :class:`Principal`) and checks it with
:func:`plinth_common.auth.access.require` against the resource's owning team: a model's team
tag; a run's team is the team whose experiment holds it (the experiment the registry created
for the team, named after it, when the team's MLflow user was made; the scheduler's
``MLFLOW_EXPERIMENT_NAME`` is the team). Runs in other experiments belong to no team: only
admins see them. Another team's model or run answers NOT_FOUND, as a missing one does.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import secrets
from collections.abc import AsyncIterator, Callable, Collection, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import replace
from datetime import UTC, datetime
from typing import Protocol

from plinth_common.auth.access import denied, may, require
from plinth_common.auth.permissions import (
    MLFLOW_CREDENTIALS,
    MODELS_APPROVE,
    MODELS_PROMOTE,
    MODELS_READ,
    MODELS_REGISTER,
    MODELS_SET_POLICY,
    RUNS_READ,
    Permission,
)
from plinth_common.auth.principal import Principal, Role
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
    Approval,
    FinishedJob,
    LoggedModel,
    ModelQuery,
    ModelRef,
    ModelVersion,
    PolicyOutcome,
    PolicyUpdate,
    Promotion,
    PromotionPolicy,
    PromotionRecord,
    RegisteredModel,
    Run,
    TeamCredentials,
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
#: Aliases only a maintainer may move, unless PLINTH_REGISTRY_PROTECTED_ALIASES says otherwise.
DEFAULT_PROTECTED_ALIASES = frozenset({"production"})
#: Prefix of the MLflow user of a team (``team-vision``).
TEAM_USER_PREFIX = "team-"
_MODEL = "registered model"  # the NOT_FOUND kind of a missing model and of another team's
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


class Records(Protocol):
    """The registry's own records (``SqlRecords``): approvals, team MLflow users."""

    async def add_approval(self, *, model: str, version: str, approval: Approval) -> None: ...

    async def approvals(self, model: str, version: str) -> list[Approval]: ...

    async def history(self, model: str, version: str) -> list[PromotionRecord]: ...

    async def trails(
        self, model: str, versions: Collection[str]
    ) -> dict[str, tuple[list[Approval], list[PromotionRecord]]]: ...

    async def team_user(self, team: str) -> TeamCredentials | None: ...

    async def save_team_user(self, credentials: TeamCredentials) -> None: ...

    async def team_experiments(self) -> dict[str, str]: ...


class MlflowUsers(Protocol):
    """MLflow's server as its admin (``MlflowAuthClient``): users and permissions of its
    basic-auth app, and experiments made through the server (so their artifact location is
    the server's artifact proxy, as for experiments jobs make)."""

    async def ensure_experiment(self, name: str, tags: Mapping[str, str]) -> tuple[str, bool]: ...

    async def revoke(self, username: str, resource_type: str, resource_id: str) -> None: ...

    async def ensure_user(self, username: str, password: str) -> None: ...

    async def grant_manage(self, username: str, resource_type: str, resource_id: str) -> None: ...


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
        events: the ``plinth.model.*`` event recorder (it also writes the promotion history).
        records: approvals and team MLflow users.
        users: MLflow's users and permissions (None: MLflow runs without authentication, and
            team credentials cannot be made).
        protected_aliases: aliases only a maintainer of the model's team may move.
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
        records: Records,
        users: MlflowUsers | None = None,
        protected_aliases: frozenset[str] = DEFAULT_PROTECTED_ALIASES,
        on_promotion: Callable[[str, str], None] | None = None,
    ) -> None:
        # Told (team, outcome) of each promotion the policy decided: promoted, refused,
        # awaiting_approval (the registry's promotions metric).
        self._on_promotion = on_promotion or (lambda team, outcome: None)
        self._mlflow = mlflow
        self._events = events
        self._cache = cache
        self._facts = facts
        self._records = records
        self._users = users
        self._protected = protected_aliases
        # Models whose MLflow grants this process made exclusive to their team (see _grant_model).
        self._exclusive: set[str] = set()
        # Writes to one model are serialized in this process, so a promotion's "previous
        # version" and the duplicate-job check cannot interleave with another write.
        self._locks = [asyncio.Lock() for _ in range(_LOCK_STRIPES)]

    # -- runs ---------------------------------------------------------------------------------

    async def get_run(self, principal: Principal, run_id: str) -> Run:
        """A run, read through from MLflow tracking, if the caller may read its team's runs.

        Raises:
            NotFound: MLflow has no such run, or it is not the caller's team's.
        """
        run = await self._run_of(run_id)
        team = await self._run_team(run)
        require(principal, RUNS_READ, team, kind="run", name=run_id)
        return run

    async def _run_of(self, run_id: str) -> Run:
        run = await self._mlflow.get_run(check_run_id(run_id))
        if run is None:
            raise NotFound("run", run_id)
        return run

    async def _run_team(self, run: Run) -> str:
        """The team whose experiment holds the run ('' when none does: admins only)."""
        return (await self._team_experiments()).get(run.experiment_id, "")

    async def _team_experiments(self) -> Mapping[str, str]:
        return await self._facts.get(("team-experiments",), self._records.team_experiments)

    async def list_runs(
        self,
        principal: Principal,
        *,
        experiment_ids: Sequence[str],
        filter_string: str,
        page_size: int,
        page_token: str,
    ) -> tuple[list[Run], str]:
        """Runs matching an MLflow filter, in the experiments named or else in every experiment
        the caller may read (admins: every active one).

        Raises:
            NotFound: an experiment named is not one of the caller's teams' (kind experiment).
        """
        ids = check_experiment_ids(experiment_ids)
        limit = check_page_size(page_size)
        _check_page_token(page_token)
        if len(filter_string) > 4096:
            raise InvalidArgument("filter", "at most 4096 characters")
        if not principal.admin:
            teams = await self._team_experiments()
            for experiment_id in ids:
                require(
                    principal,
                    RUNS_READ,
                    teams.get(experiment_id, ""),
                    kind="experiment",
                    name=experiment_id,
                )
            ids = ids or sorted(e for e, team in teams.items() if principal.can_see(team))
            if not ids:
                return [], ""
        ids = ids or await self._mlflow.experiment_ids()
        page = await self._mlflow.search_runs(
            ids, filter_string=filter_string, max_results=limit, page_token=page_token
        )
        return page.items, page.next_page_token

    # -- registration -------------------------------------------------------------------------

    async def create_version(
        self,
        principal: Principal,
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
        ``team``, when it does not exist). The caller needs ``models.register`` (developer) in
        ``team``, in the existing model's team, and may register only runs it may read.

        Raises:
            InvalidArgument: a malformed name, team, run id, path or tag.
            NotFound: no such run, or the run logged no model of that name; the team, run or
                existing model is not the caller's.
            PermissionDenied: the caller's role is too low, or the registered model belongs to
                another team than ``team``.
        """
        check_model_name(name)
        check_team(team)
        require(principal, MODELS_REGISTER, team, kind="team", name=team)
        ref = ModelRef(
            run_id=check_run_id(run_id), artifact_path=check_artifact_path(artifact_path or "model")
        )
        user_tags = check_tags(tags or {})
        user_model_tags = check_tags(model_tags or {}, "model_tags")
        async with self._write_lock(name):
            try:
                version = await self._register(
                    name=name,
                    team=team,
                    ref=ref,
                    extra_tags=user_tags,
                    model_tags=user_model_tags,
                    principal=principal,
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
        principal: Principal | None = None,
    ) -> ModelVersion:
        run, logged = await self._find_logged_model(ref, team=team, principal=principal)
        await self._ensure_owned(name, team, model_tags or {}, principal)
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

    async def _check_run(self, run: Run, *, team: str, principal: Principal | None) -> None:
        """The run may be registered: the caller may read it (or, for a job, it is not another
        team's), checked before anything else about it is told."""
        run_team = await self._run_team(run)
        if principal is not None:
            require(principal, RUNS_READ, run_team, kind="run", name=run.run_id)
        elif run_team and run_team != team:
            # A job's output naming another team's run: never register it as this team's.
            raise PermissionDenied(
                f"run {run.run_id} belongs to team {run_team!r}; a job of team {team!r} may not register it",
                owner=run_team,
            )

    async def _find_logged_model(
        self, ref: ModelRef, *, team: str, principal: Principal | None
    ) -> tuple[Run, LoggedModel]:
        if ref.model_id:
            logged = await self._mlflow.get_logged_model(ref.model_id)
            if logged is None:
                raise NotFound("logged model", ref.model_id)
            run = await self._run_of(logged.source_run_id)
            await self._check_run(run, team=team, principal=principal)
            if ref.run_id and logged.source_run_id != ref.run_id:
                raise FailedPrecondition(
                    f"logged model {ref.model_id} comes from run {logged.source_run_id}, not {ref.run_id}"
                )
        else:
            run = await self._run_of(ref.run_id)
            await self._check_run(run, team=team, principal=principal)
            found = await self._mlflow.logged_models_of_run(run, ref.artifact_path)
            if not found:
                raise NotFound("logged model", f"runs:/{ref.run_id}/{ref.artifact_path}")
            logged = found[0]
        if logged.status != "READY":
            raise FailedPrecondition(
                f"logged model {logged.model_id} of run {run.run_id} is {logged.status}, not READY"
            )
        return run, logged

    async def _ensure_owned(
        self, name: str, team: str, model_tags: Mapping[str, str], principal: Principal | None
    ) -> None:
        found = await self._mlflow.get_model(name)
        if found is None:
            if await self._mlflow.create_model(name, {**model_tags, TEAM_TAG: team}):
                await self._grant_model(team, name)
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
        if principal is not None:
            # A caller outside the owning team learns nothing more of the model than NOT_FOUND.
            require(principal, MODELS_REGISTER, owner, kind=_MODEL, name=name)
        if owner != team:
            raise PermissionDenied(
                f"registered model {name!r} belongs to team {owner!r}; team {team!r} may not register versions of it",
                owner=owner,
            )
        for key, value in model_tags.items():
            if found.tags.get(key) != value:
                await self._mlflow.set_model_tag(name, key, value)
        if name not in self._exclusive:
            await self._grant_model(team, name)

    async def _grant_model(self, team: str, name: str) -> None:
        """Gives the team's MLflow user (if it has one yet) MANAGE on its model, and takes any
        grant of another team's user away: a job may have made a model of that name through
        MLflow's API (MLflow gives its maker MANAGE) and tagged it as this team's. Done once
        per model and process."""
        if self._users is None:
            return
        credentials = await self._records.team_user(team)
        if credentials is not None:
            await self._users.grant_manage(credentials.username, "registered_model", name)
        for other in set((await self._team_experiments()).values()) - {team}:
            await self._users.revoke(TEAM_USER_PREFIX + other, "registered_model", name)
        self._exclusive.add(name)

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

    async def get_version(self, principal: Principal, name: str, version: str) -> ModelVersion:
        """One version, with its owner, its run's metrics, approvals and promotion history.

        Raises:
            NotFound: no such model or version, or the model is not the caller's team's.
        """
        check_model_name(name)
        check_version(version)
        await self._require_model(principal, MODELS_READ, name)
        return await self._cache.get(
            ("version", name, version), lambda: self._load_version(name, version)
        )

    async def _load_version(self, name: str, number: str) -> ModelVersion:
        found = await self._mlflow.get_version(name, number)
        if found is None:
            await self._model(name)  # NotFound names the model when it is the model that is missing
            raise NotFound("model version", f"{name}/{number}")
        return await self._composed(found)

    async def _composed(self, found: MlflowVersion) -> ModelVersion:
        team, metrics, approvals, history = await asyncio.gather(
            self._team(found.name),
            self._metrics(found.run_id),
            self._records.approvals(found.name, found.version),
            self._records.history(found.name, found.version),
        )
        return replace(
            _compose(found, team=team, metrics=metrics),
            approvals=tuple(approvals),
            history=tuple(history),
        )

    async def _require_model(
        self,
        principal: Principal,
        permission: Permission,
        name: str,
        *,
        role: Role | None = None,
        target: str = "",
    ) -> str:
        """Checks the caller against the model's team: NOT_FOUND exactly as for a missing
        model; a role too low names ``target`` (``diabetes@production``), default the model."""
        team = await self._team(name)
        try:
            require(principal, permission, team, kind=_MODEL, name=name, role=role)
        except PermissionDenied:
            raise denied(permission, target or name, role or permission.role) from None
        return team

    async def version_by_alias(self, principal: Principal, name: str, alias: str) -> ModelVersion:
        """The version an alias points to (serving's service identity reads any team's).

        Raises:
            NotFound: no such model, the model has no such alias, or it is another team's.
        """
        check_model_name(name)
        check_alias(alias)
        await self._require_model(principal, MODELS_READ, name)
        return await self._cache.get(
            ("alias", name, alias), lambda: self._load_version_by_alias(name, alias)
        )

    async def _load_version_by_alias(self, name: str, alias: str) -> ModelVersion:
        found = await self._mlflow.version_by_alias(name, alias)
        if found is None:
            await self._model(name)
            raise NotFound("alias", f"{name}@{alias}")
        return await self._composed(found)

    async def list_versions(
        self, principal: Principal, name: str, *, page_size: int, page_token: str
    ) -> tuple[list[ModelVersion], str]:
        """A model's versions, newest first.

        Raises:
            NotFound: no such model, or it is another team's.
        """
        check_model_name(name)
        limit = check_page_size(page_size, maximum=MAX_VERSIONS_PAGE)
        _check_page_token(page_token)
        await self._require_model(principal, MODELS_READ, name)
        model = await self._model(name)
        page = await self._mlflow.search_versions(
            f"name = '{name}'", max_results=limit, page_token=page_token
        )
        run_ids = sorted({v.run_id for v in page.items if v.run_id})
        found, trails = await asyncio.gather(
            asyncio.gather(*(self._metrics(r) for r in run_ids)),
            self._records.trails(name, [v.version for v in page.items]),
        )
        metrics = dict(zip(run_ids, found, strict=True))
        versions = [
            replace(
                _compose(
                    v,
                    team=model.team,
                    metrics=metrics.get(v.run_id, {}),
                    aliases=_aliases_of(model.aliases, v.version),
                ),
                approvals=tuple(trails[v.version][0]),
                history=tuple(trails[v.version][1]),
            )
            for v in page.items
        ]
        return versions, page.next_page_token

    async def search_models(
        self, principal: Principal, query: ModelQuery, *, page_size: int, page_token: str
    ) -> tuple[list[RegisteredModel], str]:
        """Registered models by name prefix, team and tags, by name, a page at a time; only
        the models of the caller's teams (admins and serving: every team's).

        Raises:
            NotFound: ``query.team`` is a team the caller is not in (kind team).
        """
        if len(query.name_prefix) > 128 or not set(query.name_prefix) <= _NAME_PREFIX_CHARS:
            raise InvalidArgument("name_prefix", "letters, digits, '.', '_' and '-', at most 128")
        if query.team:
            check_team(query.team)
            require(principal, MODELS_READ, query.team, kind="team", name=query.team)
        check_tags(query.tags, allow_reserved=True)
        limit = check_page_size(page_size)
        _check_page_token(page_token)
        visible: frozenset[str] | None = None
        if not query.team and not may(principal, MODELS_READ, ""):
            visible = principal.visible_teams() or frozenset()
            if not visible:
                return [], ""
        key = (
            "search",
            query.name_prefix,
            query.team,
            tuple(sorted(query.tags.items())),
            limit,
            page_token,
            tuple(sorted(visible)) if visible is not None else None,
        )
        return await self._cache.get(
            key, lambda: self._load_models(query, limit, page_token, visible)
        )

    async def _load_models(
        self, query: ModelQuery, limit: int, page_token: str, visible: frozenset[str] | None
    ) -> tuple[list[RegisteredModel], str]:
        clauses = []
        if query.name_prefix:
            clauses.append(f"name LIKE '{query.name_prefix}%'")
        team = query.team or (next(iter(visible)) if visible and len(visible) == 1 else "")
        if team:
            clauses.append(f"tags.`{TEAM_TAG}` = '{team}'")
        clauses += [
            f"tags.`{key}` = {_quote(value, 'tags')}" for key, value in sorted(query.tags.items())
        ]
        filter_string = " AND ".join(clauses)
        models: list[RegisteredModel] = []
        token = page_token
        # LIKE treats '_' in the prefix as a wildcard, and a caller in several teams sees only
        # theirs (MLflow's filter has no IN): drop false matches and keep fetching exactly
        # what is missing, so MLflow's next-page token stays exact.
        while True:
            page = await self._mlflow.search_models(
                filter_string, max_results=limit - len(models), page_token=token
            )
            models += [
                _registered(m)
                for m in page.items
                if m.name.startswith(query.name_prefix)
                and (visible is None or m.tags.get(TEAM_TAG, "") in visible)
            ]
            token = page.next_page_token
            if len(models) >= limit or not token:
                return models, token

    # -- promotion ----------------------------------------------------------------------------

    def _promote_role(self, alias: str) -> Role | None:
        return Role.MAINTAINER if alias in self._protected else None

    async def set_alias(
        self,
        principal: Principal,
        *,
        name: str,
        alias: str,
        version: str,
        approved: bool = False,
        team: str = "",
    ) -> Promotion:
        """Moves an alias to a version when the model's policy allows; emits ``model.promoted``
        and adds the move to the version's history, both naming the promoter and the approver.

        A developer of the model's team may move an alias; a protected one (``production``)
        needs a maintainer. Where the policy requires approval, an approval of this version for
        this alias must be recorded (:meth:`approve`), or the promoter is a maintainer passing
        ``approved`` (recorded as their approval); with ``require_distinct_approver`` the
        approver must be someone other than the promoter.

        Setting an alias to the version it already points to succeeds and emits the event
        again, so a caller retrying after a lost answer also heals a lost event.

        Raises:
            NotFound: no such model or version, or the model is another team's.
            PermissionDenied: the caller's role is too low, or ``team`` is given and does not
                own the model.
            FailedPrecondition: a policy rule does not hold (naming it and the actual value), a
                metric is missing, or approval is required and none counts (reason
                ``APPROVAL_REQUIRED``, saying who may approve).
        """
        check_model_name(name)
        check_alias(alias)
        check_version(version)
        await self._require_model(
            principal,
            MODELS_PROMOTE,
            name,
            role=self._promote_role(alias),
            target=f"{name}@{alias}",
        )
        async with self._write_lock(name):
            model = await self._model(name)
            _check_owner(model, team)
            found = await self._mlflow.get_version(name, version)
            if found is None:
                raise NotFound("model version", f"{name}/{version}")
            metrics = await self._metrics(found.run_id, fresh=True)
            policy = _stored_policy(model)  # fails closed: an unreadable tag blocks promotion
            needs_approval = policy.guards(alias) and policy.require_approval
            approver = ""
            try:
                if needs_approval:
                    approver = await self._approver(
                        principal, model, policy, alias, version, approved
                    )
                enforce_policy(
                    policy,
                    model=name,
                    alias=alias,
                    version=version,
                    metrics=metrics,
                    approved=bool(approver),
                    who_may_approve=_who_may_approve(model, policy, alias, version, principal),
                )
            except FailedPrecondition as refusal:
                waiting = refusal.reason == "APPROVAL_REQUIRED"
                self._on_promotion(model.team, "awaiting_approval" if waiting else "refused")
                raise
            if needs_approval and approver == principal.name and approved:
                await self._record_approval(
                    name, version, Approval(alias=alias, approved_by=approver, approved_at=_now())
                )
            previous = model.aliases.get(alias, "")
            aliases = _aliases_of({**model.aliases, alias: version}, version)
            record = PromotionRecord(
                alias=alias,
                promoted_by=principal.name,
                approved_by=approver,
                promoted_at=_now(),
                previous_version=previous,
            )
            earlier = await self._records.history(name, version)
            approvals = await self._records.approvals(name, version)
            promoted = replace(
                _compose(found, team=model.team, metrics=metrics, aliases=aliases),
                approvals=tuple(approvals),
                history=(*earlier, record),
            )
            promotion = Promotion(
                version=promoted,
                alias=alias,
                previous_version=previous,
                promoted_by=principal.name,
                approved_by=approver,
                promoted_at=record.promoted_at,
            )
            try:
                await self._mlflow.set_alias(name, alias, version)
            finally:
                self._cache.invalidate()
            # After the move, not around it: if MLflow refuses, no event. If recording fails,
            # the caller sees the error and its retry (same alias, same version) records it.
            await self._events.promoted(promotion)
        self._on_promotion(model.team, "promoted")
        log.info("%s@%s -> version %s (was %s)", name, alias, version, previous or "unset")
        return promotion

    async def _approver(
        self,
        principal: Principal,
        model: RegisteredModel,
        policy: PromotionPolicy,
        alias: str,
        version: str,
        approved: bool,
    ) -> str:
        """Whose approval lets ``principal`` move ``alias`` to ``version`` ('' when none does).

        The newest recorded approval that counts (with four-eyes, not the promoter's own);
        else the promoter's own ``approved``, where they are a maintainer and four-eyes is off.
        """
        for recorded in reversed(await self._records.approvals(model.name, version)):
            if recorded.alias != alias:
                continue
            if policy.require_distinct_approver and recorded.approved_by == principal.name:
                continue
            return recorded.approved_by
        if (
            approved
            and not policy.require_distinct_approver
            and may(principal, MODELS_APPROVE, model.team)
        ):
            return principal.name
        return ""

    async def approve(
        self, principal: Principal, *, name: str, version: str, alias: str, comment: str = ""
    ) -> tuple[ModelVersion, Approval]:
        """Records the caller's approval of ``version`` for ``alias`` (a maintainer of the
        model's team); a later :meth:`set_alias` under a policy requiring approval counts it.

        Raises:
            InvalidArgument: a malformed name, version or alias, or a comment over 1000 characters.
            NotFound: no such model or version, or the model is another team's.
            PermissionDenied: the caller is no maintainer of the model's team.
        """
        check_model_name(name)
        check_version(version)
        check_alias(alias)
        if len(comment) > 1000:
            raise InvalidArgument("comment", "at most 1000 characters")
        await self._require_model(principal, MODELS_APPROVE, name)
        async with self._write_lock(name):
            found = await self._mlflow.get_version(name, version)
            if found is None:
                raise NotFound("model version", f"{name}/{version}")
            approval = Approval(
                alias=alias, approved_by=principal.name, approved_at=_now(), comment=comment
            )
            await self._record_approval(name, version, approval)
            approved = await self._composed(found)
        log.info("%s version %s approved for %s by %s", name, version, alias, principal.name)
        return approved, approval

    async def _record_approval(self, name: str, version: str, approval: Approval) -> None:
        try:
            await self._records.add_approval(model=name, version=version, approval=approval)
        finally:
            self._cache.invalidate()

    async def delete_alias(
        self, principal: Principal, *, name: str, alias: str, team: str = ""
    ) -> str:
        """Removes an alias; returns the version it pointed to. Needs what moving it needs.

        Raises:
            NotFound: no such model or alias, or the model is another team's.
            PermissionDenied: the caller's role is too low (a protected alias: maintainer).
        """
        check_model_name(name)
        check_alias(alias)
        await self._require_model(
            principal,
            MODELS_PROMOTE,
            name,
            role=self._promote_role(alias),
            target=f"{name}@{alias}",
        )
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

    async def get_policy(self, principal: Principal, name: str) -> PolicyOutcome:
        """A model's policy (empty when none is set), with warnings about its rules.

        Raises:
            NotFound: no such model, or it is another team's.
        """
        check_model_name(name)
        await self._require_model(principal, MODELS_READ, name)
        model = await self._model(name)
        known = await self._known_metrics(name) if model.policy.rules else set()
        return PolicyOutcome(
            model=model,
            warnings=tuple(policy_warnings(model.policy, model=name, known_metrics=known)),
        )

    async def set_policy(
        self, principal: Principal, *, name: str, policy: PromotionPolicy, team: str = ""
    ) -> PolicyOutcome:
        """Replaces a model's whole policy (an empty one removes it).

        Returns:
            The model with its new policy, and warnings such as a rule on a metric no version
            of the model has (with the closest names its versions have).

        Raises:
            InvalidArgument: a malformed rule or alias, naming the field.
            NotFound: no such model, or it is another team's.
            PermissionDenied: the caller is no maintainer of the model's team, or ``team`` is
                given and does not own the model.
        """
        check_model_name(name)
        check_policy(policy)
        await self._require_model(principal, MODELS_SET_POLICY, name)
        async with self._write_lock(name):
            model = await self._model(name)
            _check_owner(model, team)
            return await self._store_policy(model, policy)

    async def update_policy(
        self, principal: Principal, *, name: str, update: PolicyUpdate, team: str = ""
    ) -> PolicyOutcome:
        """Changes a model's stored policy: removes and adds rules, sets the flags given.

        A rule with the metric and op of a stored rule replaces it; removals apply first. A
        result with no rule and no approval requirement removes the policy.

        Returns:
            The model with its whole policy after the change, and warnings: those of
            :meth:`set_policy`, and a removal that found no rule on that metric.

        Raises:
            InvalidArgument: a malformed rule, metric or alias, or more rules than allowed.
            NotFound: no such model, or it is another team's.
            PermissionDenied: the caller is no maintainer of the model's team, or ``team`` is
                given and does not own the model.
            FailedPrecondition: the stored policy cannot be read (nothing to change).
        """
        check_model_name(name)
        check_update(update)
        await self._require_model(principal, MODELS_SET_POLICY, name)
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

    # -- MLflow credentials of teams ----------------------------------------------------------

    async def team_credentials(self, principal: Principal, team: str) -> TeamCredentials:
        """The MLflow user of ``team``, made on first request (the scheduler's, for jobs).

        The first request makes the team's experiment (named after the team; an existing one
        of that name is adopted, and other teams' users lose any grant on it), an MLflow user ``team-<team>`` with a random password, and
        gives it MANAGE on the experiment and on the team's registered models (models made
        later get it when they are made). The credentials are stored, so they survive restarts.

        Raises:
            NotFound: the caller is neither the scheduler nor an admin nor in the team.
            PermissionDenied: a member of the team (people never get the team's password).
            FailedPrecondition: MLflow runs without authentication here.
        """
        check_team(team)
        require(principal, MLFLOW_CREDENTIALS, team, kind="team", name=team)
        if self._users is None:
            raise FailedPrecondition(
                "MLflow runs without authentication here: there are no team credentials"
            )
        async with self._write_lock(TEAM_USER_PREFIX + team):
            found = await self._records.team_user(team)
            if found is not None:
                return found
            experiment_id, made = await self._users.ensure_experiment(team, {TEAM_TAG: team})
            if not made:
                # An experiment of that name existed: a job of another team may have made it
                # (its maker gets MANAGE). Only this team keeps a grant on it.
                for other in (await self._team_experiments()).values():
                    if other != team:
                        await self._users.revoke(
                            TEAM_USER_PREFIX + other, "experiment", experiment_id
                        )
            credentials = TeamCredentials(
                team=team,
                username=TEAM_USER_PREFIX + team,
                password=secrets.token_urlsafe(32),
                experiment_id=experiment_id,
            )
            # Idempotent on MLflow's side (a user left by an earlier, unfinished try gets the
            # new password), stored last: a failure anywhere before leaves nothing half-made.
            await self._users.ensure_user(credentials.username, credentials.password)
            await self._users.grant_manage(credentials.username, "experiment", experiment_id)
            for model in await self._team_model_names(team):
                await self._users.grant_manage(credentials.username, "registered_model", model)
            await self._records.save_team_user(credentials)
            self._facts.invalidate()  # the experiment now has a team
        log.info("MLflow user %s made for team %s", credentials.username, team)
        return credentials

    async def _team_model_names(self, team: str) -> list[str]:
        names: list[str] = []
        token = ""
        while True:
            page = await self._mlflow.search_models(
                f"tags.`{TEAM_TAG}` = '{team}'", max_results=1000, page_token=token
            )
            names += [m.name for m in page.items]
            token = page.next_page_token
            if not token:
                return names

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


def _now() -> datetime:
    return datetime.now(UTC)


def _who_may_approve(
    model: RegisteredModel, policy: PromotionPolicy, alias: str, version: str, promoter: Principal
) -> str:
    other = f" other than {promoter.name}" if policy.require_distinct_approver else ""
    return (
        f"a maintainer of team {model.team!r}{other} must approve version {version} for "
        f"{alias!r} first (ApproveModelVersion)"
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
