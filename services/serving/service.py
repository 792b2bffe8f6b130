"""Serving's use cases: create, get, list and delete deployments, retarget them on promotions,
and tell inference where a deployment's requests go. Imports neither grpc nor nats nor
sqlalchemy.

Rollouts themselves run in the :class:`~services.serving.reconciler.Reconciler`; the use cases
only record what is wanted and wake it (every commit does).
"""

from __future__ import annotations

import difflib
import logging
from typing import Any

from plinth_common.db import Database
from plinth_common.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PlinthError,
    Unavailable,
)
from plinth_common.events.tracing import traceparent_of_current
from plinth_common.names import check_alias, check_deployment_name, check_model_name, check_team
from plinth_common.paging import PageRequest
from services.serving import domain
from services.serving.domain import Deployment, DeploymentSpec, DeploymentState, Promotion, Route
from services.serving.ports import DeploymentEvents, Deployments, EngineStatus, ModelRegistry
from services.serving.reconciler import Reconciler

log = logging.getLogger(__name__)

_PAGE_KIND = "deployments"
_SUGGESTIONS = 3


class ServingService:
    """Deployments: commands, queries, promotions, and the inference routes.

    Args:
        db: the serving database.
        store: the deployments.
        events: deployment event recorder (the outbox).
        registry: which models exist (checked at creation).
        reconciler: runs the rollouts and keeps the routes.
        engine: whether the model server is up (None: always taken as up).
        delete_wait_s: how long DeleteDeployment waits for the unload.
    """

    def __init__(
        self,
        *,
        db: Database,
        store: Deployments,
        events: DeploymentEvents,
        registry: ModelRegistry,
        reconciler: Reconciler,
        engine: EngineStatus | None = None,
        delete_wait_s: float = 60.0,
    ) -> None:
        self._db = db
        self._store = store
        self._events = events
        self._registry = registry
        self._reconciler = reconciler
        self._engine = engine
        self._delete_wait_s = delete_wait_s

    # -- commands and queries -------------------------------------------------------------------

    async def create(self, spec: DeploymentSpec) -> Deployment:
        """Creates a deployment; if its alias already points to a version, that version loads.

        Raises:
            InvalidArgument: a field is wrong (``alias``: ``latest`` and ``v<N>`` are MLflow's).
            NotFound: the registry has no such model (the hint names the closest ones).
            AlreadyExists: the name is taken.
            Unavailable: the registry cannot be asked whether the model exists.
        """
        spec = domain.validate_spec(spec)
        await self._check_model_exists(spec.model_name)
        async with self._db.transaction() as session:
            if await self._store.get(session, spec.name) is not None:
                raise AlreadyExists("deployment", spec.name)
            await self._store.insert(session, domain.new_deployment(spec, domain.now()))
        # Asked after the insert, so a promotion that lands meanwhile is not lost: the lookup's
        # answer is only recorded if no promotion has set the target in between (promotions
        # are newer than what the registry said before them).
        await self._reconciler.resolve_alias(spec.name)
        return await self.get(spec.name)

    def engine_problem(self) -> str | None:
        """Why the model server cannot serve now; None when it can."""
        return None if self._engine is None else self._engine.problem()

    def _shown(self, d: Deployment) -> Deployment:
        """The deployment as clients see it: UNAVAILABLE while the model server is down."""
        problem = self.engine_problem()
        return d if problem is None else domain.engine_down(d, problem)

    async def _check_model_exists(self, model_name: str) -> None:
        try:
            if await self._registry.model_exists(model_name):
                return
            names = await self._registry.model_names()
        except Unavailable:
            raise
        except PlinthError as exc:
            # A refusal of "which models exist?" says nothing about this one: do not guess.
            raise Unavailable(
                f"the registry service cannot say whether model {model_name!r} exists "
                f"({exc.message}); retry shortly",
                dependency="registry service",
            ) from exc
        close = difflib.get_close_matches(model_name, names, n=_SUGGESTIONS)
        hint = (
            "did you mean " + " or ".join(repr(n) for n in close) + "?"
            if close
            else "no registered model has a similar name; register a version first"
        )
        raise NotFound("registered model", model_name, hint=hint)

    async def get(self, name: str) -> Deployment:
        """The deployment, or NotFound."""
        check_deployment_name(name)
        async with self._db.read() as session:
            found = await self._store.get(session, name)
        if found is None:
            raise NotFound("deployment", name)
        return self._shown(found)

    async def list(
        self, *, team: str = "", page_size: int = 0, page_token: str = ""
    ) -> tuple[list[Deployment], str]:
        """A page of deployments, newest first, and the next page's token ('' at the end)."""
        if team:
            check_team(team)
        page = PageRequest.parse(page_size, page_token, kind=_PAGE_KIND)
        async with self._db.read() as session:
            found = await self._store.page(
                session, team=team, limit=page.fetch_limit, before_seq=page.before
            )
        shown, token = page.cut(found, seq=lambda d: d.seq)
        return [self._shown(d) for d in shown], token

    async def delete(self, name: str) -> None:
        """Deletes a deployment: inference stops at once, its Triton models are unloaded.

        Raises:
            NotFound: no such deployment.
        """
        check_deployment_name(name)
        async with self._db.transaction() as session:
            deleted = await self._store.delete(session, name)
            if deleted is None:
                raise NotFound("deployment", name)
            if deleted.serving_version:
                await self._events.traffic_changed(session, deleted, {})
        await self._reconciler.retire(name, timeout_s=self._delete_wait_s)

    # -- promotions -----------------------------------------------------------------------------

    async def on_promoted(self, session: Any, promotion: Promotion) -> int:
        """Points every deployment that follows the promoted alias at the new version.

        Runs inside the consumer's transaction; the rollout itself starts after the commit.
        Returns how many deployments follow the alias.
        """
        try:
            check_model_name(promotion.model_name, "model_name")
            check_alias(promotion.alias)
        except InvalidArgument as exc:
            log.warning("ignoring a promotion: %s", exc.message)
            return 0
        at = domain.now()
        traceparent = traceparent_of_current().get("traceparent", "")
        following = await self._store.following(session, promotion.model_name, promotion.alias)
        for d in following:
            changed = domain.retarget(d, promotion, traceparent=traceparent, at=at)
            if changed is d:
                log.info(
                    "deployment %s: promotion to v%s is older than its target v%s; skipped",
                    d.name,
                    promotion.version,
                    d.target_version,
                )
                continue
            await self._store.save(session, changed)
            log.info(
                "deployment %s: target is now v%s (%s)", d.name, promotion.version, promotion.alias
            )
        return len(following)

    # -- inference routes -----------------------------------------------------------------------

    def route(self, name: str) -> Route | None:
        """Where inference for deployment ``name`` goes, or None (unknown or not serving)."""
        return self._reconciler.route(name)

    async def unroutable(self, name: str) -> PlinthError:
        """The error for inference on a deployment without a route."""
        found = await self._find(name)
        if found is None:
            return NotFound("deployment", name[:80])
        if found.state is DeploymentState.FAILED:
            # Retrying cannot help until a promotion names a version that loads.
            return FailedPrecondition(
                f"deployment {name!r} has no version to serve: {found.last_error or 'FAILED'}; "
                "promote a version that loads"
            )
        return Unavailable(
            f"deployment {name!r} has no version ready to serve yet (state {found.state.value}); "
            "retry once it is READY"
        )

    async def exists(self, name: str) -> bool:
        """True when a deployment called ``name`` exists."""
        return await self._find(name) is not None

    async def _find(self, name: str) -> Deployment | None:
        try:
            check_deployment_name(name)
        except InvalidArgument:
            return None
        async with self._db.read() as session:
            return await self._store.get(session, name)
