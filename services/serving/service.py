"""Serving domain logic: deployments, their rollouts on Triton, and the routes inference uses.
Imports neither grpc nor nats.

A deployment follows one alias of one registered model. The alias's version, as last heard
(from a ``plinth.model.promoted`` event, or from the registry when the deployment is created),
is its *target*. Reconciliation is level-triggered: whenever the store changes (and every few
seconds), deployments whose target is neither served nor failed get a rollout worker, at most
one per deployment, so rollouts of one deployment are serialized. A worker downloads the
version, builds its Triton model, loads it, and then, only if the target has not moved on
meanwhile, switches traffic to it and unloads the old version. A newer promotion that arrives
during a load therefore wins, and stale versions are never switched to.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from opentelemetry import trace
from sqlalchemy.exc import IntegrityError

from plinth_common.db import Database
from plinth_common.errors import AlreadyExists, InvalidArgument, NotFound, PlinthError, Unavailable
from plinth_common.events.tracing import extract, traceparent_of_current
from services.serving.repository import ModelRepository, triton_model_name
from services.serving.signature import BatchingSettings, ModelIO, read_model_io
from services.serving.store import (
    DeploymentRow,
    DeploymentStore,
    decode_page_token,
    encode_page_token,
)

log = logging.getLogger(__name__)
tracer = trace.get_tracer("plinth.serving")


def _current_traceparent() -> str:
    return traceparent_of_current().get("traceparent", "")


DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
ALIAS = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_-]{0,63}$")
VERSION = re.compile(r"^[0-9]{1,18}$")
DEFAULT_ALIAS = "production"
DEFAULT_MAX_BATCH_SIZE = 8
MAX_BATCH_SIZE = 1024
MAX_QUEUE_DELAY_US = 1_000_000
MAX_INSTANCES = 16
MAX_PAGE_SIZE = 500
_MAX_REASON = 2000


class DeploymentState(str, enum.Enum):
    """Where a deployment is relative to its target version."""

    PENDING = "PENDING"
    LOADING = "LOADING"
    READY = "READY"
    FAILED = "FAILED"


@dataclass(frozen=True, kw_only=True)
class DeploymentSpec:
    """What a user asks for; zeros in ``batching`` mean the defaults."""

    name: str
    team: str
    model_name: str
    alias: str = ""
    batching: BatchingSettings = BatchingSettings(
        max_batch_size=0, max_queue_delay_us=0, instance_count=0
    )


@dataclass(frozen=True, kw_only=True)
class VersionRef:
    """A registered model version: its number, artifact URI and run."""

    version: str
    source: str
    run_id: str = ""


@dataclass(frozen=True, kw_only=True)
class Promotion:
    """An alias moved (the payload of ``plinth.model.promoted`` plus the event's time)."""

    model_name: str
    alias: str
    version: str
    source: str
    run_id: str
    time: datetime


@dataclass(frozen=True, kw_only=True)
class Route:
    """Where inference for a deployment goes.

    Attributes:
        deployment: the name clients use.
        version: the registered model version that answers.
        triton_model: the Triton model that serves it.
        io: its tensors.
        max_batch_size: the largest batch one request may carry.
    """

    deployment: str
    version: str
    triton_model: str
    io: ModelIO
    max_batch_size: int


class AliasResolver(Protocol):
    """Tells where an alias points (the registry)."""

    async def version_for_alias(self, model_name: str, alias: str) -> VersionRef | None: ...


class ArtifactStore(Protocol):
    """Fetches a version's artifacts (MLflow)."""

    async def download(self, source: str, dst: Path) -> Path: ...


class ModelServer(Protocol):
    """Loads and unloads models of the repository (Triton)."""

    async def wait_ready(self, timeout: float = ...) -> None: ...

    async def load(self, model: str) -> None: ...

    async def unload(self, model: str) -> None: ...


class DeploymentEvents(Protocol):
    """Records deployment events in the caller's transaction (the outbox)."""

    async def ready(self, session: Any, row: DeploymentRow, version: str) -> None: ...

    async def failed(self, session: Any, row: DeploymentRow, version: str, reason: str) -> None: ...

    async def traffic_changed(
        self, session: Any, row: DeploymentRow, traffic: Mapping[str, int]
    ) -> None: ...


def _now() -> datetime:
    return datetime.now(UTC)


def _utc(value: datetime) -> datetime:
    # SQLite hands back naive datetimes; everything here is UTC.
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def _check(field_name: str, value: str, pattern: re.Pattern[str], rule: str) -> None:
    if not pattern.match(value):
        raise InvalidArgument(field_name, rule)


def check_deployment_name(value: str, field_name: str = "name") -> None:
    """Raises InvalidArgument unless ``value`` is a DNS label."""
    _check(
        field_name,
        value,
        DNS_LABEL,
        "lower-case letters, digits and '-', 1 to 63, starting and ending with a letter or digit",
    )


def validate_spec(spec: DeploymentSpec) -> DeploymentSpec:
    """Checks a deployment request and fills in defaults.

    Raises:
        InvalidArgument: naming the first field that is wrong.
    """
    check_deployment_name(spec.name)
    check_deployment_name(spec.team, "team")
    _check(
        "model_name",
        spec.model_name,
        MODEL_NAME,
        "letters, digits, '.', '_' and '-', at most 128, starting with a letter or digit",
    )
    alias = spec.alias or DEFAULT_ALIAS
    _check("alias", alias, ALIAS, "letters, digits, '_' and '-', at most 64, not starting with '-'")
    b = spec.batching
    max_batch = b.max_batch_size or DEFAULT_MAX_BATCH_SIZE
    if not 1 <= max_batch <= MAX_BATCH_SIZE:
        raise InvalidArgument(
            "triton.max_batch_size", f"between 1 and {MAX_BATCH_SIZE}, got {b.max_batch_size}"
        )
    if not 0 <= b.max_queue_delay_us <= MAX_QUEUE_DELAY_US:
        raise InvalidArgument(
            "triton.max_queue_delay_microseconds",
            f"between 0 and {MAX_QUEUE_DELAY_US}, got {b.max_queue_delay_us}",
        )
    instances = b.instance_count or 1
    if not 1 <= instances <= MAX_INSTANCES:
        raise InvalidArgument(
            "triton.instance_count", f"between 1 and {MAX_INSTANCES}, got {b.instance_count}"
        )
    return DeploymentSpec(
        name=spec.name,
        team=spec.team,
        model_name=spec.model_name,
        alias=alias,
        batching=BatchingSettings(
            max_batch_size=max_batch,
            max_queue_delay_us=b.max_queue_delay_us,
            instance_count=instances,
        ),
    )


def state_of(row: DeploymentRow, **changes: Any) -> str:
    """The state that ``row`` (with ``changes`` applied) is in."""
    values = {**row.__dict__, **changes}
    target = values["target_version"]
    if not target:
        return DeploymentState.PENDING.value
    if target == values["serving_version"]:
        return DeploymentState.READY.value
    if target == values["failed_version"]:
        return DeploymentState.FAILED.value
    return DeploymentState.LOADING.value


def _needs_rollout(row: DeploymentRow) -> bool:
    return bool(row.target_version) and row.target_version not in (
        row.serving_version,
        row.failed_version,
    )


def batching_of(row: DeploymentRow) -> BatchingSettings:
    """The Triton settings of a stored deployment."""
    return BatchingSettings(
        max_batch_size=row.max_batch_size,
        max_queue_delay_us=row.max_queue_delay_us,
        instance_count=row.instance_count,
    )


def _reason(exc: BaseException) -> str:
    text = exc.message if isinstance(exc, PlinthError) else str(exc)
    return (text or type(exc).__name__)[:_MAX_REASON]


class ServingService:
    """Deployments: commands, queries, promotions, rollouts, and the inference routes.

    Args:
        db: the serving database.
        store: deployment queries.
        events: deployment event recorder (the outbox).
        repository: the Triton model repository on disk.
        artifacts: where versions' artifacts come from (MLflow).
        models: the model server (Triton).
        registry: tells where an alias points when a deployment is created.
        unload_grace_s: pause between moving traffic and unloading the old version, so that
            requests already routed to it reach Triton before it goes.
        reconcile_interval_s: how often to look for work without a wake-up.
        max_parallel_rollouts: rollouts that may download and load at the same time.
        delete_wait_s: how long DeleteDeployment waits for the unload.
    """

    def __init__(
        self,
        *,
        db: Database,
        store: DeploymentStore,
        events: DeploymentEvents,
        repository: ModelRepository,
        artifacts: ArtifactStore,
        models: ModelServer,
        registry: AliasResolver,
        unload_grace_s: float = 0.5,
        reconcile_interval_s: float = 2.0,
        max_parallel_rollouts: int = 2,
        delete_wait_s: float = 60.0,
    ) -> None:
        self._db = db
        self._store = store
        self._events = events
        self._repository = repository
        self._artifacts = artifacts
        self._models = models
        self._registry = registry
        self._unload_grace_s = unload_grace_s
        self._reconcile_interval_s = reconcile_interval_s
        self._delete_wait_s = delete_wait_s
        self._parallel = asyncio.Semaphore(max_parallel_rollouts)
        self._routes: dict[str, Route] = {}
        self._workers: dict[str, asyncio.Task[None]] = {}
        self._lookup_retry_at: dict[str, tuple[float, float]] = {}
        self._resolving: dict[str, asyncio.Future[None]] = {}
        self._wake = asyncio.Event()
        self._reconciler: asyncio.Task[None] | None = None
        self._started = asyncio.Event()
        # Any commit may have created work (a promotion, a new deployment): look again.
        db.on_commit(lambda _info: self._wake.set())

    # -- commands and queries ------------------------------------------------------------------

    async def create(self, spec: DeploymentSpec) -> DeploymentRow:
        """Creates a deployment; if its alias already points to a version, that version loads.

        Raises:
            InvalidArgument: a field is wrong.
            AlreadyExists: the name is taken.
        """
        spec = validate_spec(spec)
        now = _now()
        try:
            async with self._db.transaction() as session:
                if await self._store.get(session, spec.name) is not None:
                    raise AlreadyExists("deployment", spec.name)
                await self._store.insert(
                    session,
                    name=spec.name,
                    team=spec.team,
                    model_name=spec.model_name,
                    alias=spec.alias,
                    max_batch_size=spec.batching.max_batch_size,
                    max_queue_delay_us=spec.batching.max_queue_delay_us,
                    instance_count=spec.batching.instance_count,
                    state=DeploymentState.PENDING.value,
                    lookup_pending=True,
                    created_at=now,
                    updated_at=now,
                )
        except IntegrityError:
            raise AlreadyExists("deployment", spec.name) from None
        # Asked after the insert, so a promotion that lands meanwhile is not lost: the lookup's
        # answer is only recorded if no promotion has set the target in between (promotions
        # are newer than what the registry said before them).
        await self._resolve_alias(spec.name)
        return await self.get(spec.name)

    async def get(self, name: str) -> DeploymentRow:
        """The deployment, or NotFound."""
        check_deployment_name(name)
        async with self._db.read() as session:
            row = await self._store.get(session, name)
        if row is None:
            raise NotFound("deployment", name)
        return row

    async def list(
        self, *, team: str = "", page_size: int = 0, page_token: str = ""
    ) -> tuple[list[DeploymentRow], str]:
        """A page of deployments, newest first, and the next page's token ('' at the end)."""
        if team:
            check_deployment_name(team, "team")
        if not 0 <= page_size <= MAX_PAGE_SIZE:
            raise InvalidArgument("page_size", f"between 0 and {MAX_PAGE_SIZE}")
        limit = page_size or 50
        before = decode_page_token(page_token) if page_token else None
        async with self._db.read() as session:
            rows = await self._store.page(session, team=team, limit=limit + 1, before_seq=before)
        token = encode_page_token(rows[limit - 1].seq) if len(rows) > limit else ""
        return rows[:limit], token

    async def delete(self, name: str) -> None:
        """Deletes a deployment: inference stops at once, its Triton models are unloaded.

        Raises:
            NotFound: no such deployment.
        """
        check_deployment_name(name)
        async with self._db.transaction() as session:
            row = await self._store.delete(session, name)
            if row is None:
                raise NotFound("deployment", name)
            if row.serving_version:
                await self._events.traffic_changed(session, row, {})
        self._routes.pop(name, None)
        self._lookup_retry_at.pop(name, None)
        # The deployment's worker owns its Triton models; once it sees the row gone it unloads
        # them (after a load in progress ends).
        worker = self._ensure_worker(name)
        try:
            await asyncio.wait_for(asyncio.shield(worker), timeout=self._delete_wait_s)
        except TimeoutError:
            log.warning(
                "deployment %s: unload still running after %.0fs", name, self._delete_wait_s
            )

    # -- promotions ----------------------------------------------------------------------------

    async def on_promoted(self, session: Any, promotion: Promotion) -> int:
        """Points every deployment that follows the promoted alias at the new version.

        Runs inside the consumer's transaction; the rollout itself starts after the commit.
        Returns how many deployments follow the alias.
        """
        if not (MODEL_NAME.match(promotion.model_name) and ALIAS.match(promotion.alias)):
            log.warning(
                "ignoring promotion with malformed model %r / alias %r",
                promotion.model_name[:80],
                promotion.alias[:80],
            )
            return 0
        when = _utc(promotion.time)
        count = 0
        for row in await self._store.following(session, promotion.model_name, promotion.alias):
            count += 1
            if row.target_time is not None and when < _utc(row.target_time):
                log.info(
                    "deployment %s: promotion to v%s is older than its target v%s; skipped",
                    row.name,
                    promotion.version,
                    row.target_version,
                )
                continue
            changes = {
                # Kept even when malformed (cut to the column's size), so that the rollout
                # fails visibly with the reason instead of the event being dropped.
                "target_version": promotion.version[:32],
                "target_source": promotion.source[:4096],
                "target_run_id": promotion.run_id[:64],
                "target_time": when,
                # The rollout runs later, in a worker: it continues the promotion's trace.
                "target_traceparent": _current_traceparent(),
                # Naming a version again is how a failed one gets another try.
                "failed_version": "",
                "lookup_pending": False,
            }
            if changes["target_version"] == row.serving_version:
                changes["last_error"] = ""
            await self._store.update(
                session, row.name, state=state_of(row, **changes), updated_at=_now(), **changes
            )
            log.info(
                "deployment %s: target is now v%s (%s)",
                row.name,
                promotion.version,
                promotion.alias,
            )
        return count

    async def _resolve_alias(self, name: str) -> None:
        """Asks the registry where a new deployment's alias points, if still unknown (one
        question per deployment at a time: CreateDeployment and its worker share it)."""
        running = self._resolving.get(name)
        if running is None:
            running = asyncio.ensure_future(self._ask_registry(name))
            self._resolving[name] = running
            running.add_done_callback(lambda _: self._resolving.pop(name, None))
        await asyncio.shield(running)

    async def _ask_registry(self, name: str) -> None:
        async with self._db.read() as session:
            row = await self._store.get(session, name)
        if row is None or not row.lookup_pending:
            return
        try:
            ref = await self._registry.version_for_alias(row.model_name, row.alias)
        except Exception as exc:  # noqa: BLE001 - any failure: retry later with back-off
            delay = min(2 * self._lookup_retry_at.get(name, (0.0, 0.5))[1], 60.0)
            self._lookup_retry_at[name] = (time.monotonic() + delay, delay)
            log.warning(
                "deployment %s: cannot ask the registry (%s); retrying in %.0fs",
                name,
                _reason(exc),
                delay,
            )
            async with self._db.transaction() as session:
                await self._store.update(
                    session,
                    name,
                    last_error=f"registry: {_reason(exc)}"[:_MAX_REASON],
                    updated_at=_now(),
                )
            return
        self._lookup_retry_at.pop(name, None)
        async with self._db.transaction() as session:
            row = await self._store.get(session, name)
            if row is None or not row.lookup_pending:
                return  # a promotion got there first, and is newer
            changes: dict[str, Any] = {"lookup_pending": False, "last_error": ""}
            if ref is not None and VERSION.match(ref.version):
                changes.update(
                    target_version=ref.version,
                    target_source=ref.source,
                    target_run_id=ref.run_id,
                    target_time=_now(),
                    target_traceparent=_current_traceparent(),
                )
                log.info(
                    "deployment %s: %s@%s is v%s", name, row.model_name, row.alias, ref.version
                )
            else:
                log.info(
                    "deployment %s: %s@%s points nowhere yet; waiting for a promotion",
                    name,
                    row.model_name,
                    row.alias,
                )
            await self._store.update(
                session, name, state=state_of(row, **changes), updated_at=_now(), **changes
            )

    # -- inference routes ----------------------------------------------------------------------

    def route(self, name: str) -> Route | None:
        """Where inference for deployment ``name`` goes, or None (unknown or not serving)."""
        return self._routes.get(name)

    async def unroutable(self, name: str) -> PlinthError:
        """The error for inference on a deployment without a route."""
        if not DNS_LABEL.match(name):
            return NotFound("deployment", name[:80])
        async with self._db.read() as session:
            row = await self._store.get(session, name)
        if row is None:
            return NotFound("deployment", name)
        return Unavailable(f"deployment {name!r} has no version ready to serve (state {row.state})")

    async def exists(self, name: str) -> bool:
        """True when a deployment called ``name`` exists."""
        if not DNS_LABEL.match(name):
            return False
        async with self._db.read() as session:
            return await self._store.get(session, name) is not None

    # -- life cycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        """Starts reconciling in the background (after the model server is ready)."""
        self._reconciler = asyncio.create_task(self._run(), name="serving-reconciler")

    async def wait_started(self) -> None:
        """Waits until routes of the versions served before a restart are back."""
        await self._started.wait()

    async def stop(self) -> None:
        """Stops reconciling; a rollout in progress resumes after a restart."""
        tasks = [t for t in (self._reconciler, *self._workers.values()) if t is not None]
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
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=self._reconcile_interval_s)
            except TimeoutError:
                pass
            self._wake.clear()

    async def reconcile_once(self) -> None:
        """Starts a worker for each deployment that has work and no worker."""
        async with self._db.read() as session:
            rows = await self._store.needing_work(session)
        now = time.monotonic()
        for row in rows:
            retry_at = self._lookup_retry_at.get(row.name)
            if row.lookup_pending and not _needs_rollout(row) and retry_at and retry_at[0] > now:
                continue
            self._ensure_worker(row.name)

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
            rows = await self._store.serving(session)
        keep = set()
        for row in rows:
            model = triton_model_name(row.name, row.serving_version)
            try:
                if not await asyncio.to_thread(self._repository.exists, model):
                    raise FileNotFoundError(f"{model} is missing from the repository")
                await self._models.load(model)
            except Exception as exc:  # noqa: BLE001 - roll the target out again instead
                log.warning(
                    "deployment %s: cannot restore v%s (%s); rolling out again",
                    row.name,
                    row.serving_version,
                    _reason(exc),
                )
                async with self._db.transaction() as session:
                    await self._store.update(
                        session,
                        row.name,
                        serving_version="",
                        serving_io="",
                        state=state_of(row, serving_version=""),
                        updated_at=_now(),
                    )
                continue
            keep.add(model)
            self._routes[row.name] = self._route(
                row.name, row.serving_version, ModelIO.from_json(row.serving_io), row.max_batch_size
            )
        for model in await asyncio.to_thread(self._repository.models):
            if model not in keep:
                await self._discard(model)
        log.info("restored %d deployments", len(keep))

    # -- rollouts ------------------------------------------------------------------------------

    async def _work(self, name: str) -> None:
        try:
            while True:
                async with self._db.read() as session:
                    row = await self._store.get(session, name)
                if row is None:
                    await self._purge(name)
                    return
                if row.lookup_pending and not row.target_version:
                    await self._resolve_alias(name)
                    async with self._db.read() as session:
                        row = await self._store.get(session, name)
                    if row is None:
                        continue
                    if row.lookup_pending:
                        return  # the registry did not answer; the reconciler retries later
                if not _needs_rollout(row):
                    if row.loading_version:
                        await self._settle(name)
                    return
                async with self._parallel:
                    await self._roll_out(row)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("deployment %s: rollout worker failed", name)

    async def _roll_out(self, row: DeploymentRow) -> None:
        with tracer.start_as_current_span(
            f"deployment {row.name} rollout",
            context=extract({"traceparent": row.target_traceparent}),
            attributes={"plinth.deployment": row.name, "plinth.model.version": row.target_version},
        ):
            await self._roll_out_traced(row)

    async def _roll_out_traced(self, row: DeploymentRow) -> None:
        name, version = row.name, row.target_version
        async with self._db.transaction() as session:
            current = await self._store.get(session, name)
            if current is None or current.target_version != version:
                return
            await self._store.update(
                session,
                name,
                loading_version=version,
                state=DeploymentState.LOADING.value,
                updated_at=_now(),
            )
        log.info("deployment %s: loading v%s from %s", name, version, row.target_source)
        started = time.monotonic()
        model = ""
        try:
            model = triton_model_name(name, version)
            io = await self._build(model, row)
            await self._models.load(model)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - every failure ends the same way
            await self._fail(name, version, model, _reason(exc))
            return
        log.info("deployment %s: v%s loaded in %.1fs", name, version, time.monotonic() - started)
        async with self._db.transaction() as session:
            current = await self._store.get(session, name)
            switched = current is not None and current.target_version == version
            if switched and current is not None:
                changes = {
                    "serving_version": version,
                    "serving_io": io.to_json(),
                    "loading_version": "",
                    "failed_version": "",
                    "last_error": "",
                }
                updated = await self._store.update(
                    session, name, state=state_of(current, **changes), updated_at=_now(), **changes
                )
                assert updated is not None
                await self._events.ready(session, updated, version)
                await self._events.traffic_changed(session, updated, {version: 100})
        if not switched:
            log.info("deployment %s: v%s is stale (target moved on); dropping it", name, version)
            if current is None or current.serving_version != version:
                await self._discard(model)
            return
        old = self._routes.get(name)
        self._routes[name] = self._route(name, version, io, row.max_batch_size)
        log.info("deployment %s: traffic moved to v%s", name, version)
        if old is not None and old.triton_model != model:
            await asyncio.sleep(self._unload_grace_s)
            await self._discard(old.triton_model)

    async def _build(self, model: str, row: DeploymentRow) -> ModelIO:
        """Downloads the version and writes its Triton model into the repository."""
        staging = await asyncio.to_thread(self._repository.new_staging, model)
        try:
            downloaded = await self._artifacts.download(row.target_source, staging / "download")
            io = await asyncio.to_thread(read_model_io, downloaded)
            await asyncio.to_thread(
                self._repository.install, model, staging, downloaded, io, batching_of(row)
            )
            return io
        finally:
            await asyncio.to_thread(self._repository.discard_staging, staging)

    async def _fail(self, name: str, version: str, model: str, reason: str) -> None:
        log.warning("deployment %s: v%s failed: %s", name, version, reason)
        route = self._routes.get(name)
        if model and (route is None or route.triton_model != model):
            await self._discard(model)
        async with self._db.transaction() as session:
            current = await self._store.get(session, name)
            if current is None:
                return
            changes: dict[str, Any] = {
                "loading_version": "",
                "last_error": f"v{version}: {reason}"[:_MAX_REASON],
            }
            if current.target_version == version:
                changes["failed_version"] = version
            updated = await self._store.update(
                session, name, state=state_of(current, **changes), updated_at=_now(), **changes
            )
            assert updated is not None
            await self._events.failed(session, updated, version, reason)

    async def _settle(self, name: str) -> None:
        async with self._db.transaction() as session:
            current = await self._store.get(session, name)
            if current is not None:
                await self._store.update(
                    session, name, loading_version="", state=state_of(current), updated_at=_now()
                )

    async def _purge(self, name: str) -> None:
        """Unloads and removes every model of a deleted deployment."""
        self._routes.pop(name, None)
        for model in await asyncio.to_thread(self._repository.models_of, name):
            await self._discard(model)
        log.info("deployment %s: deleted and unloaded", name)

    async def _discard(self, model: str) -> None:
        try:
            await self._models.unload(model)
        except Exception as exc:  # noqa: BLE001 - the folder goes anyway; Triton forgets on restart
            log.warning("cannot unload %s: %s", model, _reason(exc))
        await asyncio.to_thread(self._repository.remove, model)

    @staticmethod
    def _route(name: str, version: str, io: ModelIO, max_batch_size: int) -> Route:
        return Route(
            deployment=name,
            version=version,
            triton_model=triton_model_name(name, version),
            io=io,
            max_batch_size=max_batch_size,
        )
