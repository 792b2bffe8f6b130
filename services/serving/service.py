"""Serving's use cases: create, get, list, share and delete deployments, retarget them on
promotions, and tell inference where a deployment's requests go and who may send them.

Every use case takes the caller (a :class:`~plinth_common.auth.Principal`) and checks it
against the owning team with :func:`~plinth_common.auth.require`: another team's deployment is
NOT_FOUND. Imports neither grpc nor nats nor sqlalchemy.

Rollouts themselves run in the :class:`~services.serving.reconciler.Reconciler`; the use cases
only record what is wanted and wake it (every commit does).
"""

from __future__ import annotations

import asyncio
import difflib
import logging
from collections.abc import Sequence
from typing import Any, Protocol

from plinth_common.auth import Principal, may, require
from plinth_common.auth.permissions import (
    DEPLOYMENTS_CREATE,
    DEPLOYMENTS_DELETE,
    DEPLOYMENTS_READ,
    DEPLOYMENTS_SHARE,
    DEPLOYMENTS_TRAFFIC,
    INFERENCE_CALL,
)
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
from services.serving.domain import (
    Deployment,
    DeploymentAccess,
    DeploymentSpec,
    DeploymentState,
    Promotion,
    Route,
    TrafficRequest,
    VersionRef,
)
from services.serving.ports import DeploymentEvents, Deployments, EngineStatus, ModelRegistry
from services.serving.reconciler import Reconciler
from services.serving.traffic import WindowStats

log = logging.getLogger(__name__)


class TrafficMeter(Protocol):
    """Per-version traffic as the data plane measured it (the canary guard)."""

    def view(self, name: str, version: str, window_s: float) -> WindowStats | None: ...


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
        traffic_wait_s: how long SetTraffic waits for its versions to load.
        meter: what the inference data plane measured per version (None: no data plane).
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
        traffic_wait_s: float = 120.0,
        meter: TrafficMeter | None = None,
    ) -> None:
        self._db = db
        self._store = store
        self._events = events
        self._registry = registry
        self._reconciler = reconciler
        self._engine = engine
        self._delete_wait_s = delete_wait_s
        self._traffic_wait_s = traffic_wait_s
        self.meter = meter
        # Deployment -> who may call it for inference; changed only with the lock held, right
        # after the commit that changed the store, so it follows the store's order.
        self._access: dict[str, DeploymentAccess] = {}
        self._access_lock = asyncio.Lock()

    # -- commands and queries -------------------------------------------------------------------

    async def create(self, principal: Principal, spec: DeploymentSpec) -> Deployment:
        """Creates a deployment of ``spec.team``; if its alias already points to a version, that
        version loads.

        Raises:
            InvalidArgument: a field is wrong (``alias``: ``latest`` and ``v<N>`` are MLflow's).
            NotFound: the caller is no member of the team (kind ``team``), or the team has no
                such model (the hint names the closest of the team's models).
            PermissionDenied: the caller's role in the team is below developer.
            AlreadyExists: the name is taken.
            Unavailable: the registry cannot be asked whether the model exists.
        """
        spec = domain.validate_spec(spec)
        require(principal, DEPLOYMENTS_CREATE, spec.team, kind="team", name=spec.team)
        await self._check_model_exists(spec.model_name, spec.team)
        async with self._access_lock:
            async with self._db.transaction() as session:
                if await self._store.get(session, spec.name) is not None:
                    raise AlreadyExists("deployment", spec.name)
                created = await self._store.insert(
                    session, domain.new_deployment(spec, domain.now())
                )
            self._access[created.name] = created.access
        # Asked after the insert, so a promotion that lands meanwhile is not lost: the lookup's
        # answer is only recorded if no promotion has set the target in between (promotions
        # are newer than what the registry said before them).
        await self._reconciler.resolve_alias(spec.name)
        return await self.get(principal, spec.name)

    def measured(self, d: Deployment) -> dict[str, WindowStats | None]:
        """Each version of ``d``'s split -> its traffic over the SLO window, as the data plane
        measured it (None: not measured, e.g. inference on the Python path)."""
        meter = self.meter
        return {
            version: None if meter is None else meter.view(d.name, version, d.slo.window_s)
            for version in d.traffic
        }

    def engine_problem(self) -> str | None:
        """Why the model server cannot serve now; None when it can."""
        return None if self._engine is None else self._engine.problem()

    def _shown(self, d: Deployment) -> Deployment:
        """The deployment as clients see it: UNAVAILABLE while the model server is down."""
        problem = self.engine_problem()
        return d if problem is None else domain.engine_down(d, problem)

    async def _check_model_exists(self, model_name: str, team: str) -> None:
        try:
            if await self._registry.model_exists(model_name, team):
                return
            names = await self._registry.model_names(team)
        except Unavailable:
            raise
        except PlinthError as exc:
            # A refusal of "which models exist?" says nothing about this one: do not guess.
            raise Unavailable(
                f"the registry service cannot say whether model {model_name!r} exists "
                f"({exc.message}); retry shortly",
                dependency="registry service",
            ) from exc
        # Only the team's own models are suggested: another team's names must not leak.
        close = difflib.get_close_matches(model_name, names, n=_SUGGESTIONS)
        hint = (
            "did you mean " + " or ".join(repr(n) for n in close) + "?"
            if close
            else f"no registered model has a similar name in team {team!r}; register a version "
            "first"
        )
        raise NotFound("registered model", model_name, hint=hint)

    async def get(self, principal: Principal, name: str) -> Deployment:
        """The deployment, or NotFound (also for another team's: a share lends inference only).

        Raises:
            NotFound: no such deployment, or the caller is no member of its team.
        """
        check_deployment_name(name)
        async with self._db.read() as session:
            found = await self._store.get(session, name)
        if found is None:
            raise NotFound("deployment", name)
        require(principal, DEPLOYMENTS_READ, found.team, kind="deployment", name=name)
        return self._shown(found)

    async def list(
        self, principal: Principal, *, team: str = "", page_size: int = 0, page_token: str = ""
    ) -> tuple[list[Deployment], str]:
        """A page of deployments, newest first, and the next page's token ('' at the end).

        Without ``team``: the deployments of every team the caller is a member of (admins:
        all).

        Raises:
            NotFound: ``team`` is one the caller is no member of (kind ``team``).
        """
        teams: frozenset[str] | None
        if team:
            check_team(team)
            require(principal, DEPLOYMENTS_READ, team, kind="team", name=team)
            teams = frozenset({team})
        else:
            teams = principal.visible_teams()
        page = PageRequest.parse(page_size, page_token, kind=_PAGE_KIND)
        if teams is not None and not teams:
            return [], ""
        async with self._db.read() as session:
            found = await self._store.page(
                session, teams=teams, limit=page.fetch_limit, before_seq=page.before
            )
        shown, token = page.cut(found, seq=lambda d: d.seq)
        return [self._shown(d) for d in shown], token

    async def share(self, principal: Principal, name: str, teams: Sequence[str]) -> Deployment:
        """Replaces the teams the deployment is shared with, read-only, for inference.

        Raises:
            NotFound: no such deployment, or the caller is no member of its team.
            PermissionDenied: the caller's role in its team is below maintainer.
            InvalidArgument: ``teams`` names a malformed team, or the owning team.
        """
        check_deployment_name(name)
        async with self._access_lock:
            async with self._db.transaction() as session:
                found = await self._store.get(session, name)
                if found is None:
                    raise NotFound("deployment", name)
                require(principal, DEPLOYMENTS_SHARE, found.team, kind="deployment", name=name)
                shared = domain.check_shared_with(teams, found.team)
                saved = await self._store.share(session, name, shared, domain.now())
                if saved is None:
                    raise NotFound("deployment", name)
            self._access[name] = saved.access
        log.info("deployment %s: shared with %s", name, ", ".join(shared) or "no team")
        return self._shown(saved)

    async def delete(self, principal: Principal, name: str) -> None:
        """Deletes a deployment: inference stops at once, its Triton models are unloaded.

        Raises:
            NotFound: no such deployment, or the caller is no member of its team.
            PermissionDenied: the caller's role in its team is below maintainer.
        """
        check_deployment_name(name)
        async with self._access_lock:
            async with self._db.transaction() as session:
                found = await self._store.get(session, name)
                if found is None:
                    raise NotFound("deployment", name)
                require(principal, DEPLOYMENTS_DELETE, found.team, kind="deployment", name=name)
                deleted = await self._store.delete(session, name)
                if deleted is None:
                    raise NotFound("deployment", name)
                if deleted.serving_version:
                    await self._events.traffic_changed(
                        session,
                        deleted,
                        {},
                        previous=deleted.traffic,
                        reason="deleted",
                        actor=principal.name,
                    )
            self._access.pop(name, None)
        await self._reconciler.retire(name, timeout_s=self._delete_wait_s)

    async def set_traffic(
        self,
        principal: Principal,
        name: str,
        shares: Sequence[tuple[str, int]],
        *,
        reason: str = "",
    ) -> Deployment:
        """Splits the deployment's traffic between versions of its model (see
        :mod:`services.serving.domain`); returns once the split applies, or after
        ``traffic_wait_s`` with the split still pending.

        Raises:
            InvalidArgument: the split is malformed (percents not summing to 100, a version
                named twice, too many versions).
            NotFound: no such deployment, or the caller is no member of its team; a version
                the registry does not have for the deployment's model.
            PermissionDenied: the caller's role in its team is below maintainer.
            FailedPrecondition: a split of several versions that leaves out the serving
                version (or while none serves).
            Unavailable: the registry cannot say whether the versions exist.
        """
        check_deployment_name(name)
        split = domain.check_split(shares)
        found = await self._find(name)
        if found is None:
            raise NotFound("deployment", name)
        require(principal, DEPLOYMENTS_TRAFFIC, found.team, kind="deployment", name=name)
        domain.pinned_version(found, split)
        refs: list[VersionRef] = []
        for version in sorted(split):
            if version == found.serving_version:
                continue
            known = found.canary(version)
            if known is not None:
                refs.append(VersionRef(version=version, source=known.source, run_id=known.run_id))
            else:
                # Versions of the deployment's own model only (the name is checked at creation).
                refs.append(await self._registry.version(found.model_name, version))
        request = TrafficRequest(
            split=tuple(sorted(split.items(), key=lambda share: int(share[0]))),
            refs=tuple(refs),
            reason=reason[:200],
            actor=principal.name,
        )
        at = domain.now()
        async with self._db.transaction() as session:
            cur = await self._store.get(session, name)
            if cur is None:
                raise NotFound("deployment", name)
            pin = domain.pinned_version(cur, split)
            if pin is not None and pin != cur.serving_version:
                ref = next(r for r in refs if r.version == pin)
                changed = domain.pinned(cur, ref, request, at=at)
            else:
                changed = domain.traffic_requested(cur, request, at=at)
            await self._store.save(session, changed)
        log.info(
            "deployment %s: %s asked for traffic %s",
            name,
            principal.name,
            " ".join(f"v{v}={p}%" for v, p in request.split),
        )
        await self._reconciler.settle(name, timeout_s=self._traffic_wait_s)
        return await self.get(principal, name)

    # -- who may call what, for inference -------------------------------------------------------

    async def load_access(self) -> None:
        """Reads every deployment's team and shares into memory (at start, before any route
        exists, so that inference is authorized without a query per request)."""
        async with self._access_lock, self._db.read() as session:
            self._access = await self._store.access(session)

    def access_table(self) -> dict[str, DeploymentAccess]:
        """Deployment name -> its team and the teams it is shared with: a snapshot of what
        inference is authorized against, in the shape a data-plane proxy is pushed (with the
        callers' identities, the proxy decides as :meth:`may_infer` does)."""
        return dict(self._access)

    def may_infer(self, principal: Principal, name: str) -> bool:
        """Whether ``principal`` may call deployment ``name`` for inference (no I/O)."""
        access = self._access.get(name)
        return access is not None and may(
            principal, INFERENCE_CALL, access.team, shared_with=access.shared_with
        )

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
        if promotion.team:
            # Deployments follow models of their own team only (checked at creation); another
            # team's model of the same name (deleted and registered again) moves none of them.
            following = [d for d in following if d.team == promotion.team]
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

    def authorized_route(self, principal: Principal, name: str) -> Route | None:
        """The route of ``name`` when it has one and ``principal`` may call it (no I/O); None
        otherwise (:meth:`find_route` then says why)."""
        route = self._reconciler.route(name)
        return route if route is not None and self.may_infer(principal, name) else None

    async def find_route(self, principal: Principal, name: str) -> Route:
        """The route of ``name``, asked of the store: the slow path after
        :meth:`authorized_route` found none.

        Raises:
            NotFound: no such deployment, or ``principal`` may not call it (the same answer,
                so that another team's private deployment does not leak).
            FailedPrecondition: its target failed and it has no version to serve.
            Unavailable: it has no version ready yet.
        """
        found = await self._find(name)
        if found is None or not may(
            principal, INFERENCE_CALL, found.team, shared_with=found.shared_with
        ):
            raise NotFound("deployment", name[:80])
        route = self._reconciler.route(name)
        if route is not None:
            return route
        if found.state is DeploymentState.FAILED:
            # Retrying cannot help until a promotion names a version that loads.
            raise FailedPrecondition(
                f"deployment {name!r} has no version to serve: {found.last_error or 'FAILED'}; "
                "promote a version that loads"
            )
        raise Unavailable(
            f"deployment {name!r} has no version ready to serve yet (state {found.state.value}); "
            "retry once it is READY"
        )

    async def _find(self, name: str) -> Deployment | None:
        try:
            check_deployment_name(name)
        except InvalidArgument:
            return None
        async with self._db.read() as session:
            return await self._store.get(session, name)
