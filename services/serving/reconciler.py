"""The rollout reconciler: brings every deployment to its target version on the model server.

Reconciliation is level-triggered: whenever the store changes (and every few seconds),
deployments whose target is neither served nor failed get a rollout worker, at most one per
deployment, so rollouts of one deployment are serialized. A worker downloads the version, builds
its Triton model, loads it, and then, only if the target has not moved on meanwhile, switches
traffic to it and unloads the old version. A newer promotion that arrives during a load therefore
wins, and stale versions are never switched to. A failed load leaves the old version serving.

A new deployment's worker first asks the registry where its alias points. A registry that cannot
answer is asked again later (exponential back-off with jitter, per deployment, without holding
the worker); a registry that refuses the question leaves the deployment FAILED. Likewise a load
that finds the model server down is tried again after a back-off instead of failing the version.

Direct models: with a data plane, a version that serves alone takes a second hop after its
rollout: its model is copied to one named as the deployment whose Triton version is the registry
version (``<deployment>`` serving version N), loaded, the route switched to it, and the
``<deployment>__v<N>`` model drained and unloaded. The data plane passes such requests without
rewriting them (a fraction of its cost per request). Canaries keep their ``__v`` models; the
stable version of a split stays direct. A hop that fails leaves the ``__v`` model serving.

Traffic splits: besides its serving (stable) version a deployment may serve *canaries*, each with
a share of the requests. A requested split (``SetTraffic``) is applied by the deployment's worker
too: it loads every canary first, then moves the shares (routes, then the inference data plane),
then unloads what left the split after the drain delay. :meth:`Reconciler.roll_back` takes every
canary's share back to the stable version at once (the SLO guard calls it).

The decisions themselves are the pure functions of :mod:`services.serving.domain`; this module
runs them against the store, the registry, the artifact store and the model server. No network
call happens while a write transaction is open. Imports neither grpc nor nats nor sqlalchemy.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from opentelemetry import trace

from plinth_common.db import Database
from plinth_common.errors import PlinthError, Unavailable
from plinth_common.events.tracing import extract, traceparent_of_current
from services.serving import domain
from services.serving.domain import (
    SERVING_ACTOR,
    Backend,
    BatchingSettings,
    Canary,
    Deployment,
    Limits,
    Route,
    Slo,
    Split,
    VersionRef,
)
from services.serving.ports import (
    ArtifactStore,
    DeploymentEvents,
    Deployments,
    ModelRegistry,
    ModelRepository,
    ModelServer,
    RoutePublisher,
)
from services.serving.signature import ModelIO, read_model_io

log = logging.getLogger(__name__)
tracer = trace.get_tracer("plinth.serving")

# One decision of the domain about one deployment: the deployment as it is -> as it becomes.
_Change = Callable[[Deployment], Deployment]
#: Requests in flight per Triton model on the request path (the data plane's ``in_flight``);
#: None while no data plane counts them (the Python path), and then the grace decides.
InFlight = Callable[[], Awaitable[Mapping[str, int] | None]]


class DirectModels(Protocol):
    """Direct copies of Triton models (``ModelRepository`` of ``services.serving.triton``;
    blocking calls: run them in a worker thread)."""

    def make_direct(self, model: str, deployment: str, version: str) -> None:
        """Copies ``model`` to the model named ``deployment`` serving only ``version``."""
        ...

    def direct_version(self, deployment: str) -> str | None:
        """The version the direct model of ``deployment`` serves, or None."""
        ...


# How often a drain asks the data plane whether the old version's requests have ended.
_DRAIN_POLL_S = 0.02


def _traceparent() -> str:
    return traceparent_of_current().get("traceparent", "")


@dataclass
class Backoff:
    """When to ask the registry again about each deployment: exponential, capped, with jitter
    (so that deployments created together do not ask together again).

    Attributes:
        initial_s: the first delay.
        max_s: the longest delay.
    """

    initial_s: float = 1.0
    max_s: float = 60.0
    _due: dict[str, tuple[float, int]] = field(default_factory=dict)

    def failed(self, name: str, now: float) -> float:
        """Records a failed attempt for ``name``; returns the delay before the next one."""
        attempts = self._due.get(name, (0.0, 0))[1] + 1
        delay = min(self.max_s, self.initial_s * 2 ** (attempts - 1)) * random.uniform(0.5, 1.0)
        self._due[name] = (now + delay, attempts)
        return delay

    def waiting(self, name: str, now: float) -> bool:
        """True while ``name``'s next attempt is not due."""
        due = self._due.get(name)
        return due is not None and due[0] > now

    def forget(self, name: str) -> None:
        """Starts ``name`` afresh (it succeeded, or it is gone)."""
        self._due.pop(name, None)

    def clear(self) -> None:
        """Starts every name afresh (what they waited for is back)."""
        self._due.clear()


class Reconciler:
    """Runs rollouts and keeps the inference routes.

    Args:
        db: the serving database.
        store: the deployments.
        events: deployment event recorder (the outbox).
        repository: the model server's repository on disk.
        artifacts: where versions' artifacts come from (MLflow).
        models: the model server (Triton).
        registry: tells where an alias points when a deployment is created.
        unload_grace_s: without ``in_flight`` (or when the data plane does not answer it), the
            fixed pause between moving traffic off an old version and unloading it, so that
            requests already routed to it reach Triton before it goes.
        drain_timeout_s: with ``in_flight``, how long an old version may keep requests after
            traffic moved off it before it is unloaded anyway (an upper bound: it goes as soon as
            its last request ended); None: ``unload_grace_s``.
        reconcile_interval_s: how often to look for work without a wake-up.
        max_parallel_rollouts: rollouts that may download and load at the same time.
        backoff: when to ask an unreachable registry again, or to load again on a model server
            that was down (one schedule each, with these settings).
        clock: monotonic seconds (the back-off's time).
        publisher: the inference data plane's routing table, pushed every route change (None:
            inference only on the Python path).
        on_rollout: told each rollout's outcome (``completed``, ``failed``, ``rolled_back``):
            serving's ``plinth_serving_rollouts_total``.
        in_flight: the data plane's requests in flight per Triton model, so that an old
            version is unloaded once drained (None: the Python path, a fixed pause).
        direct: makes a version that serves alone a direct model after its rollout (None:
            every version keeps its ``<deployment>__v<N>`` model).
    """

    def __init__(
        self,
        *,
        db: Database,
        store: Deployments,
        events: DeploymentEvents,
        repository: ModelRepository,
        artifacts: ArtifactStore,
        models: ModelServer,
        registry: ModelRegistry,
        unload_grace_s: float = 0.5,
        drain_timeout_s: float | None = None,
        reconcile_interval_s: float = 2.0,
        max_parallel_rollouts: int = 2,
        backoff: Backoff | None = None,
        clock: Callable[[], float] = time.monotonic,
        publisher: RoutePublisher | None = None,
        on_rollout: Callable[[str], None] | None = None,
        in_flight: InFlight | None = None,
        direct: DirectModels | None = None,
    ) -> None:
        self._direct = direct
        self._db = db
        self._store = store
        self._events = events
        self._repository = repository
        self._artifacts = artifacts
        self._models = models
        self._registry = registry
        self._unload_grace_s = unload_grace_s
        self._drain_timeout_s = unload_grace_s if drain_timeout_s is None else drain_timeout_s
        self._in_flight = in_flight
        self._reconcile_interval_s = reconcile_interval_s
        self._parallel = asyncio.Semaphore(max_parallel_rollouts)
        schedule = backoff or Backoff()
        self._lookup_backoff = schedule
        self._engine_backoff = Backoff(initial_s=schedule.initial_s, max_s=schedule.max_s)
        self._clock = clock
        self._routes: dict[str, Route] = {}
        # Deployment -> its canaries' routes with their percent; its limits and SLO.
        self._canaries: dict[str, tuple[tuple[Route, int], ...]] = {}
        self._limits: dict[str, Limits] = {}
        self._slos: dict[str, Slo] = {}
        self._publisher = publisher
        self._on_rollout = on_rollout or (lambda _outcome: None)
        self._publish_lock = asyncio.Lock()
        self._publish_failed = False
        # Triton models out of every route whose unload waits for a route push the data plane
        # took (until then it may still send them requests).
        self._unload_pending: set[str] = set()
        # Held from a traffic change's commit to its in-memory routes, so that two changes of
        # one deployment (a split applying, a rollback) land in the store's order.
        self._switching = asyncio.Lock()
        self._workers: dict[str, asyncio.Task[None]] = {}
        self._resolving: dict[str, asyncio.Future[None]] = {}
        self._wake = asyncio.Event()
        self._loop: asyncio.Task[None] | None = None
        self._started = asyncio.Event()
        # Any commit may have created work (a promotion, a new deployment): look again.
        db.on_commit(lambda _info: self._wake.set())

    # -- what the use cases ask -----------------------------------------------------------------

    def route(self, name: str) -> Route | None:
        """Where one inference request for deployment ``name`` goes (a version picked by the
        split's weights), or None (unknown or not serving)."""
        stable = self._routes.get(name)
        canaries = self._canaries.get(name)
        if stable is None or not canaries:
            return stable
        pick = random.randrange(100)
        for route, percent in canaries:
            if pick < percent:
                return route
            pick -= percent
        return stable

    def splits(self) -> list[Split]:
        """Every routed deployment's versions with their shares, the stable one first."""
        return [self._split(name, stable) for name, stable in sorted(self._routes.items())]

    def _split(self, name: str, stable: Route) -> Split:
        canaries = self._canaries.get(name, ())
        backends = [
            Backend(
                version=stable.version,
                triton_model=stable.triton_model,
                percent=100 - sum(percent for _, percent in canaries),
            )
        ]
        backends += [
            Backend(version=r.version, triton_model=r.triton_model, percent=percent)
            for r, percent in canaries
        ]
        return Split(
            deployment=name, backends=tuple(backends), limits=self._limits.get(name, Limits())
        )

    def routed_models(self) -> dict[str, str]:
        """``"<deployment>/<version>"`` -> Triton model, of every version answering now."""
        return {
            f"{route.deployment}/{route.version}": route.triton_model
            for route in self._all_routes()
        }

    def canaried(self) -> dict[str, tuple[Slo, tuple[str, ...]]]:
        """Deployments that serve canaries now: their SLO and the canary versions."""
        return {
            name: (self._slos.get(name, Slo()), tuple(r.version for r, _ in canaries))
            for name, canaries in self._canaries.items()
            if canaries
        }

    async def publish(self) -> bool:
        """Pushes every route to the inference data plane; False (logged) when it refused, in
        which case the next reconciliation pushes again."""
        if self._publisher is None:
            return True
        async with self._publish_lock:
            try:
                await self._publisher(self.splits())
            except Exception as exc:  # noqa: BLE001 - the data plane keeps its last good routes
                if not self._publish_failed:
                    log.warning(
                        "the inference data plane refused the routes (%s); it keeps its last "
                        "good routes, pushing again shortly",
                        domain.reason_of(exc),
                    )
                self._publish_failed = True
                return False
            if self._publish_failed:
                log.info("the inference data plane took the routes again")
            self._publish_failed = False
            return True

    async def retire(self, name: str, *, timeout_s: float) -> None:
        """After a deployment was deleted: stops its traffic at once, then waits (at most
        ``timeout_s``) until its worker has unloaded its models."""
        self._drop_routes(name)
        await self.publish()
        self._lookup_backoff.forget(name)
        self._engine_backoff.forget(name)
        # The deployment's worker owns its Triton models; once it sees the row gone it unloads
        # them (after a load in progress ends).
        worker = self._ensure_worker(name)
        try:
            await asyncio.wait_for(asyncio.shield(worker), timeout=timeout_s)
        except TimeoutError:
            log.warning("deployment %s: unload still running after %.0fs", name, timeout_s)

    async def settle(self, name: str, *, timeout_s: float) -> None:
        """Runs the deployment's worker now and waits (at most ``timeout_s``) until it has
        nothing left to do (SetTraffic waits so for its split)."""
        deadline = time.monotonic() + timeout_s
        while (left := deadline - time.monotonic()) > 0:
            worker = self._ensure_worker(name)
            try:
                await asyncio.wait_for(asyncio.shield(worker), timeout=left)
            except TimeoutError:
                return
            d = await self._get(name)
            if d is None or (d.pending_traffic is None and not d.needs_rollout):
                return
            if self._engine_backoff.waiting(name, self._clock()):
                return  # the model server is down: the split applies once it is back
            await asyncio.sleep(0.05)

    async def resolve_alias(self, name: str) -> None:
        """Asks the registry where a new deployment's alias points, if still unknown (one
        question per deployment at a time: CreateDeployment and its worker share it)."""
        running = self._resolving.get(name)
        if running is None:
            running = asyncio.ensure_future(self._ask_registry(name))
            self._resolving[name] = running
            running.add_done_callback(lambda _: self._resolving.pop(name, None))
        await asyncio.shield(running)

    # -- life cycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        """Starts reconciling in the background (after the model server is ready)."""
        self._loop = asyncio.create_task(self._run(), name="serving-reconciler")

    async def wait_started(self) -> None:
        """Waits until routes of the versions served before a restart are back."""
        await self._started.wait()

    async def stop(self) -> None:
        """Stops reconciling; a rollout in progress resumes after a restart."""
        tasks = [t for t in (self._loop, *self._workers.values()) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _run(self) -> None:
        while True:
            try:
                await self._models.wait_ready(timeout=60.0)
                break
            except TimeoutError as exc:
                log.warning("%s; rollouts wait for it", exc)
        try:
            await self._restore()
        except Exception:
            log.exception("restoring deployments failed")
        self._started.set()
        while True:
            try:
                await self.reconcile_once()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("reconciliation failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=self._reconcile_interval_s)
            self._wake.clear()

    async def reconcile_once(self) -> None:
        """Starts a worker for each deployment that has work and no worker (and pushes the
        routes again to a data plane that refused them)."""
        if self._publish_failed and await self.publish():
            await self._unload_after_grace(set())
        async with self._db.read() as session:
            pending = await self._store.needing_work(session)
        now = self._clock()
        for d in pending:
            if (
                d.lookup_pending
                and not d.needs_rollout
                and self._lookup_backoff.waiting(d.name, now)
            ):
                continue
            if d.needs_rollout and self._engine_backoff.waiting(d.name, now):
                continue
            self._ensure_worker(d.name)

    @property
    def started(self) -> bool:
        """True once the versions served before a restart are restored."""
        return self._started.is_set()

    async def reload_served(self) -> int:
        """Loads every serving version again into a model server that restarted empty, and
        records ``deployment.ready`` (a recovery) for each; returns how many it reloaded.

        Routes that change meanwhile (a rollout switching) are reloaded too, until every route
        was; a version that no longer loads rolls out again as after a restart.

        Raises:
            Unavailable: the model server went down again (the caller waits and calls again).
        """
        reloaded: set[str] = set()
        while todo := [r for r in self._all_routes() if r.triton_model not in reloaded]:
            for route in todo:
                reloaded.add(route.triton_model)
                if await self._reload(route):
                    await self._recovered(route)
        # Rollouts that found the model server down may go now rather than after their back-off.
        self._engine_backoff.clear()
        self._wake.set()
        return len(reloaded)

    async def _reload(self, route: Route) -> bool:
        try:
            await self._models.load(route.triton_model)
        except Unavailable:
            raise
        except Exception as exc:  # noqa: BLE001 - roll the version out again instead
            log.warning(
                "deployment %s: cannot reload v%s (%s); rolling out again",
                route.deployment,
                route.version,
                domain.reason_of(exc),
            )
            canaries = self._canaries.get(route.deployment, ())
            if any(r is route for r, _ in canaries):
                await self.roll_back(
                    route.deployment, f"v{route.version} cannot be reloaded", unloaded=True
                )
            elif self._routes.get(route.deployment) is route:
                self._drop_routes(route.deployment)
                await self.publish()
                await self._update(
                    route.deployment, lambda cur: domain.unserved(cur, at=domain.now())
                )
            return False
        return True

    def _all_routes(self) -> list[Route]:
        routes = list(self._routes.values())
        for canaries in self._canaries.values():
            routes += [r for r, _ in canaries]
        return routes

    def _in_use(self, name: str) -> set[str]:
        """The Triton models that answer for deployment ``name`` now."""
        stable = self._routes.get(name)
        models = {r.triton_model for r, _ in self._canaries.get(name, ())}
        return models | ({stable.triton_model} if stable is not None else set())

    def _set_routes(self, d: Deployment, stable: Route) -> None:
        self._routes[d.name] = stable
        self._canaries[d.name] = tuple(
            (self._route(d, c.version, c.io), c.percent) for c in d.canaries if c.io is not None
        )
        self._limits[d.name] = d.limits
        self._slos[d.name] = d.slo

    def _drop_routes(self, name: str) -> None:
        self._routes.pop(name, None)
        self._canaries.pop(name, None)
        self._limits.pop(name, None)
        self._slos.pop(name, None)

    async def _recovered(self, route: Route) -> None:
        async with self._db.transaction() as session:
            cur = await self._store.get(session, route.deployment)
            if cur is not None and cur.serving_version == route.version:
                await self._events.ready(session, cur, route.version, recovered=True)
        log.info("deployment %s: v%s serves again", route.deployment, route.version)

    async def wait_idle(self) -> None:
        """Waits until no rollout worker runs (tests use it after :meth:`reconcile_once`)."""
        while self._workers:
            await asyncio.gather(*self._workers.values(), return_exceptions=True)

    def _ensure_worker(self, name: str) -> asyncio.Task[None]:
        worker = self._workers.get(name)
        if worker is None or worker.done():
            worker = asyncio.create_task(self._work(name), name=f"rollout-{name}")
            self._workers[name] = worker
            worker.add_done_callback(self._forget_worker)
        return worker

    def _forget_worker(self, task: asyncio.Task[None]) -> None:
        name = task.get_name().removeprefix("rollout-")
        if self._workers.get(name) is task:
            del self._workers[name]

    async def _restore(self) -> None:
        """Reloads what served before a restart; drops what interrupted rollouts left."""
        await asyncio.to_thread(self._repository.clear_staging)
        async with self._db.read() as session:
            served = await self._store.serving(session)
        keep = set()
        for d in served:
            try:
                model = await self._restored_model(d.name, d.serving_version)
                if d.serving_io is None:
                    raise ValueError("its tensors were not recorded")
                if not await asyncio.to_thread(self._repository.exists, model):
                    raise FileNotFoundError(f"{model} is missing from the repository")
                await self._models.load(model)
            except Exception as exc:  # noqa: BLE001 - roll the target out again instead
                log.warning(
                    "deployment %s: cannot restore v%s (%s); rolling out again",
                    d.name,
                    d.serving_version,
                    domain.reason_of(exc),
                )
                await self._update(d.name, lambda cur: domain.unserved(cur, at=domain.now()))
                continue
            keep.add(model)
            restored = await self._restore_canaries(d)
            keep |= {self._repository.model_name(d.name, c.version) for c in restored.canaries}
            route = self._route(d, d.serving_version, d.serving_io)
            self._set_routes(restored, dataclasses.replace(route, triton_model=model))
        for model in await asyncio.to_thread(self._repository.models):
            if model not in keep:
                await self._discard(model)
        await self.publish()
        log.info("restored %d deployments", len(served))

    async def _restored_model(self, name: str, version: str) -> str:
        """The model that served ``version`` before a restart: the direct one when its folder
        holds that version, else ``<name>__v<version>`` (and deployments stored before)."""
        model = self._repository.model_name(name, version)
        if self._direct is None or self._publisher is None:
            return model
        direct = await asyncio.to_thread(self._direct.direct_version, name)
        return name if direct == version else model

    async def _restore_canaries(self, d: Deployment) -> Deployment:
        """Loads a deployment's canaries again after a restart; one that does not load rolls
        every canary back (the stable version takes all the traffic)."""
        try:
            for c in d.canaries:
                model = self._repository.model_name(d.name, c.version)
                if c.io is None or not await asyncio.to_thread(self._repository.exists, model):
                    raise FileNotFoundError(f"{model} is missing from the repository")
                await self._models.load(model)
        except Exception as exc:  # noqa: BLE001 - the stable version serves alone instead
            reason = f"canary cannot be restored ({domain.reason_of(exc)})"
            log.warning("deployment %s: %s; rolling back", d.name, reason)
            async with self._db.transaction() as session:
                cur = await self._store.get(session, d.name)
                if cur is None or not cur.canaries:
                    return d
                saved = await self._store.save(session, domain.rolled_back(cur, at=domain.now()))
                if saved is None:
                    return d
                await self._events.traffic_changed(
                    session,
                    saved,
                    saved.traffic,
                    previous=cur.traffic,
                    reason=f"rollback: {reason}",
                )
                return saved
        return d

    # -- the registry ---------------------------------------------------------------------------

    async def _ask_registry(self, name: str) -> None:
        d = await self._get(name)
        if d is None or not d.lookup_pending:
            return
        try:
            ref = await self._registry.version_for_alias(d.model_name, d.alias)
        except Unavailable as exc:
            why = exc.message
            self._retry_lookup_later(name, why)
            await self._update_pending(
                name, lambda cur: domain.lookup_retrying(cur, why, at=domain.now())
            )
            return
        except PlinthError as exc:
            # The registry answered, and no retry of the same question can change the answer.
            refusal = exc.message
            log.warning(
                "deployment %s: the registry refused %s@%s for good: %s",
                name,
                d.model_name,
                d.alias,
                refusal,
            )
            self._lookup_backoff.forget(name)
            await self._update_pending(
                name, lambda cur: domain.lookup_refused(cur, refusal, at=domain.now())
            )
            return
        except Exception as exc:  # an unexpected failure: logged, and asked again later
            log.exception("deployment %s: asking the registry failed", name)
            self._retry_lookup_later(name, domain.reason_of(exc))
            return
        self._lookup_backoff.forget(name)
        traceparent = _traceparent()
        changed = await self._update_pending(
            name,
            lambda cur: domain.resolved(cur, ref, traceparent=traceparent, at=domain.now()),
        )
        if changed is not None and ref is not None:
            log.info("deployment %s: %s@%s is v%s", name, d.model_name, d.alias, ref.version)
        elif changed is not None:
            log.info(
                "deployment %s: %s@%s points nowhere yet; waiting for a promotion",
                name,
                d.model_name,
                d.alias,
            )

    def _retry_lookup_later(self, name: str, reason: str) -> None:
        delay = self._lookup_backoff.failed(name, self._clock())
        log.warning(
            "deployment %s: cannot ask the registry (%s); retrying in %.0fs", name, reason, delay
        )

    async def _update_pending(self, name: str, change: _Change) -> Deployment | None:
        """Applies ``change`` only while the lookup is still pending: a promotion that got there
        first is newer than what the registry said before it."""

        def if_pending(cur: Deployment) -> Deployment:
            return change(cur) if cur.lookup_pending else cur

        return await self._update(name, if_pending)

    # -- rollouts -------------------------------------------------------------------------------

    async def _work(self, name: str) -> None:
        try:
            while True:
                d = await self._get(name)
                if d is None:
                    await self._purge(name)
                    return
                if d.lookup_pending and not d.target_version:
                    await self.resolve_alias(name)
                    d = await self._get(name)
                    if d is None:
                        continue
                    if d.lookup_pending:
                        return  # the registry did not answer; the reconciler retries later
                if not d.needs_rollout:
                    if d.loading_version:
                        await self._update(name, lambda cur: domain.settled(cur, at=domain.now()))
                    if d.pending_traffic is not None:
                        if self._engine_backoff.waiting(name, self._clock()):
                            return
                        async with self._parallel:
                            await self._apply_traffic(d)
                    return
                if self._engine_backoff.waiting(name, self._clock()):
                    return  # the model server was down; the reconciler starts it again later
                async with self._parallel:
                    await self._roll_out(d)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("deployment %s: rollout worker failed", name)

    async def _roll_out(self, d: Deployment) -> None:
        with tracer.start_as_current_span(
            f"deployment {d.name} rollout",
            context=extract({"traceparent": d.target_traceparent}),
            attributes={"plinth.deployment": d.name, "plinth.model.version": d.target_version},
        ):
            await self._roll_out_traced(d)

    async def _roll_out_traced(self, d: Deployment) -> None:
        name, version = d.name, d.target_version

        def start_loading(cur: Deployment) -> Deployment:
            return domain.loading(cur, at=domain.now()) if cur.target_version == version else cur

        started = await self._update(name, start_loading)
        if started is None or started.target_version != version:
            return
        log.info("deployment %s: loading v%s from %s", name, version, d.target_source)
        began = time.monotonic()
        model = ""
        try:
            model = self._repository.model_name(name, version)
            canary = d.canary(version)
            if canary is not None and canary.io is not None and model in self._in_use(name):
                io = canary.io  # loaded and answering already: it takes all the traffic now
            else:
                io = await self._build(model, d.target_source, d.batching)
                await self._models.load(model)
        except asyncio.CancelledError:
            raise
        except Unavailable as exc:
            await self._postpone(name, version, model, exc.message)
            return
        except Exception as exc:  # noqa: BLE001 - every other failure ends the same way
            await self._fail(name, version, model, domain.reason_of(exc))
            return
        self._engine_backoff.forget(name)
        log.info("deployment %s: v%s loaded in %.1fs", name, version, time.monotonic() - began)
        async with self._switching:
            switched = await self._switch(name, version, io)
            old = self._in_use(name)
            if switched is not None:
                self._set_routes(switched, self._route(switched, version, io))
        if switched is None:
            log.info("deployment %s: v%s is stale (target moved on); dropping it", name, version)
            if model not in self._in_use(name):
                await self._discard(model)
            return
        # Load new, switch the routes (here and in the data plane), drain, then unload old.
        published = await self.publish()
        log.info("deployment %s: traffic moved to v%s", name, version)
        self._on_rollout("completed")
        await self._unload_after_grace(old - {model}, published=published)
        await self._go_direct(name)

    async def _go_direct(self, name: str) -> None:
        """The second hop: a version serving alone moves from its ``__v`` model to the direct
        one (load, switch if still the same route, drain, unload); a failure keeps the ``__v``
        model serving."""
        stable = self._routes.get(name)
        if (
            self._direct is None
            or self._publisher is None
            or self._publish_failed
            or stable is None
            or stable.triton_model == name
            or self._canaries.get(name)
            or name in self._unload_pending
        ):
            return
        model = stable.triton_model
        try:
            await asyncio.to_thread(self._direct.make_direct, model, name, stable.version)
            await self._models.load(name)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - the __v model keeps serving
            log.warning(
                "deployment %s: v%s stays on %s (no direct model: %s)",
                name,
                stable.version,
                model,
                domain.reason_of(exc),
            )
            await self._discard(name)
            return
        async with self._switching:
            moved_on = self._routes.get(name) is not stable or bool(self._canaries.get(name))
            if not moved_on:
                self._routes[name] = dataclasses.replace(stable, triton_model=name)
        if moved_on:
            if name not in self._in_use(name):
                await self._discard(name)
            return
        published = await self.publish()
        log.info("deployment %s: v%s serves as the direct model %s", name, stable.version, name)
        await self._unload_after_grace({model}, published=published)

    async def _unload_after_grace(self, models: set[str], *, published: bool = True) -> None:
        """Unloads ``models`` (and those held back earlier) once the data plane took routes
        without them; after a refused push they wait for the next push it takes."""
        if not published:
            if models:
                log.warning(
                    "the data plane may still route to %s: unloading after its next route push",
                    ", ".join(sorted(models)),
                )
            self._unload_pending |= models
            return
        routed = {route.triton_model for route in self._all_routes()}
        models = (models | self._unload_pending) - routed
        self._unload_pending -= models | routed
        if not models:
            return
        await self._drain(models)
        for model in sorted(models):
            if model not in {route.triton_model for route in self._all_routes()}:
                await self._discard(model)

    async def _drain(self, models: set[str]) -> None:
        """Waits until the data plane has no request in flight on ``models``, at most the
        drain timeout (logged when reached); without a data plane, the unload grace."""
        if self._in_flight is None:
            await asyncio.sleep(self._unload_grace_s)
            return
        started = time.monotonic()
        deadline = started + self._drain_timeout_s
        busy: dict[str, int] = {}
        while True:
            try:
                counts = await self._in_flight()
            except Exception as exc:  # noqa: BLE001 - then the grace decides, as without one
                log.warning(
                    "cannot ask the data plane what is in flight on %s (%s): unloading after "
                    "the grace of %.1f s",
                    ", ".join(sorted(models)),
                    domain.reason_of(exc),
                    self._unload_grace_s,
                )
                await self._rest_of_grace(started)
                return
            if counts is None:  # no data plane right now: requests take the Python path
                await self._rest_of_grace(started)
                return
            busy = {model: counts[model] for model in models if counts.get(model, 0) > 0}
            if not busy:
                return
            if time.monotonic() >= deadline:
                break
            await asyncio.sleep(_DRAIN_POLL_S)
        log.warning(
            "unloading %s with requests still in flight (%s) after the drain timeout of %.1f s",
            ", ".join(sorted(busy)),
            ", ".join(f"{model}: {n}" for model, n in sorted(busy.items())),
            self._drain_timeout_s,
        )

    async def _rest_of_grace(self, started: float) -> None:
        await asyncio.sleep(max(0.0, started + self._unload_grace_s - time.monotonic()))

    async def _switch(self, name: str, version: str, io: ModelIO) -> Deployment | None:
        """Moves traffic to ``version`` if it is still the target; None when it is stale."""
        async with self._db.transaction() as session:
            cur = await self._store.get(session, name)
            if cur is None or cur.target_version != version:
                return None
            saved = await self._store.save(
                session, domain.switched(cur, version, io, at=domain.now())
            )
            if saved is None:
                return None
            pin = cur.pending_traffic
            if pin is not None and pin.percents == {version: 100}:
                reason, actor = _set_traffic_reason(pin.reason), pin.actor
            else:
                reason, actor = f"rollout of v{version} ({cur.alias})", SERVING_ACTOR
            await self._events.ready(session, saved, version)
            await self._events.traffic_changed(
                session, saved, saved.traffic, previous=cur.traffic, reason=reason, actor=actor
            )
            return saved

    # -- traffic splits -------------------------------------------------------------------------

    async def _apply_traffic(self, d: Deployment) -> None:
        """Loads a requested split's canaries, then moves the shares, then unloads what left."""
        request = d.pending_traffic
        if request is None:
            return
        name, split, stable = d.name, request.percents, d.serving_version
        if not stable or stable not in split:
            reason = f"the split no longer keeps the serving version v{stable or '-'}"
            await self._update(
                name, lambda cur: domain.traffic_failed(cur, stable, reason, at=domain.now())
            )
            return
        refs = {ref.version: ref for ref in request.refs}
        canaries: list[Canary] = []
        loaded: list[str] = []
        in_use = self._in_use(name)
        for version, percent in sorted(split.items()):
            if version == stable:
                continue
            model = ""
            try:
                model = self._repository.model_name(name, version)
                known = d.canary(version)
                if known is not None and known.io is not None and model in in_use:
                    canaries.append(dataclasses.replace(known, percent=percent))
                    continue
                ref = refs.get(version) or VersionRef(version=version, source="")
                log.info("deployment %s: loading canary v%s from %s", name, version, ref.source)
                io = await self._build(model, ref.source, d.batching)
                await self._models.load(model)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the split stays as it was
                reason = domain.reason_of(exc)
                for m in [*loaded, model]:
                    if m and m not in in_use:
                        await self._discard(m)
                if isinstance(exc, Unavailable):
                    # The model server is down: the split applies once it is back.
                    self._engine_backoff.failed(name, self._clock())
                    log.warning("deployment %s: canary v%s waits: %s", name, version, reason)
                    return
                log.warning("deployment %s: canary v%s failed: %s", name, version, reason)
                await self._traffic_failed(name, request, version, reason)
                return
            loaded.append(model)
            canaries.append(
                Canary(
                    version=version, percent=percent, source=ref.source, run_id=ref.run_id, io=io
                )
            )
        self._engine_backoff.forget(name)
        async with self._switching:
            applied = await self._commit_split(name, request, stable, tuple(canaries))
            old = self._in_use(name)
            stable_route = self._routes.get(name)
            if applied is not None and stable_route is not None:
                self._set_routes(applied, stable_route)
        if applied is None:
            log.info("deployment %s: the requested split was superseded", name)
            for model in loaded:
                if model not in self._in_use(name):
                    await self._discard(model)
            return
        published = await self.publish()
        log.info("deployment %s: traffic is now %s", name, _split_text(applied.traffic))
        await self._unload_after_grace(old - self._in_use(name), published=published)
        await self._go_direct(name)

    async def _commit_split(
        self, name: str, request: Any, stable: str, canaries: tuple[Canary, ...]
    ) -> Deployment | None:
        async with self._db.transaction() as session:
            cur = await self._store.get(session, name)
            if (
                cur is None
                or cur.pending_traffic != request
                or cur.serving_version != stable
                or name not in self._routes
            ):
                return None
            saved = await self._store.save(
                session, domain.canaries_applied(cur, canaries, at=domain.now())
            )
            if saved is None:
                return None
            await self._events.traffic_changed(
                session,
                saved,
                saved.traffic,
                previous=cur.traffic,
                reason=_set_traffic_reason(request.reason),
                actor=request.actor,
            )
            return saved

    async def _traffic_failed(self, name: str, request: Any, version: str, reason: str) -> None:
        async with self._db.transaction() as session:
            cur = await self._store.get(session, name)
            if cur is None or cur.pending_traffic != request:
                return
            saved = await self._store.save(
                session, domain.traffic_failed(cur, version, reason, at=domain.now())
            )
            if saved is not None:
                await self._events.failed(session, saved, version, reason)

    async def roll_back(self, name: str, reason: str, *, unloaded: bool = False) -> bool:
        """Gives every canary's share of ``name`` back to its serving version at once (records
        ``deployment.traffic_changed`` with ``reason``), then unloads the canaries; False when
        it serves no canary (any more).

        Args:
            name: the deployment.
            reason: why, as the event says it ("rollback: ..." is prefixed).
            unloaded: the canaries are gone from the model server already (a reload failed).
        """
        async with self._switching:
            old = self._in_use(name)
            async with self._db.transaction() as session:
                cur = await self._store.get(session, name)
                if cur is None or not cur.canaries:
                    return False
                saved = await self._store.save(session, domain.rolled_back(cur, at=domain.now()))
                if saved is None:
                    return False
                await self._events.traffic_changed(
                    session,
                    saved,
                    saved.traffic,
                    previous=cur.traffic,
                    reason=f"rollback: {reason}",
                )
            stable = self._routes.get(name)
            if stable is not None:
                self._set_routes(saved, stable)
        log.warning("deployment %s: canaries rolled back: %s", name, reason)
        self._on_rollout("rolled_back")
        published = await self.publish()
        if not unloaded:
            await self._unload_after_grace(old - self._in_use(name), published=published)
        # No second hop here: the guard calls this beside the deployment's worker, which owns
        # its models; a stable version still on its __v model goes direct at its next change.
        return True

    async def _build(self, model: str, source: str, batching: BatchingSettings) -> ModelIO:
        """Downloads the version and writes its Triton model into the repository."""
        staging = await asyncio.to_thread(self._repository.new_staging, model)
        try:
            downloaded = await self._artifacts.download(source, staging / "download")
            io = await asyncio.to_thread(read_model_io, downloaded)
            await asyncio.to_thread(
                self._repository.install, model, staging, downloaded, io, batching
            )
            return io
        finally:
            await asyncio.to_thread(self._repository.discard_staging, staging)

    async def _fail(self, name: str, version: str, model: str, reason: str) -> None:
        log.warning("deployment %s: v%s failed: %s", name, version, reason)
        if model and model not in self._in_use(name):
            await self._discard(model)
        async with self._db.transaction() as session:
            cur = await self._store.get(session, name)
            if cur is None:
                return
            saved = await self._store.save(
                session, domain.rollout_failed(cur, version, reason, at=domain.now())
            )
            if saved is not None:
                await self._events.failed(session, saved, version, reason)
        if saved is not None:
            self._on_rollout("failed")

    async def _postpone(self, name: str, version: str, model: str, reason: str) -> None:
        delay = self._engine_backoff.failed(name, self._clock())
        log.warning(
            "deployment %s: v%s waits for the model server (%s); loading again in %.0fs",
            name,
            version,
            reason,
            delay,
        )
        if model and model not in self._in_use(name):
            await self._discard(model)
        await self._update(
            name, lambda cur: domain.postponed(cur, version, reason, at=domain.now())
        )

    async def _purge(self, name: str) -> None:
        """Unloads and removes every model of a deleted deployment."""
        self._drop_routes(name)
        for model in await asyncio.to_thread(self._repository.models_of, name):
            await self._discard(model)
        log.info("deployment %s: deleted and unloaded", name)

    async def _discard(self, model: str) -> None:
        try:
            await self._models.unload(model)
        except Exception as exc:  # noqa: BLE001 - the folder goes anyway; Triton forgets on restart
            log.warning("cannot unload %s: %s", model, domain.reason_of(exc))
        await asyncio.to_thread(self._repository.remove, model)

    # -- the store ------------------------------------------------------------------------------

    async def _get(self, name: str) -> Deployment | None:
        async with self._db.read() as session:
            return await self._store.get(session, name)

    async def _update(self, name: str, change: _Change) -> Deployment | None:
        """Reads, changes and writes one deployment in one short transaction; None when gone."""
        async with self._db.transaction() as session:
            cur = await self._store.get(session, name)
            if cur is None:
                return None
            new = change(cur)
            return cur if new == cur else await self._store.save(session, new)

    def _route(self, d: Deployment, version: str, io: ModelIO) -> Route:
        return Route(
            deployment=d.name,
            version=version,
            triton_model=self._repository.model_name(d.name, version),
            io=io,
            max_batch_size=d.batching.max_batch_size,
        )


def _set_traffic_reason(reason: str) -> str:
    return f"SetTraffic: {reason}" if reason else "SetTraffic"


def _split_text(traffic: dict[str, int]) -> str:
    return " ".join(f"v{version}={percent}%" for version, percent in traffic.items())
